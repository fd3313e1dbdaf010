"""The audit of one finished run: verify the log, replay it, attack it, score every attack.

Order matters: nothing is attacked before the whole log verifies (signatures, chains, Merkle
tree, checkpoints, and the final checkpoint the owner saw), unless the caller forces it, and
then the report says so first. The auditor alone holds the truth (which samples each released
batch held, their images and labels, the evaluation half of the test split); attacks get a
`View` of what their threat model allows and return predictions the auditor scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from clicooper_bus.audit import scoring
from clicooper_bus.audit.replay import Batch, Replay, replay
from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.ml.attacks import default_attacks
from clicooper_bus.ml.attacks.base import Attack, Knowledge
from clicooper_bus.ml.attacks.extraction import Surrogate
from clicooper_bus.ml.data import Dataset, batch_order, load_dataset, to_float
from clicooper_bus.ml.models import plan_spec, segments_from_state_dict
from clicooper_bus.ml.privacy import defences
from clicooper_bus.ml.privacy.labels import group_sum
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec, inference_model
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.plan import schedule
from clicooper_bus.tlog.logverify import VerifyResult, verify_log

T = TypeVar("T")
CLUSTER_SAMPLES = 2000  # activations clustered
INVERT_SAMPLES = 500  # activations reconstructed and scored by SSIM


class AuditRefused(ClicooperError):
    """The log did not verify and the audit was not forced."""

    def __init__(self, result: VerifyResult):
        f = result.failure
        where = f"{f.file}" + (f" at index {f.index}" if f and f.index is not None else "")
        super().__init__(f"the log does not verify ({where}: {f.reason if f else '?'}); refusing "
                         f"to attack it. Repair or re-obtain the log, or pass --force to attack "
                         f"it anyway (the report will say so on its first line)")
        self.result = result


def track(it: Iterable[T], desc: str, total: int) -> Iterator[T]:
    """Progress of a long step: a tqdm bar on a terminal, a line per ~10 % otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(it, desc=desc, total=total, leave=False)
        return
    every, t0 = max(1, total // 10), time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        if i % every == 0 or i == total:
            print(f"  {desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)


def _verify_progress():
    """A `verify_log` progress callback: one line per quarter of each pass."""
    shown: set[tuple[str, int]] = set()

    def show(stage: str, done: int, total: int) -> None:
        quarter = 4 * done // max(1, total)
        if (stage, quarter) not in shown:
            shown.add((stage, quarter))
            print(f"  verifying {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return show


class Release(torch.nn.Module):
    """The owner's release path as a white-box attacker knows it: the head, then the privacy
    filter (clip and noise, fresh: the attacker lacks the owner's secret). A module, so each
    view gets its own copy."""

    def __init__(self, head: torch.nn.Module, spec: FilterSpec | None = None):
        super().__init__()
        self.head = head
        self.filter = ActivationFilter(spec) if spec is not None else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.head(x)
        return self.filter(a) if self.filter is not None else a


@dataclass
class Truth:
    """What only the auditor knows: indices, images and labels behind the released batches."""

    released_index: np.ndarray  # training-set index of each released sample used
    images: np.ndarray  # their images, float [0, 1]
    labels: np.ndarray  # their true labels
    eval_images: torch.Tensor
    eval_labels: np.ndarray
    aux: np.ndarray  # the public aux images and labels, for the reference lines
    aux_labels: np.ndarray


@dataclass
class Audit:
    run_dir: Path
    integrity: VerifyResult
    forced: bool = False
    config: RunConfig | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> arrays for the report
    classes: int = 0
    wall_s: float = 0.0


def run_config(run_dir: Path, replayed: Replay) -> RunConfig:
    path = run_dir / "config.toml"
    if not path.exists():
        raise ClicooperError(f"{path} is missing: the owner writes it at the start of a run; "
                             f"without it the auditor cannot load the run's dataset")
    cfg = load_config(path)
    committed = replayed.roster.meta.get("config", "")
    if cfg.digest() != committed:
        raise ClicooperError(f"{path} is not the configuration the roster commits to (digest "
                             f"{cfg.digest()[:16]}..., roster {committed[:16]}...)")
    return cfg


def load_model(run_dir: Path, plan, ack: dict | None
               ) -> tuple[list[torch.nn.Sequential], np.ndarray | None]:
    """The delivered model, checked against the digest the owner acknowledged in the log, and
    the owner's pseudo-class decoding (output -> class) when labels were obfuscated."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = run_dir / "model.safetensors"
    if not path.exists():
        raise ClicooperError(f"{path} is missing: the run did not finish delivering its model")
    data = path.read_bytes()
    logged = (ack or {}).get("model_sha256")
    if logged is None:
        raise ClicooperError("the log holds no owner acknowledgement with the model's digest: "
                             "the run did not end normally, so its model cannot be tied to it")
    if hashlib.sha256(data).hexdigest() != logged:
        raise ClicooperError(f"{path} is not the model the owner acknowledged in the log "
                             f"(sha256 {hashlib.sha256(data).hexdigest()[:16]}..., log "
                             f"{str(logged)[:16]}...): it was replaced after the run")
    groups = None
    if plan.n_outputs != plan.classes:  # pseudo-classes: the owner's decoding, owner-only file
        gpath = run_dir / "label_groups.json"
        try:
            groups = np.asarray(json.loads(gpath.read_text())["groups"], np.int64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClicooperError(f"{gpath} is missing or unreadable ({exc}): the owner writes it "
                                 f"when it obfuscates labels; without it the model's "
                                 f"pseudo-classes cannot be decoded") from None
        if groups.shape != (plan.n_outputs,) or groups.min() < 0 or groups.max() >= plan.classes:
            raise ClicooperError(f"{gpath} does not map the model's {plan.n_outputs} outputs to "
                                 f"{plan.classes} classes")
    try:
        return (segments_from_state_dict(plan_spec(plan), plan.segment_cuts, plan.seed, st_load(data)),
                groups)
    except (SafetensorError, RuntimeError, KeyError) as exc:
        raise ClicooperError(f"{path} does not fit the run's model plan: {exc}") from None


def _latest_first(batches: list[Batch], limit: int) -> list[Batch]:
    """Whole batches from the latest epoch backwards (the released head closest to the final
    one), in log order within an epoch, up to `limit` samples."""
    chosen, n = [], 0
    for epoch in sorted({b.epoch for b in batches}, reverse=True):
        for b in (b for b in batches if b.epoch == epoch):
            if n >= limit:
                break
            chosen.append(b)
            n += len(b.array)
    return chosen


def gather(replayed: Replay, data: Dataset, segments, cfg: RunConfig, spec: FilterSpec | None
           ) -> tuple[Knowledge, Truth, dict[str, Any]]:
    plan = replayed.plan
    if not replayed.released:
        raise ClicooperError("the log retains no released activations (fwd bodies): set "
                             "[log] retention to keep some, e.g. fwd=sample:16")
    chosen = _latest_first(replayed.released, CLUSTER_SAMPLES)
    labels_by_step = {b.step: b.array for b in replayed.labels}
    index, acts, received = [], [], []
    for b in chosen:
        order = batch_order(len(data.x_train), plan.batch_size, plan.seed, b.epoch)
        if not 0 <= b.batch < len(order):
            raise ClicooperError(f"released batch {b.batch} of epoch {b.epoch} does not exist in "
                                 f"a {len(order)}-batch epoch of this run's data")
        idx = order[b.batch]
        if len(idx) != len(b.array):
            raise ClicooperError(f"released batch {b.batch} of epoch {b.epoch} holds "
                                 f"{len(b.array)} samples, the run's batch order says {len(idx)}: "
                                 f"config.toml does not describe this run's data")
        index.append(idx)
        acts.append(b.array)
        received.append(labels_by_step.get(b.step, np.full(len(idx), -1)))
    index = np.concatenate(index)
    half = len(data.x_test) // 2
    aux = to_float(data.x_test[:half])
    head, stages = segments[0], segments[1:1 + len(plan.cuts)]  # not the owner's tail

    pairs = _eval_pairs(replayed, aux, plan.batch_size)
    knowledge = Knowledge({
        "plan": plan, "released": np.concatenate(acts).astype(np.float32),
        "released_labels": np.concatenate(received).astype(np.int64), "eval_pairs": pairs,
        "stages": stages, "release": Release(head, spec), "aux_images": aux,
        "aux_labels": data.y_test[:half]})
    truth = Truth(index, data.x_train[index].astype(np.float32) / 255.0, data.y_train[index],
                  to_float(data.x_test[half:]), data.y_test[half:], aux.numpy(), data.y_test[:half])
    epochs = sorted({b.epoch for b in chosen})
    info = {"released_samples": len(index), "released_epochs": epochs,
            "eval_pairs": 0 if pairs is None else len(pairs[0]), "aux_samples": half,
            "eval_samples": len(data.x_test) - half,
            "labels_aligned": int((knowledge.values["released_labels"] >= 0).sum())}
    return knowledge, truth, info


def _eval_pairs(replayed: Replay, aux: torch.Tensor, bs: int):
    """Evaluation releases of aux images from the latest epoch that has any, with the images."""
    usable = [b for b in replayed.eval_released if (b.batch + 1) * bs <= len(aux)]
    if not usable:
        return None
    last = max(b.epoch for b in usable)
    batches = [b for b in usable if b.epoch == last]
    x = torch.cat([aux[b.batch * bs:b.batch * bs + len(b.array)] for b in batches])
    return x, np.concatenate([b.array for b in batches]).astype(np.float32)


def audit_run(run_dir: str | Path, *, force: bool = False, owner: PublicIdentity | None = None,
              witnessed: list[str] | None = None, attacks: list[Attack] | None = None,
              progress=track) -> Audit:
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    witnessed = list(witnessed or [])
    cp = run_dir / "checkpoint.txt"
    if not witnessed and cp.exists():
        witnessed = [cp.read_text()]
    print(f"auditor: verifying {run_dir / 'log'}", file=sys.stderr, flush=True)
    result = verify_log(run_dir / "log", owner=owner, witnessed=witnessed,
                        progress=_verify_progress())
    print(f"auditor: log {'verified' if result.ok else 'did NOT verify'}: {result.entries} "
          f"entries, {result.checkpoints} checkpoints", file=sys.stderr, flush=True)
    audit = Audit(run_dir, result, forced=not result.ok)
    if not result.ok and not force:
        raise AuditRefused(result)
    try:
        replayed = replay(run_dir / "log")
    except (ClicooperError, ValueError) as exc:
        raise ClicooperError(f"the log cannot be read even with --force: {exc}") from None
    cfg = run_config(run_dir, replayed)
    audit.config = cfg
    audit.classes = replayed.plan.classes  # true classes (the model may output pseudo-classes)
    summary_path = run_dir / "summary.json"
    audit.summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed).limit(
        cfg.data.train_limit or None, cfg.data.test_limit or None)
    pv = cfg.privacy
    spec = defences.filter_spec(pv, cfg.run.epochs)
    segments, groups = load_model(run_dir, replayed.plan, replayed.ack)
    knowledge, truth, info = gather(replayed, data, segments, cfg, spec)
    owner = inference_model(segments, spec)
    owner_acc = scoring.accuracy(_predict(owner, truth.eval_images, groups), truth.eval_labels)
    # counted in the verified log, not taken from the owner's summary
    epochs = len(replayed.owner_epochs.get("fwd", ())) or cfg.run.epochs
    evaluations = len(replayed.owner_epochs.get("eval_fwd", ()))
    audit.settings = {
        "configuration": defences.describe(pv),
        "dataset": cfg.data.name, "model": replayed.plan.model, "cuts": list(replayed.plan.cuts),
        "owner_tail": replayed.plan.tail or None,
        # from the signed roster's plan and the verified config
        "schedule": schedule(replayed.plan.in_flight, pv.release == "once"),
        "epochs": audit.summary.get("epochs"), "test_accuracy": audit.summary.get("test_accuracy"),
        "owner_accuracy_eval_half": owner_acc, "privacy": _privacy_text(pv, spec),
        # recomputed from the verified config, not copied from the owner's summary
        "epsilon": defences.spent(pv, cfg.run.epochs, epochs, evaluations),
        "label_obfuscation": f"{pv.label_gamma} secret pseudo-classes per class, permuted"
        if pv.label_gamma > 1 else ("none: no label leaves the owner (owner tail)"
                                    if pv.owner_tail else "none"),
        "privacy_settings": dataclasses.asdict(pv),
        "retention": cfg.log.retention, **info}
    for attack in attacks if attacks is not None else default_attacks():
        print(f"auditor: attack {attack.name}: {attack.title}", file=sys.stderr, flush=True)
        a0 = time.perf_counter()
        out = attack.run(knowledge.view(attack.threat), progress)
        row = {"name": attack.name, "family": attack.family, "title": attack.title,
               "threat_model": attack.threat.to_json(), **score_attack(attack, out, truth, audit, progress)}
        row["wall_s"] = round(time.perf_counter() - a0, 1)
        audit.results.append(row)
    audit.wall_s = time.perf_counter() - t0
    return audit


def _predict(model: torch.nn.Module, x: torch.Tensor, groups: np.ndarray | None = None
             ) -> np.ndarray:
    """Class predictions; pseudo-class outputs are decoded by summing each class's."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 512):
            p = model(x[i:i + 512]).softmax(1)
            out.append((group_sum(p, groups) if groups is not None else p).argmax(1))
    return torch.cat(out).numpy()


def _privacy_text(pv, spec: FilterSpec | None) -> str:
    parts = []
    if spec is None:
        parts.append("no activation protection")
    else:
        norm = "L2" if spec.mechanism == "gaussian" else "L1"
        parts.append(f"{norm} clip {spec.clip:g}, {spec.mechanism} noise {spec.noise:.4g} per "
                     f"coordinate ({spec.noise / spec.clip:.4g} x clip), release {spec.mode}")
    if pv.release == "once" and spec is None:
        parts.append("head fixed at its initial weights")
    if pv.nopeek:
        parts.append(f"NoPeek alpha {pv.nopeek:g}")
    if pv.evaluate == "owner":
        parts.append("evaluation on the owner only")
    return "; ".join(parts)


def score_attack(attack: Attack, out: Any, truth: Truth, audit: Audit,
                 progress=track) -> dict[str, Any]:
    refs = audit.references
    if attack.family == "clustering":
        truth_labels = truth.labels[:len(next(iter(out.values())))]
        variants = {v: scoring.clustering_scores(p, truth_labels) for v, p in out.items()}
        best = max(variants, key=lambda v: variants[v]["ari"])
        if "raw_pixels" not in refs:
            from clicooper_bus.ml.attacks.clustering import cluster_variants

            raw = cluster_variants(truth.images[:len(truth_labels)], audit.classes,
                                   track=progress, desc="clustering raw pixels (reference)")
            rv = {v: scoring.clustering_scores(p, truth_labels) for v, p in raw.items()}
            rbest = max(rv, key=lambda v: rv[v]["ari"])
            refs["raw_pixels"] = {"variant": rbest, **rv[rbest]}
        return {"samples": len(truth_labels), "strongest": best, **variants[best],
                "variants": variants, "reference_raw_pixels": refs["raw_pixels"]}
    if attack.family == "inversion":
        recon = np.asarray(out, np.float32)
        originals = truth.images[:len(recon)]
        floors_by_n = refs.setdefault("inversion_floors", {})
        if str(len(recon)) not in floors_by_n:  # floors over exactly the samples scored
            floors_by_n[str(len(recon))] = scoring.inversion_floors(
                originals, truth.labels[:len(recon)], truth.aux, truth.aux_labels)
        audit.figures.setdefault("originals", originals[:10])
        audit.figures[attack.name] = recon[:10]
        floors = floors_by_n[str(len(recon))]
        s = scoring.mean_ssim(recon, originals)
        row = {"samples": len(recon), "ssim": s, "floors": floors,
               "above_mean_image": s - floors["mean_image"]}
        if len(recon) < INVERT_SAMPLES:
            row["warning"] = (f"only {len(recon)} released activations were retained; the "
                              f"SSIM of fewer than {INVERT_SAMPLES} samples is noisy (keep more "
                              f"with [log] retention fwd=sample:N)")
        return row
    if attack.family == "extraction":
        assert isinstance(out, Surrogate)
        pred = out.predict(truth.eval_images)
        acc = (scoring.accuracy(pred, truth.eval_labels) if out.named
               else scoring.hungarian_accuracy(pred, truth.eval_labels))
        # unnamed groups are matched to classes after the fact, which lifts chance too
        chance = (scoring.chance_accuracy(truth.eval_labels) if out.named
                  else scoring.matched_chance(pred, truth.eval_labels))
        return {"samples": len(truth.eval_labels), "accuracy": acc,
                "mapping": "soft vote of labelled samples" if out.named
                else "best consistent mapping (Hungarian, scored by the auditor)",
                "chance": chance,
                "owner_accuracy": audit.settings["owner_accuracy_eval_half"], "how": out.how}
    raise ClicooperError(f"attack {attack.name} has unknown family {attack.family!r}")

