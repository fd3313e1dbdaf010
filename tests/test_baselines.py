"""Own-data baselines: what colluding trainers reach from the public aux data alone."""

from __future__ import annotations

import numpy as np

from clicooper_bus.audit.baselines import own_data


def _blobs(n, k=10, d=64, sigma=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, d))
    y = rng.integers(0, k, n)
    return (centres[y] + sigma * rng.normal(size=(n, d))).astype(np.float32), y


def test_baselines_learn_from_the_aux_data_alone_and_more_labels_help():
    x, y = _blobs(1200)
    aux, aux_y, ev, ev_y = x[:600], y[:600], x[600:], y[600:]
    none, fifty = (own_data(aux, aux_y, ev, ev_y, n, 10) for n in (0, 50))
    assert set(none) >= {"cluster-vote", "best", "best_name", "chance"}
    assert "supervised" not in none  # no label, no supervised model
    assert set(fifty) >= {"supervised", "label-spreading", "cluster-vote"}
    assert fifty["best"] == max(fifty[k] for k in ("supervised", "label-spreading",
                                                   "cluster-vote"))
    assert fifty["best"] > 0.8 > 0.2 > fifty["chance"]  # separable blobs, ten classes


def test_with_no_structure_every_baseline_is_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1000, 32)).astype(np.float32), rng.integers(0, 10, 1000)
    r = own_data(x[:500], y[:500], x[500:], y[500:], 50, 10)
    assert r["supervised"] < r["chance"] + 0.1 and r["label-spreading"] < r["chance"] + 0.1
