"""The delivered model as a user gets it: one `torch.nn.Module` from `model.safetensors`.

The owner writes the file (`services/owner/artefacts.py`) with everything loading needs in its
safetensors metadata (strings, `model_metadata`): the format tag, the model spec (its resolved
layers: every op and parameter, so no built-in name needs looking up), the signed
plan (cuts, seed, classes, outputs, owner tail, batch size), the spec digest the roster
committed to, and the owner's release transform. `load_model` rebuilds the network from that
metadata alone, so the file is enough; it runs what the owner runs when it evaluates
(`services/owner/training.py`):

    images (uint8 0..255)  ->  float32 / 255, N x C x H x W  ->  head  ->  [clip]  ->  stages
    [-> owner tail]  ->  logits  [-> softmax, summed per class: pseudo-classes decoded]

- The clip (`ml/privacy/release.py` `Clip`) is there when activations were protected: the
  stages learnt on clipped activations. Noise is for releases only, never at inference.
- With label obfuscation (`[privacy] label_gamma` > 1) the last layer has classes x gamma
  pseudo-class outputs; decoding them needs the owner's grouping, `label_groups.json` in the run
  directory (mode 0600). It is not in the model file on purpose (whoever holds the file and the
  log's pseudo-labels could decode every retained label), and the owner's `owner.secret` alone
  cannot rebuild it: each run keys its pseudo-labels with a fresh nonce kept in memory only.

Files written before the metadata existed load from their run directory (the plan from the
log's roster, the release from `config.toml`); alone, they are refused with a message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.data import to_float
from clicooper_bus.ml.models import ModelSpec, model_spec, plan_spec, segments_from_state_dict
from clicooper_bus.ml.privacy.labels import group_sum
from clicooper_bus.ml.privacy.release import FilterSpec, inference_model
from clicooper_bus.plan import MAX_PLAN_BYTES, Plan, check_layers

FORMAT = "clicooper-model/1"


# --- the metadata ------------------------------------------------------------------------------

def model_metadata(*, run_id: str, spec: ModelSpec, plan: Plan, digest: str,
                   release: FilterSpec | None) -> dict[str, str]:
    """The safetensors metadata (every value a string) that makes the file self-contained.
    `digest` is the spec digest the roster committed to (`ModelSpec.digest`)."""
    return {"format": FORMAT, "run_id": run_id, "model": spec.name, "model_spec": digest,
            "cuts": json.dumps(list(plan.segment_cuts)),
            "spec": json.dumps(spec.to_doc(), sort_keys=True),
            "plan": plan.to_meta(),
            "release": json.dumps(dataclasses.asdict(release) if release else None),
            "input": "float32 N x C x H x W in [0, 1]: uint8 images / 255",
            "outputs": "logits" if plan.n_outputs == plan.classes else
                       "pseudo-class logits: decode with the owner's label_groups.json"}


def _json(meta: dict[str, str], key: str) -> Any:
    """The metadata's `key` parsed as JSON, at most MAX_PLAN_BYTES. Raises ValueError (or
    KeyError if absent) for text too long, malformed or nested too deep."""
    text = meta[key]
    if len(text) > MAX_PLAN_BYTES:
        raise ValueError(f"its {key} is {len(text):,} bytes, over the limit of "
                         f"{MAX_PLAN_BYTES:,}")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"its {key} nests too deep") from None


def _spec(doc: dict[str, Any]) -> ModelSpec:
    """The metadata's spec, re-resolved (`ModelSpec.from_doc`, so within the spec limits); a
    file from before specs were data holds layers as lists (`["conv2d", 1, 16, 5, 2]`): its
    built-in model by name. Raises ClicooperError, KeyError, TypeError or ValueError for a
    malformed document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise ValueError("its spec is not a table with a list of layers")
    if doc["layers"] and isinstance(doc["layers"][0], list):
        spec = model_spec(doc["name"], tuple(doc["input_shape"]), int(doc["classes"]))
        return dataclasses.replace(spec, head_end=int(doc["head_end"]))
    check_layers(doc["layers"], "its spec's layers")  # structure and limits, no recursion
    return ModelSpec.from_doc(doc)


