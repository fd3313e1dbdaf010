"""How the owner ends a run, as a part of `process.Owner`: a finished run's last exchange (its
usage, the ack, the notary's final checkpoint and certificates) and what it writes
(`summary.json` with the CPU table, the compute plan, the privacy spent and the replays, the
provenance bundle); a run stopped early (a refusal, a peer gone) with its reason and no model.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from clicooper_bus.layout import write_atomic
from clicooper_bus.ml.compute import compute_plan
from clicooper_bus.ml.privacy import defences as privacy
from clicooper_bus.net.bus import BusError
from clicooper_bus.plan import schedule
from clicooper_bus.protocol import Ack, End, Usage, cpu_table
from clicooper_bus.services.common import EXIT_STOPPED
from clicooper_bus.services.owner import artefacts
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin

# how long the owner waits, once the notary's final checkpoint is in, for a usage report that
# has not come: each comes before its sender's segment or final checkpoint, so one missing then
# was never sent (a trainer from before usage reports); the summary names it
USAGE_WAIT_S = 2.0
CPU_NOTE = ("time.process_time() of each process (user + system CPU seconds of all its threads), "
            "from its signed usage message in the log; train_cpu_s spans its first training "
            "step's start to its last one's end; the notary's cpu_s runs to the owner's ack; "
            "the broker's cpu_s is in its telemetry line 'broker stopped' (telemetry/broker.jsonl)")


class Ending:
    """The ending methods of `process.Owner` (a mixin: it uses the owner's bus, loop, books,
    training, setup, layout and stages)."""

    def _stop(self, stopped: dict, text: str, wall: float, gone: list[str] = ()) -> int:
        """Stop the run cleanly on a refusal or on peers `gone` (silent past the rejoin
        timeout): nothing more is trained, no model is saved or certified. Tell everyone (`end`
        with `stopped`; the notary, unless gone, signs a final checkpoint over what it logged),
        write `checkpoint.txt` and `summary.json` with the reason under `stopped`, and leave
        once the notary closes the log. Returns EXIT_STOPPED."""
        print(f"owner: error: {text}; the run stops: no model is saved (summary.json says "
              f"why)", file=sys.stderr, flush=True)
        self.log.error("run stopped", **stopped)
        bus, books, notary = self.bus, self.books, self.cfg.participants.notary
        self.loop.only("checkpoint", "tip")  # nothing poisoned is taken any more
        bus.unwatch(gone)  # the run ends without them
        cp = None
        try:
            if self.chain_ready:
                bus.send_doc("end", "all", End(f"stopped: {text}", stopped=True).to_doc())
            else:  # a resumed owner before it took its chain up: what it signed would fork it
                self.log.warning("stopped before our chain was taken up: nothing sent")
            if notary not in gone and self.chain_ready:
                self.loop.until(lambda: books.final_note is not None,
                                timeout_s=self.cfg.bus.step_timeout_s, timed_out=None)
        except BusError as exc:  # a peer (or the broker) died meanwhile: write what we have
            self.log.warning("no final checkpoint", error=str(exc))
        if books.final_note is not None:
            cp = open_checkpoint(books.final_note, self.notary_key, default_origin(self.cfg.run.id))
            write_atomic(self.layout.checkpoint, books.final_note)
        setup = self.setup
        summary = {
            "run_id": self.cfg.run.id, "dataset": setup.data.name, "model": setup.spec.name,
            "stages": self.stages, "cuts": list(setup.cuts), "stopped": stopped,
            "epochs": len(self.per_epoch), "steps": len(books.metrics),
            "test_accuracy": None, "per_epoch": self.per_epoch, "wall_s": wall,
            "final_checkpoint": {"size": cp.size, "root": cp.root.hex()} if cp else None,
            "model_file": None, "replays": self._replays()}
        summary.update(self._withhold_model(stopped))
        artefacts.write_summary(self.layout, summary)
        print(f"owner: wrote {self.layout.summary} (stopped); no model", flush=True)
        bus.watch({})
        bus.mark_done()
        if cp is not None:
            bus.linger(bus.topics.closed(notary), (self.kid[notary], notary))
            bus.forget_sent()  # the log is closed: a stopped run is not resumed
        return EXIT_STOPPED

    def _withhold_model(self, stopped: dict) -> dict:
        """A run stopped after the model was assembled (its digest may already be in the log,
        in the ack) delivers no model: `model.safetensors` is renamed to
        `model.undelivered.safetensors` (kept, the weights were checked finite, but nothing
        reads it as the run's model and no provenance bundle certifies it), and the summary
        says so. Returns the summary's entry (empty when no model was written)."""
        model = self.layout.model
        if not model.exists():
            return {}
        kept = model.with_name("model.undelivered.safetensors")
        model.replace(kept)
        sha = getattr(self, "model_sha", None)  # None: a resumed owner's dead process wrote it
        self.log.warning("model withheld", file=kept.name, sha256=sha)
        return {"undelivered_model": {
            "file": kept.name, "sha256": sha,
            "why": f"the run stopped after the model was assembled ({stopped.get('problem')}): "
                   f"it is not delivered and not certified"}}

    def _finish(self, per_epoch: list[dict], steps: int, sent: dict[str, int], t0: float) -> None:
        """Acknowledge, receive what the run still owes (the notary's final checkpoint, the
        watermark certificates, the usage reports), and only then write the certified
        artefacts: a refusal while receiving (PoisonedInput, Refused) leaves nothing certified
        written, and the caller stops the run cleanly."""
        bus, books = self.bus, self.books
        sent = {k: v for k, v in sent.items() if k != "beat"}
        # the owner's measured CPU goes into the log beside the trainers' (an auditor trusts only
        # the log), before the ack so that the final checkpoint covers it
        own = self.training.meter.usage()
        bus.send_doc("usage", "all", own.to_doc())
        sent["usage"] = sent.get("usage", 0) + 1
        # the model's digest goes into the log, so an auditor can tell it is this run's model
        bus.send_doc("ack", "all", Ack(self.stages, self.model_sha).to_doc())
        sent["ack"] = sent.get("ack", 0) + 1
        self.until("the notary's final checkpoint", lambda: books.final_note is not None)
        cp = open_checkpoint(books.final_note, self.notary_key, default_origin(self.cfg.run.id))
        bus.watch({})  # from here on peers leave as they finish
        if self.cfg.watermark.enabled:
            want = {(k, t) for k in range(1, len(self.stages) + 1) for t in range(self.rounds)}
            self.until("the notary's watermark certificates", lambda: want <= set(books.certs))
        cpu = self._cpu(own)  # the last receiving
        self.loop.only()  # nothing more is taken: what follows only writes
        write_atomic(self.layout.checkpoint, books.final_note)
        if self.cfg.watermark.enabled:
            self._write_provenance()
        summary = self._summary(per_epoch, steps, sent, time.perf_counter() - t0, cp)
        summary["cpu"] = cpu
        summary["owner_cpu_share"] = summary["cpu"]["owner_cpu_share"]
        artefacts.write_summary(self.layout, summary)
        print(f"owner: test accuracy {per_epoch[-1].get('accuracy', float('nan')):.4f}; wrote "
              f"{self.layout.summary} and model.safetensors; log tree size {cp.size}", flush=True)
        print(f"owner: the owner did {summary['owner_flops_share']:.1%} of the training FLOPs "
              f"(`clicooper plan` for the table) and {self._cpu_text(summary['cpu'])}", flush=True)
        bus.mark_done()
        notary = self.cfg.participants.notary
        bus.linger(bus.topics.closed(notary), (self.kid[notary], notary))
        bus.forget_sent()  # a finished run is not resumed

    def _cpu(self, own: Usage) -> dict:
        """The summary's `cpu` table: every process's measured CPU, from its usage report (the
        owner's own, and the trainers' and notary's as their signed messages said); waits at
        most `USAGE_WAIT_S` for a report that has not come, and names it under `missing`."""
        p, books = self.cfg.participants, self.books
        others = [*self.stages, p.notary]
        self.loop.until(lambda: set(others) <= set(books.usage), timeout_s=USAGE_WAIT_S,
                        timed_out=None)
        missing = sorted(set(others) - set(books.usage))
        if missing:
            self.log.warning("no usage report", missing=missing)
        reports = [(p.owner, "owner", own), *((n, "trainer", books.usage.get(n))
                                              for n in self.stages),
                   (p.notary, "notary", books.usage.get(p.notary))]
        table = cpu_table(reports)
        self.log.info("measured cpu", processes=table["processes"],
                      owner_cpu_share=table["owner_cpu_share"], missing=table["missing"])
        return {**table, "clock": CPU_NOTE}

    @staticmethod
    def _cpu_text(cpu: dict) -> str:
        """The console's words for the measured CPU share."""
        if cpu["owner_cpu_share"] is None:
            why = (f"no usage report from {', '.join(cpu['missing'])}" if cpu["missing"] else
                   f"a step count that is not the owner's from {', '.join(cpu['implausible'])}")
            return f"no measured CPU share: {why}"
        owner, trainers = (sum(r["train_cpu_s"] for r in cpu["processes"] if r["role"] == role)
                           for role in ("owner", "trainer"))
        return (f"{cpu['owner_cpu_share']:.1%} of the training CPU as self-reported (owner "
                f"{owner:.1f} s, trainers {trainers:.1f} s, CPU seconds over the training steps)")

    def _write_provenance(self) -> None:
        artefacts.write_provenance(
            self.layout, cfg=self.cfg, stages=self.stages, rounds=self.rounds,
            roster_bytes=self.roster_bytes, certs=self.books.certs, final_note=self.books.final_note,
            handovers=self.handovers,
            checkpoints=self.books.checkpoints, model_sha=self.model_sha, owner=self.ident.public,
            notary=self.notary_key)

    def _summary(self, per_epoch: list[dict], steps: int, sent: dict[str, int], wall: float,
                 cp) -> dict:
        cfg, setup = self.cfg, self.setup
        # measured after training: the counting step builds segments of its own (a batch of 8
        # is exact, the count being linear in the batch)
        compute = compute_plan(setup.spec, tuple(setup.plan.cuts), tail=setup.plan.tail,
                               batch_size=8, trainers=self.stages, seed=cfg.run.seed).to_json()
        if setup.defences.codec is not None:  # the last stage only knows the pseudo-labels
            for row in per_epoch:
                row["train_accuracy_on"] = "pseudo-labels"
        return {
            "run_id": cfg.run.id, "dataset": setup.data.name, "model": setup.spec.name,
            "stages": self.stages, "cuts": list(setup.cuts), "epochs": len(per_epoch),
            "steps": steps, "in_flight": cfg.run.in_flight,
            "schedule": schedule(cfg.run.in_flight, setup.defences.head_fixed),
            "test_accuracy": per_epoch[-1].get("accuracy"),  # None: never evaluated
            "per_epoch": per_epoch, "messages": dict(sorted(sent.items())), "wall_s": wall,
            "final_checkpoint": {"size": cp.size, "root": cp.root.hex()},
            "owner_flops_share": compute["owner_share"], "compute": compute,
            "model_file": self.layout.model.name, "model_sha256": self.model_sha,
            "privacy": {"configuration": privacy.describe(cfg.privacy),
                        "settings": dataclasses.asdict(cfg.privacy),
                        "spent": privacy.spent(cfg.privacy, cfg.run.epochs, len(per_epoch),
                                               self.evaluations, setup.data.classes)},
            "replays": self._replays(),
        }

    def _replays(self) -> dict[str, int]:
        """What rollbacks cost and what was checked: steps trained again, and the trainers'
        messages received again, equal to the first (with in_flight 1 every one is, or the run
        stopped) or not."""
        b = self.books
        return {"rollbacks": self.rollbacks, "steps_trained_again": b.replayed_steps,
                "messages_compared": b.replays_compared + b.replays_differing,
                "messages_differing": b.replays_differing}
