"""The audit report's figures (PNG, matplotlib's Agg backend): the reconstructions beside their
originals, every family's score panel, the run's training curve, and the comparison of several
runs. Each writer returns whether it wrote its file (nothing to draw: no file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clicooper_bus.audit import families

RECONSTRUCTIONS, SCORES, TRAINING = "reconstructions.png", "scores.png", "training.png"
CAPTIONS = {
    TRAINING: "Training: the owner's loss and accuracies per epoch (from the run's summary)",
    SCORES: "Scores: every attack family's headline beside the lines it must beat",
    RECONSTRUCTIONS: "Reconstructions: the originals above each inversion attack's attempts",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reconstruction_grid(images: dict[str, np.ndarray], path: Path) -> bool:
    """Originals (`images["originals"]`, C x H x W in [0, 1]) above each attack's
    reconstructions, one row per attack. False (nothing written) without originals."""
    rows = ["originals"] + [k for k in images if k != "originals"]
    n = len(images.get("originals", []))
    if not n:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, name in enumerate(rows):
        for c in range(n):
            ax, img = axes[r][c], images[name][c]
            ax.imshow(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)),
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    _save(fig, path)
    return True


def scores_figure(attacks: list[dict[str, Any]], path: Path) -> bool:
    """One panel per registered family (left empty when none of its attacks ran)."""
    if not attacks:
        return False
    plt = _pyplot()
    fams = sorted(families.families(), key=lambda f: f.panel)
    fig, axes = plt.subplots(1, len(fams), figsize=(13, 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams, strict=True):
        rows = families.rows_of(attacks, fam.name)
        if rows:
            fam.plot(ax, rows)
    _save(fig, path)
    return True


def training_curve(summary: dict[str, Any], path: Path) -> bool:
    """Loss (left) and train / test accuracy (right) per epoch from the run's summary
    (`per_epoch` rows: epoch, loss, train_accuracy, optional accuracy). False without rows."""
    rows = [r for r in (summary or {}).get("per_epoch") or [] if "loss" in r]
    if not rows:
        return False
    plt = _pyplot()
    epochs = [r.get("epoch", i) + 1 for i, r in enumerate(rows)]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss.plot(epochs, [r["loss"] for r in rows], "o-", color="tab:red")
    loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    pseudo = any(r.get("train_accuracy_on") == "pseudo-labels" for r in rows)
    acc.plot(epochs, [r.get("train_accuracy", np.nan) for r in rows], "o-",
             label="train" + (" (pseudo-labels)" if pseudo else ""))
    tested = [(e, r["accuracy"]) for e, r in zip(epochs, rows, strict=True) if "accuracy" in r]
    if tested:
        acc.plot(*zip(*tested, strict=True), "s--", label="test")
    acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    acc.legend(fontsize=7)
    for ax in (loss, acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)
    return True


def compare_figure(names: list[str], values: dict[str, list[float | None]], runs: list[str],
                   path: Path) -> None:
    """Grouped bars: each attack's headline score (`values[name][run]`) in each run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 3.6))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        ys = [values[n][i] if values[n][i] is not None else 0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, ys, width, label=run)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=7)
    ax.set_ylabel(" / ".join(f.label for f in families.families()))
    ax.legend(fontsize=7)
    _save(fig, path)
