"""Training where edge trainers live (issue 18), in numbers, from one invocation:
`python -m clicooper_bus.tools.bench_edge [--quick] [--json FILE]` (as root; `make bench-edge`).

The trainers run in one network namespace, the owner's side (broker, notary, owner: `clicooper
run` with every trainer listed as remote) in another, joined by a veth pair (`tools/netns.py`).
Each run is one epoch of the small CNN on the first `--train-limit` Fashion-MNIST images (default
5,120: 40 steps of 128), the demo's split (two trainers, the offloading cut) unless said
otherwise, CURVE on, watermarks off, evaluated once after the epoch on `--test-limit` images
(not timed). The link is, in turn:

- unlimited (no qdisc; the veth copies at memory speed): the compute-bound epoch;
- rate-limited in both directions with tbf (`tc qdisc replace dev IF root tbf rate R burst B
  latency 400ms`, B = 4,000 bytes (32 kbit), more above 100 Mbit/s: `netns.burst_bytes`) at
  1 Gbit/s, 100 Mbit/s and 20 Mbit/s. Bandwidth only: this kernel has no `netem`, so no delay,
  jitter or loss is emulated, and an edge link's round-trip time is not in these numbers.

Every link's run follows the unlimited run of the same codec and `in_flight`, and its ratio is
taken against that run: epoch / max(compute-bound epoch, bytes the epoch moved over the link
in its busier direction / link rate) (target <= 1.25), and the plain epoch / compute-bound.

Measured per run:
- the epoch: the owner's wall time of the training epoch (`summary.json` `per_epoch`);
- bytes: every envelope (topic, header, signature, body) that crossed the link, from the run's
  provenance log (the broker is on the owner's side, so a message a trainer sends goes up once,
  and one addressed to a trainer comes down once; broadcasts a trainer subscribes to come down
  once per trainer), for the epoch (fwd, bwd, labels, metrics) and for the whole run. The
  kernel's counters of the two veth ends over the whole run give the framing on top (ZeroMQ,
  CURVE, TCP/IP): their ratio to the log's bytes scales the epoch's bytes to the wire's;
- the owner's CPU per training step (`summary.json` `cpu`, its `cpu_s_per_step`: every thread
  of the owner process over the training window) against the CPU of its head alone computing
  a step in process (forward, backward and Adam step of the head on a batch, `threads` torch
  threads, `head_cpu_per_step`), target <= 1.3;
- the link's achieved TCP rate (one stream, device to owner), to show what tbf gives.

The scaling table repeats fp32 (or `--scaling-codec`) at in_flight 1 for K = 1..4 trainers on
the unlimited and the 100 Mbit/s link, with the per-hop added latency: (step over the link -
step unlimited) / hops, 2K hops a synchronous step (K forward, K back).

Cleanup: every namespace and link made is removed, with every process inside, however the
benchmark ends (SIGINT, SIGTERM and SIGHUP included); after a SIGKILL, `--clean` removes what
is left (`cco-` names).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.tools import netns
from clicooper_bus.tools.bench_bus import bench_overrides, training_epoch
from clicooper_bus.tools.run import ensure_keys

ROOT = Path(__file__).resolve().parents[2]  # the tree whose code every process runs
OWNER_IP, DEVICE_IP = "10.78.0.1", "10.78.0.2"
LINKS: dict[str, float | None] = {"unlimited": None, "1gbit": 1e9, "100mbit": 100e6,
                                  "20mbit": 20e6}
TRAINING = ("fwd", "bwd", "labels", "metrics", "logits")  # an epoch's traffic (evaluation is after it)
# the broadcast kinds a trainer subscribes to (services/trainer/stage.py `run`): each comes
# down the link once per trainer
BROADCASTS = ("roster", "end", "ack", "checkpoint", "beat", "round", "wm_commit", "rollback",
              "restored")
RUN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Setting:
    codec: str
    in_flight: int
    trainers: int
    link: str


@dataclass
class Result:
    setting: Setting
    epoch_s: float
    steps: int
    accuracy: float
    owner_cpu_step_s: float | None
    epoch_up: int  # envelope bytes of the epoch's traffic, device -> owner side (the log)
    epoch_down: int
    run_up: int  # ... of the whole run
    run_down: int
    wire_up: int  # the veth counters over the whole run
    wire_down: int
    load: float  # the 1-minute load average when the run started

    @property
    def framing(self) -> float:
        """Wire bytes per logged envelope byte (ZeroMQ, CURVE and TCP/IP on top), both ways."""
        logged = self.run_up + self.run_down
        return (self.wire_up + self.wire_down) / logged if logged else float("nan")

    @property
    def epoch_wire_bytes(self) -> float:
        """The epoch's bytes on the wire in its busier direction."""
        return max(self.epoch_up, self.epoch_down) * self.framing

    @property
    def step_bytes(self) -> float:
        """Envelope bytes of a training step over the link, both directions (the log)."""
        return (self.epoch_up + self.epoch_down) / self.steps


