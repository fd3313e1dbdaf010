"""The benchmark scripts keep running (their numbers are recorded in docs/BENCHMARKS.md)."""

from clicooper_bus.tools.bench_log import main as bench_log


def test_bench_log_quick_prints_every_section(capsys, tmp_path):
    assert bench_log(["--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| 1 KiB |") == 4 and out.count("| 1 MiB |") == 4
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
