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
from clicooper_bus.ml.privacy import defences
from clicooper_bus.ml.privacy.labels import LabelCodec
from clicooper_bus.ml.privacy.nopeek import distance_correlation
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec, inference_model
from clicooper_bus.ml.privacy.secret import load_or_create, run_key, secret_path

SECRET = bytes(range(32))


# --- the accountant -------------------------------------------------------------------------

def test_analytic_gaussian_known_value():
    # Balle and Wang (2018), as in Google's dp_accounting: eps = 1, delta = 1e-5, sensitivity 1
    # needs sigma = 3.7306..., where the classical formula asks for 4.8448...
    assert 1 / acc.gaussian_mu(1.0, 1e-5) == pytest.approx(3.730631634944469, rel=1e-9)
    assert acc.classical_sigma(1.0, 1e-5, 1.0) == pytest.approx(4.844805262605389, rel=1e-12)
    assert acc.gaussian_epsilon(1 / 3.730631634944469, 1e-5) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 4.0, 20.0, 200.0])
def test_analytic_gaussian_is_exact_for_every_epsilon(eps):
    """The calibrated noise meets delta with equality, including eps >= 1 where the classical
    formula does not hold, and is never more than the classical noise where that one holds."""
    mu = acc.gaussian_mu(eps, 1e-5)
    assert acc.gaussian_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
    assert acc.gaussian_delta(eps, mu * 1.01) > 1e-5  # less noise would not do
    if eps < 1:
        assert 1 / mu <= acc.classical_sigma(eps, 1e-5, 1.0)


def test_gaussian_delta_matches_the_definition_by_monte_carlo():
    """delta(eps) = P[L > eps] - e^eps P[L' > eps] for the privacy-loss variable of N(0,1)
    against N(mu, 1); checked by sampling, independently of the closed form."""
    mu, eps = 1.5, 0.7
    rng = np.random.default_rng(0)
    z = rng.standard_normal(2_000_000)
    # P = N(0, 1), Q = N(mu, 1): L = log p(x)/q(x) = mu^2/2 - mu x, so under P it is
    # N(mu^2/2, mu^2) and under Q N(-mu^2/2, mu^2)
    loss_p = mu * z + mu**2 / 2
    loss_q = mu * z - mu**2 / 2
    mc = (loss_p > eps).mean() - math.exp(eps) * (loss_q > eps).mean()
    assert acc.gaussian_delta(eps, mu) == pytest.approx(mc, abs=2e-3)


def test_composition_of_gaussian_releases_is_exact_and_below_rdp():
    one = acc.spent("gaussian", noise=2.0, clip=1.0, releases=1, delta=1e-5)
    four = acc.spent("gaussian", noise=2.0, clip=1.0, releases=4, delta=1e-5)
    half_noise = acc.spent("gaussian", noise=1.0, clip=1.0, releases=1, delta=1e-5)
    assert four.epsilon == pytest.approx(half_noise.epsilon, rel=1e-9)  # sqrt(4) = 2
    assert one.epsilon < four.epsilon
    for s in (one, four):
        assert s.rdp_epsilon >= s.epsilon  # RDP is a valid, looser bound
        assert s.sensitivity == 2.0 and "replace-one" in s.adjacency


def test_calibration_round_trips():
    for mech in ("gaussian", "laplace"):
        noise = acc.calibrate(mech, 3.0, 1e-5, clip=0.5, releases=5)
        assert acc.spent(mech, noise, 0.5, 5, 1e-5).epsilon == pytest.approx(3.0, rel=1e-6)


def test_laplace_accounting():
    # one release is exactly sensitivity / b pure DP; the RDP of order 1 is the KL divergence
    assert acc.laplace_epsilon(4.0, 1, 0.0) == pytest.approx(0.25)
    assert acc.laplace_rdp(1.0, 2.0) == pytest.approx(0.5 + math.exp(-0.5) - 1)
    # RDP orders approach the pure bound from below
    assert acc.laplace_rdp(200.0, 2.0) == pytest.approx(0.5, abs=0.01)
    assert acc.laplace_rdp(200.0, 2.0) <= 0.5
    # many releases: RDP beats pure composition
    assert acc.laplace_epsilon(20.0, 100, 1e-5) < 100 / 20.0


def test_spent_reports_what_it_holds_for():
    p = load_config(None, {"privacy": {"mechanism": "gaussian", "epsilon": 8.0}}).privacy
    s = defences.spent(p, planned_epochs=5, epochs=5, evaluations=5)
    assert s["epsilon"] == pytest.approx(8.0, rel=1e-6) and s["delta"] == 1e-5
    assert s["releases"] == 5 and s["target_epsilon"] == 8.0
    assert s["test_set"]["releases"] == 5
    once = load_config(None, {"privacy": {"mechanism": "gaussian", "epsilon": 8.0,
                                          "release": "once"}}).privacy
    s1 = defences.spent(once, 5, 5, 5)
    assert s1["releases"] == 1 and s1["epsilon"] == pytest.approx(8.0, rel=1e-6)
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
            t.penalty = lambda x, a, alpha=alpha: alpha * distance_correlation(x, a)
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
    bound: every noise > 0 gives a finite, exact epsilon, below the RDP bound."""
    s = acc.spent("gaussian", 0.0009, 1.0, 10, 1e-5)
    assert math.isfinite(s.epsilon) and s.epsilon <= s.rdp_epsilon
    mu = 2.0 * math.sqrt(10) / 0.0009
    assert acc.gaussian_delta(s.epsilon, mu) <= 1e-5 * (1 + 1e-6)
    assert acc.gaussian_delta(s.epsilon * 0.999, mu) > 1e-5
