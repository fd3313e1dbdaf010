"""The edge-link benchmark's machinery (issue 18), without timing anything: it explains what it
needs where it cannot run; the namespaces and the shaped veth pair it makes are removed with
every process inside, whether the measurement ends normally, raises, or is stopped by a signal
(or killed outright, then by `--clean`'s removal); and its ratio is the one the issue defines.

The namespace tests need root, `ip` and `tc` and skip otherwise, naming what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clicooper_bus.tools import bench_edge, netns
from clicooper_bus.tools.bench_edge import Bench, Result, Setting, bound_s

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from clicooper_bus.tools import netns
with netns.stop_on_signals(), netns.pair("10.79.0.1", "10.79.0.2") as p:
    netns.shape(p, 20e6)
    sleeper = __import__("subprocess").Popen(p.exec("device", "sleep", "60"))
    print(p.tag, sleeper.pid, flush=True)
    time.sleep(60)
"""


@pytest.fixture
def can():
    reason = netns.missing(shaping=True)
    if reason:
        pytest.skip(reason)


def _gone(pid: str) -> bool:
    """Whether process `pid` has exited (a zombie counts: its parent, gone, cannot reap it)."""
    for _ in range(50):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_it_says_what_it_needs_where_it_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert bench_edge.main([]) == 2
    err = capsys.readouterr().err
    assert "needs root, iproute2 (`ip`, `tc`)" in err and "not root" in err


def _qdiscs(p: netns.Pair) -> str:
    return "".join(subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev],
                                  capture_output=True, text=True).stdout
                   for ns, dev in ((p.owner, p.owner_if), (p.device, p.device_if)))


def test_the_link_is_shaped_both_ways_and_removed_with_its_processes_on_an_error(can):
    with pytest.raises(RuntimeError, match="measurement failed"), \
            netns.pair("10.79.0.1", "10.79.0.2") as p:
        netns.shape(p, 100e6)
        assert _qdiscs(p).count("tbf") == 2 and _qdiscs(p).count("rate 100Mbit") == 2
        netns.shape(p, 1e9)
        assert _qdiscs(p).count("rate 1Gbit") == 2 and "burst 40000b" in _qdiscs(p)
        netns.shape(p, None)
        assert "tbf" not in _qdiscs(p)
        assert netns.tx_bytes(p.owner, p.owner_if) >= 0
        sleeper = subprocess.Popen(p.exec("device", "sleep", "60"))
        assert set(netns.leftovers(p.tag)) == {p.owner, p.device}  # the link is inside them
        raise RuntimeError("measurement failed")
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert netns.leftovers(p.tag) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_removes_every_namespace_link_and_process(can, sig):
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        tag, sleeper = proc.stdout.readline().split()
        assert len(netns.leftovers(tag)) == 2  # both namespaces
        proc.send_signal(sig)
        assert proc.wait(timeout=20) != 0
        assert "Stopped" in proc.stderr.read() or sig == signal.SIGINT
        assert netns.leftovers(tag) == [] and _gone(sleeper)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_what_a_killed_benchmark_leaves_is_removed_by_clean(can):
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    tag, sleeper = proc.stdout.readline().split()
    proc.kill()  # no cleanup can run
    proc.wait()
    try:
        assert len(netns.leftovers(tag)) == 2
        assert tag in netns.stale()  # its creator is dead
    finally:
        removed = netns.remove_all(tag)
    assert len(removed) == 2 and netns.leftovers(tag) == [] and _gone(sleeper)


def test_clean_leaves_a_pair_whose_creator_still_runs(can, capsys):
    """`bench_edge --clean` removes what dead benchmarks left, never a live one's pair (a
    concurrent test_two_hosts or benchmark)."""
    with netns.pair("10.79.0.1", "10.79.0.2") as live:
        assert live.tag not in netns.stale()
        assert bench_edge.main(["--clean"]) == 0
        assert set(netns.leftovers(live.tag)) == {live.owner, live.device}
    assert netns.leftovers(live.tag) == []


def _result(link: str, epoch_s: float, down: int) -> Result:
    return Result(Setting("fp32", 1, 2, link), epoch_s, 40, 0.8, None, epoch_up=down // 2,
                  epoch_down=down, run_up=100, run_down=100, wire_up=110, wire_down=110, load=0.0)


def test_the_ratio_is_the_epoch_over_the_larger_of_compute_and_bytes_over_rate():
    bench = Bench({}, 5120, 1000)
    bench.results = [_result("unlimited", 10.0, 0), _result("100mbit", 30.0, 250_000_000),
                     _result("1gbit", 12.5, 250_000_000)]
    # 250 MB in the busier direction, x 1.1 framing from the counters, at 100 Mbit/s: 22 s
    assert bound_s(bench, bench.results[1]) == pytest.approx((10.0, 22.0, 30 / 22))
    assert bound_s(bench, bench.results[2]) == pytest.approx((10.0, 2.2, 1.25))  # compute-bound
    assert bench.results[1].step_bytes == 375_000_000 / 40
    assert "| fp32 | 1 | 100mbit | 30.0 s | 10.0 s |" in bench_edge.tables(bench)
