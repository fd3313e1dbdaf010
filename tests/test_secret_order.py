"""Lever 1 of the defences: the secret batch order (`[privacy] secret_order`).

The owner keys each epoch's order with a key only it holds; trainers name what they receive by
release position, not sample; the auditor reads the key on its truth side and links releases
across epochs the way an attacker must: by matching them.
"""

from __future__ import annotations

import stat

import numpy as np
import pytest

from clicooper_bus.audit import scoring
from clicooper_bus.audit.auditor import audit_run
from clicooper_bus.audit.order import Order, run_order
from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError, ConfigError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.attacks.channels import ChannelInference
from clicooper_bus.ml.attacks.linking import RELEASE, Rows, blocks_from, link_matched
from clicooper_bus.ml.data import batch_order, keyed_permutation, load_dataset, order_commitment
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.services.owner.artefacts import write_order_key
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tools.run import run
from tests.busrun import write_config

KEY = bytes(range(32))


def test_the_keyed_order_is_a_permutation_only_its_key_recomputes():
    p = keyed_permutation(1000, KEY, 0)
    assert np.array_equal(np.sort(p), np.arange(1000))
    assert np.array_equal(p, keyed_permutation(1000, KEY, 0))  # the owner, after a restart
    assert not np.array_equal(p, keyed_permutation(1000, KEY, 1))  # a new order every epoch
    assert not np.array_equal(p, keyed_permutation(1000, bytes(32), 0))
    public = np.concatenate(batch_order(1000, 32, 0, 0))
    assert not np.array_equal(p, public)
    assert np.array_equal(np.concatenate(batch_order(1000, 32, 0, 0, KEY)), p)
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        keyed_permutation(10, b"short", 0)


def test_release_tags_name_no_sample_and_the_truth_side_reads_them_back():
    order = Order(500, 32, 0, KEY)
    ids = np.array([3, 17, 499, 0])
    t0, t1 = order.tags(0, ids), order.tags(1, ids)
    assert not np.array_equal(t0 % 500, t1 % 500)  # the same samples, other positions
    assert np.array_equal(order.samples(np.concatenate([t0, t1])), np.concatenate([ids, ids]))
    # a tag is the position in the epoch: batch b's row r is tag epoch * n + b * 32 + r
    b = order.batches(1)[2]
    assert np.array_equal(order.tags(1, b), 500 + 64 + np.arange(32))
    rows = Rows("fwd", "train", np.concatenate([ids, ids]), np.array([0] * 4 + [1] * 4),
                np.zeros((8, 2), np.float32))
    named = order.as_attacker_names(rows)
    assert named.split == RELEASE and len(np.unique(named.ids)) == 8
    assert np.all(np.diff(named.ids) > 0)  # reordered: in tag order, not the sample ids'
    assert sorted(order.samples(named.ids).tolist()) == sorted(rows.ids.tolist())
    public = Order(500, 32, 0)  # the public order leaves sample ids as they are
    assert public.as_attacker_names(rows) is rows


