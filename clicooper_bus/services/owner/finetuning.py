"""The owner's fine-tune after a finished run (`[privacy] finetune_epochs`, `ml.finetune`): it
runs once the log is closed, so nothing of it can reach a trainer, writes
`model.finetuned.safetensors` beside the run's model (which stays the certified one) and adds
to `summary.json` what it reached, what the control arm reached and the owner's share of the
training FLOPs with the fine-tune counted."""

from __future__ import annotations

import json

from clicooper_bus.config import RunConfig
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.build import build_segments
from clicooper_bus.ml.finetune import finetune
from clicooper_bus.services.owner import artefacts
from clicooper_bus.services.owner.setup import OwnerSetup


def owned(setup: OwnerSetup) -> tuple[int, ...]:
    """The owner's segments: the head (0) and the tail (the last)."""
    return (0, len(setup.segments) - 1)


def share(summary: dict, epochs: int, n_train: int, extra_flops: float) -> float:
    """The owner's share (0..1) of the run's training FLOPs with `extra_flops` of its own added
    to `epochs` epochs of `n_train` samples at the compute plan's per-sample counts."""
    c = summary["compute"]
    steps = epochs * n_train
    return (c["owner_flops"] * steps + extra_flops) / (c["train_flops"] * steps + extra_flops)


def after_run(cfg: RunConfig, setup: OwnerSetup, layout: RunLayout) -> dict:
    """Fine-tune (and, with `finetune_control`, the control arm), write the fine-tuned model,
    and add the `finetune` entry to the summary; returns that entry."""
    p, r = cfg.privacy, cfg.run
    flt = setup.defences.filter
    kw = {"epochs": p.finetune_epochs, "samples": p.finetune_samples,
          "batch_size": r.batch_size, "lr": r.lr, "seed": r.seed,
          "release": flt.spec if flt is not None else None}
    print(f"owner: fine-tuning the head and tail for {p.finetune_epochs} epoch(s), the stages "
          f"frozen, nothing released", flush=True)
    tuned, got = finetune(setup.segments, owned(setup), setup.data, **kw)
    sha = artefacts.write_model(layout, setup, r.id, segments=tuned, path=layout.finetuned_model)
    summary = json.loads(layout.summary.read_text())
    epochs = summary["epochs"]
    entry = {**got.to_json(), "model_file": layout.finetuned_model.name, "model_sha256": sha,
             "split_accuracy": summary["test_accuracy"],
             "owner_flops_share": share(summary, epochs, len(setup.data.x_train), got.flops),
             "note": "the owner's head and tail trained on clean data with the stages frozen, "
                     "after the log closed: released nothing; the certified model is "
                     f"{layout.model.name}"}
    print(f"owner: fine-tuned test accuracy {got.accuracy:.4f} (split training "
          f"{summary['test_accuracy']:.4f}); the owner's share of the training FLOPs with it "
          f"{entry['owner_flops_share']:.1%}", flush=True)
    if p.finetune_control:
        untrained = build_segments(setup.spec, setup.plan.segment_cuts, r.seed)
        _, control = finetune(untrained, owned(setup), setup.data, **kw)
        entry["control"] = {**control.to_json(),
                            "note": "the same fine-tune from the run's initial weights: what "
                                    "the owner reaches without any trainer"}
        print(f"owner: control arm (same fine-tune, untrained stages) {control.accuracy:.4f}",
              flush=True)
    summary["finetune"] = entry
    artefacts.write_summary(layout, summary)
    return entry
