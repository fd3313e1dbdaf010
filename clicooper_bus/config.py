"""The run configuration: a TOML file, every key documented here with its default.

An unknown section or key, a value of the wrong type or out of range is an error naming the
file, the section and the key. `clicooper config defaults` prints a complete, commented file.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clicooper_bus.config_checks import cross_checks
from clicooper_bus.errors import ConfigError
from clicooper_bus.model_spec import inline_spec

MAX_IN_FLIGHT = 8  # training batches in flight at most: what a trainer accepts to hold
MAX_BATCH_SIZE = 1 << 16  # samples per step at most: what a trainer accepts (plan.py)


def _doc(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class RunSection:
    id: str = _doc("demo", "run id: names the bus topics and the directory <out_dir>/<id>/")
    seed: int = _doc(0, "seed of initialisation and batch order", min=0)
    epochs: int = _doc(5, "training epochs over the training set", min=1)
    batch_size: int = _doc(128, "samples per step", min=1, max=MAX_BATCH_SIZE)
    lr: float = _doc(1e-3, "Adam learning rate of every segment", min=0.0)
    max_steps: int = _doc(0, "stop after this many steps in all (0: no limit)", min=0)
    eval_every: int = _doc(1, "evaluate on the test set every N epochs (0: only at the end)",
                           min=0)
    threads: int = _doc(2, "torch threads of the owner (which computes the head)", min=1)
    trainer_threads: int = _doc(1, "torch threads of each trainer started from this config "
                                   "(idle torch threads spin and take CPU from the others)",
                                min=1)
    trainer_memory_mb: int = _doc(2048, "memory a trainer started from this config allows its "
                                        "stage, MiB: weights, gradients, Adam state and "
                                        "activations at batch_size (Python and torch themselves "
                                        "take about 300 MiB more); a plan needing more is refused "
                                        "before anything is allocated", min=16)
    in_flight: int = _doc(1, "training batches the owner keeps in flight. 1: synchronous split "
                             "learning, the same weights as the in-process reference. N > 1 "
                             "pipelines (faster over a network): the head's forward of batch s "
                             "uses head weights updated through batch s-N, so its gradients "
                             "arrive up to N-1 steps late; the trainers' stages still train "
                             "in step order (on what the lagging head sends them)",
                          min=1, max=MAX_IN_FLIGHT)
    out_dir: str = _doc("runs", "where <id>/ (log, model, summary) is written")
    snapshot_every: int = _doc(50, "a trainer snapshots its stage (weights, Adam state, step, "
                                   "RNG) to <run>/snapshots/<name>/ and commits its digest in "
                                   "a signed snapshot message every N training steps, and at "
                                   "every epoch (watermark round) boundary; the owner keeps its "
                                   "head's in memory at the same steps. A trainer restarted "
                                   "after a crash resumes from the last step every stage "
                                   "committed, so at most N steps are trained again", min=1)


@dataclass
class DataSection:
    name: str = _doc("fashion-mnist", "fashion-mnist, mnist-5k, synthetic or npz",
                     choices=("fashion-mnist", "mnist-5k", "synthetic", "npz"))
    path: str = _doc("", "IDX directory for fashion-mnist (default: the Debian package's), "
                         ".npz file for npz")
    train_limit: int = _doc(0, "use only the first N training samples (0: all)", min=0)
    test_limit: int = _doc(0, "use only the first N test samples (0: all)", min=0)


@dataclass
class ModelSection:
    name: str = _doc("small-cnn", "a built-in model (small-cnn, vgg-small, resnet-8, resnet-20: "
                                  "the specs in clicooper_bus/ml/zoo/), or with `spec` or "
                                  "`layers` the name of your own model (default: the spec "
                                  "file's name, or custom)")
    spec: str = _doc("", "a model spec file (TOML: name, default_cut, [[layers]]; relative to "
                         "this config file), read when the config is loaded: its layers are "
                         "written inline into the run's config.toml. Empty: none")
    layers: list = _doc([], "the model inline, as a list of layer tables ([[model.layers]] op "
                            "= \"conv2d\" ...): conv2d, linear, relu, gelu, maxpool, avgpool, "
                            "adaptive_avgpool, flatten, dropout, groupnorm, layernorm, residual "
                            "(see the README, 'Bring your own model'). Empty: the model `name`")
    default_cut: int = _doc(0, "where the owner's head ends when `cuts` is empty (the first "
                               "layer of trainer 1); 0: the spec's own default_cut (inline "
                               "layers without one: 1)", min=0)
    cuts: list = _doc([], "first layer index of each trainer's stage (empty: the head ends at "
                          "the model's default cut, the rest is split evenly)")


@dataclass
class ParticipantsSection:
    keys: str = _doc("runs/keys", "directory holding NAME.pub of every participant (and "
                                  "NAME.key of the ones started on this machine)")
    owner: str = _doc("owner", "the owner's key name")
    notary: str = _doc("notary", "the notary's key name")
    trainers: list = _doc(["trainer-1", "trainer-2"],
                          "trainer key names, in stage order (1 to 8; a stage cut without "
                          "weights (the small CNN's second when cut for three trainers) carries "
                          "no watermark)")
    broker: str = _doc("broker", "the broker's key name: its CURVE key, which every participant "
                                 "checks when it connects")
    remote: list = _doc([], "trainers among `trainers` that join from other machines (`clicooper "
                            "join`): `clicooper run` waits for them instead of starting them")
    observers: list = _doc([], "auditors following the run (`clicooper_bus.services.auditor --follow --name "
                               "NAME`): the owner starts only once they watch, and the notary "
                               "keeps the finished run open until they are done")
    standby: list = _doc([], "standby trainers: roster members with no stage, each ready to "
                             "take over the stage of a trainer gone past rejoin_timeout_s "
                             "(their order is the order of takeover)")


@dataclass
class BusSection:
    pub: str = _doc("tcp://127.0.0.1:5555", "broker address publishers connect to (its XSUB)")
    sub: str = _doc("tcp://127.0.0.1:5556", "broker address subscribers connect to (its XPUB)")
    witness: str = _doc("tcp://127.0.0.1:5557", "broker address the notary subscribes at: "
                                                "lossless, the run waits while the notary does "
                                                "not read (paused), so its log has no gap; "
                                                "empty: the notary subscribes at `sub`, where a "
                                                "reader paused past `stall_s` misses messages")
    timeout_s: float = _doc(5.0, "a peer or the broker silent this long is suspected: every "
                                 "process logs it and says so on its console, and the owner "
                                 "sends no new step until the peer's beats come back (keep it "
                                 "above the longest computation between two messages, e.g. one "
                                 "step on a slow device)", min=0.5)
    rejoin_timeout_s: float = _doc(60.0, "a peer or the broker silent this long is gone: the run "
                                         "stops cleanly, naming it (summary.json 'stopped'); a "
                                         "pause shorter than this (a device asleep, SIGSTOP) "
                                         "loses nothing. At least timeout_s", min=0.5)
    beat_s: float = _doc(1.0, "interval of liveness beats", min=0.05)
    join_timeout_s: float = _doc(120.0, "how long to wait for everyone to join (the owner), for "
                                        "the roster (notary, trainers), for a peer's first "
                                        "message, and for the end-of-run handshake", min=1.0)
    step_timeout_s: float = _doc(60.0, "the owner gives up when a step's gradients or an "
                                       "evaluation batch do not come back in this long while "
                                       "everyone is alive (a lost message)", min=1.0)
    hwm: int = _doc(16, "ZeroMQ high-water mark, in messages", min=1)
    security: str = _doc("curve", "curve: every connection is encrypted and authenticated with the "
                                  "participants' keys, and the broker admits only the run's "
                                  "members; none: plaintext, loopback addresses only, to measure "
                                  "what CURVE costs", choices=("curve", "none"))
    stall_s: float = _doc(2.0, "the longest the broker waits for a subscriber that stopped "
                               "reading; after it, that subscriber misses what does not fit its "
                               "queue and everyone else runs on", min=0.01)
    audit_timeout_s: float = _doc(600.0, "how long the notary keeps a finished run open for an "
                                          "auditor following it (`clicooper_bus.services.auditor --follow`) "
                                          "to finish its audit", min=1.0)
    codec: str = _doc("fp32", "how activations and gradients travel, applied after the privacy "
                              "filter (post-processing: epsilon unchanged) and part of the "
                              "signed plan: fp32 (as computed), fp16, bf16, or int8 (one "
                              "float32 scale per row)", choices=("fp32", "fp16", "bf16", "int8"))


@dataclass
class LogSection:
    retention: str = _doc("fwd=sample:16,bwd=sample:4,eval_fwd=sample:2,eval_out=sample:2,*=all",
                          "which bodies the log keeps: all, none, sample:N, kind=policy,... "
                          "or verify (what replay verification reads: every body today) "
                          "(sample:N keeps the first N per kind, sender and epoch; the auditor "
                          "attacks the retained activations: at batch 128, fwd=sample:16 keeps "
                          "2,048 per epoch)")
    checkpoint_every: int = _doc(1000, "sign a checkpoint every N entries", min=1)
    checkpoint_seconds: float = _doc(10.0, "... and at least every T seconds", min=0.1)
    fsync: str = _doc("checkpoint", "always, checkpoint or never",
                      choices=("always", "checkpoint", "never"))
    notary_nice: int = _doc(10, "the notary lowers its CPU priority by this much (0: not), so "
                                "that on a shared machine it does not slow training", min=0)


@dataclass
class WatermarkSection:
    enabled: bool = _doc(True, "each trainer embeds a chained watermark in its stage every "
                               "round and the notary certifies it (stages without weights "
                               "carry none)")
    bits: int = _doc(64, "watermark bits T per stage and round", min=8, max=4096)
    strength: float = _doc(0.1, "lambda of the watermark regulariser "
                                "lambda * BCE(sigmoid(X w), b)", min=0.0)
    threshold: float = _doc(0.2, "a stage verifies with at most this fraction of its bits "
                                 "wrong (at T = 64, 0.2: a mark-free stage passes with "
                                 "probability 2.3e-7)", min=0.0)


@dataclass
class PrivacySection:
    name: str = _doc("", "what reports call this configuration (e.g. undefended, paper, "
                         "defended); empty: derived from the settings")
    mechanism: str = _doc("none", "activation protection on every release: none, gaussian "
                                  "(L2 clip, then Gaussian noise) or laplace (L1 clip, then "
                                  "Laplace noise)", choices=("none", "gaussian", "laplace"))
    clip: float = _doc(1.0, "per-sample clipping norm C of each released activation (L2 for "
                            "gaussian, L1 for laplace)", min=1e-9)
    noise_multiplier: float = _doc(0.0, "noise per coordinate as a multiple of clip (Gaussian "
                                        "standard deviation or Laplace scale; the sensitivity "
                                        "is 2 x clip, so noise/sensitivity is half of this); "
                                        "0: calibrated from epsilon", min=0.0)
    epsilon: float = _doc(0.0, "target epsilon for the whole run (each training sample over all "
                               "its releases); 0: use noise_multiplier", min=0.0)
    delta: float = _doc(1e-5, "delta of the (epsilon, delta) guarantee", min=1e-300)
    release: str = _doc("per-step", "per-step: fresh noise on every release, head trained end "
                                    "to end; once: the head stays at its initial weights and "
                                    "each sample's noisy activation is the same every epoch "
                                    "(released once)", choices=("per-step", "once"))
    label_gamma: int = _doc(1, "secret label obfuscation: pseudo-classes per class (1: off); the "
                               "last stage learns gamma x classes pseudo-classes keyed by the "
                               "owner's secret, the owner decodes", min=1)
    owner_tail: bool = _doc(False, "U-shaped split: the owner keeps the model's last layer and "
                                   "the loss; no label or pseudo-label is sent (the gradient "
                                   "the owner sends back still depends on the labels)")
    nopeek: float = _doc(0.0, "NoPeek: weight alpha of the distance-correlation penalty between "
                              "images and the head's output before the release's clip and "
                              "noise, in the head's training (0: off)",
                         min=0.0)
    evaluate: str = _doc("chain", "chain: evaluate each epoch through the trainers (they see "
                                  "evaluation activations); owner: evaluate once, at the end, "
                                  "on the delivered model (nothing of the test set is released)",
                         choices=("chain", "owner"))
    secret_order: bool = _doc(False, "secret batch order: each epoch's order is keyed by a "
                                     "key drawn fresh for each run (order.secret in the run "
                                     "directory, 0600; the signed roster commits to it, and "
                                     "the auditor needs it to score), so a trainer knows only "
                                     "where a release came in its epoch, not which sample it "
                                     "was, and can link one sample's releases across epochs "
                                     "only by matching them; needs evaluate = owner")
    label_epsilon: float = _doc(0.0, "randomised response on each training label, drawn once "
                                     "per sample from the owner's secret: the epsilon of the "
                                     "label-DP it gives the whole transcript (0: off)",
                                min=0.0, max=50.0)
    label_dcor: float = _doc(0.0, "label decorrelation: weight beta of the distance-correlation "
                                  "penalty between the trained-on labels (one-hot) and the "
                                  "head's output before the release's clip and noise, in the "
                                  "head's training (0: off)",
                             min=0.0)
    finetune_epochs: int = _doc(0, "owner fine-tune: after the run, epochs the owner trains its "
                                   "head and tail on its clean data with the trainers' stages "
                                   "frozen; nothing is released (0: off; needs owner_tail)",
                                min=0)
    finetune_samples: int = _doc(0, "training samples the fine-tune uses (the first of the "
                                    "training set; 0: all of them)", min=0)
    finetune_lr: float = _doc(0.01, "Adam learning rate of the fine-tune (its few steps move "
                                    "further than training's [run] lr)", min=1e-9)
    finetune_control: bool = _doc(False, "also fine-tune the same way from untrained weights "
                                         "(the control arm: what the owner reaches without the "
                                         "trainers); measured, not delivered")

    @property
    def on(self) -> bool:
        """Whether any defence is configured (then the owner needs its secret)."""
        return self.mechanism != "none" or self.label_gamma > 1 or self.owner_tail \
            or self.nopeek > 0 or self.evaluate == "owner" or self.release == "once" \
            or self.label_epsilon > 0 or self.label_dcor > 0 or self.finetune_epochs > 0 \
            or self.secret_order


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    participants: ParticipantsSection = field(default_factory=ParticipantsSection)
    bus: BusSection = field(default_factory=BusSection)
    log: LogSection = field(default_factory=LogSection)
    watermark: WatermarkSection = field(default_factory=WatermarkSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.id

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the whole configuration: goes in the roster."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def to_toml(self) -> str:
        return render_toml(self)


def _check(where: str, f: Any, value: Any) -> Any:
    typ = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float,
                                                    "list": list, "bool": bool}[f.type]
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} "
                          f"{value!r}")
    meta = f.metadata
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: must be at least {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: must be at most {meta['max']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    return value


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None
                ) -> RunConfig:
    """Read a TOML config (None: all defaults), then apply `overrides` the same way."""
    if not path:
        return config_from_text("", None, overrides)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return config_from_text(text, path, overrides)


def config_from_text(text: str, path: str | Path | None,
                     overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """`load_config` of a file's `text` already read (a reader that checked the bytes against
    a digest configures from those bytes, not from a second read); `path` names it in errors
    and anchors a relative [model] spec."""
    name = str(path) if path else "defaults"
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    cfg = RunConfig()
    spec_dir, named = Path("."), False  # where [model] spec is relative to; name given?
    for source, doc in ((name, raw), ("overrides", overrides or {})):
        if isinstance(doc.get("model"), dict):
            if "spec" in doc["model"]:  # a file's spec is relative to it, an override's to .
                spec_dir = Path(path).parent if doc is raw and path else Path(".")
            named = named or "name" in doc["model"]
        for section, values in doc.items():
            sect_field = next((f for f in fields(cfg) if f.name == section), None)
            if sect_field is None or not isinstance(values, dict):
                raise ConfigError(f"{source}: unknown section [{section}]; sections are "
                                  f"{', '.join(f.name for f in fields(cfg))}")
            obj = getattr(cfg, section)
            known = {f.name: f for f in fields(obj)}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(f"{source}: unknown key [{section}] {key}; keys are "
                                      f"{', '.join(known)}")
                setattr(obj, key, _check(f"{source}: [{section}] {key}", known[key], value))
    inline_spec(cfg.model, name, spec_dir, named)
    cross_checks(cfg, name)
    return cfg


def missing_keys(text: str) -> list[str]:
    """`section.key` of every key a config file's `text` does not set (loading fills them
    with today's defaults): a run written by an older version lacks the keys added since.
    The text must be TOML (`config_from_text` checks it)."""
    doc = tomllib.loads(text)
    return [f"{f.name}.{k.name}" for f in fields(RunConfig)
            for k in fields(getattr(RunConfig(), f.name))
            if k.name not in (doc.get(f.name) or {})]


def _toml_value(v: Any) -> str:
    """A TOML value: strings, numbers and booleans are valid TOML in JSON syntax; lists and
    tables (the model's layers) are written inline."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def render_toml(cfg: RunConfig) -> str:
    out = ["# CliCooper bus run configuration; every key shown with its value and meaning.\n"]
    for sect in fields(cfg):
        out.append(f"\n[{sect.name}]\n")
        obj = getattr(cfg, sect.name)
        for f in fields(obj):
            out.append(f"# {f.metadata['doc']}\n{f.name} = {_toml_value(getattr(obj, f.name))}\n")
    return "".join(out)