@dataclass
class Bench:
    machine: dict
    train_limit: int
    test_limit: int
    rates: dict[str, float] = field(default_factory=dict)  # measured TCP bit/s per link
    head_cpu_step_s: float = float("nan")
    head_wall_step_s: float = float("nan")
    results: list[Result] = field(default_factory=list)


# --- one run --------------------------------------------------------------------------------


def _config(workdir: Path, s: Setting, train_limit: int, test_limit: int, tag: str) -> Path:
    over = bench_overrides(workdir, train_limit, s.in_flight, tag)
    names = [f"trainer-{i}" for i in range(1, s.trainers + 1)]
    over["participants"].update(trainers=names, remote=names)
    over["data"]["test_limit"] = test_limit
    over["bus"] = {"codec": s.codec, "pub": f"tcp://{OWNER_IP}:7201",
                   "sub": f"tcp://{OWNER_IP}:7202", "witness": f"tcp://{OWNER_IP}:7203"}
    cfg = load_config(None, over)
    path = workdir / f"{cfg.run.id}.toml"
    path.write_text(cfg.to_toml())
    p = cfg.participants
    ensure_keys(Path(p.keys), [p.owner, p.notary, p.broker, *p.trainers])
    return path


def _popen(argv: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process's group still running, SIGKILL it after 15 s."""
    for pr in procs:
        if pr.poll() is None:
            os.killpg(pr.pid, signal.SIGTERM)
    for pr in procs:
        try:
            pr.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(pr.pid, signal.SIGKILL)
            pr.wait()


def _launch(pair: netns.Pair, path: Path) -> int:
    """`clicooper run` on the owner's side, then each trainer in the device namespace once the
    run directory is made; returns the owner side's exit status (0: trained, log verified)."""
    cfg = load_config(path)
    py = sys.executable
    owner_out = cfg.run_dir.parent / f"{cfg.run.id}.run.out"
    owner_out.parent.mkdir(parents=True, exist_ok=True)
    procs = [_popen(pair.exec("owner", py, "-m", "clicooper_bus.tools.cli", "run", "--config",
                              str(path)), owner_out)]
    try:
        made = RunLayout(cfg.run_dir).config
        deadline = time.monotonic() + 120
        while not made.exists():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the owner side did not start: {owner_out.read_text()[-2000:]}")
            time.sleep(0.1)
        tel = RunLayout(cfg.run_dir).telemetry
        tel.mkdir(parents=True, exist_ok=True)
        for t in cfg.participants.trainers:
            procs.append(_popen(pair.exec("device", py, "-m", "clicooper_bus.services.trainer",
                                          "--config", str(path), "--name", t),
                                tel / f"{t}.jsonl"))
        code = procs[0].wait(timeout=RUN_TIMEOUT_S)
        for pr in procs[1:]:
            pr.wait(timeout=60)
        if code != 0:
            raise SystemExit(f"the run {cfg.run.id} failed ({code}): {owner_out.read_text()[-2000:]}")
        return code
    finally:
        _stop(procs)


def link_bytes(run_dir: Path) -> dict[str, int]:
    """Envelope bytes over the link, from the run's log: `epoch_up`/`epoch_down` for the
    training traffic, `run_up`/`run_down` for everything (see the module's docstring)."""
    from clicooper_bus.net.roster import Roster
    from clicooper_bus.net.wire import parse_header, split_leaf
    from clicooper_bus.tlog.log import ProvenanceLog

    out = dict.fromkeys(("epoch_up", "epoch_down", "run_up", "run_down"), 0)
    with ProvenanceLog.open(RunLayout(run_dir).log) as plog:
        roster = Roster.open(plog.roster_bytes)
        stages = set(roster.stages)
        device = {m.key_id for m in roster.members if m.name in stages}
        for i in range(plog.size):
            leaf = plog.leaf(i)
            h = parse_header(split_leaf(leaf)[0], plog.limits)
            size = len(h.topic) + len(leaf) + h.body_len
            up = size if h.sender in device else 0
            copies = 1 if h.to in stages else len(stages) if h.kind in BROADCASTS else 0
            out["run_up"] += up
            out["run_down"] += size * copies
            if h.kind in TRAINING:
                out["epoch_up"] += up
                out["epoch_down"] += size * copies
    return out


def one_run(pair: netns.Pair, workdir: Path, s: Setting, train_limit: int, test_limit: int,
            tag: str) -> Result:
    """Shape the link, train one epoch across it, read what it measured; removes the run."""
    path = _config(workdir, s, train_limit, test_limit, tag)
    cfg = load_config(path)
    netns.shape(pair, LINKS[s.link])
    load = os.getloadavg()[0]
    down0, up0 = netns.tx_bytes(pair.owner, pair.owner_if), netns.tx_bytes(pair.device,
                                                                            pair.device_if)
    _launch(pair, path)
    down = netns.tx_bytes(pair.owner, pair.owner_if) - down0
    up = netns.tx_bytes(pair.device, pair.device_if) - up0
    epoch_s, accuracy = training_epoch(cfg.run_dir)
    summary = json.loads(RunLayout(cfg.run_dir).summary.read_text())
    owner = next((r for r in summary.get("cpu", {}).get("processes", []) if r["role"] == "owner"),
                 {})
    counted = link_bytes(cfg.run_dir)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return Result(s, epoch_s, summary["steps"], accuracy, owner.get("cpu_s_per_step"),
                  wire_up=up, wire_down=down, load=load, **counted)


# --- the link and the head alone ---------------------------------------------------------------

_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7299)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n, t0 = 0, None
while (b := c.recv(1 << 20)):
    t0 = t0 or time.perf_counter(); n += len(b)
