"""How float tensors travel: the run's `[bus] codec`, signed into its plan (`Plan.codec`).

Every float tensor a stage sends (activations, gradients, evaluation traffic) is encoded by the
sender with its run's codec, after the privacy filter (post-processing: epsilon unchanged), and
travels under a wire dtype of its own, so the signed header says how its body is to be read:

| codec | wire dtype | body | bytes a value |
| --- | --- | --- | --- |
| fp32 | `float32` | the values, little-endian | 4 |
| fp16 | `float16` | IEEE half, little-endian, rounded to nearest even | 2 |
| bf16 | `bfloat16` | the high 16 bits of each float32, rounded to nearest even | 2 |
| int8 | `int8/row` | one float32 scale per row (`shape[0]`), then int8 values | 1 + 4 / row |

int8 (one scale per row, a row being one sample): scale = max |x| over the row / 127 (float32),
q = round-half-to-even(x * 127 / max |x|) in -127..127, decoded x' = q * scale, so
|x - x'| <= max |x| / 254 (plus the float32 rounding of the scale). A row of zeros has scale 0
and decodes to exact zeros. A row holding NaN or infinity gets a non-finite scale (and zero
values), which every receiver refuses.

Overflow never becomes infinity silently: fp16 saturates values beyond its largest finite
value (65504) to +-65504, bf16 those that would round past its largest (about 3.39e38) to it;
`Encoded.clamped` counts them and the bus logs them. NaN and infinity go through as they are
(the receiver refuses them). fp16 also flushes magnitudes below about 6e-8 to zero (gradients
that small lose everything; bf16 keeps float32's range with 8 significant bits).

Decoding (`decode`) refuses, raising BadTensor, what would be unsafe to compute on: an int8
scale that is not finite or is negative, a value -128, a non-zero value in a row of scale 0.
It does not refuse every body the encoder could not have produced (a row whose largest value
is under 127, a subnormal scale): those decode to finite values and are trained on. Body lengths are
checked against the shape when the header is parsed (`body_len`). Only numpy here: the wire
layer never imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clicooper_bus.errors import BadTensor, RosterError

CODECS = ("fp32", "fp16", "bf16", "int8")
WIRE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8/row"}
# wire dtypes numpy cannot view directly: their layout is this module's
ENCODED = ("bfloat16", "int8/row")
FLOAT_WIRE = frozenset(WIRE_DTYPES.values())
F16_MAX = float(np.finfo(np.float16).max)  # 65504
_BF16_MAX_BITS = 0x7F7F  # the largest finite bfloat16, about 3.3895e38
_BF16_NAN = 0x7FC0
_SCALE = 4  # bytes of an int8 row's float32 scale


@dataclass(frozen=True)
class Encoded:
    """A tensor as it travels: its wire dtype, shape, body bytes, and how many values were
    saturated to the codec's largest finite value."""

    dtype: str
    shape: tuple[int, ...]
    body: memoryview
    clamped: int = 0


def check_codec(codec: str) -> str:
    """`codec` if it is one of CODECS, else ValueError naming the choices."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
    return codec


def plan_codec(meta: Mapping[str, str]) -> str:
    """The codec a roster's metadata signs: its plan's `codec` (`clicooper_bus.plan.Plan`,
    which the wire layer cannot import, checks the whole plan); fp32 for a roster without a
    plan or a plan from before the codec was carried. Raises RosterError for a plan that is
    not a JSON object or names another codec."""
    text = meta.get("plan")
    if text is None:
        return "fp32"
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise RosterError("roster plan is malformed: not JSON") from None
    codec = doc.get("codec", "fp32") if isinstance(doc, dict) else None
    if codec not in CODECS:
        raise RosterError(f"roster plan: codec {codec!r:.40} is not one of {', '.join(CODECS)}")
    return codec


def wire_dtype(dtype: str, codec: str) -> str:
    """The wire dtype a tensor of `dtype` travels as under `codec`: float32 tensors take the
    codec's, any other dtype (int64 labels) travels as it is."""
    return WIRE_DTYPES[check_codec(codec)] if dtype == "float32" else dtype


def body_len(dtype: str, shape: Sequence[int]) -> int | None:
    """Bytes of the body of an ENCODED tensor of `shape` (Python ints: no overflow); None for
    a dtype not in ENCODED. Raises BadTensor for an int8/row tensor without rows (0-d)."""
    n = math.prod(shape)
    if dtype == "bfloat16":
        return 2 * n
    if dtype == "int8/row":
        if not shape:
            raise BadTensor("an int8/row tensor needs at least one dimension (its rows)",
                            field="shape")
        return _SCALE * shape[0] + n
    return None


