"""Networks and training loops the attacks share: a decoder from activations to images, a
fresh copy of the head's architecture (the roster's plan is public), a discriminator."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clicooper_bus.ml.models import build_segments, plan_spec


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def head_clone(plan, seed: int) -> nn.Sequential:
    """The head's architecture with weights from `seed`, unrelated to the owner's: the plan
    says what the head is, not what it learned."""
    return build_segments(plan_spec(plan), plan.cuts, seed)[0]


class Decoder(nn.Module):
    """Activation (C x h x w, or flat) -> image in [0, 1]: transposed convolutions doubling the
    side until it reaches the image's, then a sigmoid.

    `width` 32: on the demo's offloading cut (16 x 14 x 14 releases), 32 channels trained 10
    epochs reconstructed better than 48 trained 8 (white-box SSIM 0.868 against 0.863) in 70 %
    of the time, and SDAR's decoder at 32 scored 0.550 against 0.544 in 72 % (the decoder's
    full-resolution layers are most of both attacks' cost)."""

    def __init__(self, act_shape: tuple[int, ...], img_shape: tuple[int, int, int], width: int = 32):
        super().__init__()
        c, h, w = img_shape
        if len(act_shape) == 1:
            side = (h // 4, w // 4)
            pre: list[nn.Module] = [nn.Linear(act_shape[0], width * side[0] * side[1]), nn.ReLU(),
                                    nn.Unflatten(1, (width, *side))]
        else:
            side = act_shape[1:]
            pre = [nn.Conv2d(act_shape[0], width, 3, padding=1), nn.ReLU()]
        ups: list[nn.Module] = []
        while side[0] * 2 <= h:
            ups += [nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU()]
            side = (side[0] * 2, side[1] * 2)
        self.body = nn.Sequential(*pre, *ups)
        self.size = (h, w)
        self.out = nn.Conv2d(width, c, 3, padding=1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.body(a)
        if tuple(z.shape[-2:]) != self.size:
            z = nn.functional.interpolate(z, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(z))


class Discriminator(nn.Module):
    """Tells released activations from simulated ones (distribution matching)."""

    def __init__(self, act_shape: tuple[int, ...], width: int = 256):
        super().__init__()
        d = int(np.prod(act_shape))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.LeakyReLU(0.2),
                                 nn.Linear(width, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a).squeeze(1)


def batches(n: int, size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, size):
        yield perm[i:i + size]


@torch.no_grad()
def apply(module: nn.Module, x: torch.Tensor, size: int = 512) -> torch.Tensor:
    module.eval()
    return torch.cat([module(x[i:i + size]) for i in range(0, len(x), size)]) if len(x) else x


def train_decoder(acts: torch.Tensor, images: torch.Tensor, *, epochs: int, seed: int,
                  track, desc: str) -> Decoder:
    """Fit a decoder on (activation, image) pairs by mean squared error."""
    gen = seeded(seed)
    torch.manual_seed(seed)
    dec = Decoder(tuple(acts.shape[1:]), tuple(images.shape[1:]))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    for _ in track(range(epochs), desc, epochs):
        dec.train()
        for idx in batches(len(acts), 128, gen):
            loss = nn.functional.mse_loss(dec(acts[idx]), images[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return dec.eval()
