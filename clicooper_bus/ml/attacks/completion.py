"""Model completion: label inference from a party's own bottom model and a few labelled samples
(Fu et al. 2022, "Label Inference Attacks Against Vertical Federated Learning", USENIX
Security 2022, section 4.1: the attacker puts a small classifier on top of the bottom model it
holds and trains it with a few labelled samples, then labels what its bottom model sees).

A trainer's bottom model is its own final stage (the segment it delivered; colluding trainers:
every stage, chained in the roster's order); its labelled samples are the first `labelled`
public aux images with their labels; what it labels are the training rows it received (`fwd`,
single, and linked: a sample's class probabilities averaged over its releases in several
epochs) and the evaluation rows of the test split's private half (`eval_fwd`).

To put a labelled image through a stage, the attacker needs the activation at the stage's
input. It uses, in this order, what a real attacker has:
- known plaintext: the evaluation traffic it received holds the activations of the public aux
  images at its own input, by position in the test split (the run evaluated through the
  chain). For the first trainer that is the owner's release of the image, for a later one its
  predecessor's output on it. Nothing has to be simulated.
- otherwise (evaluation on the owner only, or those batches not retained): a simulator of
  everything before the stage, of the plan's public architecture, trained on the aux images as
  extraction trains its head without pairs (`inversion.train_simulator`: its outputs matched
  to the received rows' distribution by a discriminator, kept confident and class-balanced
  through the stage by information maximisation; no labels), then applied to the labelled
  images.
The result's `how` names which.

Simplification, stated in the report: Fu et al. fine-tune the top with MixMatch; this fits a
softmax-regression (linear) top on the stage's standardised features (PCA to `COMPONENTS`) of
the labelled samples, then pseudo-labels (Lee 2013, "Pseudo-Label"): in each of `ROUNDS` rounds the
unlabelled received rows predicted with the most confidence, as many per predicted class, join
the labelled ones and the top is refitted.

Only the rows the party received are labelled, at most `ROWS` per channel (the latest release
of each sample first); the auditor scores them against the labels of their sample ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from clicooper_bus.ml.attacks.base import Attack, ThreatModel, Track, View, no_progress
from clicooper_bus.ml.attacks.channels import (
    received_field,
    run_stages,
    simulated,
    softmax,
    stage_field,
    stage_input_shape,
)
from clicooper_bus.ml.attacks.linking import Rows, link_releases
from clicooper_bus.ml.attacks.nets import apply

LABELLED = 50  # labelled aux samples, as extraction-50 and the own-data baseline have
ROWS = 4096  # rows labelled per channel (each sample's latest release first)
COMPONENTS = 64  # PCA components of the stage's features the top sees
PCA_ROWS = 2048  # unlabelled rows the PCA is fitted on
TOP_STEPS = 200  # full-batch Adam steps of each fit of the top
LR, DECAY = 0.05, 1e-3  # its step size and weight decay (keeps 50 labels from fitting noise)
ROUNDS = 2  # pseudo-labelling rounds
PSEUDO = 0.6  # share of the unlabelled rows pseudo-labelled by the last round
SIM_EPOCHS = 3  # simulator epochs over the aux images, when there is no known plaintext


@dataclass
class Completed:
    """What a completion attack labelled: per channel, the rows' sample ids (`split`: train
    or test) and the predicted classes (named: the labelled samples name them); `how` the
    stage's input for the labelled samples and the top, in words."""

    channels: dict[str, dict] = field(default_factory=dict)
    how: str = ""
    labelled: int = 0  # labelled samples the top was fitted on


