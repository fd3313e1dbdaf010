"""Faults injected into a live run, and a soak (a benchmark) that tallies what they did.

`Injector` pauses (SIGSTOP, then SIGCONT after `pause_s`) one chosen role of a run that is
running on this machine, or kills one (SIGKILL) and, a trainer, starts its command line again
after a seeded delay (`Kill`), at a seeded random training step: the step is read from the owner's
progress lines in `RUN_DIR/telemetry/owner.out` (`  epoch E step S/N ...`, about ten an epoch),
so "step k" means "the first progress line at or past k". The processes are found by their
command line (`clicooper_bus.services.<role> --config RUN_DIR/config.toml`, a trainer's also
`--name NAME`), which works for `clicooper run` and for tests that start the processes
themselves; Linux only (`/proc`). A killed process is started again with its own command line
(the owner and the notary with `--resume`), or not at all (`restart_s` None: a trainer then
gone is handed over to a standby if the roster has one). A restarted process is a child of the
injector's process, its output appended to the killed one's telemetry files; `clicooper run`
stops the whole run when one of its processes dies, so a run with kills is started by `launch`
here instead.

    python -m clicooper_bus.tools.faults --runs 20 --seed 1 --out /tmp/soak

runs N quick synthetic runs, each pausing one role (trainer, owner, notary or broker, in turn)
for a seeded random time between `--min-pause` and `--max-pause` seconds at a seeded random step,
or (with `--kills`, every other run) killing a role at a seeded random step (`KILL_ROLES` in
turn: a trainer, the owner, a trainer for good, the notary, a trainer, the broker, then the
notary with a trainer and with the owner killed while it is down; each but the trainer for good
started again after `--min-pause` to `--max-pause` seconds, the one killed while the notary is
down after 1 s; the runs then have a standby, which takes over the stage of the trainer killed
for good), and tallies each run as
*completed* (exit 0, log verified, the test accuracy equal to an unfaulted run of the same seed),
*failed cleanly* (exit 3 or 1 with the log verifying and the failure named), or *lost* (anything
else: a hang, a log that does not verify, a different model). Writes `soak.json` under
`--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROLES = ("trainer", "owner", "notary", "broker")
# what --kills kills in turn: trainers half the time (one of them for good, which the standby
# takes over), each other role once a round; every other one is started again
KILL_ROLES = ("trainer", "owner", "trainer-gone", "notary", "trainer", "broker",
              "notary+trainer", "notary+owner")
# a compound fault: the notary killed, and while it is down (1.5 s later) a member killed and
# started again 1 s after; the notary comes back after the seeded delay (`net.outbox`)
WHILE_NOTARY_DOWN_S, COMPOUND_BY_STEP = 1.5, 15
PROGRESS = re.compile(r"^\s*epoch (\d+) step (\d+)/(\d+)")


@dataclass(frozen=True)
class Pause:
    """Pause `role` (a trainer's name, `owner`, `notary` or `broker`) for `pause_s` seconds once
    the owner reports training step `at_step` (global, counted from 0) or later."""

    role: str
    at_step: int
    pause_s: float


RESUMING = ("owner", "notary")  # restarted with --resume (a trainer finds its snapshots itself)


@dataclass(frozen=True)
class Kill:
    """Kill `role` with SIGKILL once the owner reports training step `at_step` or later, and
    start its command line again `restart_s` seconds later (the owner and the notary with
    `--resume`: they take the run up again; a trainer rejoins from its snapshots; the broker
    binds the same addresses); `restart_s` None: it stays dead (the run fails, named).
    `after_s`: kill that long after the step is seen (a second fault while the first one's
    process is still down). `overlap`: the next fault is taken up at once, not after this
    one's restart (a trainer killed while the notary is down)."""

    role: str
    at_step: int
    restart_s: float | None
    after_s: float = 0.0
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.restart_s is not None and not (self.role.startswith("trainer") or
                                               self.role in (*RESUMING, "broker")):
            raise ValueError(f"cannot restart {self.role!r}: roles are trainers, owner, "
                             f"notary, broker")


def plan_pauses(seed: int, roles: list[str], steps: int, pause_s: tuple[float, float],
                first: int = 1) -> list[Pause]:
    """One pause per role in `roles`, in that order, at increasing seeded random steps in
    [`first`, `steps` - 1), spread so that each falls in its own share of the run; each lasts a
    seeded random time in [pause_s[0], pause_s[1]] s. Raises ValueError if the run has fewer
    steps than pauses."""
    if steps - first < len(roles):
        raise ValueError(f"{steps} steps cannot hold {len(roles)} pauses after step {first}")
    rng = random.Random(seed)
    share = (steps - first) // len(roles)
    return [Pause(role, first + i * share + rng.randrange(max(1, share - 1)),
                  round(rng.uniform(*pause_s), 2)) for i, role in enumerate(roles)]


def command_of(pid: int) -> tuple[list[str], str]:
    """The command line and working directory of process `pid` (from /proc)."""
    proc = Path("/proc") / str(pid)
    argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    return argv, os.readlink(proc / "cwd")


def find_pid(run_dir: Path, role: str) -> int | None:
    """The process id of `role` of the run in `run_dir` (a trainer by its name), found by its
    command line in /proc; None if it is not running."""
    config = str(run_dir / "config.toml")
    module = "trainer" if role.startswith("trainer") else role
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in args if a]
        if f"clicooper_bus.services.{module}" not in argv or config not in argv:
            continue
        if module == "trainer" and role not in argv:
            continue
        return int(entry.name)
    return None


