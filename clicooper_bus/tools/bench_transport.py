"""What the edge-ready transport costs (issue 16), in numbers, from one invocation:
`python -m clicooper_bus.tools.bench_transport [--quick] [--repeats N] [--json FILE]`.

Every run is the same small one: one epoch of the small CNN on a Fashion-MNIST subset
(`--train-limit`, default 20,000 images; 1,500 with `--quick`), three trainers, watermarks
off, evaluated once at the end (`bench_bus.bench_overrides`), started by `clicooper run` as
separate processes on this machine. Each repeat runs, in this order:

1. `[bus] security = "curve"` (every socket encrypted, the broker admitting only the roster's
   keys and applying its per-connection rules), then `security = "none"` (plaintext, a
   forwarder without rules), alternating ABAB over the repeats so both modes see the same
   drift of the machine;
2. the curve run again while it is attacked (`siege`): a keyless client and a client with a
   key the roster does not list each subscribe to everything, never read and flood one-frame
   garbage; a separate process subscribes with a 256 KiB topic (keyless and with a listed key);
   a listed observer gone rogue (`spy`) tries another member's inbox, fakes another member's
   presence, republishes what it reads as its own, and keeps one subscription it never reads.
   Only this run lists `spy` as an observer (the owner waits for a listed observer to watch;
   that wait is before training and not timed).

Measured per run:
- training time: the owner's wall time of the epoch (`summary.json`, `time.perf_counter` in
  the owner), evaluation and start-up excluded; reported as medians over the repeats and as
  ratios: curve / none and attacked / undisturbed (the curve run of the same repeat; target
  within +-10 %);
- broker CPU per message: the broker process's utime + stime (`/proc/<pid>/stat`, every
  thread, sampled every 50 ms until it exits) from the moment it logs "broker listening" to
  its last sample, divided by the messages it forwarded (its "broker stopped" telemetry line).
  It includes what the broker does between messages over the whole run (heartbeats, CURVE
  handshakes, the joins and the final evaluation), so it is a per-message cost of running the
  broker, not of one copy alone; the clock tick is 10 ms;
- the broker's refusals by reason and its lossy sends (a subscriber that stopped reading), and
  whether a stranger received anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.tools.bench_bus import bench_overrides, training_epoch
from clicooper_bus.tools.run import ensure_keys, free_port, run
from clicooper_bus.tools.siege import siege

MODES = ("none", "curve", "attacked")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- the broker's CPU ----------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(state, parent pid, CPU seconds of every thread) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _find_broker(run_dir: Path) -> int | None:
    """The pid of our child broker process serving `run_dir`, if it has started."""
    marker = str(run_dir).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if b"clicooper_bus.services.broker" in cmd and marker in cmd:
            st = _stat(int(entry.name))
            if st is not None and st[1] == os.getpid():
                return int(entry.name)
    return None


class BrokerCPU(threading.Thread):
    """Follows the broker of one run: its CPU seconds when it logs "broker listening" and at
    the last sample before it exits (every 50 ms)."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True, name="broker-cpu")
        self.run_dir, self.done = run_dir, threading.Event()
        self.start_s: float | None = None
        self.last_s: float | None = None

    @property
    def spent_s(self) -> float:
        if self.start_s is None or self.last_s is None:
            return float("nan")
        return self.last_s - self.start_s

    def run(self) -> None:
        log = RunLayout(self.run_dir).telemetry / "broker.jsonl"
        pid = None
        while not self.done.is_set():
            pid = pid or _find_broker(self.run_dir)
            st = _stat(pid) if pid else None
            if pid and (st is None or st[0] == "Z"):
                return  # exited: the last sample stands
            if st is not None:
                if self.start_s is None and log.exists() and "broker listening" in log.read_text():
                    self.start_s = st[2]
                self.last_s = st[2]
            time.sleep(0.05)


# --- one run -------------------------------------------------------------------------------


@dataclass
class Result:
    mode: str
    repeat: int
    train_s: float
    accuracy: float
    broker_cpu_s: float
    forwarded: int
    lossy_sends: int
    refused: dict[str, int]
    attack: dict = field(default_factory=dict)

    @property
    def cpu_us_per_message(self) -> float:
        return self.broker_cpu_s / self.forwarded * 1e6 if self.forwarded else float("nan")


