"""What replay verification costs and how far an honest replay lands from the run (issue 19):
run a config `--repeat` times with `[log] retention = "verify"`, then re-execute every stage
from each run's log (`audit.training_replay.verify_training`).

    python -m clicooper_bus.tools.bench_replay --config configs/demo.toml --epochs 1 --repeat 3

prints, per run: the run's wall time and its training time (the owner's epochs), the log's
bytes on disk and per epoch, the replay's wall time, and per stage its coverage and the largest
absolute difference between what it sent and what the replay computed (the measurement the
replay's tolerance, none, stands on). Then the largest difference between the runs' final
weights: zero only with watermarks off (each run's mark keys derive from its own log). A
benchmark: it measures and prints, it asserts nothing. `--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_one(config: str, out: Path, run_id: str, epochs: int) -> dict:
    """Run `config` once under `out` (retention `verify`) and replay it; one row."""
    from clicooper_bus.audit.training_replay import verify_training
    from clicooper_bus.layout import RunLayout
    from clicooper_bus.tools.run import run

    over = {"run": {"id": run_id, "out_dir": str(out), "epochs": epochs},
            "log": {"retention": "verify"},
            "participants": {"observers": []}}  # no auditor following: the run alone is timed
    t0 = time.perf_counter()
    code = run(config, overrides=over, force=True, echo=False)
    run_s = time.perf_counter() - t0
    layout = RunLayout(out / run_id)
    if code != 0:
        raise SystemExit(f"bench_replay: run {run_id} exited {code}; see {layout.telemetry}")
    summary = json.loads(layout.summary.read_text())
    t0 = time.perf_counter()
    verdicts = verify_training(layout.root)
    replay_s = time.perf_counter() - t0
    log_bytes = _bytes_under(layout.log)
    return {"run": run_id, "run_s": run_s,
            "training_s": sum(r["wall_s"] for r in summary["per_epoch"]),
            "steps": summary["steps"], "epochs": len(summary["per_epoch"]),
            "log_bytes": log_bytes, "log_bytes_per_epoch": log_bytes / max(1, epochs),
            "replay_s": replay_s,
            "stages": [{"trainer": v.trainer, "ok": v.ok, "stopped": v.stopped,
                        "coverage": v.coverage, "checked": v.checked,
                        "largest_difference": v.largest} for v in verdicts]}


def weights_spread(out: Path, run_ids: list[str]) -> float:
    """The largest absolute difference of any weight between the runs' final models."""
    from safetensors.numpy import load_file

    from clicooper_bus.layout import RunLayout

    models = [load_file(RunLayout(out / r).root / "model.safetensors") for r in run_ids]
    return max(float(abs(m[k] - models[0][k]).max(initial=0.0))
               for m in models[1:] for k in models[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--epochs", type=int, default=1, help="epochs a run (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="identical runs (default 3)")
    ap.add_argument("--out", default="runs/bench-replay", help="where the runs go")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.repeat < 1:
        ap.error("--epochs and --repeat must be at least 1")
    from clicooper_bus.config import load_config

    out = Path(args.out).resolve()
    marked = load_config(args.config).watermark.enabled
    rows = []
    for i in range(1, args.repeat + 1):
        row = bench_one(args.config, out, f"replay-{i}", args.epochs)
        rows.append(row)
        worst = max(s["largest_difference"] for s in row["stages"])
        cover = min(s["coverage"] for s in row["stages"])
        bad = [s["trainer"] for s in row["stages"] if not s["ok"] or s["stopped"]]
        print(f"run {i}/{args.repeat}: {row['steps']} steps, run {row['run_s']:.1f} s "
              f"(training {row['training_s']:.1f} s), log {row['log_bytes'] / 2**20:.1f} MiB "
              f"({row['log_bytes_per_epoch'] / 2**20:.1f} MiB an epoch), replay "
              f"{row['replay_s']:.1f} s ({row['replay_s'] / row['training_s']:.2f} x training), "
              f"coverage {cover:.0%}, largest difference {worst:.3g}"
              + (f"; NOT VERIFIED: {', '.join(bad)}" if bad else ""), flush=True)
    if len(rows) > 1:
        spread = weights_spread(out, [r["run"] for r in rows])
        print(f"final weights across the {len(rows)} runs: largest difference {spread:.3g}"
              + (" (watermarks on: each run's mark keys derive from its own log)" if marked
                 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
