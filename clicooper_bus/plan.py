"""The training plan the owner publishes inside its signed roster, so that a trainer needs no
config file of its own: the model (its name and its fully resolved layer list: every layer's
op and parameters, input channels included), input shape, classes, cuts, seed, learning rate,
how many training batches may be in flight, and with the privacy defences the number of
(pseudo-)outputs and where the owner's tail starts. Being signed, it is also the evidence of how
the run was trained.

Trainers build their stage from the plan's layers alone (`clicooper_bus.ml.models.plan_spec`;
nothing is looked up by name, no owner code runs) and check the spec's digest against the
roster's, so the owner cannot be misunderstood and a trainer cannot silently train something
else.

A trainer trusts the owner only partly: a careless or hostile plan must be a named refusal,
never a crash or an out-of-memory kill. So every `Plan` is checked when it is made (the owner
building it, `from_meta` on a roster or a model file) against the limits below; the layers'
parameters and shapes are checked by `ml.models.resolve_spec`, which applies the same nesting
and layer-count limits. A plan outside them raises `RosterError` naming the field, the value
and the limit.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from clicooper_bus.config import MAX_BATCH_SIZE, MAX_IN_FLIGHT
from clicooper_bus.errors import RosterError
from clicooper_bus.net.encoding import CODECS

# --- limits (a plan outside them is refused: `Plan.check`) ---------------------------------------
MAX_PLAN_BYTES = 1 << 20  # a plan's JSON text, bytes (the built-ins' are under 10 kB)
MAX_NESTING = 8  # residual layers inside one another (the built-ins nest 1 deep)
MAX_LAYERS = 512  # layers in all, those inside residuals included (resnet-20: 70)
MAX_STAGES = 8  # trainers' stages (`[participants] trainers` holds 1 to 8)
MAX_SIDE = 1 << 16  # each of an input's C, H and W
MAX_CLASSES = 1 << 16  # classes, and the model's output units (classes x label_gamma)
MAX_SEED = (1 << 64) - 1  # torch.manual_seed takes 0 .. 2**64 - 1 (and negatives, refused here)
MAX_NAME = 256  # characters of the model's name
MAX_SAMPLES = 1 << 40  # train_size, test_size and max_steps


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi. Raises RosterError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RosterError(f"roster plan: {name} must be an integer in {lo}..{hi}, got "
                          f"{type(value).__name__} {value!r:.60}")
    if not lo <= value <= hi:
        raise RosterError(f"roster plan: {name} = {value} is outside {lo}..{hi}")
    return int(value)


def _ints(name: str, value: Any, lo: int, hi: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise RosterError(f"roster plan: {name} must be a list of integers, got "
                          f"{type(value).__name__} {value!r:.60}")
    return tuple(_int(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))


def check_layers(layers: Any, where: str = "roster plan: layers") -> tuple[dict[str, Any], ...]:
    """The structure of a layer list, without torch: a list of tables, each with a string
    `op`; a residual's `body` and `shortcut` lists of tables; at most MAX_NESTING residuals
    inside one another and MAX_LAYERS layers in all (nested ones included). Walks iteratively
    (no recursion, whatever the depth). Returns the layers as a tuple. Raises RosterError
    naming the layer (`layer 4.body.1`) and what is wrong."""
    if not isinstance(layers, list | tuple):
        raise RosterError(f"{where} must be a list of layer tables, got "
                          f"{type(layers).__name__}")
    count = 0
    stack: list[tuple[Any, str, int]] = [(la, str(i), 0) for i, la in enumerate(layers)]
    while stack:
        layer, name, depth = stack.pop()
        count += 1
        if count > MAX_LAYERS:
            raise RosterError(f"{where}: more than {MAX_LAYERS} layers in all (residuals' "
                              f"bodies and shortcuts included); the limit is {MAX_LAYERS}")
        if not isinstance(layer, dict) or not isinstance(layer.get("op"), str):
            raise RosterError(f"{where}: layer {name} must be a table with a string op, got "
                              f"{layer!r:.80}")
        if layer["op"] != "residual":
            continue
        if depth + 1 > MAX_NESTING:
            raise RosterError(f"{where}: layer {name} nests residuals more than {MAX_NESTING} "
                              f"deep (the limit: a trainer's stack and time are finite)")
        for part in ("body", "shortcut"):
            inner = layer.get(part, [])
            if not isinstance(inner, list | tuple):
                raise RosterError(f"{where}: layer {name}'s {part} must be a list of layer "
                                  f"tables, got {type(inner).__name__}")
            stack.extend((la, f"{name}.{part}.{j}", depth + 1) for j, la in enumerate(inner))
    return tuple(layers)


@dataclass(frozen=True)
class Plan:
    """A run's training plan; checked when made (`check`), so that every Plan in a process is
    within the limits above. Raises RosterError naming the field that is wrong."""

    model: str
    input_shape: tuple[int, int, int]
    classes: int
    cuts: tuple[int, ...]
    seed: int
    lr: float
    batch_size: int
    outputs: int = 0  # the model's output units: classes x label_gamma (0: classes)
    tail: int = 0  # first layer of the owner's tail (owner_tail), 0: the last stage has the loss
    in_flight: int = 1  # training batches the owner keeps in flight ([run] in_flight)
    # the resolved layers (`ml.models.resolve_spec`: JSON tables, every parameter explicit);
    # empty only in plans from before specs were data, which name a built-in model
    layers: tuple[dict[str, Any], ...] = ()
    # the training and test set sizes and the step limit ([run] max_steps, 0: none): with the
    # batch size, every step's and evaluation batch's exact rows (the batch sizes are a public
    # function of them, `ml.data.batch_rows`; the samples too unless `secret_order`), and when
    # an epoch's training is over,
    # so that a stage refuses a batch a row short or an evaluation batch outside the
    # protocol naming its sender; 0 in plans from before they were carried (rows 1..batch_size)
    train_size: int = 0
    test_size: int = 0
    max_steps: int = 0
    # how float tensors travel ([bus] codec, `net.encoding`): every sender encodes with it and
    # every receiver refuses another encoding; fp32 in plans from before it was carried
    codec: str = "fp32"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every field typed and in range (normalising lists to tuples and integral numbers to
        int): a model name; input_shape three sides in 1..MAX_SIDE; classes in 1..MAX_CLASSES;
        outputs 0 or a multiple of classes up to MAX_CLASSES; 1 to MAX_STAGES cuts, strictly
        increasing from 1, before the tail and (with layers) inside the model; tail 0 or after
        the last cut and inside the model; seed in 0..2**64-1 (torch's manual_seed); lr finite
        and >= 0; batch_size in 1..MAX_BATCH_SIZE; in_flight in 1..MAX_IN_FLIGHT; train_size,
        test_size and max_steps in 0..MAX_SAMPLES; codec one of `net.encoding.CODECS`;
        layers as `check_layers`. Raises
        RosterError naming the field, its value and the limit."""
        put = object.__setattr__
        if not isinstance(self.model, str) or not 0 < len(self.model) <= MAX_NAME:
            raise RosterError(f"roster plan: model must be a name of 1 to {MAX_NAME} "
                              f"characters, got {self.model!r:.60}")
        shape = _ints("input_shape", self.input_shape, 1, MAX_SIDE)
        if len(shape) != 3:
            raise RosterError(f"roster plan: input_shape must be C, H, W (3 sides), got "
                              f"{list(shape)}")
        put(self, "input_shape", shape)
        put(self, "classes", _int("classes", self.classes, 1, MAX_CLASSES))
        outputs = _int("outputs", self.outputs, 0, MAX_CLASSES)
        if outputs and (outputs < self.classes or outputs % self.classes):
            raise RosterError(f"roster plan: outputs = {outputs} must be 0 or a multiple of "
                              f"classes ({self.classes}): classes x label_gamma")
        put(self, "outputs", outputs)
        put(self, "layers", check_layers(self.layers))
        n = len(self.layers)
        cuts = _ints("cuts", self.cuts, 1, MAX_LAYERS)
        tail = _int("tail", self.tail, 0, MAX_LAYERS)
        end = tail or n  # the first layer no trainer holds (n = 0: a legacy plan, no layers)
        if not 1 <= len(cuts) <= MAX_STAGES or any(a >= b for a, b in zip(cuts, cuts[1:],
                                                                         strict=False)):
            raise RosterError(f"roster plan: cuts {list(cuts)} must be 1 to {MAX_STAGES} "
                              f"strictly increasing layer indices (one per stage)")
        if tail and tail <= cuts[-1]:
            raise RosterError(f"roster plan: tail = {tail} (the owner's tail) must come after "
                              f"the last cut {cuts[-1]}")
        if n and tail >= n:
            raise RosterError(f"roster plan: tail = {tail} (the owner's tail) must be a layer "
                              f"index of the model's {n} layers")
        if n and cuts[-1] >= end:
            raise RosterError(f"roster plan: cuts {list(cuts)} do not fit a model of {n} layers"
                              f"{f' whose tail starts at {tail}' if tail else ''}: every stage "
                              f"needs at least one layer (cuts in 1..{end - 1})")
        put(self, "cuts", cuts)
        put(self, "tail", tail)
        put(self, "seed", _int("seed", self.seed, 0, MAX_SEED))
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) \
                or lr < 0:
            raise RosterError(f"roster plan: lr must be a finite number >= 0, got {lr!r:.60}")
        put(self, "lr", float(lr))
        put(self, "batch_size", _int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE))
        put(self, "in_flight", _int("in_flight", self.in_flight, 1, MAX_IN_FLIGHT))
        for name in ("train_size", "test_size", "max_steps"):
            put(self, name, _int(name, getattr(self, name), 0, MAX_SAMPLES))
        if self.codec not in CODECS:
            raise RosterError(f"roster plan: codec {self.codec!r:.40} is not one of "
                              f"{', '.join(CODECS)}")

    @property
    def n_outputs(self) -> int:
        return self.outputs or self.classes

    @property
    def segment_cuts(self) -> tuple[int, ...]:
        """Cuts of every segment after the head: the trainers' stages, then the owner's tail."""
        return (*self.cuts, self.tail) if self.tail else self.cuts

    def check_stages(self, stages: int) -> None:
        """That the plan has one cut per stage of a roster of `stages` trainers. Raises
        RosterError otherwise."""
        if len(self.cuts) != stages:
            raise RosterError(f"roster plan: {len(self.cuts)} cut(s) {list(self.cuts)} for "
                              f"{stages} trainer stage(s): a plan has one cut per stage")

    def to_meta(self) -> str:
        """The plan as the roster's JSON. An fp32 codec (the default) is left out, so a plan
        reads as it did before codecs existed: a run of then resumes under the same plan text,
        and a trainer of then takes an fp32 plan (it refuses a field it does not know)."""
        doc = asdict(self)
        if doc["codec"] == "fp32":
            del doc["codec"]
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_meta(cls, text: str | bytes) -> Plan:
        """The plan a roster's (or a model file's) metadata carries, checked (`check`).
        Raises RosterError for text over MAX_PLAN_BYTES, JSON that does not parse or nests
        too deep, a missing or unknown field, or a field out of range."""
        if len(text) > MAX_PLAN_BYTES:
            raise RosterError(f"roster plan is {len(text):,} bytes, over the limit of "
                              f"{MAX_PLAN_BYTES:,}")
        try:
            d = json.loads(text)
        except RecursionError:
            raise RosterError("roster plan is malformed: its JSON nests too deep") from None
        except ValueError as exc:
            raise RosterError(f"roster plan is malformed: {exc}") from None
        if not isinstance(d, dict):
            raise RosterError(f"roster plan is malformed: a JSON object expected, got "
                              f"{type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise RosterError(f"roster plan has unknown field(s) {', '.join(unknown)} (fields: "
                              f"{', '.join(names)}): made by a newer owner?")
        missing = [k for k in names[:7] if k not in d]
        if missing:
            raise RosterError(f"roster plan lacks field(s) {', '.join(missing)}")
        return cls(**d)


def schedule(in_flight: int, head_fixed: bool = False) -> str:
    """How a run was trained, in words (the owner's summary and the audit report)."""
    if in_flight <= 1:
        return "synchronous (one batch in flight)"
    if head_fixed:
        return (f"pipelined ({in_flight} batches in flight; the head is fixed, so the weights "
                f"are those of a synchronous run)")
    return (f"pipelined ({in_flight} batches in flight: the head's gradients arrive up to "
            f"{in_flight - 1} step(s) late)")
