"""The owner process: holds the data, the labels and the head; drives the run.

It publishes the signed roster (with the training plan), waits until every trainer has joined,
then per step: head forward, activation to stage 1, labels to the last stage, gradient back from
stage 1, head step (pipelined, `[run] in_flight` > 1: up to N steps' forwards out before the
oldest one's gradient is taken in). After each epoch it evaluates on the test set through the
same chain. At the end it collects every trainer's sealed segment, assembles and saves the
model (safetensors), acknowledges, waits for the notary's final checkpoint and writes
`summary.json`.

    python -m clicooper_bus.services.owner --config FILE
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque

from clicooper_bus.services import USER_OMP_POLICY
from clicooper_bus.services.common import configured_in_flight

if not USER_OMP_POLICY and configured_in_flight(sys.argv) > 1:
    # pipelined, the head computes almost without pause: OpenMP's own short spin between
    # operations beat passive waiting by about 4 % an epoch (tools/bench_bus.py). A synchronous
    # owner waits for every step's gradients, and passive waiting leaves the cores to the chain.
    os.environ.pop("OMP_WAIT_POLICY", None)

import numpy as np  # noqa: E402
import torch  # noqa: E402  (after the OpenMP policy)
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from clicooper_bus.chain.certificate import open_certificate
from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError, ConfigError
from clicooper_bus.ml.data import batch_order, load_dataset, to_float
from clicooper_bus.ml.models import (
    build_segments,
    check_cuts,
    default_cuts,
    model_spec,
    state_dict_with_prefix,
    tail_start,
)
from clicooper_bus.ml.privacy import defences as privacy
from clicooper_bus.ml.privacy.nopeek import distance_correlation
from clicooper_bus.ml.privacy.release import inference_model
from clicooper_bus.ml.privacy.secret import load_or_create, run_key
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.tensors import tensor
from clicooper_bus.net.bus import Bus, BusError
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope
from clicooper_bus.plan import Plan, schedule
from clicooper_bus.services.common import (
    EXIT_OK,
    base_parser,
    identity,
    load,
    open_bus,
    public,
    run_main,
    set_threads,
)
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin

EVAL_WINDOW = 8  # evaluation batches in flight (no gradients flow back, so they pipeline)
MAX_STASH = 4 * EVAL_WINDOW  # messages kept for later; more means a peer floods the owner


class Owner:
    def __init__(self, cfg: RunConfig, log):
        self.cfg, self.log = cfg, log
        p = cfg.participants
        self.ident = identity(cfg, p.owner)
        self.trainer_keys = [public(cfg, n) for n in p.trainers]
        self.notary_key = public(cfg, p.notary)
        data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed)
        self.data = data.limit(cfg.data.train_limit or None, cfg.data.test_limit or None)
        pv = cfg.privacy
        # the secret, through a fresh key of this run, keys the noise and the pseudo-labels;
        # it never leaves the key directory
        secret = run_key(load_or_create(p.keys, p.owner), cfg.run.id) if pv.on else None
        classes = self.data.classes
        self.spec = model_spec(cfg.model.name, self.data.input_shape, classes * pv.label_gamma)
        k, tail = len(p.trainers), tail_start(self.spec) if pv.owner_tail else 0
        self.cuts = check_cuts(self.spec, tuple(cfg.model.cuts), k, tail) if cfg.model.cuts \
            else default_cuts(self.spec, k, tail)
        self.plan = Plan(self.spec.name, self.data.input_shape, classes, self.cuts,
                         cfg.run.seed, cfg.run.lr, cfg.run.batch_size,
                         outputs=classes * pv.label_gamma if pv.label_gamma > 1 else 0, tail=tail,
                         in_flight=cfg.run.in_flight)
        self.segments = build_segments(self.spec, self.plan.segment_cuts, cfg.run.seed)
        self.defences = privacy.Defences.build(pv, secret, classes, cfg.run.epochs)
        self.head = SegmentTrainer(self.segments[0], lr=cfg.run.lr, is_head=True,
                                   stash=cfg.run.in_flight > 1 and not self.defences.head_fixed)
        self.head.warm_up((cfg.run.batch_size, *self.data.input_shape))
        if pv.nopeek:
            self.head.penalty = lambda x, a: pv.nopeek * distance_correlation(x, a)
        self.tail = SegmentTrainer(self.segments[-1], lr=cfg.run.lr) if tail else None
        self.roster = Roster.build(
            cfg.run.id, owner=self.ident.public, trainers=self.trainer_keys, notary=self.notary_key,
            meta={"plan": self.plan.to_meta(), "model_spec": self.spec.digest(self.plan.segment_cuts),
                  "config": cfg.digest(), "dataset": self.data.name, "model": self.spec.name,
                  **self._watermark_meta(cfg, len(self.data.x_train))})
        self.run_dir = cfg.run_dir
        for existing in ("summary.json", "log"):
            if (self.run_dir / existing).exists():
                raise ConfigError(f"{self.run_dir / existing} exists: a run with id "
                                  f"'{cfg.run.id}' was already made here; choose another run id "
                                  f"or remove {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # what the auditor loads the run's data from; the roster commits to its digest
        (self.run_dir / "config.toml.tmp").write_text(cfg.to_toml())
        (self.run_dir / "config.toml.tmp").replace(self.run_dir / "config.toml")
        self.bus: Bus = open_bus(cfg, self.ident, Verifier(self.roster, cfg.run.id, partial=True))
        self.stages = list(self.roster.stages)
        self.kid = {m.name: m.key_id for m in self.roster.members}
        self.names = {v: k for k, v in self.kid.items()}
        self.metrics: dict[int, dict] = {}
        self.stash: list[Envelope] = []
        # who may send the owner each kind of message it keeps for later
        self.expected = {"bwd": {self.stages[0]}, "eval_out": {self.stages[-1]},
                         "segment": set(self.stages), "hello": set(self.stages)}
        if self.tail is not None:  # the last stage's outputs come back to the owner's tail
            self.expected.update({"fwd": {self.stages[-1]}, "eval_fwd": {self.stages[-1]}})
        self.final_note: str | None = None
        self.wm_on = cfg.watermark.enabled
        self.wm_commits: dict[tuple[int, int], dict] = {}
        self.wm_claims: dict[tuple[int, int], dict] = {}
        self.certs: dict[tuple[int, int], bytes] = {}
        self.rounds = 0
        self.checkpoints: list[str] = []
        self.evaluations = 0

    @staticmethod
    def _watermark_meta(cfg: RunConfig, n_train: int) -> dict[str, str]:
        """The watermark settings the owner signs into the roster, with the number of rounds
        the run will have, so that a bundle missing its last rounds cannot pass for whole."""
        w = cfg.watermark
        if not w.enabled:
            return {}
        rounds = cfg.run.epochs
        if cfg.run.max_steps:
            per_epoch = -(-n_train // cfg.run.batch_size)
            rounds = min(rounds, -(-cfg.run.max_steps // per_epoch))
        return {"watermark": json.dumps({"bits": w.bits, "strength": w.strength,
                                         "threshold": w.threshold, "rounds": rounds},
                                        sort_keys=True)}

    # --- bus helpers -------------------------------------------------------------------------

    def _wait(self, what: str, match) -> Envelope:
        """The first message `match` accepts; others are handled or stashed meanwhile."""
        for i, env in enumerate(self.stash):
            if match(env):
                return self.stash.pop(i)
        bus = self.bus
        deadline = time.monotonic() + self.cfg.bus.step_timeout_s
        while True:
            if time.monotonic() > deadline:  # checked on every pass: beats keep arriving
                raise BusError(f"waited {self.cfg.bus.step_timeout_s:.0f} s for {what} while "
                               f"everyone is alive: a message was lost or a peer is stuck")
            env = bus.recv(1.0)
            if env is None:
                continue
            kind, sender = env.header.kind, self.names.get(env.header.sender)
            if kind == "metrics" and sender == self.stages[-1]:
                self._note_metrics(env)
            elif kind == "checkpoint":
                self._note_checkpoint(env)
            elif kind in ("wm_commit", "wm_claim", "wm_cert"):
                self._note_watermark(env, sender)
            if match(env):
                return env
            if sender in self.expected.get(kind, ()):
                if len(self.stash) >= MAX_STASH:
                    raise ClicooperError(f"{sender} sent more {kind} messages than the protocol "
                                         f"allows in flight")
                self.stash.append(env)

    def _note_metrics(self, env: Envelope) -> None:
        doc, step = env.document(), env.header.step
        if type(doc) is not dict or type(doc.get("loss")) is not float or \
                type(doc.get("correct")) is not int or step is None or step in self.metrics:
            raise ClicooperError(f"{self.stages[-1]} sent malformed or repeated metrics for step "
                                 f"{step}")
        self.metrics[step] = doc

    def _note_checkpoint(self, env: Envelope) -> None:
        if env.header.sender != self.kid[self.cfg.participants.notary]:
            return
        doc = env.document()
        if type(doc) is not dict or type(doc.get("note")) is not str:
            raise ClicooperError("the notary sent a malformed checkpoint message")
        open_checkpoint(doc["note"], self.notary_key, default_origin(self.cfg.run.id))
        self.checkpoints.append(doc["note"])  # trainers key their marks to these roots
        if doc.get("final") is True:
            self.final_note = doc["note"]

    def _note_watermark(self, env: Envelope, sender: str | None) -> None:
        doc = env.document()
        if type(doc) is not dict:
            raise ClicooperError(f"{sender} sent a malformed {env.header.kind} message")
        kind = env.header.kind
        if kind == "wm_cert" and sender == self.cfg.participants.notary:
            try:
                cert, _ = open_certificate(doc["certificate"], self.notary_key,
                                           default_origin(self.cfg.run.id))
            except (KeyError, TypeError, ClicooperError) as exc:
                raise ClicooperError(f"the notary sent a certificate that does not verify: "
                                     f"{exc}") from None
            self.certs[(cert.stage, cert.round)] = bytes(doc["certificate"])
        elif kind in ("wm_commit", "wm_claim") and sender in self.stages:
            if type(doc.get("round")) is not int:
                raise ClicooperError(f"{sender} sent a {kind} without a round number")
            stage = self.stages.index(sender) + 1
            key = (stage, doc["round"])
            (self.wm_commits if kind == "wm_commit" else self.wm_claims)[key] = doc

    def _wait_all(self, what: str, table: dict, round_: int) -> None:
        """Until every stage's message of `round_` is in `table`."""
        want = {(k, round_) for k in range(1, len(self.stages) + 1)}
        while not want <= set(table):
            self._wait(what, lambda e: want <= set(table))

    def _tensor(self, env: Envelope, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        """The body as a tensor, refusing one whose shape or dtype is not what the step needs."""
        h = env.header
        if h.shape != shape or h.dtype != dtype:
            raise ClicooperError(f"{self.names.get(h.sender, h.sender)} sent {h.kind} of "
                                 f"{h.dtype} {list(h.shape or ())} for step {h.step}, expected "
                                 f"{dtype} {list(shape)}")
        return tensor(env)

    def _batch_of(self, env: Envelope, n: int) -> torch.Tensor:
        """The last stage's output for the owner's tail: float32, one row per sample."""
        h = env.header
        if h.dtype != "float32" or not h.shape or h.shape[0] != n:
            raise ClicooperError(f"{self.names.get(h.sender, h.sender)} sent {h.kind} of "
                                 f"{h.dtype} {list(h.shape or ())} for step {h.step}, expected "
                                 f"float32 [{n}, ...]")
        return tensor(env)

    def _from(self, name: str, kind: str, step: int | None = None):
        kid = self.kid[name]
        return lambda e: (e.header.kind == kind and e.header.sender == kid
                          and (step is None or e.header.step == step))

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        try:
            t0 = time.perf_counter()
            self._join()
            per_epoch, step = [], 0
            for epoch in range(self.cfg.run.epochs):
                if self.wm_on:  # every trainer commits to its round key before the round
                    self.bus.send_doc("round", "all", {"round": epoch, "phase": "start"})
                    self._wait_all(f"watermark commitments of round {epoch}", self.wm_commits,
                                   epoch)
                row, step = self._train_epoch(epoch, step)
                if self.wm_on:  # ... and claims it once its last step is done
                    self.bus.send_doc("round", "all", {"round": epoch, "phase": "end"})
                    self._wait_all(f"watermark claims of round {epoch}", self.wm_claims, epoch)
                    self.rounds = epoch + 1
                stop = bool(self.cfg.run.max_steps) and step >= self.cfg.run.max_steps
                last = stop or epoch == self.cfg.run.epochs - 1  # the run ends: always evaluate
                every = self.cfg.run.eval_every
                on_chain = self.cfg.privacy.evaluate == "chain"
                if on_chain and (last or (every and (epoch + 1) % every == 0)):
                    row["accuracy"] = self._evaluate(epoch)
                    self.evaluations += 1
                per_epoch.append(row)
                self.log.info("epoch done", **row)
                print(f"epoch {epoch + 1}/{self.cfg.run.epochs}: loss {row['loss']:.4f}, "
                      f"train accuracy{' (on pseudo-labels)' if self.defences.codec else ''} "
                      f"{row['train_accuracy']:.4f}, "
                      f"{self._accuracy_text(row)}, {row['wall_s']:.1f} s", flush=True)
                if stop:
                    break
            sent = self._collect_segments()
            if self.cfg.privacy.evaluate == "owner":  # on the delivered model, nothing released
                per_epoch[-1]["accuracy"] = self._evaluate_locally()
                print(f"owner: test accuracy of the delivered model {per_epoch[-1]['accuracy']:.4f}",
                      flush=True)
            self._finish(per_epoch, step, sent, time.perf_counter() - t0)
            return EXIT_OK
        finally:
            self.bus.close()

    def _join(self) -> None:
        bus, run = self.bus, self.cfg.run.id
        for kind in ("bwd", "eval_out", "metrics", "segment", "fwd", "eval_fwd"):
            bus.subscribe(bus.topic(kind, self.cfg.participants.owner))
        for kind in ("hello", "checkpoint", "beat", "wm_commit", "wm_claim", "wm_cert"):
            bus.subscribe(f"run/{run}/{kind}/")
        bus.announce()
        everyone = self.stages + [self.cfg.participants.notary]
        print(f"owner: waiting for {', '.join(everyone)} to join run '{run}'", flush=True)
        bus.wait_for_subscribers("hello", everyone, self.cfg.bus.join_timeout_s)
        if self.cfg.participants.observers:  # so that the notary knows to wait for them
            bus.wait_for_subscribers("watching", self.cfg.participants.observers,
                                     self.cfg.bus.join_timeout_s)
        self.roster_bytes = self.roster.sign(self.ident)
        bus.send_bytes("roster", "all", self.roster_bytes)
        bus.start_beating()
        bus.watch({self.kid[n]: n for n in everyone})
        deadline = time.monotonic() + self.cfg.bus.join_timeout_s
        ready: set[str] = set()
        while ready != set(self.stages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(f"trainers {sorted(set(self.stages) - ready)} did not confirm the "
                               f"roster in time")
            env = bus.recv(min(left, 1.0))
            if env is not None and env.header.kind == "hello" and \
                    self.names.get(env.header.sender) in self.stages:
                name = self.names.get(env.header.sender)
                doc = env.document()
                if type(doc) is not dict or doc.get("model_spec") != self.roster.meta["model_spec"]:
                    raise ClicooperError(f"{name} built a different model ({doc})")
                if doc.get("in_flight", 1) != self.cfg.run.in_flight:
                    raise ClicooperError(
                        f"{name} follows a schedule of {doc.get('in_flight', 1)} batch(es) in "
                        f"flight, the roster asks for {self.cfg.run.in_flight}: a trainer "
                        f"older than pipelining? Update it, or set [run] in_flight = 1")
                ready.add(name)
            elif env is not None and env.header.kind == "checkpoint":
                self._note_checkpoint(env)
        self.log.info("everyone joined", trainers=self.stages)
        piped = f", {schedule(self.cfg.run.in_flight, self.defences.head_fixed)}" \
            if self.cfg.run.in_flight > 1 else ""
        print(f"owner: {len(self.stages)} trainers joined; training {self.spec.name} on "
              f"{len(self.data.x_train)} {self.data.name} images{piped}", flush=True)

    def _train_epoch(self, epoch: int, step: int) -> tuple[dict, int]:
        cfg, bus, first, last = self.cfg, self.bus, self.stages[0], self.stages[-1]
        batches = batch_order(len(self.data.x_train), cfg.run.batch_size, cfg.run.seed, epoch)
        t0, seen, report = time.perf_counter(), 0, max(1, len(batches) // 10)
        steps_before = step
        window: deque[tuple[int, np.ndarray, dict, tuple[int, ...]]] = deque()
        for b, idx in enumerate(batches):
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                break
            if len(window) == cfg.run.in_flight:  # pipelined: the oldest batch must finish
                self._complete(*window.popleft())
            meta = {"step": step, "batch": b, "epoch": epoch}
            act = self._release(self.data.x_train[idx], idx, step)
            bus.send_array("fwd", first, act, **meta)
            if self.tail is None:
                bus.send_array("labels", last, self._labels(idx), **meta)
            window.append((step, idx, meta, tuple(act.shape)))
            seen += len(idx)
            step += 1
            if (b + 1) % report == 0:
                latest = max((s for s in self.metrics if s >= steps_before), default=None)
                loss = self.metrics[latest]["loss"] if latest is not None else float("nan")
                print(f"  epoch {epoch + 1} step {b + 1}/{len(batches)} loss {loss:.4f} "
                      f"{seen / (time.perf_counter() - t0):,.0f} samples/s", flush=True)
        while window:  # an epoch ends with nothing in flight
            self._complete(*window.popleft())
        # the last metrics may still be on the way
        while any(s not in self.metrics for s in range(steps_before, step)):
            self._wait("training metrics", lambda e: e.header.kind == "metrics")
        ms = [self.metrics[s] for s in range(steps_before, step)]
        n = max(1, seen)
        sizes = [len(i) for i in batches[:step - steps_before]]
        return {"epoch": epoch, "loss": sum(m["loss"] * k for m, k in zip(ms, sizes, strict=True)) / n,
                "train_accuracy": sum(m["correct"] for m in ms) / n, "steps": step - steps_before,
                "wall_s": time.perf_counter() - t0}, step

    def _complete(self, step: int, idx: np.ndarray, meta: dict, shape: tuple[int, ...]) -> None:
        """The rest of a training step once its forward is out: the owner's tail (if it keeps
        one), then the gradients from the first stage into the head."""
        first = self.stages[0]
        if self.tail is not None:
            self._tail_step(idx, step, meta)
        env = self._wait(f"gradients of step {step} from {first}", self._from(first, "bwd", step))
        grad = self._tensor(env, shape, "float32")
        if not self.defences.head_fixed:
            self.head.backward(grad, step)

    def _accuracy_text(self, row: dict) -> str:
        if "accuracy" in row:
            return f"test accuracy {row['accuracy']:.4f}"
        if self.cfg.privacy.evaluate == "owner":
            return "test accuracy at the end, on the owner"
        return "not evaluated this epoch"

    def _release(self, images, idx, step: int) -> torch.Tensor:
        """The head's activation of one training batch, through the privacy filter."""
        d, x = self.defences, to_float(images)
        flt = d.filter
        if d.head_fixed:  # `once`: the fixed head and per-sample noise give the same release
            out = self.head.evaluate(x)
            return flt(out, ids=idx, split="train") if flt is not None else out
        post = (lambda a: flt(a, ids=idx, split="train", step=step)) if flt is not None else None
        return self.head.forward(x, step, post=post)

    def _labels(self, idx):
        y = self.data.y_train[idx]
        codec = self.defences.codec
        return codec.encode(idx, y) if codec is not None else y

    def _tail_step(self, idx, step: int, meta: dict) -> None:
        """Owner tail: the last stage's output comes back; the owner computes the loss and sends
        the gradient back down the chain."""
        last = self.stages[-1]
        env = self._wait(f"the output of step {step} from {last}", self._from(last, "fwd", step))
        self.tail.forward(self._batch_of(env, len(idx)), step)
        r = self.tail.loss_backward(torch.from_numpy(self.data.y_train[idx]).long(), step)
        self.bus.send_array("bwd", last, r.grad_in, **meta)
        self.metrics[step] = {"loss": r.loss, "correct": r.correct}

    def _decode(self, logits: torch.Tensor) -> torch.Tensor:
        codec = self.defences.codec
        return codec.decode(logits) if codec is not None else logits

    def _evaluate_locally(self) -> float:
        flt = self.defences.filter
        model = inference_model(self.segments, flt.spec if flt is not None else None)
        x, y, bs = self.data.x_test, self.data.y_test, self.cfg.run.batch_size
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), bs):
                pred = self._decode(model(to_float(x[i:i + bs]))).argmax(1).numpy()
                correct += int((pred == y[i:i + bs]).sum())
        return correct / max(1, len(x))

    def _evaluate(self, epoch: int) -> float:
        x, y, bs = self.data.x_test, self.data.y_test, self.cfg.run.batch_size
        batches = [(i, slice(i * bs, (i + 1) * bs)) for i in range((len(x) + bs - 1) // bs)]
        first, last = self.stages[0], self.stages[-1]
        correct, sent, done, seen = 0, 0, 0, set()
        while done < len(batches):
            while sent < len(batches) and sent - done < EVAL_WINDOW:
                i, sl = batches[sent]
                act, flt = self.head.evaluate(to_float(x[sl])), self.defences.filter
                if flt is not None:
                    ids = np.arange(sl.start, min(sl.stop, len(x)))
                    act = flt(act, ids=ids, split="test", step=epoch * len(batches) + i)
                self.bus.send_array("eval_fwd", first, act, step=i, batch=i, epoch=epoch)
                sent += 1
            env = self._wait("evaluation outputs", self._from(
                last, "eval_fwd" if self.tail is not None else "eval_out"))
            i = env.header.step
            if not (0 <= i < sent) or i in seen:
                self.log.warning("unexpected evaluation output ignored", step=i, sender=last)
                continue
            seen.add(i)
            sl = batches[i][1]
            if self.tail is not None:
                logits = self.tail.evaluate(self._batch_of(env, len(y[sl])))
            else:
                logits = self._tensor(env, (len(y[sl]), self.plan.n_outputs), "float32")
            correct += int((self._decode(logits).argmax(1).numpy() == y[sl]).sum())
            done += 1
        return correct / max(1, len(x))

    def _collect_segments(self) -> dict[str, int]:
        self.bus.send_doc("end", "all", {"reason": "training complete"})
        sent: dict[str, int] = dict(self.bus.sent)
        for i, name in enumerate(self.stages, start=1):
            env = self._wait(f"the segment of {name}", self._from(name, "segment"))
            doc = env.document()
            try:
                weights = st_load(self.ident.unseal(doc["sealed"]))
                self.segments[i].load_state_dict(weights, strict=True)
            except (KeyError, TypeError, RuntimeError, SafetensorError) as exc:
                raise ClicooperError(f"the segment {name} delivered does not fit stage {i}: "
                                     f"{exc}") from None
            for k, v in doc.get("sent", {}).items():  # counted before the segment was sent
                sent[k] = sent.get(k, 0) + int(v)
            sent["segment"] = sent.get("segment", 0) + 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tensors = state_dict_with_prefix(self.segments)
        if self.defences.codec is not None:
            self._write_groups(self.defences.codec.groups)
        save_file(tensors, self.run_dir / "model.safetensors",
                  metadata={"run_id": self.cfg.run.id, "model": self.spec.name,
                            "model_spec": self.roster.meta["model_spec"],
                            "cuts": json.dumps(list(self.plan.segment_cuts))})
        return sent

    def _write_groups(self, groups) -> None:
        """Which pseudo-class is which class, for the owner (and its auditor) only: not in the
        model file, which may be handed on, since with the log's pseudo-labels it would decode
        every retained label."""
        path = self.run_dir / "label_groups.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"groups": [int(g) for g in groups],
                       "note": "output (pseudo-class) -> true class; owner-only"}, f)

    def _finish(self, per_epoch: list[dict], steps: int, sent: dict[str, int], wall: float) -> None:
        bus = self.bus
        accuracy = per_epoch[-1].get("accuracy", float("nan"))
        sent = {k: v for k, v in sent.items() if k != "beat"}
        # the model's digest goes into the log, so an auditor can tell it is this run's model
        model_sha = hashlib.sha256((self.run_dir / "model.safetensors").read_bytes()).hexdigest()
        bus.send_doc("ack", "all", {"segments": self.stages, "model_sha256": model_sha})
        sent["ack"] = sent.get("ack", 0) + 1
        self._wait("the notary's final checkpoint",
                   lambda e: e.header.kind == "checkpoint" and self.final_note is not None)
        cp = open_checkpoint(self.final_note, self.notary_key, default_origin(self.cfg.run.id))
        bus.watch({})  # from here on peers leave as they finish
        (self.run_dir / "checkpoint.txt").write_text(self.final_note)
        if self.wm_on:
            self._write_provenance(model_sha)
        if self.defences.codec is not None:  # the last stage only knows the pseudo-labels
            for row in per_epoch:
                row["train_accuracy_on"] = "pseudo-labels"
        summary = {
            "run_id": self.cfg.run.id, "dataset": self.data.name, "model": self.spec.name,
            "stages": self.stages, "cuts": list(self.cuts), "epochs": len(per_epoch),
            "steps": steps, "in_flight": self.cfg.run.in_flight,
            "schedule": schedule(self.cfg.run.in_flight, self.defences.head_fixed),
            "test_accuracy": accuracy,
            "per_epoch": per_epoch, "messages": dict(sorted(sent.items())), "wall_s": wall,
            "final_checkpoint": {"size": cp.size, "root": cp.root.hex()},
            "model_file": "model.safetensors", "model_sha256": model_sha,
            "privacy": {"configuration": privacy.describe(self.cfg.privacy),
                        "settings": dataclasses.asdict(self.cfg.privacy),
                        "spent": privacy.spent(self.cfg.privacy, self.cfg.run.epochs,
                                               len(per_epoch),
                                               self.evaluations)},
        }
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        tmp.replace(self.run_dir / "summary.json")
        print(f"owner: test accuracy {accuracy:.4f}; wrote {self.run_dir}/summary.json and "
              f"model.safetensors; log tree size {cp.size}", flush=True)
        bus.mark_done()
        notary = self.cfg.participants.notary
        bus.linger(f"run/{self.cfg.run.id}/closed/notary", (self.kid[notary], notary))


    def _write_provenance(self, model_sha: str) -> None:
        """runs/<id>/provenance/: what `clicooper model verify` needs beside the model."""
        want = {(k, t) for k in range(1, len(self.stages) + 1) for t in range(self.rounds)}
        while not want <= set(self.certs):
            self._wait("the notary's watermark certificates", lambda e: want <= set(self.certs))
        out = self.run_dir / "provenance"
        (out / "certificates").mkdir(parents=True, exist_ok=True)
        (out / "roster.msgpack").write_bytes(self.roster_bytes)
        for (k, t), raw in sorted(self.certs.items()):
            (out / "certificates" / f"stage-{k}-round-{t}.cert").write_bytes(raw)
        (out / "checkpoint.txt").write_text(self.final_note)
        (out / "checkpoints.json").write_text(json.dumps(self.checkpoints, indent=1) + "\n")
        w = self.cfg.watermark
        manifest = {"format": "clicooper-provenance/1", "run_id": self.cfg.run.id,
                    "stages": self.stages, "rounds": self.rounds, "bits": w.bits,
                    "threshold": w.threshold, "model_sha256": model_sha,
                    "owner": self.ident.public.vkey, "notary": self.notary_key.vkey}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"owner: wrote {out} ({len(self.certs)} certificates)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)

    def body(log) -> int:
        cfg = load(args)
        set_threads(cfg.run.threads)
        return Owner(cfg, log).run()

    return run_main("owner", body, argv)


if __name__ == "__main__":
    sys.exit(main())
