"""How `clicooper run` starts a run's processes on this machine and waits for them: the
processes of a run (`_commands`), the supervision loop (`launch`), the decision of each poll
(`settle`), and what a stop signal does (`RunStopped`, `mark_interrupted`). `tools/run.py`
prepares the run and concludes it; `tools/faults.py` starts the same processes to fault them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout, write_atomic

EXIT_STOPPED = 3  # as services.common.EXIT_STOPPED (tools do not import services' start-up)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# once the owner stopped the run and left, how long a process still running gets to leave
# before it is stopped: one that was gone (silent past rejoin_timeout_s) may never return
GONE_GRACE_S = 10.0
# how often `launch` looks at its processes: a run ends this much after its last process, at
# worst (0.2 s cost every run 0.1 s on average; a poll of each process is microseconds)
POLL_S = 0.05

AUDITOR = "auditor"  # the observer `clicooper run` starts itself (a following auditor)


def _commands(cfg: RunConfig, config_path: Path, audit: bool | str = False,
              resume: bool = False) -> list[tuple[str, list[str]]]:
    """The processes of a run; `audit` adds a following auditor (a string: its --attacks);
    `resume`: the notary and the owner take up the run in its directory (`--resume`; trainers
    find their snapshots by themselves)."""
    py, c = sys.executable, ["--config", str(config_path)]
    again = ["--resume"] if resume else []
    cmds = [("broker", [py, "-m", "clicooper_bus.services.broker", *c])]
    if audit:  # first, so that it is watching before the run can end
        names = ["--attacks", audit] if isinstance(audit, str) else []
        cmds.append((AUDITOR, [py, "-m", "clicooper_bus.services.auditor", "--follow", *c, *names]))
    cmds += [("notary", [py, "-m", "clicooper_bus.services.notary", *c, *again]),
             ("owner", [py, "-m", "clicooper_bus.services.owner", *c, *again])]
    p = cfg.participants
    cmds += [(t, [py, "-m", "clicooper_bus.services.trainer", *c, "--name", t])
             for t in (*p.trainers, *p.standby) if t not in p.remote]
    return cmds


class RunStopped(ClicooperError):
    """`clicooper run` was told to stop (SIGINT, SIGTERM or SIGHUP); it stopped every process
    of the run. `code`: the exit status, 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum).name
        self.code = 128 + signum
        super().__init__(f"stopped by {self.signal}: every process of the run was stopped; what "
                         f"the notary logged so far is in the run directory")


def _stop_on_signal(signum: int, frame: object) -> None:
    raise RunStopped(signum)


def mark_interrupted(run_dir: Path, stopped: RunStopped) -> Path:
    """Write `RUN_DIR/INTERRUPTED` (atomically): which signal stopped the run, and when."""
    marker = RunLayout(run_dir).interrupted
    doc = {"signal": stopped.signal, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "note": "clicooper run was stopped before the run finished: `clicooper run --resume "
                   "RUN_DIR` takes it up again from its last round snapshot, `clicooper run "
                   "--force` deletes this directory and starts over"}
    write_atomic(marker, json.dumps(doc, indent=2) + "\n")
    return marker