def owner_step(run_dir: Path, steps_per_epoch: int) -> int:
    """The last global step the owner's progress lines report (-1 before the first)."""
    try:
        text = (run_dir / "telemetry" / "owner.out").read_text()
    except OSError:
        return -1
    last = -1
    for line in text.splitlines():
        m = PROGRESS.match(line)
        if m:
            last = (int(m.group(1)) - 1) * steps_per_epoch + int(m.group(2)) - 1
    return last


@dataclass
class Injector:
    """Applies `pauses` to the run in `run_dir` from a background thread (`start`, `join`).
    `done` records what was done: role, pid, step seen, seconds actually stopped."""

    run_dir: Path
    pauses: list[Pause | Kill]
    steps_per_epoch: int
    timeout_s: float = 600.0
    done: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    restarted: list[subprocess.Popen] = field(default_factory=list)  # ours to reap
    by_role: dict[str, subprocess.Popen] = field(default_factory=dict)  # the restarted ones

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> Injector:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop injecting (a paused process is continued first)."""
        self._stop.set()
        self._thread.join(self.timeout_s)

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        for p in self.pauses:
            step = -1
            while not self._stop.is_set() and time.monotonic() < deadline:
                step = owner_step(self.run_dir, self.steps_per_epoch)
                if step >= p.at_step:
                    break
                time.sleep(0.05)
            else:
                self.errors.append(f"the run never reached step {p.at_step} for {p.role}")
                return
            pid = find_pid(self.run_dir, p.role)
            if pid is None:
                self.errors.append(f"no running {p.role} at step {step}")
                return
            if isinstance(p, Kill):
                if p.after_s and self._stop.wait(p.after_s):
                    return
                pid = find_pid(self.run_dir, p.role) or pid
                if p.overlap:
                    threading.Thread(target=self._kill, args=(p, pid, step), daemon=True,
                                     name=f"kill-{p.role}").start()
                    while not any(d["pid"] == pid for d in self.done):
                        time.sleep(0.01)  # recorded (and killed) before the next fault
                else:
                    self._kill(p, pid, step)
                continue
            t0 = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                self._stop.wait(p.pause_s)
            finally:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:  # stopped for good by whoever ran it: gone
                    pass
            self.done.append({"role": p.role, "pid": pid, "step": step,
                              "stopped_s": round(time.monotonic() - t0, 2)})


    def _kill(self, k: Kill, pid: int, step: int) -> None:
        """SIGKILL `pid`, wait `k.restart_s`, start its command line again (same working
        directory and environment; output appended to its telemetry files)."""
        argv, cwd = command_of(pid)
        t0, killed_at = time.monotonic(), time.time()
        record = {"role": k.role, "pid": pid, "step": step, "killed": True,
                  "killed_at": round(killed_at, 3)}
        if k.restart_s is not None:
            record["restart_pending"] = True
        self.done.append(record)  # before the kill: whoever waits sees it was ours
        os.kill(pid, signal.SIGKILL)
        if k.restart_s is None or self._stop.wait(k.restart_s):
            return
        tel = self.run_dir / "telemetry"
        tel.mkdir(parents=True, exist_ok=True)
        if k.role in RESUMING and "--resume" not in argv:
            argv = [*argv, "--resume"]
        proc = subprocess.Popen(argv, cwd=cwd, stdout=open(tel / f"{k.role}.out", "a"),
                                stderr=open(tel / f"{k.role}.jsonl", "a"),
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.restarted.append(proc)
        self.by_role[k.role] = proc
        record.pop("restart_pending")
        record.update({"restarted_after_s": round(time.monotonic() - t0, 2),
                       "new_pid": proc.pid, "restarted_at": round(time.time(), 3)})

    def kills_pending(self, role: str) -> bool:
        """Whether `role` was killed and is still to be started again."""
        return any(d["role"] == role and d.get("restart_pending") for d in self.done)

    def reap(self, timeout_s: float = 30.0) -> list[int | None]:
        """Wait for the restarted processes (killing any still running after `timeout_s`);
        their exit codes. A restarted broker, which runs until it is stopped, is stopped (and
        not counted)."""
        codes = []
        broker = self.by_role.get("broker")
        for proc in self.restarted:
            if proc is broker:
                proc.terminate()
                proc.wait()
                continue
            try:
                codes.append(proc.wait(timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
        return codes


def restart_timing(run_dir: Path, kill: dict) -> dict:
    """How long a killed and restarted trainer took to come back, from its telemetry (`kill`:
    an `Injector.done` record of a kill): from its restart to its `rejoin` (the process's start,
    its stage built, the notary's tip) and from the kill to its `rolled back` (the run trains
    again). Empty if the events are not there."""
    from datetime import datetime

    times: dict[str, float] = {}
    try:
        lines = (run_dir / "telemetry" / f"{kill['role']}.jsonl").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
            t = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if t >= kill["killed_at"] and e.get("event") in ("rejoined", "rolled back"):
            times.setdefault(e["event"], t)
    if len(times) < 2:
        return {}
    return {"restart_to_rejoin_s": round(times["rejoined"] - kill["restarted_at"], 2),
            "kill_to_resumed_s": round(times["rolled back"] - kill["killed_at"], 2)}


def _wait_for_the_run(procs: dict[str, subprocess.Popen], inject: Injector | None,
                      timeout_s: float) -> int:
    """The owner's exit code once it exits (the restarted owner's, if `inject` restarted
    it); if `inject` killed it for good, once every other process but the broker has exited,
    1 if one of them failed (else 0); 124 after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    others = [p for n, p in procs.items() if n not in ("owner", "broker")]
    while time.monotonic() < deadline:
        owner = inject.by_role.get("owner", procs["owner"]) if inject else procs["owner"]
        killed = {d["pid"] for d in (inject.done if inject else []) if d.get("killed")}
        if inject is not None and inject.kills_pending("owner"):  # to be started again
            time.sleep(0.2)
            continue
        if owner.poll() is not None and owner.pid not in killed:
            return owner.returncode
        if owner.poll() is not None and all(p.poll() is not None for p in others):
            return int(any(p.returncode != 0 for p in others if p.pid not in killed))
        time.sleep(0.2)
    return 124