def _releases(noise: float, n: int = 300, epochs: int = 3, k: int = 5, seed: int = 0):
    """n samples of k well-separated classes released in `epochs` epochs under a secret order,
    each release with fresh Gaussian noise of `noise` per coordinate: Rows named by tag."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centre = rng.normal(0, 3, (k, 40))[labels] + rng.normal(0, 1, (n, 40))  # one per sample
    order = Order(n, 32, 0, KEY)
    ids = np.tile(np.arange(n), epochs)
    ep = np.repeat(np.arange(epochs), n)
    x = (centre[ids] + rng.normal(0, noise, (len(ids), 40))).astype(np.float32)
    return order, order.as_attacker_names(Rows("fwd", "train", ids, ep, x)), labels


@pytest.mark.parametrize("noise, linked", [(0.05, (0.99, 1.0)), (30.0, (0.0, 0.1))])
def test_matching_links_what_the_noise_leaves_linkable(noise, linked):
    order, rows, _ = _releases(noise)
    m = link_matched(rows)
    assert len(m.ids) == 300 and set(m.counts) == {3} and m.median is not None
    pairs = order.samples(m.matches.reshape(-1)).reshape(-1, 2)
    correct = np.mean(pairs[:, 0] == pairs[:, 1])
    assert linked[0] <= correct <= linked[1], correct
    single = link_matched(Rows("fwd", RELEASE, rows.ids[:300], rows.epochs[:300], rows.x[:300]))
    assert single is None  # one epoch: nothing to link


def test_the_row_order_gives_no_link_away():
    """Identical releases (a collapsed stage's constant output) can only be linked at chance:
    rows come in tag order, not in the auditor's order of sample ids, which would line one
    sample's releases up as row i of every epoch."""
    order, rows, _ = _releases(0.05)
    same = order.as_attacker_names(Rows("fwd", "train", order.samples(rows.ids), rows.epochs,
                                        np.zeros_like(rows.x)))
    assert np.all(np.diff(same.ids) > 0)  # tag order: epoch, then position
    m = link_matched(same)
    pairs = order.samples(m.matches.reshape(-1)).reshape(-1, 2)
    assert np.mean(pairs[:, 0] == pairs[:, 1]) < 0.05  # chance is 1 in 300


def test_labels_received_constrain_the_matching_and_consistent_links_are_surer():
    order, rows, labels = _releases(1.5)  # noisy enough that plain matching errs
    truth = labels[order.samples(rows.ids)]

    def right(m, sel=None):
        pairs = order.samples((m.matches if sel is None else m.pairs(sel)).reshape(-1))
        pairs = pairs.reshape(-1, 2)
        return np.mean(pairs[:, 0] == pairs[:, 1])

    plain = link_matched(rows)
    # a label drawn once per image, as a pseudo-class is (finer than the class): the same in
    # every epoch, so a trainer matches only within it
    drawn = np.random.default_rng(1).integers(0, 30, 300)[order.samples(rows.ids)]
    within = link_matched(rows, blocks=drawn)
    assert right(within) > right(plain) + 0.05
    sure = np.flatnonzero(plain.consistent)
    assert 0 < len(sure) < len(plain.ids) and right(plain, sure) > right(plain)
    labels_rows = Rows("labels", RELEASE, rows.ids, rows.epochs, truth[:, None])
    assert np.array_equal(blocks_from(labels_rows, rows), truth)
    part = Rows("labels", RELEASE, rows.ids[::2], rows.epochs[::2], truth[::2, None])
    assert np.array_equal(blocks_from(part, rows) >= 0, np.arange(len(rows)) % 2 == 0)
    assert blocks_from(None, rows) is None


def test_the_channel_attack_links_by_matching_when_the_order_is_secret():
    order, rows, labels = _releases(0.05)
    out = ChannelInference("t", 0).for_trainer("t")._channel("fwd", rows, 5)
    assert "fwd+linked" not in out and "fwd+matched" in out and "fwd+matched-median" in out
    assert "fwd+matched-consistent" in out
    ch = out["fwd+matched"]
    assert ch["split"] == RELEASE and ch["releases"] == 3.0 and len(ch["matches"]) == 600
    # scored as the auditor scores it: the tags read back through the secret order
    truth = labels[order.samples(ch["ids"])]
    best = max(scoring.clustering_scores(p, truth)["ari"] for p in ch["variants"].values())
    assert best > 0.9


def test_a_secret_order_needs_evaluation_on_the_owner():
    with pytest.raises(ConfigError, match="secret_order hides the training order only"):
        load_config(None, {"privacy": {"secret_order": True}})
    load_config(None, {"privacy": {"secret_order": True, "evaluate": "owner"}})


def test_the_auditor_refuses_a_secret_order_without_its_key_or_with_another(tmp_path):
    layout = RunLayout(tmp_path)
    with pytest.raises(ClicooperError, match="secret batch order and its key .* is missing"):
        run_order(layout, True, 10, 2, 0, order_commitment(KEY))
    assert not run_order(layout, False, 10, 2, 0).secret
    write_order_key(layout, KEY)
    assert stat.S_IMODE(layout.order_key.stat().st_mode) == 0o600
    assert run_order(layout, True, 10, 2, 0, order_commitment(KEY)).key == KEY
    with pytest.raises(ClicooperError, match="not this run's order key"):
        run_order(layout, True, 10, 2, 0, order_commitment(bytes(32)))
    layout.order_key.chmod(0o644)
    with pytest.raises(ClicooperError, match="cannot be used: .*readable by group or others"):
        run_order(layout, True, 10, 2, 0, order_commitment(KEY))


def test_a_run_sends_the_secret_order_and_the_auditor_links_it_only_by_matching(tmp_path,
                                                                                monkeypatch):
    path = write_config(tmp_path, run_id="so", trainers=2, run={"epochs": 2},
                        log={"retention": "*=all"},
                        privacy={"secret_order": True, "evaluate": "owner"})
    assert run(str(path), echo=False, free_ports=False, timeout_s=300, audit=None) == 0
    out = tmp_path / "runs" / "so"
    layout = RunLayout(out)
    assert stat.S_IMODE(layout.order_key.stat().st_mode) == 0o600
    key = bytes.fromhex(layout.order_key.read_text().strip())
    data = load_dataset("synthetic", None, 0)
    n, batches = len(data.y_train), 0
    with ProvenanceLog.open(out / "log") as plog:
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            if h.kind != "labels":
                continue
            got = np.frombuffer(bytes(plog.body(h.body_sha256)), np.int64)
            assert np.array_equal(got, data.y_train[batch_order(n, 32, 0, h.epoch, key)[h.batch]])
            batches += not np.array_equal(got, data.y_train[batch_order(n, 32, 0, h.epoch)[h.batch]])
        roster = Roster.open(plog.roster_bytes)
    assert batches > 0  # the public order does not explain what the last stage received
    assert roster.meta["order_commitment"] == order_commitment(key)
    monkeypatch.setattr("clicooper_bus.audit.channels.TARGETS", 200)  # followed: 200, not 2,000
    last = ChannelInference().for_trainer("trainer-2", 2, True)
    last.per_trainer = False
    (row,) = audit_run(out, attacks=[last]).results
    ch = row["channels"]
    assert "fwd+matched" in ch and not any("+linked" in c for c in ch)
    assert 0.0 <= ch["fwd+matched"]["linked_correctly"] <= 1.0
    # the last stage received every label: it matches only within them
    assert "linked by matching within received labels" in ch["fwd+matched"]["rows_of"]


def test_a_few_confirmed_links_are_not_scored():
    """Noise that leaves a few dozen confirmed links by chance gives no `+matched-consistent`
    channel: on so few rows the best clustering variant reads structure out of noise."""
    _, rows, _ = _releases(30.0)
    m = link_matched(rows)
    assert m.consistent.sum() < 200
    out = ChannelInference("t", 0).for_trainer("t")._matched("fwd", rows, 5, False, None)
    assert "fwd+matched" in out and "fwd+matched-consistent" not in out
