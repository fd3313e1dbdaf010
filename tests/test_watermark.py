"""The watermark key chain and the Uchida-style mark: derivation, embedding, extraction, and the
false-positive bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from clicooper_bus.chain import key as wk
from clicooper_bus.ml.watermark import mark as wm


def link(**kw) -> wk.Link:
    base = dict(run_id="demo", stage=1, round=0, trainer_key=bytes(range(32)),
                prev_link=b"\x01" * 32, prev_round=wk.ZERO, log_root=b"\x02" * 32)
    base.update(kw)
    return wk.Link(**base)


def test_key_is_fixed_by_its_format():
    """The derivation spelled out independently: a change to it (field order, domain, length
    prefixes) would break every certificate ever issued, so it must be deliberate."""
    import hashlib

    def field(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    lk = link()
    expected = hashlib.sha256(
        field(b"clicooper-watermark-key/1") + field(b"demo") + field((1).to_bytes(4, "big"))
        + field((0).to_bytes(4, "big")) + field(lk.trainer_key) + field(lk.prev_link)
        + field(lk.prev_round) + field(lk.log_root)).digest()
    assert lk.key() == expected
    assert wk.commitment(lk.key()) == hashlib.sha256(
        field(b"clicooper-watermark-commit/1") + field(lk.key())).digest()


def test_every_field_changes_the_key():
    base = link().key()
    changes = dict(run_id="demo2", stage=2, round=1, trainer_key=bytes(32),
                   prev_link=b"\x03" * 32, prev_round=b"\x04" * 32, log_root=b"\x05" * 32)
    keys = {base}
    for name, value in changes.items():
        keys.add(dataclasses.replace(link(), **{name: value}).key())
    assert len(keys) == 1 + len(changes)


def test_fields_are_length_prefixed():
    """Moving a byte from one field to the next must change the key (no concatenation
    ambiguity): run ids 'ab' + stage vs 'a' + ... cannot collide."""
    assert link(run_id="ab").key() != link(run_id="a").key()


@pytest.mark.parametrize("field,value", [("prev_link", b"x"), ("log_root", b""),
                                         ("trainer_key", b"k" * 31), ("stage", 0), ("round", -1)])
def test_bad_links_are_refused(field, value):
    with pytest.raises(ValueError):
        link(**{field: value})


def test_bits_and_projection_are_deterministic():
    key = link().key()
    b = wk.bits(key)
    assert b.shape == (64,) and set(np.unique(b)) <= {0, 1} and 16 < b.sum() < 48
    x = wk.projection(key, 300)
    assert x.shape == (64, 300) and x.dtype == np.float32
    assert -1 <= x.min() < -0.9 and 0.9 < x.max() < 1
    assert (wk.projection(key, 300) == x).all() and (wk.bits(key, 128)[:64] == b).all()
    assert not (wk.projection(link(round=1).key(), 300) == x).all()


def test_false_positive_bound():
    assert wk.false_positive_probability(64, 0.2) < 1e-6
    assert wk.false_positive_probability(64, 0.5) > 0.5


def _stage(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(392, 64), nn.ReLU())


def test_embedding_reaches_zero_bit_errors_and_extraction_reads_it():
    stage = _stage(0)
    key = link().key()
    mark = wm.Watermark(key, stage, strength=1.0)
    assert wm.bit_error_rate(key, stage) > 0.2  # nothing there yet
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        mark.loss().backward()
        opt.step()
    assert wm.bit_error_rate(key, stage) == 0.0
    other = link(round=1).key()
    assert wm.bit_error_rate(other, stage) > 0.2  # a different key reads noise


def test_unmarked_models_never_verify():
    key = link().key()
    rates = [wm.bit_error_rate(key, _stage(seed)) for seed in range(40)]
    assert min(rates) > wk.DEFAULT_THRESHOLD
    assert 0.4 < float(np.mean(rates)) < 0.6


def test_a_stage_without_weights_is_refused():
    with pytest.raises(ValueError, match="no weighted layer"):
        wm.Watermark(link().key(), nn.Sequential(nn.ReLU()))


def test_carrier_is_whole_when_small_and_averaged_when_large():
    conv = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 8, 5))
    assert wm.carrier(conv) is conv[1]
    assert wm.carrier_vector(wm.carrier(conv)).numel() == 8 * 3 * 5 * 5
    big = nn.Sequential(nn.Linear(1568, 128))
    assert wm.carrier_vector(wm.carrier(big)).numel() == 1568



@pytest.mark.parametrize("layer", [nn.Linear(392, 64), nn.Linear(20, 10), nn.Conv2d(3, 8, 5)])
def test_closed_form_gradient_equals_autograd(layer, monkeypatch):
    """What training adds each step (`add_grad`) is exactly the gradient of `loss()`, for a
    carrier read whole and one averaged over its outputs."""
    monkeypatch.setattr(wm, "FLATTEN_MAX", 1000)  # the 392 x 64 layer is then averaged
    stage = nn.Sequential(layer)
    mark = wm.Watermark(link().key(), stage, strength=0.3)
    layer.weight.grad = None
    mark.loss().backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = torch.ones_like(layer.weight)  # it adds to what is there
    mark.add_grad()
    assert torch.allclose(layer.weight.grad - 1, expected, atol=1e-7, rtol=1e-5)


def test_a_claim_is_bounded_like_the_marks_it_reports():
    """An oversized claim would make every message quoting it (the notary's tips) too large to
    send: its bits must fit MAX_BITS, be packed 8 a byte, and its errors at most its bits."""
    from clicooper_bus.chain.documents import MAX_BITS, Claim

    ok = Claim(1, 0, bytes(32), bytes(32), bytes(8), 64, 3)
    assert Claim.from_doc(ok.to_doc()) == ok
    for bad in (Claim(1, 0, bytes(32), bytes(32), bytes(20_000), 64, 0),
                Claim(1, 0, bytes(32), bytes(32), bytes(MAX_BITS // 8 + 1), MAX_BITS + 8, 0),
                Claim(1, 0, bytes(32), bytes(32), bytes(8), 64, 65)):
        with pytest.raises(ValueError, match="malformed watermark claim"):
            Claim.from_doc(bad.to_doc())
