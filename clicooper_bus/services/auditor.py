"""The auditor process: audits a run, live (`--follow`) or finished (a run directory).

`--follow` joins the run's broker as a silent observer: it needs no key and sends nothing. It
announces itself with a subscription (`run/<id>/watching/<name>`), so the notary keeps the run
open until it is done; it witnesses every checkpoint the notary publishes (checking the
notary's signature on each note) and, once the closing one arrives (the notary appends nothing
after it), audits the log against that witnessed checkpoint, writes `<run_dir>/audit/`, and
signals `run/<id>/done/<name>`.

    python -m clicooper_bus.services.auditor --follow --config FILE [--force]
    python -m clicooper_bus.services.auditor RUN_DIR [--force]        (the same as `clicooper audit RUN_DIR`)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import zmq

from clicooper_bus import __version__
from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.protocol import CheckpointMessage, Topics
from clicooper_bus.services.common import (
    EXIT_FAIL,
    EXIT_OK,
    broker_key,
    identity,
    load,
    open_roster,
    openmp_policy,
    public,
    run_main,
)
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin


class Follower:
    """Witnesses a live run's checkpoints until the notary closes the log."""

    def __init__(self, cfg: RunConfig, name: str, log):
        self.cfg, self.name, self.log = cfg, name, log
        self.notary = public(cfg, cfg.participants.notary)
        self.owner = public(cfg, cfg.participants.owner)
        self.origin = default_origin(cfg.run.id)
        # the owner's roster binds every later message to the run's nonce (the owner starts
        # only once we watch, so it comes after our subscription)
        self.verifier = Verifier({k.key_id: k for k in (self.notary, self.owner)}, cfg.run.id,
                                 partial=True, roster_first=True)
        self.bound = False
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        broker = broker_key(cfg)
        if broker is not None:  # the observer's own key: the broker admits only members
            make_client(self.sub, identity(cfg, name), broker)
        self.sub.connect(cfg.bus.sub)
        self.topics = Topics(cfg.run.id)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.topics.kind("roster"))
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.topics.kind("checkpoint"))
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.topics.watching(name))

    def closing_checkpoint(self) -> str:
        """Block until the notary's closing checkpoint (the log is closed: nothing is appended
        after it); every earlier one is checked on the way.
        A run that publishes no checkpoint for the join timeout is taken for dead."""
        quiet = self.cfg.bus.join_timeout_s + self.cfg.log.checkpoint_seconds
        last, seen = time.monotonic(), 0
        print(f"auditor: following run '{self.cfg.run.id}' on {self.cfg.bus.sub}", flush=True)
        while True:
            if not self.sub.poll(1000):
                if time.monotonic() - last > quiet:
                    raise ClicooperError(
                        f"no checkpoint from the notary for {quiet:.0f} s: the run is not "
                        f"running or has died; audit it offline once it has ended: "
                        f"clicooper audit {self.cfg.run_dir}")
                continue
            frames = self.sub.recv_multipart(copy=True)
            try:  # only the notary's signed, in-order messages count (no replayed "closed")
                env = self.verifier.verify_frames(frames)
                if env.header.kind == "roster":
                    self._bind(env)
                    continue
                if env.header.kind != "checkpoint" or env.header.sender != self.notary.key_id:
                    continue
                msg = CheckpointMessage.parse(env.document(), sender=self.cfg.participants.notary)
                cp = open_checkpoint(msg.note, self.notary, self.origin)
            except ClicooperError as exc:
                self.log.warning("message refused", error=str(exc))
                print(f"auditor: refused a message on the checkpoint topic: {exc}", flush=True)
                continue
            last, seen = time.monotonic(), seen + 1
            self.log.info("checkpoint witnessed", size=cp.size, final=msg.final, closed=msg.closed)
            if msg.closed:
                print(f"auditor: the notary closed the log (tree size {cp.size}, {seen} "
                      f"checkpoints witnessed); auditing", flush=True)
                self.sub.setsockopt_string(zmq.UNSUBSCRIBE, self.topics.kind("checkpoint"))
                return msg.note

    def _bind(self, env) -> None:
        """Take the owner's first valid roster: from then on only messages of its run count."""
        roster = None if self.bound else open_roster(env, self.owner, self.log)
        if roster is not None and roster.run_id == self.cfg.run.id:
            self.verifier.use_roster(roster)
            self.bound = True
            self.log.info("roster witnessed", nonce=roster.nonce.hex())

    def done(self) -> None:
        """Tell the notary we are finished, give the subscription time to travel, leave."""
        self.sub.setsockopt_string(zmq.SUBSCRIBE, self.topics.done(self.name))
        time.sleep(0.5)
        self.sub.close()
        self.ctx.term()


def _report(attacked: bool, where: Path, doc: dict) -> int:
    from clicooper_bus.audit.report import print_audit

    print_audit(attacked, where, doc)
    return EXIT_OK if attacked else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("run_dir", nargs="?", help="audit this finished run (offline)")
    p.add_argument("--follow", action="store_true", help="follow the live run of --config")
    p.add_argument("--config", help="run config (TOML) of the run to follow")
    p.add_argument("--name", default="auditor", help="this observer's name on the bus")
    p.add_argument("--force", action="store_true",
                   help="attack even a log that does not verify (the report says so first)")
    p.add_argument("--attacks", help="comma-separated attack names (default: the whole suite)")
    args = p.parse_args(argv)
    if args.follow == bool(args.run_dir) or (args.follow and not args.config):
        p.error("give either RUN_DIR, or --follow with --config")
    # passive: scikit-learn ships its own libgomp, whose idle worker (after the first k-means)
    # spun beside torch's threads under ACTIVE and made every later torch attack 2.5x slower
    # (white-box decoder 114 s against 45 s passive, docs/BENCHMARKS.md)
    openmp_policy("PASSIVE")

    def body(log) -> int:
        from clicooper_bus.audit.report import audit_and_write  # imports torch
        from clicooper_bus.ml.attacks import select

        attacks = select(args.attacks)  # a bad name fails now, not after the run
        if not args.follow:
            return _report(*audit_and_write(Path(args.run_dir), force=args.force,
                                            attacks=attacks))
        cfg = load(args)
        follower = Follower(cfg, args.name, log)
        try:
            note = follower.closing_checkpoint()
            owner = public(cfg, cfg.participants.owner)
            result = audit_and_write(cfg.run_dir, force=args.force, owner=owner,
                                     witnessed=[note], attacks=attacks)
        finally:
            follower.done()
        return _report(*result)

    return run_main("auditor", body, argv)


if __name__ == "__main__":
    sys.exit(main())
