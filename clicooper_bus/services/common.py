"""What every process does at start: read its config, set up telemetry and torch threads, load
its key, and open its bus connection; and how it stops: exit codes and signals."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

import structlog

from clicooper_bus import __version__, telemetry
from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError, RosterError
from clicooper_bus.net.admission import Member
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.identity import Identity, PublicIdentity, load_identity, load_public
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope

EXIT_OK, EXIT_FAIL, EXIT_TERMINATED = 0, 1, 143
# a run stopped early and cleanly on a refusal (poisoned input): the log closed and verifiable,
# `summary.json` written with the reason under `stopped`, no model saved or certified
EXIT_STOPPED = 3
_OMP_MARK = "CLICOOPER_OMP_DEFAULT"  # the value we set, so a child does not take it for a user's
# the cyclic garbage collector's thresholds in every process of a run (Python's: 700, 10, 10).
# Importing torch and the torch._dynamo its optimizers pull in makes about a million objects,
# and collecting them again and again as they are made took 0.6 s of each owner's, trainer's
# and auditor's start-up CPU (medians of 3: `import torch, torch._dynamo` 3.59 s, 2.95 s with
# these, 2.88 s with no collection at all). Nothing is computed differently: cyclic garbage is
# freed a little later.
GC_THRESHOLDS = (50_000, 20, 20)


def openmp_policy(policy: str | None) -> None:
    """Set this process's OpenMP wait policy (`PASSIVE`, `ACTIVE`, or None for OpenMP's own
    short spin) unless the user set OMP_WAIT_POLICY. Call at the start of a process's main,
    before torch is imported: libgomp reads it once, when it loads.

    Idle OpenMP threads spin by default and take cores from the other processes of a run; with
    six processes on two cores, passive waiting made an epoch about 8 % faster (measured with
    tools/bench_bus.py). A pipelined owner takes OpenMP's default back, and the auditor spins,
    each for its own measured reason."""
    current = os.environ.get("OMP_WAIT_POLICY")
    if current is not None and current != os.environ.get(_OMP_MARK):
        return  # the user's choice
    if policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
        os.environ.pop(_OMP_MARK, None)
    else:
        os.environ["OMP_WAIT_POLICY"] = os.environ[_OMP_MARK] = policy


class Terminated(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_terminated)


def configured_in_flight(config: str | None) -> int:
    """`[run] in_flight` of the config file `config`, read before the process imports torch (its
    OpenMP policy depends on it); 1 if there is none or it does not load: the real load, once
    logging is set up, reports the error."""
    try:
        return load_config(config).run.in_flight
    except (ClicooperError, OSError, ValueError):
        return 1


def open_roster(env: Envelope, owner: PublicIdentity, log) -> Roster | None:
    """The roster in `env` if the owner signed it, else None with the reason logged (anyone
    may publish on the roster topic: a refused roster is not fatal, the real one may follow)."""
    try:
        roster = Roster.open(bytes(env.body), owner=owner)
    except RosterError as exc:
        log.error("roster refused", error=str(exc))
        return None
    if env.header.nonce != roster.nonce:
        log.error("roster refused", error="its message is not bound to the roster's own run "
                                          "nonce (a replayed or spliced roster)")
        return None
    return roster


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", help="run config (TOML); defaults for every key not given")
    return p


def load(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config)
    structlog.contextvars.bind_contextvars(run_id=cfg.run.id)
    return cfg


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def identity(cfg: RunConfig, name: str) -> Identity:
    return load_identity(Path(cfg.participants.keys) / f"{name}.key")


def public(cfg: RunConfig, name: str) -> PublicIdentity:
    return load_public(Path(cfg.participants.keys) / f"{name}.pub")


def broker_key(cfg: RunConfig) -> PublicIdentity | None:
    """The broker's public key, which CURVE clients pin; None on a plaintext bus."""
    return public(cfg, cfg.participants.broker) if cfg.bus.security == "curve" else None


def members(cfg: RunConfig) -> list[Member]:
    """Every member of the run with its key, as the broker admits them: the roster's members
    (owner, trainers, notary; a standby as a trainer, whose stage it may take over) and the
    observers. Raises KeyFileError naming a missing key."""
    p = cfg.participants
    roles = [(p.owner, "owner"), (p.notary, "notary"),
             *((t, "trainer") for t in (*p.trainers, *p.standby)),
             *((o, "auditor") for o in p.observers)]
    return [Member(name, role, public(cfg, name)) for name, role in roles]


def open_bus(cfg: RunConfig, ident: Identity, verifier: Verifier, *, witness: bool = False
             ) -> Bus:
    """This process's bus connection; its suspicions of silent peers (and their return) are
    printed on its console, prefixed with its name, besides the telemetry log. `witness`: the
    notary's, which subscribes at the broker's lossless `[bus] witness` address (if set)."""
    b = cfg.bus
    sub = b.witness if witness and b.witness else b.sub

    def notice(text: str) -> None:
        print(f"{ident.name}: {text}", flush=True)

    return Bus(ident, cfg.run.id, BusAddress(b.pub, sub), verifier, hwm=b.hwm,
               beat_s=b.beat_s, timeout_s=b.timeout_s, join_timeout_s=b.join_timeout_s,
               rejoin_timeout_s=b.rejoin_timeout_s, broker=broker_key(cfg), notice=notice)


def run_main(role: str, body, argv: list[str] | None = None) -> int:
    """Run a process body with telemetry bound, mapping failures to exit codes.

    On the way out the process's objects are frozen (`gc.freeze`): the interpreter's final
    collection then skips them, which after torch (and the torch._dynamo its optimizers import)
    took 0.7 s of CPU of each owner, trainer and auditor at the end of every run: such a process
    now exits 0.17 s after its body returned, not 0.85 s. What exit does (atexit, flushing,
    closing) is unchanged; only cyclic garbage is left to the process's end, not collected."""
    gc.set_threshold(*GC_THRESHOLDS)
    log = telemetry.configure(role)
    install_signal_handlers()
    try:
        return body(log)
    except Terminated as exc:
        log.warning("terminated", signal=str(exc))
        return EXIT_TERMINATED
    except ClicooperError as exc:
        log.error("failed", error=str(exc), error_type=type(exc).__name__)
        print(f"{role}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # a bug or a hostile input we did not foresee: say so, exit 1
        log.exception("crashed", error=str(exc), error_type=type(exc).__name__)
        print(f"{role}: crashed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        gc.freeze()