def launch(cfg_path: Path, *, timeout_s: float, inject: Injector | None = None,
           grace_s: float = 20.0) -> int:
    """Start every process of the run at `cfg_path` (as `clicooper run` would, without its
    rule that one process's death stops the run: a killed trainer is restarted by `inject`),
    wait for the owner (for every other process if `inject` killed it), give the others
    `grace_s` to leave, stop what is left. Returns the owner's exit code (with the owner
    killed, 1 if any other process failed), or 1 if another process failed (a restarted one
    included), or 124 on `timeout_s`."""
    from clicooper_bus.tools.launch import _commands
    from clicooper_bus.tools.run import prepare

    cfg, path = prepare(str(cfg_path), {}, None, free_ports=False)
    tel = cfg.run_dir / "telemetry"
    tel.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    code = 124
    try:
        for name, cmd in _commands(cfg, path):
            procs[name] = subprocess.Popen(cmd, stdout=open(tel / f"{name}.out", "w"),
                                           stderr=open(tel / f"{name}.jsonl", "w"), env=env)
            if name == "broker":
                time.sleep(0.3)
        if inject is not None:
            inject.run_dir = cfg.run_dir
            inject.start()
        code = _wait_for_the_run(procs, inject, timeout_s)
        if code == 124:
            return code
        killed = {d["pid"] for d in (inject.done if inject else []) if d.get("killed")}
        deadline = time.monotonic() + grace_s
        for name, p in procs.items():
            if name == "broker":
                continue
            try:
                c = p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            if p.pid not in killed and c not in (0, 3) and code == 0:
                code = 1
        if inject is not None:
            inject.stop()
            if any(c not in (0, 3) for c in inject.reap(max(1.0, deadline - time.monotonic()))) \
                    and code == 0:
                code = 1
        return code
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# --- the soak (a benchmark, not a test) ----------------------------------------------------------

