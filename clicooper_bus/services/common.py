"""What every process does at start: read its config, set up telemetry and torch threads, load
its key, and open its bus connection; and how it stops: exit codes and signals."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import structlog

from clicooper_bus import telemetry
from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.identity import Identity, PublicIdentity, load_identity, load_public
from clicooper_bus.net.verifier import Verifier

EXIT_OK, EXIT_FAIL, EXIT_TERMINATED = 0, 1, 143


class Terminated(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_terminated)


def configured_in_flight(argv: list[str]) -> int:
    """`[run] in_flight` of the config named by `--config` in `argv`, read before the process
    imports torch (its OpenMP settings depend on it); 1 if there is none or it does not load:
    the real load reports the error."""
    p = argparse.ArgumentParser(add_help=False)  # --help is the real parser's to answer
    p.add_argument("--config")
    args, _ = p.parse_known_args(argv[1:])
    try:
        return load_config(args.config).run.in_flight
    except (ClicooperError, OSError, ValueError):  # reported properly once logging is set up
        return 1


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
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


def open_bus(cfg: RunConfig, ident: Identity, verifier: Verifier) -> Bus:
    b = cfg.bus
    return Bus(ident, cfg.run.id, BusAddress(b.pub, b.sub), verifier, hwm=b.hwm,
               beat_s=b.beat_s, timeout_s=b.timeout_s, join_timeout_s=b.join_timeout_s)


def run_main(role: str, body, argv: list[str] | None = None) -> int:
    """Run a process body with telemetry bound, mapping failures to exit codes."""
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
