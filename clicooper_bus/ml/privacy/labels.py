"""Secret label obfuscation: the last stage learns pseudo-classes, never the classes.

Each true class c owns `gamma` pseudo-classes. A sample's pseudo-class is
perm[c * gamma + j] with j = PRF(secret, sample id) mod gamma (HMAC-SHA256), and `perm` is a
secret permutation of the gamma x classes outputs, so the outputs of one class are not
neighbours. The model trains on pseudo-labels; the owner decodes a prediction by summing the
softmax probabilities of each class's pseudo-classes. Without the secret a trainer sees labels
whose grouping it must infer (the auditor's extraction attack tries exactly that).
"""

from __future__ import annotations

import numpy as np
import torch

from clicooper_bus.ml.privacy.secret import prf_int


def group_sum(p: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
    """Probabilities of groups: the sum of each group's member outputs (`groups[o]` is the group
    of output o). How the owner decodes pseudo-classes, and how an attacker scores its guess."""
    k = int(groups.max()) + 1
    return torch.zeros(len(p), k, dtype=p.dtype).index_add_(1, torch.as_tensor(groups), p)


class LabelCodec:
    def __init__(self, secret: bytes, classes: int, gamma: int):
        if gamma < 1 or classes < 2:
            raise ValueError(f"label obfuscation needs gamma >= 1 and classes >= 2, got "
                             f"{gamma}, {classes}")
        self.secret, self.classes, self.gamma = secret, classes, gamma
        rng = np.random.default_rng(prf_int(secret, b"labels/permutation"))
        self.perm = rng.permutation(classes * gamma)  # (class, slot) -> output
        self.groups = np.empty(classes * gamma, np.int64)  # output -> class
        self.groups[self.perm] = np.repeat(np.arange(classes), gamma)

    @property
    def outputs(self) -> int:
        return self.classes * self.gamma

    def encode(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        slots = np.array([prf_int(self.secret, b"labels/slot", int(i)) % self.gamma for i in ids],
                         np.int64)
        return self.perm[np.asarray(labels, np.int64) * self.gamma + slots]

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities: the sum of each class's pseudo-class probabilities."""
        return group_sum(logits.softmax(1), self.groups)