def latest_once(rows: Rows, limit: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Row positions: each sample's latest release (among `keep` rows), at most `limit`."""
    pos = np.flatnonzero(keep) if keep is not None else np.arange(len(rows))
    order = pos[np.argsort(-rows.epochs[pos], kind="stable")]
    _, first = np.unique(rows.ids[order], return_index=True)
    return order[np.sort(first)][:limit]


class Top:
    """The completed top: features standardised and reduced by PCA, then a softmax regression
    (weights D x classes, bias): `proba(features)` is N x classes."""

    def __init__(self, pre: Pipeline):
        self.pre = pre
        self.weight: np.ndarray = np.zeros((0, 0), np.float32)
        self.bias: np.ndarray = np.zeros(0, np.float32)

    def reduce(self, f: np.ndarray) -> np.ndarray:
        return self.pre.transform(f.astype(np.float32)).astype(np.float32)

    def scores(self, z: np.ndarray) -> np.ndarray:
        return softmax(z @ self.weight + self.bias)

    def proba(self, f: np.ndarray) -> np.ndarray:
        return self.scores(self.reduce(f))

    def fit(self, z: np.ndarray, y: np.ndarray, classes: int) -> None:
        """Cross-entropy with weight decay, full batch, `TOP_STEPS` Adam steps from zero (in
        numpy: on a few thousand 64-wide rows autograd's overhead would be most of the time)."""
        onehot = np.eye(classes, dtype=np.float32)[y]
        params = [np.zeros((z.shape[1], classes), np.float32), np.zeros(classes, np.float32)]
        self.weight, self.bias = params
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        for t in range(1, TOP_STEPS + 1):
            err = (self.scores(z) - onehot) / len(z)  # d(mean cross-entropy)/d(logits)
            grads = [z.T @ err + DECAY * self.weight, err.sum(0)]
            for p, g, m1, v1 in zip(params, grads, m, v, strict=True):
                m1 += (1 - 0.9) * (g - m1)
                v1 += (1 - 0.999) * (g * g - v1)
                p -= LR * (m1 / (1 - 0.9 ** t)) / (np.sqrt(v1 / (1 - 0.999 ** t)) + 1e-8)


def fit_top(f_lab: np.ndarray, y_lab: np.ndarray, f_unlab: np.ndarray, classes: int,
            seed: int = 0) -> Top:
    """The top fitted on the labelled rows, then refitted `ROUNDS` times with class-balanced
    pseudo-labels of the unlabelled rows (the most confident, as many per predicted class,
    growing to a `PSEUDO` share). PCA is fitted on the labelled and (at most `PCA_ROWS`)
    unlabelled rows: everything the attacker holds."""
    fit_rows = np.vstack([f_unlab[:PCA_ROWS], f_lab]).astype(np.float32)
    # randomized SVD with 3 power iterations (scikit-learn's default here is 7): the top only
    # needs the leading directions roughly, and this is most of the attack's time
    top = Top(make_pipeline(StandardScaler(), PCA(
        n_components=min(COMPONENTS, *fit_rows.shape), svd_solver="randomized",
        iterated_power=3, random_state=seed)))
    # a stage whose features are constant (dead units) leaves PCA no variance to divide by:
    # its components are then arbitrary, and the top labels at chance, which is the truth
    with np.errstate(invalid="ignore", divide="ignore"):
        top.pre.fit(fit_rows)
    zl, zu = top.reduce(f_lab), top.reduce(f_unlab)
    top.fit(zl, y_lab, classes)
    for r in range(1, ROUNDS + 1):
        p = top.scores(zu)
        pred, conf = p.argmax(1), p.max(1)
        per = int(PSEUDO * len(zu) * r / ROUNDS / classes)  # grows each round
        chosen = np.concatenate([idx[np.argsort(-conf[idx])[:per]] for c in range(classes)
                                 for idx in [np.flatnonzero(pred == c)]])
        top.fit(np.vstack([zl, zu[chosen]]), np.concatenate([y_lab, pred[chosen]]), classes)
    return top


class ModelCompletion(Attack):
    """Model completion by one trainer alone: its own stage, the rows it received, the first
    `labelled` aux images with their labels."""

    name = "completion"
    family = "completion"
    title = "Model completion: a top on the party's own stage, fitted with 50 labelled aux images"
    per_trainer = True

    def __init__(self, trainer: str = "", index: int = 0, labelled: int = LABELLED,
                 seed: int = 0):
        """`index`: the trainer's stage (1 the first), from the roster's public order."""
        self.trainer, self.index, self.labelled, self.seed = trainer, index, labelled, seed
        self.stages = [trainer] if trainer else []
        if trainer:
            self.name = f"completion-{trainer}"
            self.title = (f"Model completion: a top on {trainer}'s stage, fitted with "
                          f"{labelled} labelled aux images")
            self.threat = ThreatModel(
                f"{trainer}, alone (non-colluding)",
                frozenset({"plan", received_field(trainer), stage_field(trainer), "aux_images",
                           "aux_labels"}),
                f"its own stage; public aux images, the first {labelled} with labels",
                aux_labels=labelled)

    def expand(self, stages: list[str]) -> list[Attack]:
        """One attack per trainer, and one for all of them colluding (two or more)."""
        alone: list[Attack] = [ModelCompletion(s, i, self.labelled, self.seed)
                               for i, s in enumerate(stages, 1)]
        return alone + ([CollusiveCompletion(stages, self.labelled, self.seed)]
                        if len(stages) > 1 else [])

    # what the attacking party feeds and holds: the first member's inputs, every member's stage
    def _inputs(self, view: View) -> dict[str, Rows]:
        return dict(getattr(view, received_field(self.stages[0])) or {})

    def _bottom(self, view: View) -> list[nn.Module]:
        return [getattr(view, stage_field(s)) for s in self.stages]

    def run(self, view: View, track: Track = no_progress) -> Completed:
        channels, stages, plan = self._inputs(view), self._bottom(view), view.plan
        fwd = channels.get("fwd")
        k = plan.classes
        if fwd is None or len(fwd) < 2 * k or any(s is None for s in stages):
            return Completed(how="no received training rows (or no stage) to label")
        shape = stage_input_shape(plan, self.index)
        aux, y = view.aux_images, np.asarray(view.aux_labels)
        n = len(y)
        lab, how = self._labelled_inputs(channels.get("eval_fwd"), n)
        if lab is None:
            lab, how = self._simulated_inputs(view, fwd, stages, shape, aux[:n], track)
            have = np.arange(n)
        else:
            lab, have = lab
        pick = latest_once(fwd, ROWS)
        feats = run_stages(stages, shape, fwd.x)  # every row: linking averages over releases
        top = fit_top(run_stages(stages, shape, lab), y[have], feats[pick], k, self.seed)
        out = Completed(how=f"{how}; softmax-regression top on {len(have)} labelled aux samples "
                            f"with {ROUNDS} rounds of pseudo-labels (not MixMatch)",
                        labelled=len(have))
        probs = top.proba(feats)
        out.channels["fwd"] = {"ids": fwd.ids[pick], "split": fwd.split, "source": "fwd",
                               "pred": probs[pick].argmax(1)}
        how, ids, mean, counts = link_releases(fwd, probs, self.seed)
        several = np.flatnonzero(counts >= 2)[:ROWS]
        if len(several) >= 2 * k:
            out.channels[f"fwd+{how}"] = {"ids": ids[several], "split": fwd.split,
                                          "source": "fwd",
                                          "releases": float(counts[several].mean()),
                                          "pred": mean[several].argmax(1)}
        for kind in ("eval_fwd", simulated("eval_fwd")):
            ev = channels.get(kind)
            if ev is not None:  # the test split's private half: not the attacker's aux images
                pos = latest_once(ev, ROWS, ev.ids >= len(aux))
                if len(pos) >= 2 * k:
                    p = top.proba(run_stages(stages, shape, ev.x[pos]))
                    out.channels[kind] = {"ids": ev.ids[pos], "split": "test",
                                          "source": "eval_fwd", "pred": p.argmax(1)}
        sim = channels.get(simulated("fwd"))
        if sim is not None and len(sim) >= 2 * k:  # the white-box simulated stream, same top
            self._linked(out, simulated("fwd"), sim, top.proba(run_stages(stages, shape, sim.x)))
        return out

    def _linked(self, out: Completed, kind: str, rows: Rows, probs: np.ndarray) -> None:
        """Channel `kind` (single releases) and `kind+linked` (each sample's mean probability
        over its releases; `kind+matched` under a secret order) from the top's probabilities
        on `rows`."""
        pick = latest_once(rows, ROWS)
        out.channels[kind] = {"ids": rows.ids[pick], "split": rows.split, "source": "fwd",
                              "pred": probs[pick].argmax(1)}
        how, ids, mean, counts = link_releases(rows, probs, self.seed)
        several = np.argsort(-counts, kind="stable")
        several = several[counts[several] >= 2][:ROWS]
        if len(several) >= 2 * probs.shape[1]:
            out.channels[f"{kind}+{how}"] = {"ids": ids[several], "split": rows.split,
                                              "source": "fwd",
                                              "releases": float(counts[several].mean()),
                                              "pred": mean[several].argmax(1)}

    def _labelled_inputs(self, ev: Rows | None, n: int):
        """((activations at the stage's input of the labelled aux images it has, their
        positions among the first n), how) from the evaluation rows received; (None, "") when
        fewer than half of them are there."""
        if ev is None:
            return None, ""
        pos = latest_once(ev, n, ev.ids < n)
        if len(pos) < max(2, n // 2):
            return None, ""
        return (ev.x[pos], ev.ids[pos].astype(np.int64)), (
            f"known plaintext: its received evaluation rows of {len(pos)} labelled aux images")

    def _simulated_inputs(self, view: View, fwd: Rows, stages: list[nn.Module],
                          shape: tuple[int, ...], images: torch.Tensor, track: Track):
        """The labelled images through a simulator of the layers before the stage (the plan's
        architecture), trained as extraction's head without pairs."""
        from clicooper_bus.ml.attacks.inversion import train_simulator

        # the plan cut at this stage's input: segment 0 is everything before the stage
        prefix = dataclasses.replace(view.plan, cuts=view.plan.cuts[self.index - 1:])
        pick = latest_once(fwd, ROWS)
        sim_view = SimpleNamespace(
            plan=prefix, aux_images=view.aux_images, stages=stages,
            released=fwd.x[pick].reshape(len(pick), *shape).astype(np.float32))
        sim, _ = train_simulator(sim_view, epochs=SIM_EPOCHS, adv=0.1, seed=self.seed,
                                 track=track, labels=None, decoder=False,
                                 desc=f"{self.name}: simulator epochs")
        acts = apply(sim, images).reshape(len(images), -1).numpy()
        return acts, ("no evaluation rows of the labelled images: a simulator of the layers "
                      "before the stage, matched to the received rows' distribution")


class CollusiveCompletion(ModelCompletion):
    """Every trainer colluding: their stages chained as one bottom model, fed the first
    trainer's received rows (the owner's releases). The auditor's row also takes the strongest
    of the members' own completions: colluders hold at least what each of them holds."""

    def __init__(self, stages: list[str], labelled: int = LABELLED, seed: int = 0):
        super().__init__("", 1, labelled, seed)
        self.trainer, self.stages = "all trainers", list(stages)
        self.name = "completion-colluding"
        self.title = (f"Model completion: a top on every stage chained, fitted with {labelled} "
                      f"labelled aux images")
        self.threat = ThreatModel(
            f"all trainers colluding ({', '.join(stages)})",
            frozenset({"plan", "aux_images", "aux_labels",
                       *(f(s) for s in stages for f in (received_field, stage_field))}),
            f"every stage; public aux images, the first {labelled} with labels",
            aux_labels=labelled)
