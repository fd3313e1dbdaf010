"""The white-box simulation of unretained streams: what each stage would have received from
the final head and the privacy filter, per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clicooper_bus.audit.simulated import Stream, simulate
from clicooper_bus.ml.privacy import lattice
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec


def _parts():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
    stage = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    return head, [stage, nn.Linear(4, 3)]


def _stream(n=30, epochs=(0, 1, 2), split="train"):
    return Stream("fwd", split, np.arange(100, 100 + n), torch.rand(n, 1, 4, 4), epochs)


def test_each_stage_gets_its_predecessors_outputs_for_every_noisy_epoch():
    head, stages = _parts()
    stream = _stream()
    spec = FilterSpec("gaussian", 1.0, 0.2)
    one, two = simulate(head, stages, spec, stream, 10_000)
    assert one.kind == "fwd (simulated)" and one.split == "train"
    assert np.array_equal(one.ids, np.tile(stream.ids, 3))
    assert list(np.unique(one.epochs)) == [0, 1, 2]
    assert one.x.shape == (90, 8) and two.x.shape == (90, 4)
    with torch.no_grad():
        want = stages[0](torch.from_numpy(one.x[:30])).numpy()
    assert np.allclose(two.x[:30], want, atol=1e-6)
    assert not np.allclose(one.x[:30], one.x[30:60])  # fresh noise every epoch


def test_without_fresh_noise_one_epoch_is_simulated():
    """No mechanism, or once mode: every epoch's release is the same, and linking copies
    would measure nothing."""
    head, stages = _parts()
    for spec in (None, FilterSpec("gaussian", 1.0, 0.5, "once")):
        one = simulate(head, stages, spec, _stream(), 10_000)[0]
        assert len(one) == 30 and set(one.epochs) == {2}


def test_rows_are_bounded_by_fewer_samples_not_fewer_epochs():
    head, stages = _parts()
    one = simulate(head, stages, FilterSpec("gaussian", 1.0, 0.2), _stream(), 40)[0]
    assert len(one) == 39 and list(np.unique(one.epochs)) == [0, 1, 2]
    assert len(np.unique(one.ids)) == 13


@pytest.mark.parametrize("mode", ["per-step", "once"])
def test_the_noise_is_the_mechanism_s(mode):
    """The simulated release minus the clipped activation has the mechanism's spread, in the
    owner's lattice units."""
    head, stages = _parts()
    spec = FilterSpec("gaussian", 1.0, 0.3, mode)
    stream = _stream(n=2000, epochs=(0,))
    got = simulate(head, stages, spec, stream, 10_000)[0].x
    with torch.no_grad():
        clean = ActivationFilter(spec).clip(head(stream.images)).numpy()
    sigma = lattice.units(0.3, 1.0) * lattice.step(1.0)
    assert (got - clean).std() == pytest.approx(sigma, rel=0.03)
