"""What a trainer's snapshot costs (issue 17 item 1): bytes, and milliseconds to take it (copies
and both digests) and to write it (safetensors, `write_atomic` with its fsyncs), for each
trainer stage of a model at a run's cuts, after a few Adam steps so that its moments exist.

    python -m clicooper_bus.tools.bench_snapshot --config configs/demo.toml --out /tmp/snapbench

prints one line a stage: parameters, bytes, median (and range) of `--repeat` snapshots, and the
cost a training step at `[run] snapshot_every`. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def bench(config: str | None, out: Path, repeat: int) -> list[dict]:
    """One row per trainer stage of `config`'s model and cuts (one thread, as trainers run)."""
    import torch

    from clicooper_bus.config import load_config
    from clicooper_bus.layout import RunLayout
    from clicooper_bus.ml.data import load_dataset
    from clicooper_bus.ml.models import build_segments, default_cuts, model_spec
    from clicooper_bus.ml.split import SegmentTrainer
    from clicooper_bus.services.trainer import snapshot

    cfg = load_config(config)
    torch.set_num_threads(cfg.run.trainer_threads)
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed)
    spec = model_spec(cfg.model.name, data.input_shape, data.classes)
    cuts = default_cuts(spec, len(cfg.participants.trainers))
    segments = build_segments(spec, cuts, cfg.run.seed)
    root = Path(tempfile.mkdtemp(dir=out))
    rows = []
    for i, module in enumerate(segments[1:len(cfg.participants.trainers) + 1], start=1):
        seg = SegmentTrainer(module, lr=cfg.run.lr)
        x = torch.randn(cfg.run.batch_size, *spec.shapes[cuts[i - 1]])
        for s in range(3):  # Adam's moments exist from the first update
            y = seg.forward(x, s)
            seg.backward(torch.ones_like(y), s)
        store = snapshot.Store(RunLayout(root).snapshots(f"trainer-{i}"), {"run_id": "bench"})
        take, write, size = [], [], 0
        for s in range(repeat):
            t0 = time.perf_counter()
            snap = snapshot.take(seg, s)
            t1 = time.perf_counter()
            size = store.keep(snap)
            take.append((t1 - t0) * 1e3)
            write.append((time.perf_counter() - t1) * 1e3)
        total = statistics.median(a + b for a, b in zip(take, write, strict=True))
        rows.append({"stage": i, "parameters": sum(p.numel() for p in module.parameters()),
                     "bytes": size, "take_ms": statistics.median(take),
                     "write_ms": statistics.median(write), "write_ms_range": (min(write),
                                                                              max(write)),
                     "ms_per_step": total / cfg.run.snapshot_every,
                     "snapshot_every": cfg.run.snapshot_every})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config (its model, cuts, batch size, snapshot_every)")
    p.add_argument("--out", default=tempfile.gettempdir(), help="where to write the snapshots "
                                                                "(the disk the run would use)")
    p.add_argument("--repeat", type=int, default=20, help="snapshots per stage (default 20)")
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for r in bench(args.config, Path(args.out), args.repeat):
        lo, hi = r["write_ms_range"]
        print(f"stage {r['stage']}: {r['parameters']:,} parameters, snapshot {r['bytes']:,} "
              f"bytes, take {r['take_ms']:.1f} ms, write {r['write_ms']:.1f} ms ({lo:.1f} to "
              f"{hi:.1f}; median of {args.repeat}); {r['ms_per_step']:.2f} ms a step at "
              f"snapshot_every = {r['snapshot_every']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