def _check_fits(spec: ModelSpec, plan: Plan) -> None:
    """That the plan and the spec of one file describe one model (the digest covers the
    spec and the cuts, not the plan's other fields). Raises ValueError naming the field."""
    if plan.n_outputs != spec.classes:
        raise ValueError(f"its plan has {plan.n_outputs} outputs (classes {plan.classes}, "
                         f"outputs {plan.outputs}) but its spec {spec.classes}")
    if tuple(plan.input_shape) != tuple(spec.input_shape):
        raise ValueError(f"its plan's input_shape {list(plan.input_shape)} is not its spec's "
                         f"{list(spec.input_shape)}")
    if plan.layers and list(plan.layers) != list(spec.layers):
        raise ValueError("its plan's layers are not its spec's")
    if plan.segment_cuts[-1] >= len(spec.layers):
        raise ValueError(f"its plan's cuts {list(plan.segment_cuts)} do not fit a spec of "
                         f"{len(spec.layers)} layers")


def _digest_ok(spec: ModelSpec, cuts: tuple[int, ...], digest: str | None) -> bool:
    """Whether `digest` is the spec's (or, for a run made before specs were data, its
    legacy digest)."""
    return digest in (spec.digest(cuts), spec.legacy_digest(cuts))


@dataclass(frozen=True)
class Card:
    """What loading needs, read from the file's metadata (or, for an old file, its run)."""

    run_id: str
    spec: ModelSpec
    plan: Plan
    release: FilterSpec | None

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> Card:
        """Raises ClicooperError if the metadata is malformed (a plan field out of range, a
        spec over the limits, JSON too long or too deep, a plan and a spec that disagree) or
        its spec does not hash to the digest it carries."""
        try:
            plan = Plan.from_meta(meta["plan"])
            spec = _spec(_json(meta, "spec"))
            rel = _json(meta, "release")
            release = FilterSpec(**rel) if rel else None
        except (KeyError, TypeError, ValueError, ClicooperError) as exc:
            raise ClicooperError(f"{path}: malformed {FORMAT} metadata ({exc})") from None
        if not _digest_ok(spec, plan.segment_cuts, meta.get("model_spec")):
            # the digest is unkeyed: it shows the metadata disagrees with itself (damage, a
            # careless edit), not who wrote it; the run's signed log is what ties a model to
            # its run (`clicooper model verify`)
            raise ClicooperError(f"{path}: its spec and cuts do not hash to the digest it "
                                 f"carries (model_spec {str(meta.get('model_spec', ''))[:16]}"
                                 f"...): the file's metadata is inconsistent with itself. The "
                                 f"digest is unkeyed, so a match would not prove the file "
                                 f"authentic either: check it against its run's signed log")
        try:
            _check_fits(spec, plan)
        except ValueError as exc:
            raise ClicooperError(f"{path}: malformed {FORMAT} metadata ({exc})") from None
        return cls(meta.get("run_id", ""), spec, plan, release)

    @classmethod
    def from_run(cls, meta: dict[str, str], path: Path, run: RunLayout) -> Card:
        """An older file (no format tag): the plan from the run's log roster, the release
        from its config. Raises ClicooperError if the run directory lacks them."""
        if not (run.log.is_dir() and run.config.is_file()):
            raise ClicooperError(
                f"{path} was written before model files carried their spec (no {FORMAT!r} "
                f"metadata): load it from its run directory (with log/ and config.toml), or "
                f"re-save it from there")
        from clicooper_bus.config import load_config
        from clicooper_bus.ml.privacy.defences import filter_spec
        from clicooper_bus.net.roster import Roster
        from clicooper_bus.tlog.log import ProvenanceLog

        with ProvenanceLog.open(run.log) as plog:
            plan = Plan.from_meta(Roster.open(plog.roster_bytes).meta["plan"])
        spec = plan_spec(plan)
        if meta.get("model_spec") and not _digest_ok(spec, plan.segment_cuts, meta["model_spec"]):
            raise ClicooperError(f"{path} is not a model of the run in {run.root}: its spec "
                                 f"digest differs from the roster's plan")
        cfg = load_config(run.config)
        return cls(meta.get("run_id", ""), spec, plan, filter_spec(cfg.privacy, cfg.run.epochs))