print(n * 8 / (time.perf_counter() - t0), flush=True)
"""
_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7299)); left = int(sys.argv[2]); chunk = bytes(1 << 20)
while left > 0:
    c.sendall(chunk[:min(left, len(chunk))]); left -= len(chunk)
c.close()
"""


def link_rate(pair: netns.Pair, rate_bit_s: float, seconds: float = 3.0) -> float:
    """The TCP goodput of one stream from the device to the owner's side over the link shaped
    at `rate_bit_s`, in bit/s, sending for about `seconds`."""
    netns.shape(pair, rate_bit_s)
    sink = subprocess.Popen(pair.exec("owner", sys.executable, "-c", _SINK, pair.owner_ip),
                            stdout=subprocess.PIPE, text=True)
    try:
        sink.stdout.readline()
        subprocess.run(pair.exec("device", sys.executable, "-c", _SOURCE, pair.owner_ip,
                                 str(int(rate_bit_s / 8 * seconds))), check=True, timeout=120)
        return float(sink.stdout.readline())
    finally:
        sink.kill()
        sink.wait()


def head_cpu_per_step(threads: int, batch: int = 128, steps: int = 40) -> tuple[float, float]:
    """(CPU seconds of every thread of this process, wall seconds) of the demo head's training
    step alone: forward of a real batch, backward of a gradient of the output's shape, Adam
    step; `threads` torch threads waiting passively, as a synchronous owner's
    (`services/common.openmp_policy`; a spinning thread would count its spin as CPU), after 5
    warm-up steps. Run in a fresh process (`_spawned`): the wait policy is read when torch
    loads."""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from clicooper_bus.ml.data import load_dataset
    from clicooper_bus.ml.models import build_segments, configured_split
    from clicooper_bus.ml.split import SegmentTrainer

    cfg = load_config(None, {"participants": {"trainers": ["trainer-1", "trainer-2"]}})
    torch.set_num_threads(threads)
    data = load_dataset(cfg.data.name, None, 0).limit(batch, 1)
    spec, cuts, _ = configured_split(cfg, data.input_shape, data.classes)
    head = SegmentTrainer(build_segments(spec, cuts, 0)[0], lr=cfg.run.lr, is_head=True)
    x = torch.tensor(data.x_train[:batch], dtype=torch.float32)
    grad = None
    for i in range(steps + 5):
        if i == 5:
            t0, w0 = time.process_time(), time.perf_counter()
        out = head.forward(x, i)
        grad = torch.randn_like(out) * 1e-3 if grad is None else grad
        head.backward(grad, i)
    return (time.process_time() - t0) / steps, (time.perf_counter() - w0) / steps


