"""`clicooper finetune RUN_DIR`: the owner's fine-tune of a finished run (`[privacy]
finetune_epochs`, `ml/finetune.py`), offline on the owner's machine.

`clicooper run` calls it once the run's processes have left and the run ended with exit code
0; a deployment that starts the
processes itself (the Procfile, remote trainers) runs it after the run. It reads the run's
certified `model.safetensors` and the owner's data (the run's `config.toml`), fine-tunes the
owner's head and tail with the stages frozen, writes `model.finetuned.safetensors` (its
metadata names the certified model it came from and says it is not certified), and adds to
`summary.json` a `finetune` entry: the accuracy reached, the split-trained one, the FLOPs and
CPU seconds spent, the owner's share of the training FLOPs with them counted, and with
`finetune_control` the control arm's. Nothing is sent: no trainer is involved.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout, write_atomic
from clicooper_bus.ml.build import build_segments, segments_from_state_dict, state_dict_with_prefix
from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.delivered import read_card
from clicooper_bus.ml.finetune import finetune
from clicooper_bus.services.owner.artefacts import write_summary


def owned(n_segments: int) -> tuple[int, ...]:
    """The owner's segments of a run with an owner tail: the head (0) and the tail (the last)."""
    return (0, n_segments - 1)


def trained_samples(summary: dict, n_train: int, batch_size: int) -> int:
    """The samples the split training went through: its steps' batches, at most `epochs` times
    the training set (the last batch of an epoch is short)."""
    return min(summary["steps"] * batch_size, summary["epochs"] * n_train)


def share(compute: dict, samples: int, extra_flops: float) -> float:
    """The owner's share (0..1) of the training FLOPs of `samples` training samples at the
    compute plan's per-sample counts, with `extra_flops` of the owner's own added."""
    return (compute["owner_flops"] * samples + extra_flops) / \
        (compute["train_flops"] * samples + extra_flops)


def finetune_run(run_dir: str | os.PathLike[str]) -> dict:
    """Fine-tune the finished run in `run_dir` as its config says; returns the summary's new
    `finetune` entry. Raises ClicooperError for a run that is not finished, has no model, or
    does not configure a fine-tune."""
    layout = RunLayout(Path(run_dir))
    if not layout.config.exists() or not layout.summary.exists():
        raise ClicooperError(f"{run_dir} holds no finished run (config.toml and summary.json)")
    cfg = load_config(layout.config)
    p, r = cfg.privacy, cfg.run
    if not p.finetune_epochs:
        raise ClicooperError(f"{layout.config} sets no [privacy] finetune_epochs: nothing to do")
    summary = json.loads(layout.summary.read_text())
    if summary.get("stopped") or not layout.model.exists():
        raise ClicooperError(f"run {r.id} stopped without a model: there is nothing to fine-tune")
    card, weights = read_card(layout.model, layout)
    plan = card.plan
    segments = segments_from_state_dict(card.spec, plan.segment_cuts, plan.seed, weights)
    data = load_dataset(cfg.data.name, cfg.data.path or None, r.seed)
    data = data.limit(cfg.data.train_limit or None, cfg.data.test_limit or None)
    # no release clip: it bounded what left the owner, and the fine-tuned model never leaves
    # (the head learns the scale the frozen stages read best; with the clip the fine-tune of
    # the demo's cut under noise 0.3 reached 0.19 where without it 0.60)
    kw = {"epochs": p.finetune_epochs, "samples": p.finetune_samples, "batch_size": r.batch_size,
          "lr": p.finetune_lr, "seed": r.seed, "release": None}
    print(f"finetune: the owner's head and tail of run {r.id}, {p.finetune_epochs} epoch(s) on "
          f"{p.finetune_samples or len(data.x_train)} samples, the stages frozen", flush=True)
    tuned, got = finetune(segments, owned(len(segments)), data, **kw)
    certified = hashlib.sha256(layout.model.read_bytes()).hexdigest()
    with safe_open(str(layout.model), framework="pt") as f:
        meta = {**(f.metadata() or {}), "release": json.dumps(None),  # inference: no clip
                "finetuned_from": certified, "certified": "false"}
    raw = save(state_dict_with_prefix(tuned), metadata=meta)
    write_atomic(layout.finetuned_model, raw)
    samples = trained_samples(summary, len(data.x_train), r.batch_size)
    entry = {**got.to_json(), "model_file": layout.finetuned_model.name,
             "model_sha256": hashlib.sha256(raw).hexdigest(), "finetuned_from": certified,
             "split_accuracy": summary["test_accuracy"],
             "owner_flops_share": share(summary["compute"], samples, got.flops),
             "note": "the owner's head and tail trained on its clean data with the stages "
                     "frozen, after the run: nothing was sent; the certified model is "
                     f"{layout.model.name}. Trained on the true labels: no epsilon of the run "
                     "covers it"}
    print(f"finetune: test accuracy {got.accuracy:.4f} (split training "
          f"{summary['test_accuracy']:.4f}); the owner's share of the training FLOPs with the "
          f"fine-tune {entry['owner_flops_share']:.1%}", flush=True)
    if p.finetune_control:
        untrained = build_segments(card.spec, plan.segment_cuts, plan.seed)
        _, control = finetune(untrained, owned(len(untrained)), data, **kw)
        entry["control"] = {**control.to_json(),
                            "note": "the same fine-tune from the run's initial weights: what "
                                    "the owner reaches without any trainer (not counted in "
                                    "the owner's share)"}
        print(f"finetune: control arm (the same from untrained weights) {control.accuracy:.4f}",
              flush=True)
    summary["finetune"] = entry
    write_summary(layout, summary)
    return entry
