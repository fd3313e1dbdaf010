"""Issue 19: the owner's own check of a last stage's metrics (`ml.step_metrics`): exact for
fp32, within the codec's proven bound for the others, and never passing a made-up claim."""

from __future__ import annotations

import pytest
import torch

from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.step_metrics import disagreement, error_bound, step_metrics
from clicooper_bus.ml.tensors import as_sent
from clicooper_bus.net.encoding import CODECS


def _step(seed: int = 0, n: int = 64, classes: int = 10):
    """A last stage's real step: its logits, labels and the metrics it computed."""
    g = torch.Generator().manual_seed(seed)
    seg = SegmentTrainer(torch.nn.Linear(20, classes))
    x = torch.randn(n, 20, generator=g) * 3
    labels = torch.randint(0, classes, (n,), generator=g)
    seg.forward(x, 0)
    r = seg.loss_backward(labels, 0)
    return r, labels


@pytest.mark.parametrize("codec", CODECS)
def test_an_honest_claim_agrees_with_its_logits_as_received(codec):
    for seed in range(20):
        r, labels = _step(seed)
        got = as_sent(r.logits, codec)  # what the owner decodes
        assert disagreement(r.loss, r.correct, got, labels, codec) is None, (codec, seed)


@pytest.mark.parametrize("codec", CODECS)
def test_a_claim_off_by_one_sample_or_a_tenth_of_the_loss_is_refused(codec):
    r, labels = _step(1)
    got = as_sent(r.logits, codec)
    assert step_metrics(r.logits, labels) == (r.loss, r.correct)  # the same operations
    n = len(labels)
    assert "correct" in disagreement(r.loss, n, got, labels, codec)  # a perfect batch
    assert "loss" in disagreement(0.9 * r.loss, r.correct, got, labels, codec)
    if codec == "fp32":  # exact: one sample more is a lie
        assert "correct" in disagreement(r.loss, r.correct + 1, got, labels, codec)


def test_the_codec_bound_covers_the_codec_error():
    r, _ = _step(2)
    for codec in CODECS:
        err = (as_sent(r.logits, codec) - r.logits).abs().amax(1)
        assert bool((err <= error_bound(r.logits, codec)).all()), codec
    with pytest.raises(ValueError):
        error_bound(r.logits, "int4")
