"""The benchmark script keeps running (its numbers are recorded in docs/BENCHMARKS.md)."""

from tools.bench_log import main


def test_bench_quick_prints_every_section(capsys, tmp_path):
    assert main(["--quick", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| 1 KiB |") == 4 and out.count("| 1 MiB |") == 4
    assert "us per message" in out and "MB/s" in out
    assert "inclusion: at most" in out and "consistency: at most" in out