def launch(cfg: RunConfig, config_path: Path, *, echo: bool = True,
           timeout_s: float | None = None, audit: bool | str = False,
           resume: bool = False) -> int:
    """Run every process; returns 0 if all succeeded, EXIT_STOPPED (3) if the owner stopped
    the run on a refusal (every process then leaves by itself once the log is closed), 1 if
    one failed. Raises RunStopped on SIGINT, SIGTERM or SIGHUP, after stopping them all (each
    runs in its own session, so a signal to us alone would orphan them).

    Why not honcho's `Manager` (which `make demo` uses through the Procfile): it handles SIGINT
    and SIGTERM but not SIGHUP, terminates everyone the moment any one process exits (even
    with 0: the trainers leave before the notary has closed the log for a following auditor,
    and a stopped run's processes leave one by one), merges each process's stdout and stderr
    into one prefixed console stream (we keep each process's telemetry in its own JSON-lines
    file and echo only the owner's progress), and forks a helper per process. What it would
    save us is this loop and the killpg below; what we need from it, it does not do."""
    tel = RunLayout(cfg.run_dir).telemetry
    tel.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _stop_on_signal) for s in STOP_SIGNALS}
    mode = "a" if resume else "w"  # a resumed run's telemetry goes on after the first's
    try:
        cmds = _commands(cfg, config_path, audit, resume=True) if resume else \
            _commands(cfg, config_path, audit)
        for name, cmd in cmds:
            procs[name] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE if name == "owner" else open(tel / f"{name}.out", mode),
                stderr=open(tel / f"{name}.jsonl", mode), env=env, text=True,
                start_new_session=True)
            # no head start for the broker: the others take over a second to import before
            # they connect (ZeroMQ connects before a bind and retries), and a broker that
            # fails is reported by the loop below (0.3 s of every run less)
        if mode == "w":
            (tel / "owner.out").write_text("")
        # appending (O_APPEND), whatever the mode: a fault harness restarts a killed owner with
        # its output appended to this file, and lines of the dead one still in our pipe must
        # not land over the new one's (a test twice missed the new owner's first line under
        # load; the cause is not proven, this removes the one way to it we found)
        owner_out = open(tel / "owner.out", "a")

        def pump():
            for line in procs["owner"].stdout:
                owner_out.write(line)
                owner_out.flush()
                if echo:
                    print(line, end="", flush=True)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s if timeout_s else None
        workers = [n for n in procs if n != "broker"]
        ended = None  # since when the run was stopped (by the owner, or by the notary)
        while True:
            codes = {n: procs[n].poll() for n in procs}
            ended = ended or (time.monotonic() if stopping(codes) else None)
            outcome = settle(codes, ended)
            if outcome is not None:
                code, why, names = outcome
                if why:
                    print(f"clicooper run: {why}", file=sys.stderr)
                if names:
                    _report(names, tel)
                return code
            if deadline and time.monotonic() > deadline:
                print(f"clicooper run: timed out after {timeout_s:.0f} s", file=sys.stderr)
                _report([n for n in workers if codes[n] is None], tel)
                return 1
            time.sleep(POLL_S)
    finally:
        for s in previous:  # a second signal must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                os.killpg(p.pid, signal.SIGCONT)  # a stopped process acts on it only once continued
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


def stopping(codes: dict[str, int | None]) -> bool:
    """Whether the run was stopped: the owner left with EXIT_STOPPED (the log is closed, or the
    notary is gone), or the notary did (the owner equivocated: it may never leave by itself)."""
    return EXIT_STOPPED in (codes.get("owner"), codes.get("notary"))


def settle(codes: dict[str, int | None], ended: float | None,
           now: float | None = None) -> tuple[int, str, list[str]] | None:
    """How a run whose processes' exit codes are `codes` (None: still running; "broker" among
    them) ends: None while it goes on, else (exit code, what to say or "", whose telemetry to
    show). `ended`: since when it was stopped (`stopping`, time.monotonic()); processes still
    running `GONE_GRACE_S` later are gone peers (stopped by our caller), unless one is a
    following auditor, which has its own timeouts."""
    workers = [n for n in codes if n != "broker"]
    # an owner the notary proved to equivocate (the notary stopped the run) may fail its own way
    cheat = "owner" if codes.get("notary") == EXIT_STOPPED else None
    failed = [n for n, c in codes.items() if c not in (None, 0, EXIT_STOPPED) and n != cheat]
    if failed:
        return 1, "", failed
    if codes.get("broker") not in (None, 0):  # it leaves only when told to: it failed
        return 1, "", ["broker"]
    if all(codes[n] in (0, EXIT_STOPPED) or n == cheat and codes[n] is not None
           for n in workers):
        return (EXIT_STOPPED if stopping(codes) else 0), "", []
    left = [n for n in workers if codes[n] is None]
    now = time.monotonic() if now is None else now
    if ended is not None and now - ended > GONE_GRACE_S and AUDITOR not in left:
        return EXIT_STOPPED, (f"{', '.join(left)} still running {GONE_GRACE_S:.0f} s after the "
                              f"run was stopped (gone?); stopping it"), []
    return None


def _report(names: list[str], tel: Path) -> None:
    for name in names:
        print(f"clicooper run: process '{name}' failed; last lines of {tel / (name + '.jsonl')}:",
              file=sys.stderr)
        try:
            lines = (tel / f"{name}.jsonl").read_text().splitlines()[-8:]
        except OSError:
            lines = []
        for line in lines:
            print(f"  {line}", file=sys.stderr)
