"""Build what the auditor hands attacks from an in-process model, without a bus run: the same
`Knowledge` fields (released activations, received labels, evaluation pairs, stages, release
mechanism, aux data) and the `Truth` the auditor scores against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clicooper_bus.audit.auditor import Audit, Release, Truth, score_attack
from clicooper_bus.ml.attacks.base import Attack, Knowledge
from clicooper_bus.ml.data import Dataset, to_float
from clicooper_bus.ml.models import assemble
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.logverify import VerifyResult


def build(data: Dataset, plan: Plan, segments, *, released: int = 2000, seed: int = 0,
          received: np.ndarray | None = None, decode: np.ndarray | None = None,
          eval_pairs: int = 256) -> tuple[Knowledge, Truth, Audit]:
    """`received`: the labels the last stage was given for every training sample (default
    the true ones); `decode`: the true class of each model output when they differ (the
    owner's secret, used here only to score the owner)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.x_train), size=min(released, len(data.x_train)), replace=False)
    head, stages = segments[0].eval(), [s.eval() for s in segments[1:]]
    half = len(data.x_test) // 2
    aux = to_float(data.x_test[:half])

    release = Release(head)
    acts = release(to_float(data.x_train[idx])).numpy()
    got = (data.y_train if received is None else received)[idx]
    pairs = (aux[:eval_pairs], release(aux[:eval_pairs]).numpy()) if eval_pairs else None
    k = Knowledge({"plan": plan, "released": acts, "released_labels": got, "eval_pairs": pairs,
                   "stages": stages, "release": release, "aux_images": aux,
                   "aux_labels": data.y_test[:half]})
    truth = Truth(idx, data.x_train[idx].astype(np.float32) / 255.0, data.y_train[idx],
                  to_float(data.x_test[half:]), data.y_test[half:], aux.numpy(),
                  data.y_test[:half])
    model = assemble(segments).eval()
    with torch.no_grad():
        out = model(truth.eval_images)
    classes = data.classes
    if decode is not None:  # expanded labels: sum each class's pseudo-class probabilities
        out = torch.zeros(len(out), classes).index_add_(1, torch.as_tensor(decode),
                                                        out.softmax(1))
    owner = float((out.argmax(1).numpy() == truth.eval_labels).mean())
    audit = Audit(Path("."), VerifyResult(log="in-process", ok=True))
    audit.settings["owner_accuracy_eval_half"] = owner
    audit.classes = plan.classes
    return k, truth, audit


def run(attack: Attack, knowledge: Knowledge, truth: Truth, audit: Audit) -> dict:
    out = attack.run(knowledge.view(attack.threat))
    return score_attack(attack, out, truth, audit)