def same_weights(a: Path, b: Path) -> bool:
    """Whether two model files hold the same tensors, bit for bit (their metadata, which names
    the run, aside)."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and x[k].tobytes() == y[k].tobytes() for k in x)


def _outcome(cfg, code: int, reference: Path | None) -> tuple[str, str]:
    """(completed | failed cleanly | lost, why) of a finished faulted run; `reference`: the
    unfaulted run's directory (a completed run has its test accuracy; with the same weights
    too, it is identical, as deterministic settings should make it)."""
    from clicooper_bus.layout import RunLayout
    from clicooper_bus.tlog.logverify import verify_log

    layout = RunLayout(cfg.run_dir)
    try:
        verified = verify_log(layout.log)
    except Exception as exc:  # noqa: BLE001 - any failure to read the log is a loss
        return "lost", f"the log could not be read: {exc}"
    if not verified.ok:
        return "lost", f"the log does not verify: {verified.failure}"
    summary = json.loads(layout.summary.read_text()) if layout.summary.exists() else None
    if code == 0 and summary is not None:
        acc = summary.get("test_accuracy")
        ref = json.loads((reference / "summary.json").read_text()) if reference else None
        if ref is not None and acc != ref["test_accuracy"]:
            return "lost", (f"test accuracy {acc} differs from the unfaulted run's "
                            f"{ref['test_accuracy']}")
        same = reference is not None and same_weights(layout.model, reference / "model.safetensors")
        return "completed", f"test accuracy {acc}; {'the same' if same else 'other'} weights"
    if code in (1, 3):
        why = (summary or {}).get("stopped") or _named_failure(layout.telemetry)
        if why is None:
            return "lost", f"exit {code} with no process naming why"
        return "failed cleanly", json.dumps(why, sort_keys=True, default=str)
    return "lost", f"exit {code}"


def _named_failure(telemetry: Path) -> dict | None:
    """The first error a process of the run logged, with who logged it (`{by, problem}`), from
    its telemetry; None if none did."""
    for path in sorted(telemetry.glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("level") == "error" and e.get("error"):
                return {"by": path.stem, "problem": e["error"]}
    return None


def soak(runs: int, seed: int, out: Path, *, min_pause: float, max_pause: float,
         timeout_s: float, rejoin_timeout_s: float, trainers: int = 2,
         kills: bool = False) -> dict:
    """`runs` faulted quick synthetic runs under `out`, one role paused each (in turn), or with
    `kills` every other run one killed (`KILL_ROLES` in turn, started again after
    `min_pause`..`max_pause` s but for the trainer killed for good, which the runs' standby
    takes over); returns the tally and each run's record (also written to `out/soak.json`)."""
    from clicooper_bus.config import load_config
    from clicooper_bus.tools.run import free_port, run

    out.mkdir(parents=True, exist_ok=True)
    base = {"run": {"out_dir": str(out / "runs"), "epochs": 1, "batch_size": 32, "seed": seed,
                    "threads": 1, "trainer_threads": 1, "snapshot_every": 10},
            "data": {"name": "synthetic"},
            "participants": {"keys": str(out / "keys"),
                             "trainers": [f"trainer-{i}" for i in range(1, trainers + 1)]},
            "bus": {"timeout_s": timeout_s, "rejoin_timeout_s": rejoin_timeout_s,
                    "beat_s": min(1.0, timeout_s / 4)},
            "watermark": {"enabled": False}}
    if kills:
        base["participants"]["standby"] = ["standby-1"]

    def one(run_id: str, pauses: list[Pause | Kill]) -> tuple[int, object, Injector | None]:
        over = json.loads(json.dumps(base))
        over["run"]["id"] = run_id
        over["bus"].update(pub=f"tcp://127.0.0.1:{free_port()}",
                           sub=f"tcp://127.0.0.1:{free_port()}",
                           witness=f"tcp://127.0.0.1:{free_port()}")
        cfg = load_config(None, over)
        path = out / f"{run_id}.toml"
        path.write_text(cfg.to_toml())
        inj = None
        steps = -(-2000 // 32)  # the synthetic set's training batches
        limit = rejoin_timeout_s * 4 + 300
        if any(isinstance(p, Kill) for p in pauses):  # `clicooper run` stops on a death
            inj = Injector(cfg.run_dir, pauses, steps)
            return launch(path, timeout_s=limit, inject=inj), cfg, inj
        if pauses:
            inj = Injector(cfg.run_dir, pauses, steps).start()
        code = run(str(path), echo=False, timeout_s=limit, free_ports=False)
        if inj is not None:
            inj.stop()
        return code, cfg, inj

    code, cfg, _ = one("clean", [])
    reference = cfg.run_dir if code == 0 else None
    reference_accuracy = json.loads((cfg.run_dir / "summary.json").read_text())[
        "test_accuracy"] if code == 0 else None
    rng = random.Random(seed)
    records, tally = [], {"completed": 0, "failed cleanly": 0, "lost": 0}
    for i in range(runs):
        kill = kills and i % 2 == 1
        role = KILL_ROLES[(i // 2) % len(KILL_ROLES)] if kill else \
            ROLES[(i // 2 if kills else i) % len(ROLES)]
        for_good = role == "trainer-gone"
        role, _, second = role.partition("+")
        role = f"trainer-{rng.randint(1, trainers)}" if role.startswith("trainer") else role
        second = f"trainer-{rng.randint(1, trainers)}" if second == "trainer" else second
        # the owner's last progress line of the epoch is at step 60 (every 6th of 63)
        pause: list[Pause | Kill] = plan_pauses(rng.randrange(1 << 30), [role], 60,
                                                (min_pause, max_pause), first=2)
        if kill and second:  # the second started again while the notary is still down
            # early enough that training has not ended in the second before the owner holds
            # for the notary (an owner killed after its `end` cannot be resumed)
            at = min(pause[0].at_step, COMPOUND_BY_STEP)
            down = max(pause[0].pause_s, WHILE_NOTARY_DOWN_S + 2.0)
            pause = [Kill(role, at, down, overlap=True),
                     Kill(second, at, 1.0, after_s=WHILE_NOTARY_DOWN_S)]
        elif kill:  # started again (the owner and notary with --resume), or gone: a standby
            pause = [Kill(role, pause[0].at_step, None if for_good else pause[0].pause_s)]
        t0 = time.monotonic()
        code, cfg, inj = one(f"fault-{i:03d}", pause)
        outcome, why = _outcome(cfg, code, reference)
        if inj is not None and inj.errors:
            outcome, why = "lost", "; ".join(inj.errors)
        tally[outcome] += 1
        for d in inj.done if inj else []:
            if d.get("killed") and "restarted_at" in d:
                d.update(restart_timing(cfg.run_dir, d))
        rec = {"run": cfg.run.id, "pause": asdict(pause[0]), "done": inj.done if inj else [],
               "exit": code, "outcome": outcome, "why": why,
               "wall_s": round(time.monotonic() - t0, 1)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    report = {"runs": runs, "faults": sum(len(r["done"]) for r in records),
              "kills": sum(bool(d.get("killed")) for r in records for d in r["done"]),
              "tally": tally,
              "identical_models": sum("the same weights" in r["why"] for r in records),
              "reference_accuracy": reference_accuracy, "seed": seed,
              "settings": {"timeout_s": timeout_s, "rejoin_timeout_s": rejoin_timeout_s,
                           "pause_s": [min_pause, max_pause], "trainers": trainers,
                           "kills": kills},
              "records": records}
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Soak: N quick synthetic runs, each with one role paused (SIGSTOP, then "
                    "SIGCONT) at a seeded random step, or with --kills every other run a role "
                    "killed (SIGKILL; a trainer restarted); tallies completed, failed cleanly, "
                    "lost.",
        epilog="example: python -m clicooper_bus.tools.faults --runs 20 --seed 1 --out /tmp/soak")
    p.add_argument("--runs", type=int, default=20, help="faulted runs (default 20)")
    p.add_argument("--seed", type=int, default=1, help="seed of the runs and of the faults")
    p.add_argument("--out", default="runs/soak", help="directory for the runs and soak.json")
    p.add_argument("--min-pause", type=float, default=2.0, help="shortest pause, s (default 2)")
    p.add_argument("--max-pause", type=float, default=8.0, help="longest pause, s (default 8)")
    p.add_argument("--timeout", type=float, default=1.0,
                   help="[bus] timeout_s of the runs: suspected after this silence (default 1)")
    p.add_argument("--rejoin-timeout", type=float, default=20.0,
                   help="[bus] rejoin_timeout_s of the runs: gone after this (default 20)")
    p.add_argument("--kills", action="store_true",
                   help="every other run kills a role (SIGKILL) at a seeded step: in turn a "
                        "trainer, the owner, a trainer for good (a standby takes its stage "
                        "over), the notary, a trainer, the broker, then the notary with a "
                        "trainer and with the owner killed while it is down (started again "
                        "after 1 s); each but the one for good started again after "
                        "--min-pause..--max-pause s")
    args = p.parse_args(argv)
    report = soak(args.runs, args.seed, Path(args.out), min_pause=args.min_pause,
                  max_pause=args.max_pause, timeout_s=args.timeout,
                  rejoin_timeout_s=args.rejoin_timeout, kills=args.kills)
    t = report["tally"]
    print(f"{report['runs']} runs, {report['faults']} faults ({report['kills']} kills): "
          f"{t['completed']} completed "
          f"({report['identical_models']} with the unfaulted run's exact weights), "
          f"{t['failed cleanly']} failed cleanly, {t['lost']} lost "
          f"({Path(args.out) / 'soak.json'})")
    return 0 if t["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