def _spawned(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# --- the invocation ---------------------------------------------------------------------------


def measure(pair: netns.Pair, workdir: Path, bench: Bench, *, codecs: list[str],
            in_flights: list[int], links: list[str], scaling: list[int], scaling_codec: str,
            quick: bool) -> None:
    """Every setting, the unlimited run of each (codec, in_flight) first, then its links;
    then the scaling runs. Appends to `bench.results` as it goes (an interrupted benchmark
    keeps what it measured)."""
    for name in links:
        if LINKS[name] is not None:
            bench.rates[name] = link_rate(pair, LINKS[name], 1.0 if quick else 3.0)
            print(f"  {name}: TCP goodput {bench.rates[name] / 1e6:,.1f} Mbit/s", flush=True)
    threads = load_config(None).run.threads
    bench.head_cpu_step_s, bench.head_wall_step_s = _spawned(head_cpu_per_step, threads)
    print(f"  the head alone, in process: {bench.head_cpu_step_s * 1e3:.1f} ms CPU a step, "
          f"{bench.head_wall_step_s * 1e3:.1f} ms wall ({threads} threads)", flush=True)
    settings = [Setting(c, n, 2, link) for c in codecs for n in in_flights
                for link in ["unlimited", *[x for x in links if x != "unlimited"]]]
    settings += [Setting(scaling_codec, 1, k, link) for k in scaling
                 for link in ("unlimited", "100mbit")]
    done: set[Setting] = set()
    for i, s in enumerate(settings):
        if s in done:  # the scaling table's K = 2 runs are the main table's
            continue
        tag = f"{s.codec}-{s.in_flight}-{s.trainers}-{s.link}"
        res = one_run(pair, workdir, s, bench.train_limit, bench.test_limit, tag)
        bench.results.append(res)
        done.add(s)
        print(f"  [{i + 1}/{len(settings)}] {tag}: epoch {res.epoch_s:.1f} s, "
              f"{res.step_bytes / 1e6:.2f} MB a step, accuracy {res.accuracy:.3f}, "
              f"load {res.load:.1f}", flush=True)


def _find(bench: Bench, s: Setting) -> Result | None:
    return next((r for r in bench.results if r.setting == s), None)


def bound_s(bench: Bench, r: Result) -> tuple[float, float, float] | None:
    """(compute-bound epoch, link-bound epoch, ratio to the larger) of a run, or None when its
    unlimited run is missing."""
    base = _find(bench, Setting(r.setting.codec, r.setting.in_flight, r.setting.trainers,
                                "unlimited"))
    if base is None:
        return None
    rate = LINKS[r.setting.link]
    link_s = r.epoch_wire_bytes * 8 / rate if rate else 0.0
    return base.epoch_s, link_s, r.epoch_s / max(base.epoch_s, link_s)


def tables(bench: Bench) -> str:
    """The markdown tables of a benchmark."""
    out = ["| codec | in_flight | link | epoch | compute-bound epoch | bytes a step (up + down) "
           "| epoch's bytes, busier direction, on the wire | link-bound epoch | ratio to the "
           "bound (target <= 1.25) | ratio to compute-bound | test accuracy | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench.results:
        s, b = r.setting, bound_s(bench, r)
        if s.trainers != 2 or b is None:
            continue
        out.append(f"| {s.codec} | {s.in_flight} | {s.link} | {r.epoch_s:.1f} s | {b[0]:.1f} s | "
                   f"{r.step_bytes / 1e6:.3f} MB | {r.epoch_wire_bytes / 1e6:.1f} MB | "
                   f"{b[1]:.1f} s | **{b[2]:.2f}** | {r.epoch_s / b[0]:.2f} | "
                   f"{r.accuracy:.3f} | {r.load:.1f} |")
    out += ["", "| K trainers | link | epoch | steps | bytes a step (up + down) | per-hop "
                "added latency (2K hops a step) | ratio to the bound |", "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in bench.results if r.setting.in_flight == 1),
                    key=lambda r: (r.setting.codec, r.setting.trainers, r.setting.link)):
        s, b = r.setting, bound_s(bench, r)
        if s.link not in ("unlimited", "100mbit") or b is None:
            continue
        hop = (r.epoch_s - b[0]) / r.steps / (2 * s.trainers) if s.link != "unlimited" else 0.0
        out.append(f"| {s.trainers} ({s.codec}) | {s.link} | {r.epoch_s:.1f} s | {r.steps} | "
                   f"{r.step_bytes / 1e6:.3f} MB | {hop * 1e3:.1f} ms | {b[2]:.2f} |")
    out += ["", "| codec | in_flight | owner CPU a step, unlimited link | its head alone in "
                "process | ratio (target <= 1.3) |", "|---|---|---|---|---|"]
    for r in bench.results:
        s = r.setting
        if s.link == "unlimited" and s.trainers == 2 and r.owner_cpu_step_s:
            out.append(f"| {s.codec} | {s.in_flight} | {r.owner_cpu_step_s * 1e3:.1f} ms | "
                       f"{bench.head_cpu_step_s * 1e3:.1f} ms | "
                       f"**{r.owner_cpu_step_s / bench.head_cpu_step_s:.2f}** |")
    return "\n".join(out)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 6-step smoke run of each setting, "
                   "fp32 and int8 at in_flight 1, no scaling")
    p.add_argument("--train-limit", type=int, default=5120, help="training images (one epoch)")
    p.add_argument("--test-limit", type=int, default=1000, help="test images (not timed)")
    p.add_argument("--codecs", default="fp32,fp16,bf16,int8")
    p.add_argument("--in-flight", default="1,2", help="values of [run] in_flight")
    p.add_argument("--links", default=",".join(LINKS), help=f"of {', '.join(LINKS)}")
    p.add_argument("--scaling", default="1,2,3,4", help="trainer counts K ('' for none)")
    p.add_argument("--scaling-codec", default="fp32")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--clean", nargs="?", const="", metavar="TAG",
                   help="remove the namespaces and links left by a benchmark that was killed "
                        "(every pair whose creator is gone, or pair TAG), then exit")
    args = p.parse_args(argv)
    if args.quick:
        args.train_limit, args.test_limit = 768, 256
        args.codecs, args.in_flight, args.scaling = "fp32,int8", "1", ""
    return args


