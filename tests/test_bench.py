"""The benchmark scripts keep running (their numbers are recorded in docs/BENCHMARKS.md)."""

from clicooper_bus.tools.bench_log import main as bench_log


def test_bench_log_quick_prints_every_section(capsys, tmp_path):
    assert bench_log(["--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| 1 KiB |") == 5 and out.count("| 1 MiB |") == 4
    # the outbox: every message appended is read back (fewer than the bus keeps)
    assert "| 1 KiB | 50 |" in out and "| 0.8 MB | 20 |" in out, out
    assert [row.split("|")[5].strip() for row in out.splitlines()
            if row.startswith(("| 1 KiB | 50 |", "| 0.8 MB | 20 |"))] == ["50", "20"], out
    assert "us per message" in out and "MB/s" in out
    assert "inclusion: at most" in out and "consistency: at most" in out


def test_bench_bus_throughput_paths_deliver():
    """The three throughput paths deliver every message (a lost one would read as NaN)."""
    from clicooper_bus.tools.bench_bus import bus_throughput, raw_throughput

    (raw, raw_cpu), (brk, brk_cpu) = (raw_throughput(30, via_broker=False),
                                      raw_throughput(30, via_broker=True))
    rates = [raw, brk, bus_throughput(30)]
    assert all(r > 0 for r in rates), rates
    assert raw_cpu > 0 and brk_cpu > 0  # every process reported the CPU it spent


def test_bench_transport_reads_cpu_and_pairs_ratios_within_a_repeat():
    """The transport benchmark's parts that need no run: /proc CPU of a process, and ratios
    taken within each repeat before their median."""
    import os

    from clicooper_bus.tools.bench_transport import Result, _stat, summarise

    state, parent, cpu = _stat(os.getpid())
    assert state in "RSD" and parent == os.getppid() and cpu > 0
    assert _stat(2 ** 22 + 1) is None  # above pid_max: gone
    runs = [Result(m, k, t, 0.5, 0.1, 100, 0, {}) for k, ts in enumerate(((2, 3, 3.75), (4, 5, 5)))
            for m, t in zip(("none", "curve", "attacked"), ts, strict=True)]
    s = summarise(runs)
    assert s["curve/none"]["each"] == [1.5, 1.25] and s["curve/none"]["median"] == 1.375
    assert s["attacked/undisturbed"]["each"] == [1.25, 1.0]
    assert runs[0].cpu_us_per_message == 1000