def _config(workdir: Path, mode: str, repeat: int, train_limit: int, test_limit: int) -> Path:
    over = bench_overrides(workdir, train_limit, 1, f"{mode}-{repeat}")
    over["data"]["test_limit"] = test_limit
    # fixed ports, written before the run starts: the attackers must know them
    over["bus"] = {"security": "none" if mode == "none" else "curve",
                   "pub": f"tcp://127.0.0.1:{free_port()}",
                   "sub": f"tcp://127.0.0.1:{free_port()}"}
    if mode == "attacked":
        over["participants"]["observers"] = ["spy"]
    cfg = load_config(None, over)
    path = workdir / f"{cfg.run.id}.toml"
    path.write_text(cfg.to_toml())
    return path


def _broker_stopped(run_dir: Path) -> dict:
    for line in (RunLayout(run_dir).telemetry / "broker.jsonl").read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "broker stopped":
            return json.loads(line)
    raise SystemExit(f"the broker of {run_dir} logged no 'broker stopped' line")


def one_run(workdir: Path, mode: str, repeat: int, train_limit: int, test_limit: int) -> Result:
    """Train once in `mode` (curve, none, or curve while attacked); removes the run after."""
    path = _config(workdir, mode, repeat, train_limit, test_limit)
    cfg = load_config(path)
    ensure_keys(Path(cfg.participants.keys), ["broker", "spy"])  # run() keeps existing keys
    cpu = BrokerCPU(cfg.run_dir)
    cpu.start()
    attack = siege(cfg) if mode == "attacked" else contextlib.nullcontext({})
    chatter = io.StringIO()  # run()'s own lines; ours say the same, shorter
    try:
        with attack as seen, contextlib.redirect_stdout(chatter):
            code = run(str(path), echo=False, timeout_s=900, free_ports=False)
    finally:
        cpu.done.set()
        cpu.join(5)
    if code != 0:
        raise SystemExit(f"the benchmark run {cfg.run.id} failed: see {cfg.run_dir}")
    train_s, accuracy = training_epoch(cfg.run_dir)
    stopped = _broker_stopped(cfg.run_dir)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    attack_seen = {"strangers_received": seen.get("received"),
                   "rogue_read": sorted(seen.get("kinds", ()))} if mode == "attacked" else {}
    return Result(mode, repeat, train_s, accuracy, cpu.spent_s, stopped["forwarded"],
                  stopped["lossy_sends"], stopped["refused"], attack_seen)


def measure(workdir: Path, repeats: int, train_limit: int, test_limit: int) -> list[Result]:
    """none, curve, attacked in each repeat: plaintext and CURVE alternate (ABAB...), and the
    attacked run follows the undisturbed CURVE run it is compared with."""
    results = []
    for r in range(repeats):
        for mode in ("none", "curve", "attacked"):
            res = one_run(workdir, mode, r, train_limit, test_limit)
            results.append(res)
            refused = f", refused {sum(res.refused.values()):,}" if res.refused else ""
            print(f"  repeat {r + 1}/{repeats} {mode:8}: training {res.train_s:6.2f} s, accuracy "
                  f"{res.accuracy:.3f}, broker {res.broker_cpu_s:.2f} CPU s for "
                  f"{res.forwarded:,} messages ({res.cpu_us_per_message:.0f} us each){refused}",
                  flush=True)
    return results


# --- the report ----------------------------------------------------------------------------


def _spread(xs: list[float], fmt: str) -> str:
    return (f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}} to {max(xs):{fmt}})"
            if len(xs) > 1 else f"{xs[0]:{fmt}}")


def _ratios(results: list[Result], top: str, bottom: str) -> list[float]:
    by = {(r.mode, r.repeat): r.train_s for r in results}
    repeats = sorted({r.repeat for r in results})
    return [by[top, k] / by[bottom, k] for k in repeats]


