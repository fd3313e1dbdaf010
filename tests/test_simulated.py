"""The white-box simulation of unretained fwd streams: what each stage would have received
from the final head and the privacy filter, per epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clicooper_bus.audit.simulated import SIMULATED, simulate_fwd
from clicooper_bus.ml.privacy.release import FilterSpec


def _parts():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    stage = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    return head, [stage, nn.Linear(4, 3)]


def test_each_stage_gets_its_predecessors_outputs_for_every_epoch():
    head, stages = _parts()
    images, ids = torch.rand(30, 1, 4, 4), np.arange(100, 130)
    one, two = simulate_fwd(head, stages, None, images, ids, [0, 1, 2])
    assert one.kind == two.kind == SIMULATED and one.split == "train"
    assert np.array_equal(one.ids, np.tile(ids, 3)) and list(np.unique(one.epochs)) == [0, 1, 2]
    assert one.x.shape == (90, 8) and two.x.shape == (90, 4)
    with torch.no_grad():
        want = stages[0](head(images)).numpy()
    assert np.allclose(two.x[:30], want, atol=1e-6)
    assert np.array_equal(one.x[:30], one.x[30:60])  # no noise: every epoch the same


def test_noise_is_fresh_per_step_and_once_per_sample_in_once_mode():
    head, stages = _parts()
    images, ids = torch.rand(20, 1, 4, 4), np.arange(20)
    step = simulate_fwd(head, stages, FilterSpec("gaussian", 1.0, 0.5), images, ids, [0, 1])[0]
    assert not np.allclose(step.x[:20], step.x[20:])
    once = simulate_fwd(head, stages, FilterSpec("gaussian", 1.0, 0.5, "once"), images, ids,
                        [0, 1])[0]
    assert np.array_equal(once.x[:20], once.x[20:])
    assert np.linalg.norm(once.x[:20] - step.x[:20], axis=1).mean() > 0.1  # noise is there
