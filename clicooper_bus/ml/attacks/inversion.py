"""Input reconstruction from released activations: four attackers, from white-box to
black-box. Each returns images in [0, 1] for the first `targets` released activations; the
auditor scores them by SSIM against the originals it alone holds.

A decoder that scores below the class-mean attacker is weak, not the release private: the
class-mean line is what class information alone gives.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clicooper_bus.ml.attacks.base import Attack, ThreatModel, Track, View, no_progress
from clicooper_bus.ml.attacks.nets import (
    Discriminator,
    apply,
    batches,
    head_clone,
    seeded,
    train_decoder,
)


def _targets(view: View, n: int) -> torch.Tensor:
    return torch.tensor(np.asarray(view.released[:n], dtype=np.float32))


class WhiteBoxDecoder(Attack):
    """(a) Knows the owner's head: releases aux images exactly as the owner does (same noise),
    trains a decoder on those releases, applies it to the released training activations."""

    name = "whitebox-decoder"
    family = "inversion"
    title = "White-box decoder (owner's head known)"
    threat = ThreatModel("any trainer holding the owner's head weights",
                         frozenset({"plan", "released", "release", "aux_images"}),
                         "public aux images, released through the owner's own mechanism")

    def __init__(self, targets: int = 500, epochs: int = 10, seed: int = 0):
        self.targets, self.epochs, self.seed = targets, epochs, seed

    def run(self, view: View, track: Track = no_progress) -> np.ndarray:
        aux = view.aux_images
        torch.manual_seed(self.seed)
        acts = torch.cat([view.release(aux[i:i + 512]) for i in range(0, len(aux), 512)])
        dec = train_decoder(acts, aux, epochs=self.epochs, seed=self.seed, track=track,
                            desc="white-box decoder: training epochs")
        return apply(dec, _targets(view, self.targets)).numpy()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class UnSplitInversion(Attack):
    """(b) UnSplit (Erdogan et al. 2022): a clone of the head's architecture and the unknown
    inputs are optimised together so that clone(input) matches each released activation, with
    a total-variation prior; inputs start from the mean aux image."""

    name = "unsplit"
    family = "inversion"
    title = "UnSplit: clone head and input optimised together"
    threat = ThreatModel("trainer-1 (first stage), alone",
                         frozenset({"plan", "released", "aux_images"}),
                         "the head's architecture (roster plan); the mean public aux image as "
                         "a starting point")

    def __init__(self, targets: int = 500, iters: int = 300, tv: float = 0.05, seed: int = 0):
        self.targets, self.iters, self.tv, self.seed = targets, iters, tv, seed

    def run(self, view: View, track: Track = no_progress) -> np.ndarray:
        target = _targets(view, self.targets)
        clone = head_clone(view.plan, seed=self.seed + 1).train()
        mean = view.aux_images.mean(0, keepdim=True).clamp(0.02, 0.98)
        z = torch.logit(mean).repeat(len(target), 1, 1, 1).requires_grad_(True)
        opt = torch.optim.Adam([{"params": [z], "lr": 0.08},
                                {"params": clone.parameters(), "lr": 1e-3}])
        scale = target.pow(2).mean().clamp_min(1e-8)
        for _ in track(range(self.iters), "UnSplit: joint optimisation steps", self.iters):
            x = torch.sigmoid(z)
            loss = nn.functional.mse_loss(clone(x), target) / scale + self.tv * _tv(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.sigmoid(z).detach().numpy()


class SDARInversion(Attack):
    """(c) SDAR-style (Zhu et al., NDSS 2025): the colluding trainers train a head simulator
    on labelled aux images so that (1) their own stages classify its outputs correctly and
    (2) a discriminator cannot tell its outputs from the released activations; a decoder is
    trained through the simulator and applied to the released activations."""

    name = "sdar"
    family = "inversion"
    title = "SDAR-style distribution-matching simulator with decoder"
    threat = ThreatModel("all trainers, colluding",
                         frozenset({"plan", "released", "stages", "aux_images", "aux_labels"}),
                         "public aux images with their labels", aux_labels=None)

    def __init__(self, targets: int = 500, epochs: int = 8, adv: float = 0.1, seed: int = 0):
        self.targets, self.epochs, self.adv, self.seed = targets, epochs, adv, seed

    def run(self, view: View, track: Track = no_progress) -> np.ndarray:
        sim, dec = train_simulator(view, epochs=self.epochs, adv=self.adv, seed=self.seed,
                                   track=track, labels=torch.tensor(view.aux_labels),
                                   decoder=True, desc="SDAR: simulator and decoder epochs")
        return apply(dec, _targets(view, self.targets)).numpy()


def train_simulator(view: View, *, epochs: int, adv: float, seed: int, track: Track,
                    labels: torch.Tensor | None, decoder: bool, desc: str):
    """Head simulator on aux images, matched to the released activations' distribution by a
    discriminator, kept meaningful to the trainers' stages by classification (with labels) or
    by confident, class-balanced predictions (without). Optionally a decoder through it."""
    gen = seeded(seed)
    torch.manual_seed(seed)
    aux = view.aux_images
    real = torch.tensor(np.asarray(view.released, dtype=np.float32))
    tail = nn.Sequential(*[layer for s in view.stages for layer in s]).eval()
    for p in tail.parameters():
        p.requires_grad_(False)
    sim = head_clone(view.plan, seed=seed + 2).train()
    disc = Discriminator(tuple(real.shape[1:]))
    from clicooper_bus.ml.attacks.nets import Decoder

    dec = Decoder(tuple(real.shape[1:]), tuple(aux.shape[1:])) if decoder else None
    readout = _readout(view, tail, real)
    opt_s = torch.optim.Adam([*sim.parameters(), *readout.parameters()], lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
    opt_dec = torch.optim.Adam(dec.parameters(), lr=1e-3) if dec is not None else None
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in track(range(epochs), desc, epochs):
        for idx in batches(len(aux), 64, gen):
            x = aux[idx]
            s = sim(x)
            r = real[torch.randint(len(real), (len(idx),), generator=gen)]
            # discriminator: released (1) vs simulated (0)
            d_loss = bce(disc(r), torch.ones(len(r))) + bce(disc(s.detach()), torch.zeros(len(s)))
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            logits = readout(tail(s).flatten(1))
            if labels is not None:
                task = nn.functional.cross_entropy(logits, labels[idx])
            else:  # information maximisation: confident per sample, balanced over the batch
                p = logits.softmax(1)
                marginal = p.mean(0)
                task = -(p * p.clamp_min(1e-8).log()).sum(1).mean() + \
                    (marginal * marginal.clamp_min(1e-8).log()).sum()
            g_loss = task + adv * bce(disc(s), torch.ones(len(s)))
            opt_s.zero_grad()
            g_loss.backward()
            opt_s.step()
            if dec is not None:
                rec = nn.functional.mse_loss(dec(s.detach()), x)
                opt_dec.zero_grad()
                rec.backward()
                opt_dec.step()
    sim.eval()
    return sim, (dec.eval() if dec is not None else None)


def _readout(view: View, tail: nn.Module, real: torch.Tensor) -> nn.Module:
    """From the stages' outputs to class scores. When the stages end in the classes, nothing;
    when they end in secret pseudo-classes or in features (the owner kept the last layer), a
    linear map the attackers learn with the simulator (it learns the grouping, or a tail)."""
    with torch.no_grad():  # a stage may end in feature maps (N x C x H x W): flattened
        out_dim = tail(real[:2]).flatten(1).shape[1]
    if out_dim == view.plan.classes and not view.plan.tail:
        return nn.Identity()
    return nn.Linear(out_dim, view.plan.classes)


class ClassMeanAttack(Attack):
    """(d) A classifier on released activations (trained on aux images released through the
    owner's mechanism) outputs the probability-weighted mean aux image of each class. This is
    what class information alone gives; a decoder scoring below it is a weak decoder."""

    name = "class-mean"
    family = "inversion"
    title = "Class-mean attacker (classifier on releases, labelled aux)"
    threat = ThreatModel("any trainer holding the owner's head weights",
                         frozenset({"plan", "released", "release", "aux_images", "aux_labels"}),
                         "public aux images with their labels, released through the owner's "
                         "mechanism", aux_labels=None)

    def __init__(self, targets: int = 500, epochs: int = 15, seed: int = 0):
        self.targets, self.epochs, self.seed = targets, epochs, seed

    def run(self, view: View, track: Track = no_progress) -> np.ndarray:
        aux, y = view.aux_images, torch.tensor(view.aux_labels)
        k = view.plan.classes
        torch.manual_seed(self.seed)
        acts = torch.cat([view.release(aux[i:i + 512]) for i in range(0, len(aux), 512)])
        acts = acts.flatten(1)
        mu, sd = acts.mean(0), acts.std(0) + 1e-6
        clf = nn.Sequential(nn.Linear(acts.shape[1], 256), nn.ReLU(), nn.Linear(256, k))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
        gen = seeded(self.seed)
        for _ in track(range(self.epochs), "class-mean: classifier epochs", self.epochs):
            for idx in batches(len(acts), 128, gen):
                loss = nn.functional.cross_entropy(clf((acts[idx] - mu) / sd), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        means = torch.stack([aux[y == c].mean(0) if (y == c).any() else aux.mean(0)
                             for c in range(k)])
        with torch.no_grad():
            p = clf((_targets(view, self.targets).flatten(1) - mu) / sd).softmax(1)
            return torch.einsum("nk,kchw->nchw", p, means).numpy()
