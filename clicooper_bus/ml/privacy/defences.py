"""The owner's defences of one run, built from the `[privacy]` config section: the activation
filter, the randomised response on labels, the label codec, and the privacy they spend. One
object, so the owner, the summary and the auditor describe the same thing the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clicooper_bus.config import PrivacySection
from clicooper_bus.ml.privacy import accountant
from clicooper_bus.ml.privacy.labels import LabelCodec
from clicooper_bus.ml.privacy.randomised_response import (
    SPACE,
    RandomisedResponse,
    keep_threshold,
    realised_epsilon,
)
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec


def releases_per_sample(p: PrivacySection, epochs: int) -> int:
    """How often each training sample's activation is released: once per epoch with fresh
    noise, or once for the whole run."""
    return 1 if p.release == "once" else max(1, epochs)


def noise_level(p: PrivacySection, epochs: int) -> float:
    """Noise per coordinate (Gaussian std or Laplace scale), given or calibrated from epsilon."""
    if p.mechanism == "none":
        return 0.0
    if p.noise_multiplier:
        return p.noise_multiplier * p.clip
    return accountant.calibrate(p.mechanism, p.epsilon, p.delta, p.clip,
                                releases_per_sample(p, epochs))


def filter_spec(p: PrivacySection, epochs: int) -> FilterSpec | None:
    if p.mechanism == "none":
        return None
    return FilterSpec(p.mechanism, p.clip, noise_level(p, epochs), p.release)


def describe(p: PrivacySection) -> str:
    """A short name of the configuration, for reports."""
    if p.name:
        return p.name
    parts = []
    if p.mechanism != "none":
        level = f"epsilon {p.epsilon:g}" if p.epsilon else f"noise x{p.noise_multiplier:g}"
        parts.append(f"{p.mechanism} ({level}, clip {p.clip:g}, {p.release})")
    elif p.release == "once":
        parts.append("fixed head")
    if p.label_gamma > 1:
        parts.append(f"labels x{p.label_gamma}")
    if p.owner_tail:
        parts.append("owner tail")
    if p.nopeek:
        parts.append(f"NoPeek {p.nopeek:g}")
    if p.label_epsilon:
        parts.append(f"randomised labels (epsilon {p.label_epsilon:g})")
    if p.label_dcor:
        parts.append(f"label dCor {p.label_dcor:g}")
    if p.finetune_epochs:
        parts.append(f"owner fine-tune ({p.finetune_epochs} epochs)")
    if p.evaluate == "owner":
        parts.append("owner-side evaluation")
    return " + ".join(parts) or "undefended"


def spent(p: PrivacySection, planned_epochs: int, epochs: int,
          evaluations: int, classes: int = 10) -> dict[str, Any]:
    """Epsilon actually spent by the training set over the `epochs` that ran (the noise was
    calibrated for `planned_epochs`) and, when evaluation goes through the chain, by the test
    set, with delta, adjacency and sensitivity; under `labels`, the label-DP that randomised
    response over `classes` labels gives (`label_spent`)."""
    labels = label_spent(p, classes)
    if p.mechanism == "none":
        return {"mechanism": "none", "epsilon": None, "labels": labels,
                "note": "no activation protection: the releases are not differentially private"}
    noise = noise_level(p, planned_epochs)
    train = accountant.spent(p.mechanism, noise, p.clip, releases_per_sample(p, epochs),
                             p.delta).to_json()
    out: dict[str, Any] = {**train, "target_epsilon": p.epsilon or None,
                           "noise_multiplier": noise / p.clip, "scope": scope(p),
                           "labels": labels}
    if evaluations and p.evaluate == "chain":
        n = 1 if p.release == "once" else evaluations
        out["test_set"] = accountant.spent(p.mechanism, noise, p.clip, n, p.delta).to_json()
    return out


def label_spent(p: PrivacySection, classes: int = 10) -> dict[str, Any]:
    """The label-DP of the transcript: randomised response's realised epsilon (pure, delta 0)
    with its adjacency, scope and sampler, or a statement that the labels are not protected."""
    if not p.label_epsilon:
        return {"epsilon": None, "note": "no randomised response: what trainers receive is a "
                                         "function of the true labels"}
    t = keep_threshold(p.label_epsilon, classes)
    return {"epsilon": realised_epsilon(t, classes), "delta": 0.0, "classes": classes,
            "keep_probability": t / SPACE,
            "adjacency": "label: one training sample's label changed",
            "scope": "every message of the run, every stage and epoch, and every run the owner "
                     "makes with the same secret, number of classes and label_epsilon (each "
                     "image's randomised label is drawn once, keyed by the secret and the "
                     "image's SHA-256); runs at another label_epsilon, or after the secret is "
                     "made anew, draw afresh and their epsilons add. Test labels are never "
                     "sent. It bounds what the labels add, not what the images themselves tell "
                     "of their class",
            "sampler": "HMAC-SHA256 integers against an integer threshold, the other class by "
                       "rejection: exact (computational: it rests on HMAC being a PRF)"}


def scope(p: PrivacySection) -> str:
    """What the epsilon covers. With `once` the head is fixed, so a sample's only influence on
    what leaves the owner is its own release: the epsilon bounds the run. With `per-step` the
    head trains on raw images without DP, so a sample also shapes later releases of other
    samples through the head's weights: the epsilon bounds its own releases only."""
    if p.release == "once":
        return ("the whole run: the head is fixed, so each sample reaches the trainers only "
                "through its own release")
    return ("each sample's own activation releases only, NOT a differential-privacy guarantee "
            "for the run: the head trains on raw images without DP, so a sample also shapes "
            "later releases of other samples through the head's weights")


@dataclass
class Defences:
    settings: PrivacySection
    filter: ActivationFilter | None
    codec: LabelCodec | None
    randomised: RandomisedResponse | None = None

    @classmethod
    def build(cls, p: PrivacySection, secret: bytes | None, classes: int,
              epochs: int, label_secret: bytes | None = None,
              train_images: np.ndarray | None = None) -> Defences:
        """`secret`: the run key (noise, pseudo-labels); `label_secret`: the owner's long-term
        secret, which keys randomised response (with each of `train_images`' digest) so that
        every run draws the same labels. Raises ValueError when a defence that needs a secret
        or the images has none."""
        spec = filter_spec(p, epochs)
        if (spec is not None or p.label_gamma > 1) and secret is None:
            raise ValueError("the owner's defences need its secret")
        if p.label_epsilon and (label_secret is None or train_images is None):
            raise ValueError("randomised response needs the owner's long-term secret and the "
                             "training images")
        flt = ActivationFilter(spec, secret) if spec is not None else None
        codec = LabelCodec(secret, classes, p.label_gamma) if p.label_gamma > 1 else None
        rr = RandomisedResponse(label_secret, classes, p.label_epsilon, train_images) \
            if p.label_epsilon else None
        return cls(p, flt, codec, rr)

    def train_labels(self, ids, labels):
        """What the owner trains with for samples `ids` with true `labels` (int64 arrays): the
        randomised labels under randomised response, else the true ones (before the codec)."""
        return self.randomised.labels(ids, labels) if self.randomised is not None else labels

    @property
    def head_fixed(self) -> bool:
        return self.settings.release == "once"