def summarise(results: list[Result]) -> dict:
    """Medians and ratios (each ratio within one repeat, then the median of them)."""
    out: dict = {"modes": {}}
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        out["modes"][mode] = {
            "train_s": [r.train_s for r in rows], "accuracy": [r.accuracy for r in rows],
            "broker_cpu_s": [r.broker_cpu_s for r in rows],
            "forwarded": [r.forwarded for r in rows],
            "cpu_us_per_message": [r.cpu_us_per_message for r in rows]}
    for name, top, bottom in (("curve/none", "curve", "none"),
                              ("attacked/undisturbed", "attacked", "curve")):
        each = _ratios(results, top, bottom)
        out[name] = {"median": statistics.median(each), "each": each}
    return out


LABELS = {"none": 'plaintext (`security = "none"`)', "curve": 'CURVE (`security = "curve"`)',
          "attacked": "CURVE, under attack"}


def print_report(results: list[Result], s: dict) -> None:
    ratio = {"none": "", "curve": "curve/none", "attacked": "attacked/undisturbed"}
    print("\n| run | training, median (min to max) | ratio of the same repeat, median (each) | "
          "test accuracy | broker CPU | messages forwarded | broker CPU per message, median |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        m = s["modes"][mode]
        r = s.get(ratio[mode])
        rat = (f"{ratio[mode]} **{r['median']:.3f}** ({', '.join(f'{x:.3f}' for x in r['each'])})"
               if r else "1")
        print(f"| {LABELS[mode]} | {_spread(m['train_s'], '.2f')} s | {rat} | "
              f"{', '.join(f'{a:.3f}' for a in m['accuracy'])} | "
              f"{_spread(m['broker_cpu_s'], '.2f')} s | {_spread(m['forwarded'], ',')} | "
              f"**{statistics.median(m['cpu_us_per_message']):.0f} us** |")
    att = s["attacked/undisturbed"]["median"]
    verdict = "met" if abs(att - 1) <= 0.10 else "NOT met"
    print(f"\nUnder attack against undisturbed: {att:.3f} (target within +-10 %: {verdict}).")
    for r in (r for r in results if r.mode == "attacked"):
        print(f"  repeat {r.repeat + 1}: strangers received {r.attack['strangers_received']} "
              f"message(s), the rogue observer read {r.attack['rogue_read']}, lossy sends "
              f"{r.lossy_sends}; the broker refused:")
        for reason, n in sorted(r.refused.items(), key=lambda kv: -kv[1]):
            print(f"    {n:>9,}  {reason}")
    lossy = {m: sum(r.lossy_sends for r in results if r.mode == m) for m in ("none", "curve")}
    print(f"Undisturbed runs refused nothing: "
          f"{not any(r.refused for r in results if r.mode != 'attacked')}; lossy sends "
          f"(a stalled subscriber): plaintext {lossy['none']}, CURVE {lossy['curve']}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny subset, one repeat unless "
                   "--repeats: to check that the script runs, not for its numbers")
    p.add_argument("--repeats", type=int, help="repeats of the three runs (default 3; 1 with "
                   "--quick)")
    p.add_argument("--train-limit", type=int, help="training images per run (default 20,000; "
                   "1,500 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write every run's raw numbers here")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    train_limit = args.train_limit or (1500 if args.quick else 20000)
    test_limit = 200 if args.quick else 1000
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    print(f"one epoch of {train_limit:,} Fashion-MNIST images over the bus (3 trainers, batch 128, "
          f"watermarks off), {repeats} repeat(s) of: plaintext, CURVE, CURVE under attack",
          flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="clicooper-bench-transport-"))
    t0 = time.perf_counter()
    try:
        results = measure(workdir, repeats, train_limit, test_limit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    s = summarise(results)
    print_report(results, s)
    print(f"\n({time.perf_counter() - t0:.0f} s in all; load average "
          f"{os.getloadavg()[0]:.2f} at the end)")
    if args.json:
        raw = {"train_limit": train_limit, "repeats": repeats, "summary": s,
               "runs": [asdict(r) | {"cpu_us_per_message": r.cpu_us_per_message}
                        for r in results]}
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
