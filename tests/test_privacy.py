"""The privacy building blocks: the exact accountant against known values, the release filter,
label obfuscation, the owner's secret, NoPeek's distance correlation, and their configuration."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError, KeyFileError
from clicooper_bus.ml.privacy import accountant as acc
from clicooper_bus.ml.privacy import defences, lattice
from clicooper_bus.ml.privacy.labels import LabelCodec
from clicooper_bus.ml.privacy.nopeek import distance_correlation
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec, inference_model
from clicooper_bus.ml.privacy.secret import load_or_create, run_key, secret_path

SECRET = bytes(range(32))


# --- the accountant -------------------------------------------------------------------------

def test_zcdp_conversion_known_values():
    """rho-zCDP to (eps, delta) as in CKS20. By hand: with h = alpha - 1 and
    L = ln(1 / delta), eps(alpha) = alpha rho + (L - ln alpha) / h + ln(h / alpha), whose
    derivative at alpha = 2 is rho - L + ln 2; so at delta = e^-rho / 2 the best order is 2 and
    eps = 2 rho + L - 2 ln 2 = 3 rho - ln 2. The others are OpenDP 0.16's
    make_zCDP_to_approxDP on the same rho, an independent implementation."""
    for rho in (0.5, 2.0):
        assert acc.zcdp_epsilon(rho, math.exp(-rho) / 2) == pytest.approx(3 * rho - math.log(2),
                                                                          rel=1e-9)
    assert acc.zcdp_epsilon(0.5, 1e-5) == pytest.approx(4.728386984943315, rel=1e-9)
    assert acc.zcdp_epsilon(2.0, 1e-10) == pytest.approx(14.87067800681375, rel=1e-9)
    assert acc.zcdp_epsilon(2 / 9, 1e-5) == pytest.approx(2.984753658249914, rel=1e-9)


@pytest.mark.parametrize("rho", [1e-6, 0.01, 1.0, 66.7, 1e4, 2.5e7])
def test_zcdp_conversion_is_the_best_order_and_inverts(rho):
    """Never above Bun and Steinke's rho + 2 sqrt(rho ln(1/delta)) nor any single order's
    bound, and zcdp_rho inverts it."""
    eps = acc.zcdp_epsilon(rho, 1e-5)
    assert eps <= rho + 2 * math.sqrt(rho * math.log(1e5)) * (1 + 1e-12)
    for alpha in (1.001, 1.5, 2.0, 10.0, 1000.0):
        assert eps <= acc.zcdp_epsilon_at(rho, 1e-5, alpha) * (1 + 1e-12)
    assert acc.zcdp_rho(eps, 1e-5) == pytest.approx(rho, rel=1e-7)


def test_discrete_gaussian_accounting():
    """Noise 2 x clip is exactly 2^21 lattice steps and the sensitivity 2^21: rho = 1/2 a
    release. Four releases compose to rho = 2, the same as one at half the noise; opacus's RDP
    bound (the same curve on a grid of orders) is never below."""
    one = acc.spent("gaussian", noise=2.0, clip=1.0, releases=1, delta=1e-5)
    four = acc.spent("gaussian", noise=2.0, clip=1.0, releases=4, delta=1e-5)
    half_noise = acc.spent("gaussian", noise=1.0, clip=1.0, releases=1, delta=1e-5)
    assert one.rho == 0.5 and four.rho == 2.0 and half_noise.rho == 2.0
    assert one.lattice_noise == 2**21
    assert four.epsilon == half_noise.epsilon == acc.zcdp_epsilon(2.0, 1e-5)
    assert one.epsilon == pytest.approx(4.728386984943315, rel=1e-9)  # OpenDP's, above
    for s in (one, four):
        assert s.epsilon <= s.rdp_epsilon <= s.epsilon * 1.01
        assert s.sensitivity == 2.0 and "replace-one" in s.adjacency
        assert "discrete Gaussian" in s.method


def test_the_accountant_uses_the_noise_the_sampler_draws():
    """The noise is rounded up to whole lattice steps (clip x 2^-20), so a run never has less
    noise than asked and the accountant computes with the very integer drawn."""
    clip = 1.0
    asked = 0.3  # 314572.8 steps
    s = acc.spent("gaussian", asked, clip, 3, 1e-5)
    assert s.lattice_noise == 314573 == lattice.units(asked, clip)
    assert s.noise == 314573 * lattice.step(clip) >= asked
    assert s.rho == 3 * (2**21) ** 2 / (2 * 314573**2)
    assert lattice.units(1e-12, clip) == 1  # tiny noise: one step, never none


def test_calibration_round_trips():
    """The calibrated noise, rounded up by the sampler, spends at most the target and within
    one part in 10^5 of it."""
    for mech in ("gaussian", "laplace"):
        for eps, releases in ((3.0, 5), (0.5, 1), (100.0, 30)):
            noise = acc.calibrate(mech, eps, 1e-5, clip=0.5, releases=releases)
            got = acc.spent(mech, noise, 0.5, releases, 1e-5).epsilon
            assert eps * (1 - 1e-5) <= got <= eps


def test_laplace_accounting():
    """Scale 8 x clip (exactly 2^23 steps) is pure 2 / 8 = 0.25 a release; 100 releases at
    scale 20 x clip: pure composition gives 10, zCDP (rho = 100 x 0.1^2 / 2 = 0.5) converts to
    4.73, and the smaller is reported."""
    assert acc.discrete_laplace_epsilon(8.0, 1.0, 1, 0.0) == 0.25
    assert acc.spent("laplace", 8.0, 1.0, 1, 1e-5).epsilon == 0.25
    many = acc.spent("laplace", 20.0, 1.0, 100, 1e-5)
    assert many.epsilon == acc.zcdp_epsilon(0.5, 1e-5) < 10.0
    assert "discrete Laplace" in many.method


def test_spent_reports_what_it_holds_for():
    p = load_config(None, {"privacy": {"mechanism": "gaussian", "epsilon": 8.0}}).privacy
    s = defences.spent(p, planned_epochs=5, epochs=5, evaluations=5)
    assert 8.0 * (1 - 1e-5) <= s["epsilon"] <= 8.0 and s["delta"] == 1e-5
    assert s["releases"] == 5 and s["target_epsilon"] == 8.0
    assert s["test_set"]["releases"] == 5
    once = load_config(None, {"privacy": {"mechanism": "gaussian", "epsilon": 8.0,
                                          "release": "once"}}).privacy
    s1 = defences.spent(once, 5, 5, 5)
    assert s1["releases"] == 1 and s1["epsilon"] == pytest.approx(8.0, rel=1e-5)
    assert s1["noise"] < s["noise"]  # one release needs less noise than five
    stopped = defences.spent(p, planned_epochs=5, epochs=2, evaluations=2)
    assert stopped["epsilon"] < 8.0  # a run cut short spent less
    assert defences.spent(load_config(None).privacy, 5, 5, 5)["epsilon"] is None


# --- the release filter ---------------------------------------------------------------------

def test_clipping_bounds_every_sample():
    a = torch.randn(64, 32, 7, 7) * torch.linspace(0.01, 10, 64).view(-1, 1, 1, 1)
    for mech, p in (("gaussian", 2), ("laplace", 1)):
        f = ActivationFilter(FilterSpec(mech, clip=1.5, noise=0.1))
        norms = f.clip(a).flatten(1).norm(p=p, dim=1)
        assert norms.max() <= 1.5 + 1e-4
        small = a.flatten(1).norm(p=p, dim=1) < 1.5
        assert torch.allclose(f.clip(a)[small], a[small])  # small activations pass unchanged


def test_noise_level_and_keying():
    spec = FilterSpec("gaussian", clip=1.0, noise=0.3)
    a = torch.zeros(256, 1568)
    f = ActivationFilter(spec, SECRET)
    n1 = f(a, step=1)
    assert n1.std().item() == pytest.approx(0.3, rel=0.02)
    assert torch.equal(n1, f(a, step=1))  # keyed: the owner can reproduce its run
    assert not torch.equal(n1, f(a, step=2))  # fresh every step
    assert not torch.equal(n1, ActivationFilter(spec, bytes(32))(a, step=1))  # needs the secret
    unkeyed = ActivationFilter(spec)
    assert not torch.equal(unkeyed(a), unkeyed(a))
    lap = ActivationFilter(FilterSpec("laplace", clip=1.0, noise=0.2), SECRET)(a, step=0)
    # Laplace(b): mean |x| = b, variance 2 b^2
    assert lap.abs().mean().item() == pytest.approx(0.2, rel=0.02)
    assert lap.var().item() == pytest.approx(0.08, rel=0.05)


def test_once_releases_each_sample_identically():
    f = ActivationFilter(FilterSpec("gaussian", 1.0, 0.5, "once"), SECRET)
    a = torch.randn(4, 10)
    r1 = f(a, ids=np.array([7, 8, 9, 10]), step=0)
    r2 = f(a[[2, 0]], ids=np.array([9, 7]), step=99)
    assert torch.equal(r1[[2, 0]], r2)  # same sample, same release, whatever the batch
    test = f(a[:1], ids=np.array([7]), split="test")
    assert not torch.equal(test, r1[:1])  # test sample 7 is not training sample 7


def test_gradients_flow_through_the_filter():
    f = ActivationFilter(FilterSpec("gaussian", 1.0, 0.1), SECRET)
    x = (torch.randn(3, 5) * 10).requires_grad_(True)
    f(x, step=0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_inference_model_clips_without_noise():
    spec = FilterSpec("gaussian", 1.0, 5.0)
    head, stage = torch.nn.Linear(4, 6), torch.nn.Identity()
    m = inference_model([head, stage], spec)
    x = torch.randn(8, 4) * 100
    assert torch.equal(m(x), m(x))  # deterministic
    assert m(x).norm(dim=1).max() <= 1.0 + 1e-5


# --- labels ---------------------------------------------------------------------------------

def test_label_codec_round_trip_and_grouping():
    codec = LabelCodec(SECRET, classes=10, gamma=4)
    ids = np.arange(5000)
    y = ids % 10
    pseudo = codec.encode(ids, y)
    assert pseudo.min() >= 0 and pseudo.max() < 40
    assert (codec.groups[pseudo] == y).all()  # every pseudo-class belongs to its true class
    assert np.bincount(codec.groups).tolist() == [4] * 10
    assert len(np.unique(pseudo)) == 40  # all pseudo-classes are used
    logits = torch.full((len(y), 40), -20.0)
    logits[np.arange(len(y)), pseudo] = 20.0
    assert (codec.decode(logits).argmax(1).numpy() == y).all()
    assert torch.allclose(codec.decode(logits).sum(1), torch.ones(len(y)))
    # the grouping is secret: another secret permutes differently
    assert not np.array_equal(LabelCodec(bytes(32), 10, 4).perm, codec.perm)
    # the same sample always gets the same pseudo-class
    assert np.array_equal(codec.encode(ids[:50], y[:50]), pseudo[:50])
    # the permutation hides the grouping: outputs of one class are not a block
    assert not all((codec.groups[i * 4:(i + 1) * 4] == codec.groups[i * 4]).all() for i in range(10))


# --- the secret -----------------------------------------------------------------------------

def test_secret_is_created_private_and_checked(tmp_path):
    s = load_or_create(tmp_path, "owner")
    path = secret_path(tmp_path, "owner")
    assert len(s) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(tmp_path, "owner") == s  # kept, not replaced
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(tmp_path, "owner")
    os.chmod(path, 0o600)
    path.write_text("not hex")
    with pytest.raises(KeyFileError, match="32-byte"):
        load_or_create(tmp_path, "owner")


# --- NoPeek ---------------------------------------------------------------------------------

def test_distance_correlation():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    assert distance_correlation(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-4)
    u = x[:, :1]
    independent = distance_correlation(u, torch.randn(200, 1)).item()
    squared = distance_correlation(u, u**2).item()  # dependent, yet uncorrelated: dCor sees it
    assert independent < 0.25 and squared > independent + 0.2
    assert abs(float(np.corrcoef(u[:, 0], u[:, 0] ** 2)[0, 1])) < 0.2


# --- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("privacy,match", [
    ({"mechanism": "gaussian"}, "exactly one of epsilon"),
    ({"mechanism": "gaussian", "epsilon": 1.0, "noise_multiplier": 0.1}, "exactly one"),
    ({"epsilon": 1.0}, "need a mechanism"),
    ({"owner_tail": True, "label_gamma": 4}, "label_gamma has no effect"),
    ({"release": "once", "nopeek": 1.0}, "keeps fixed"),
    ({"mechanism": "rot13"}, "not one of"),
    ({"label_gamma": 0}, "at least 1"),
    ({"delta": 2.0}, "below 1"),
])
def test_bad_privacy_config_is_named(privacy, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"privacy": privacy})


def test_describe_names_the_configuration():
    p = load_config(None, {"privacy": {"mechanism": "gaussian", "noise_multiplier": 0.3,
                                       "owner_tail": True, "evaluate": "owner"}}).privacy
    assert defences.describe(p) == ("gaussian (noise x0.3, clip 1, per-step) + owner tail + "
                                    "owner-side evaluation")
    assert defences.describe(load_config(None).privacy) == "undefended"
    named = load_config(None, {"privacy": {"name": "paper", "label_gamma": 3}}).privacy
    assert defences.describe(named) == "paper"


def test_nopeek_penalty_reaches_the_head():
    """The head's step adds alpha * dCor(x, head(x)) to the gradient the first stage sent."""
    from clicooper_bus.ml.split import SegmentTrainer

    grads = []
    for alpha in (0.0, 2.0):
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
        t = SegmentTrainer(head, lr=0.0, is_head=True)
        if alpha:
            t.penalty = lambda x, a, step, alpha=alpha: alpha * distance_correlation(x, a)
        x = torch.randn(32, 1, 4, 4)
        out = t.forward(x, 0)
        t.optimizer.step = lambda: None  # keep the gradient to look at it
        t.optimizer.zero_grad = lambda set_to_none=True: None
        t.backward(torch.ones_like(out) * 0.01, 0)
        grads.append(head[1].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_every_run_has_its_own_key():
    """Two runs (same secret, same run id, same seed) never share noise or pseudo-labels, so a
    trainer in both cannot subtract one's noise from the other's releases."""
    k1, k2 = run_key(SECRET, "demo"), run_key(SECRET, "demo")
    assert k1 != k2 and SECRET not in (k1, k2)
    spec = FilterSpec("gaussian", 1.0, 0.3)
    a = torch.zeros(4, 16)
    assert not torch.equal(ActivationFilter(spec, k1)(a, step=0), ActivationFilter(spec, k2)(a, step=0))
    ids, y = np.arange(100), np.arange(100) % 10
    assert not np.array_equal(LabelCodec(k1, 10, 4).encode(ids, y), LabelCodec(k2, 10, 4).encode(ids, y))


def test_tiny_noise_still_reports_a_finite_epsilon():
    """noise_multiplier 0.0009 once reported epsilon as none (infinite) beside a finite RDP
    bound: every noise > 0 gives a finite epsilon, the zCDP conversion of the lattice noise
    drawn (944 steps), below the RDP bound; only no noise at all is infinite (null in JSON)."""
    s = acc.spent("gaussian", 0.0009, 1.0, 10, 1e-5)
    assert s.lattice_noise == 944 and s.rho == 10 * (2**21) ** 2 / (2 * 944**2)
    assert math.isfinite(s.epsilon) and s.epsilon == acc.zcdp_epsilon(s.rho, 1e-5)
    assert s.epsilon <= s.rdp_epsilon
    assert math.isfinite(acc.spent("laplace", 0.0009, 1.0, 10, 1e-5).epsilon)
    p = load_config(None, {"privacy": {"mechanism": "gaussian", "noise_multiplier": 0.0009}}).privacy
    assert math.isfinite(defences.spent(p, 3, 3, 3)["epsilon"])
    none = acc.spent("gaussian", 0.0, 1.0, 10, 1e-5)
    assert none.epsilon == math.inf and none.to_json()["epsilon"] is None