# --- the module --------------------------------------------------------------------------------

class DecodeLabels(nn.Module):
    """The owner's decoding of pseudo-classes: softmax over the N x (classes x gamma) logits,
    summed per class -> N x classes probabilities (`LabelCodec.decode`)."""

    def __init__(self, groups: np.ndarray):
        super().__init__()
        self.register_buffer("groups", torch.as_tensor(groups, dtype=torch.int64))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return group_sum(logits.softmax(1), self.groups)


def read_label_groups(path: Path, plan: Plan) -> np.ndarray:
    """The owner's grouping (output -> true class), int64 of shape (outputs,). Raises
    ClicooperError naming `path` if it is missing, unreadable or does not fit the plan."""
    try:
        groups = np.asarray(json.loads(path.read_text())["groups"], np.int64)
    except FileNotFoundError:
        raise ClicooperError(
            f"{path} is missing: this model's {plan.n_outputs} outputs are secret pseudo-classes "
            f"(label obfuscation, {plan.n_outputs // plan.classes} per class), and only the "
            f"owner's label_groups.json (in its run directory, mode 0600) decodes them; pass "
            f"label_groups=PATH (--label-groups PATH)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClicooperError(f"{path} is unreadable ({exc}): it should be the owner's "
                             f"label_groups.json") from None
    if groups.shape != (plan.n_outputs,) or groups.min() < 0 or groups.max() >= plan.classes:
        raise ClicooperError(f"{path} does not map this model's {plan.n_outputs} outputs to "
                             f"its {plan.classes} classes: it belongs to another run")
    return groups


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, RunLayout]:
    """(model file, the run directory it sits in). Raises ClicooperError if there is none."""
    p = Path(path)
    run = RunLayout(p) if p.is_dir() else RunLayout(p.parent)
    model = run.model if p.is_dir() else p
    if not model.is_file():
        raise ClicooperError(f"{model} does not exist: name a run directory holding "
                             f"model.safetensors, or a model file")
    return model, run