def _commit() -> str:
    """The checkout's commit, `+dirty` when files differ from it ('unknown' outside git):
    which code a result file measured."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def _split(text: str, typ=str) -> list:
    return [typ(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.clean is not None:
        if os.geteuid() != 0:
            print("bench_edge --clean needs root (it deletes network namespaces)",
                  file=sys.stderr)
            return 2
        removed = netns.remove_all(args.clean or None)
        print(f"removed {', '.join(removed) if removed else 'nothing'}")
        return 0
    why = netns.missing(shaping=True)
    if why:
        print(f"bench_edge needs root, iproute2 (`ip`, `tc`) and permission to make network "
              f"namespaces, to put the trainers behind an emulated link: {why}", file=sys.stderr)
        return 2
    bench = Bench({"machine": platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "load_at_start": os.getloadavg(),
                   # set: every process of every run waits this way (the user's choice wins
                   # over services/common.openmp_policy); unset: each process's own policy
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                   "commit": _commit()},
                  args.train_limit, args.test_limit)
    print(f"{bench.machine}; one epoch of {args.train_limit:,} images a run", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="clicooper-bench-edge-"))
    try:
        with netns.stop_on_signals(), netns.pair(OWNER_IP, DEVICE_IP) as pair:
            print(f"namespaces {pair.owner} and {pair.device} (tag {pair.tag}; if this is "
                  f"killed with SIGKILL: bench_edge --clean {pair.tag})", flush=True)
            measure(pair, workdir, bench, codecs=_split(args.codecs),
                    in_flights=_split(args.in_flight, int), links=_split(args.links),
                    scaling=_split(args.scaling, int), scaling_codec=args.scaling_codec,
                    quick=args.quick)
    except (KeyboardInterrupt, netns.Stopped) as exc:
        print(f"bench_edge: {exc or 'interrupted'}; every namespace and link it made is removed",
              file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        bench.machine["load_at_end"] = os.getloadavg()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(_doc(bench), indent=1))
    print("\n" + tables(bench))
    return 0


def _doc(bench: Bench) -> dict:
    doc = asdict(bench)
    for row, r in zip(doc["results"], bench.results, strict=True):
        b = bound_s(bench, r)
        row.update(framing=r.framing, epoch_wire_bytes=r.epoch_wire_bytes,
                   step_bytes=r.step_bytes, bound=b)
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