def encode(array: np.ndarray, codec: str) -> Encoded:
    """Encode a float array (any float dtype; taken as float32) with `codec`; fp32 sends the
    float32 values as they are. Raises ValueError for an unknown codec or an int8 tensor with
    no dimension."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    if check_codec(codec) == "fp32":
        return Encoded("float32", x.shape, _bytes(x))
    if codec == "fp16":
        return _fp16(x)
    if codec == "bf16":
        return _bf16(x)
    return _int8(x)


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _fp16(x: np.ndarray) -> Encoded:
    over = np.isfinite(x) & (np.abs(x) > F16_MAX)
    n = int(over.sum())
    y = np.where(over, np.copysign(F16_MAX, x), x) if n else x
    return Encoded("float16", x.shape, _bytes(y.astype("<f2")), n)


def _bf16(x: np.ndarray) -> Encoded:
    bits = x.view(np.uint32)
    # round to nearest, ties to even, on the 16 bits dropped (finite inputs cannot wrap: the
    # largest, 0xFF7FFFFF, plus 0x8000 stays below 2**32)
    top = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    finite = np.isfinite(x)
    over = finite & ((top & 0x7F80) == 0x7F80)  # rounded past the largest finite bfloat16
    n = int(over.sum())
    if n:
        top = np.where(over, (top & 0x8000) | _BF16_MAX_BITS, top).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        top = np.where(nan, _BF16_NAN, top).astype(np.uint16)
    return Encoded("bfloat16", x.shape, _bytes(top.astype("<u2")), n)


def _int8(x: np.ndarray) -> Encoded:
    if x.ndim == 0:
        raise ValueError("int8 encodes per row: the tensor needs at least one dimension")
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # (0, k) too: no -1 to infer
    peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
    scale = (peak / np.float32(127)).astype("<f4")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(np.isfinite(peak) & (peak > 0), 127.0 / peak.astype(np.float64), 0.0)
        # float32 arithmetic (twice as fast) unless 127 / a tiny peak overflows it
        if inv.max(initial=0.0) < np.finfo(np.float32).max:
            inv = inv.astype(np.float32)
        q = np.rint(np.nan_to_num(rows * inv[:, None], nan=0.0, posinf=0.0, neginf=0.0))
    q = np.clip(q, -127, 127).astype(np.int8)
    # a peak under 127 x the smallest float32 rounds its scale to 0: that row decodes as zeros
    # (its values are below 1e-43 anyway), never as values in a row of scale 0, which the
    # receiver refuses as malformed and would blame on this (honest) sender
    q[scale == 0] = 0
    body = np.concatenate([scale.view(np.uint8), q.reshape(-1).view(np.uint8)])
    return Encoded("int8/row", x.shape, memoryview(body))


def decode(dtype: str, shape: Sequence[int], body: bytes | memoryview) -> np.ndarray:
    """The float32 values of a float tensor body of wire `dtype` (one of FLOAT_WIRE) and
    `shape`, whose length the header check matched to the shape; float32 is a read-only view
    of `body`, the others new memory. Raises BadTensor, saying what, for a body the encoder
    cannot have produced (int8/row: a scale that is not finite or is negative, a value -128,
    a non-zero value in a row of scale 0), or for a dtype that is not a float wire dtype."""
    shape = tuple(shape)
    if dtype == "float32":
        return np.frombuffer(body, "<f4").reshape(shape)
    if dtype == "float16":
        return np.frombuffer(body, "<f2").astype(np.float32).reshape(shape)
    if dtype == "bfloat16":
        half = np.frombuffer(body, "<u2").astype(np.uint32)
        return (half << 16).view(np.float32).reshape(shape)
    if dtype == "int8/row":
        return _decode_int8(shape, body)
    raise BadTensor(f"dtype {dtype!r} is not a float wire dtype ({', '.join(sorted(FLOAT_WIRE))})",
                    field="dtype")


def _decode_int8(shape: tuple[int, ...], body: bytes | memoryview) -> np.ndarray:
    n = shape[0]
    scale = np.frombuffer(body, "<f4", count=n)
    q = np.frombuffer(body, np.int8, offset=_SCALE * n).reshape(n, math.prod(shape[1:]))
    bad = ~(np.isfinite(scale) & (scale >= 0))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise BadTensor(f"int8/row: {len(rows)} row scale(s) not finite or negative (rows "
                        f"{rows[:5].tolist()}, first {float(scale[rows[0]])!r})", field="body")
    if (q == -128).any():
        raise BadTensor("int8/row: value -128 is outside the encoder's -127..127", field="body")
    zero = scale == 0
    if zero.any() and q[zero].any():
        raise BadTensor("int8/row: non-zero values in a row of scale 0", field="body")
    with np.errstate(over="ignore"):  # a scale near float32's largest: the receiver refuses
        return (q.astype(np.float32) * scale[:, None]).reshape(shape)