def read_card(model: Path, run: RunLayout) -> tuple[Card, dict[str, torch.Tensor]]:
    """The file's card and tensors. Raises ClicooperError if it is not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(model), framework="pt") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ClicooperError(f"{model} is not a safetensors model file: {exc}") from None
    if meta.get("format") == FORMAT:
        return Card.from_metadata(meta, model), weights
    if "format" in meta:
        raise ClicooperError(f"{model} is a {meta['format']!r} file; this version reads "
                             f"{FORMAT!r}")
    return Card.from_run(meta, model, run), weights


def load_model(path: str | os.PathLike[str], *,
               label_groups: str | os.PathLike[str] | None = None) -> nn.Module:
    """The delivered model of a run directory or a model file, in eval mode.

    Input: float32 N x C x H x W in [0, 1] (uint8 images / 255, `to_input`), C, H, W as in
    `model.input_shape`. Output: N x classes scores for the original labels: logits, or with
    label obfuscation class probabilities (`model.scores` says which); argmax is the owner's
    prediction. Attributes: `run_id`, `classes`, `input_shape`, `batch_size` (the owner's
    evaluation batch), `scores`.

    `label_groups` (obfuscated labels only): the owner's `label_groups.json`; default: the one
    beside the model file. Raises ClicooperError for a missing or foreign file, metadata or
    grouping, or weights that do not fit the spec.
    """
    model_path, run = _resolve(path)
    card, weights = read_card(model_path, run)
    plan = card.plan
    try:  # built on the meta device, every tensor's shape compared before any is used
        segments = segments_from_state_dict(card.spec, plan.segment_cuts, plan.seed, weights)
    except (RuntimeError, KeyError) as exc:
        raise ClicooperError(f"{model_path}: the weights do not fit its spec: {exc}") from None
    net = inference_model(segments, card.release)
    if plan.n_outputs != plan.classes:
        gpath = Path(label_groups) if label_groups is not None else run.label_groups
        net = nn.Sequential(*net, DecodeLabels(read_label_groups(gpath, plan)))
    net.run_id, net.classes, net.input_shape = card.run_id, plan.classes, plan.input_shape
    net.batch_size = plan.batch_size
    net.scores = "logits" if plan.n_outputs == plan.classes else "probabilities"
    return net.eval()


# --- predicting on an npz ----------------------------------------------------------------------

def to_input(images: np.ndarray, input_shape: tuple[int, int, int], name: str = "x"
             ) -> torch.Tensor:
    """uint8 images N x H x W or N x H x W x C -> float32 N x C x H x W in [0, 1], as the owner
    feeds them (`ml/data.py`). Raises ClicooperError if the dtype or shape does not fit."""
    c, h, w = input_shape
    want = f"uint8 N x {h} x {w}" + ("" if c == 1 else f" x {c}") + (
        f" (or N x {h} x {w} x 1)" if c == 1 else "")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ClicooperError(f"{name} must be {want}, got {images.dtype} {images.shape}")
    x = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if x.shape[1:] != (c, h, w):
        raise ClicooperError(f"{name} must be {want} (channels last), got {images.shape}")
    return to_float(np.ascontiguousarray(x))


@dataclass
class Predictions:
    source: str  # which arrays of which file
    pred: np.ndarray  # int64 N: the predicted (original) class
    scores: np.ndarray  # float32 N x classes
    labels: np.ndarray | None  # int64 N, when the file has them

    @property
    def accuracy(self) -> float | None:
        if self.labels is None:
            return None
        return float((self.pred == self.labels).sum()) / max(1, len(self.labels))


def read_npz(path: str | os.PathLike[str]) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(the images' array name, images, labels or None) from an npz: `x_test` (and `y_test`)
    if present, else `x` (and `y`). Raises ClicooperError if neither is there or the labels
    do not fit."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ClicooperError(f"cannot read {path} as plain npz arrays: {exc}") from None
    xk = next((k for k in ("x_test", "x") if k in arrays), None)
    if xk is None:
        raise ClicooperError(f"{path} has no array x_test or x (its arrays: "
                             f"{sorted(arrays)})")
    yk = xk.replace("x", "y", 1)
    y = arrays.get(yk)
    if y is not None:
        if y.ndim != 1 or len(y) != len(arrays[xk]) or not np.issubdtype(y.dtype, np.integer):
            raise ClicooperError(f"{path}: {yk} must be {len(arrays[xk])} integer labels, got "
                                 f"{y.dtype} {y.shape}")
        y = y.astype(np.int64)
    return xk, arrays[xk], y


def predict(model: nn.Module, data: str | os.PathLike[str],
            batch_size: int | None = None) -> Predictions:
    """The model's predictions for an npz (`read_npz`), in batches of the owner's evaluation
    size by default (so that every score is computed as the owner computed it)."""
    name, images, labels = read_npz(data)
    x = to_input(images, model.input_shape, f"{data}: {name}")
    bs = batch_size or model.batch_size
    with torch.no_grad():
        scores = torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) \
            else torch.zeros(0, model.classes)
    source = f"{name}{' with labels' if labels is not None else ''} of {data}"
    return Predictions(source, scores.argmax(1).numpy().astype(np.int64),
                       scores.numpy().astype(np.float32), labels)


def write_predictions(p: Predictions, out: str | os.PathLike[str]) -> Path:
    """`.csv`: a header `index,prediction[,label]` and one row per sample; otherwise npz with
    `prediction` (int64 N), `scores` (float32 N x classes) and `label` when known."""
    out = Path(out)
    if out.suffix == ".csv":
        cols = [np.arange(len(p.pred)), p.pred] + ([p.labels] if p.labels is not None else [])
        head = "index,prediction" + (",label" if p.labels is not None else "")
        np.savetxt(out, np.stack(cols, 1), fmt="%d", delimiter=",", header=head, comments="")
    else:
        extra = {"label": p.labels} if p.labels is not None else {}
        with open(out, "wb") as f:
            np.savez(f, prediction=p.pred, scores=p.scores, **extra)
    return out
