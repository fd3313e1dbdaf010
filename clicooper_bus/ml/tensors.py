"""Tensors from verified envelopes: the one place a message body becomes a torch tensor, and
the receive check every tensor a process uses passes first (`Expected`, `received`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from clicooper_bus.errors import BadTensor, PoisonedInput
from clicooper_bus.net.encoding import FLOAT_WIRE, decode, encode, wire_dtype
from clicooper_bus.net.wire import Envelope, array_of

NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def tensor(env: Envelope) -> torch.Tensor:
    """The envelope's tensor body (dtype and shape from its verified header) as a torch tensor
    in memory torch allocated (one copy, about 0.1 ms for 0.8 MB); a float one of the codec's
    encodings (`net.encoding`: float16, bfloat16, int8/row) decoded to float32. Raises
    BadTensor for an encoded body the encoder cannot have produced (`encoding.decode`).

    Why not zero-copy: a ZeroMQ frame can start at any address, and on an AMD EPYC machine the
    BLAS kernels gave results that differ in the last bits for the same values at a different
    alignment: 50 steps over the bus drifted 2.4e-5 from the in-process reference (which holds
    the same test to 1e-5) when stages computed on the frame's buffer in place, and matched
    once each received tensor was copied into torch's (aligned) memory. Deterministic,
    replayable training needs the copy."""
    h = env.header
    if h.dtype in FLOAT_WIRE and h.dtype != "float32" and h.shape is not None:
        return torch.from_numpy(decode(h.dtype, h.shape, env.body))  # new, aligned memory
    return torch.from_numpy(env.array()).clone()


def tensor_of(dtype: str, shape: tuple[int, ...] | list[int], body: bytes | memoryview
              ) -> torch.Tensor:
    """A logged tensor body as the receiving process computed on it (`tensor`): the codec's
    encodings decoded to float32, every other dtype copied into torch's memory. For a body
    the log kept and verified, whose header the receiver accepted. Raises BadTensor for an
    encoded body the encoder cannot have produced."""
    if dtype in FLOAT_WIRE and dtype != "float32":
        return torch.from_numpy(decode(dtype, shape, body))
    return torch.from_numpy(np.array(array_of(dtype, shape, body)))


def as_sent(out: torch.Tensor, codec: str) -> torch.Tensor:
    """A float32 tensor a stage computed, as its receiver reads it after the wire's `codec`
    (`net.encoding`): encoded and decoded again, unchanged for fp32."""
    if codec == "fp32":
        return out
    enc = encode(out.detach().contiguous().numpy(), codec)
    return torch.from_numpy(decode(enc.dtype, enc.shape, enc.body))


@dataclass(frozen=True)
class Expected:
    """What the signed plan implies a received tensor is: its dtype, the shape of one row
    (sample), and its rows: exactly `rows`, or 1 to `max_rows` (a batch; the last one of an
    epoch or of the test set is smaller) when `rows` is None."""

    dtype: str
    sample: tuple[int, ...]
    rows: int | None = None
    max_rows: int = 0

    def describe(self) -> str:
        n = str(self.rows) if self.rows is not None else f"1..{self.max_rows}"
        return f"{self.dtype} [{', '.join([n, *map(str, self.sample)])}]"

    def fits(self, shape: tuple[int, ...] | list[int] | None) -> bool:
        if shape is None or len(shape) != 1 + len(self.sample) or \
                tuple(shape[1:]) != tuple(self.sample):
            return False
        return shape[0] == self.rows if self.rows is not None else 1 <= shape[0] <= self.max_rows

    def exactly(self, rows: int | None) -> Expected:
        """The same with exactly `rows` rows; unchanged when `rows` is None (not known)."""
        return self if rows is None else replace(self, rows=rows)


def received(env: Envelope, expected: Expected, sender: str) -> torch.Tensor:
    """The envelope's tensor once it passed the receive check: the dtype and shape `expected`
    (from the signed plan), sent in the wire encoding of the plan's codec (`env.float_codec`: a
    float32 tensor travels as `encoding.wire_dtype`), a well-formed encoding, and only finite
    values once decoded (NaN or infinity poisons every weight it touches). Returns float32
    for a float tensor whatever the codec. Raises PoisonedInput naming `sender`, the kind, the
    step and the problem; costs one pass over the values (about 0.03 ms for a 128 x 1568
    float32 batch, as the copy; decoding int8 adds about as much again)."""
    h = env.header
    codec = env.float_codec
    wire = wire_dtype(expected.dtype, codec)
    if h.dtype != wire or not expected.fits(h.shape):
        how = f" sent as {wire} (the signed plan's codec {codec})" if wire != \
            expected.dtype else ""
        raise PoisonedInput(sender=sender, kind=h.kind, step=h.step, problem=(
            f"a tensor of {h.dtype} {list(h.shape or ())}, expected {expected.describe()}{how} "
            f"by the signed plan"))
    try:
        t = tensor(env)
    except BadTensor as exc:
        raise PoisonedInput(sender=sender, kind=h.kind, step=h.step,
                            problem=f"a malformed {h.dtype} body: {exc}") from None
    if t.is_floating_point():
        finite_problem(t, sender=sender, kind=h.kind, step=h.step)
    return t


def finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN and no infinity (integers always do)."""
    if not t.is_floating_point():
        return True
    t = t.detach()
    if t.dtype in NUMPY_FLOATS and t.device.type == "cpu":
        # numpy's isfinite is ~20x faster than torch's here (0.03 against 0.55 ms a 128 x 1568
        # float32 batch on one thread): the check costs about as much as the copy
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _count(t: torch.Tensor, what: str) -> str:
    t = t.detach()
    nan = int(torch.isnan(t).sum())
    inf = int((~torch.isfinite(t)).sum()) - nan
    return f"{nan} NaN and {inf} infinite {what} among {t.numel()}"


def finite_problem(t: torch.Tensor, *, sender: str, kind: str, step: int | None,
                   what: str = "values") -> None:
    """Raise PoisonedInput when `t` holds NaN or infinity, counting each (`what` names them:
    values, weights of a parameter)."""
    if finite(t):
        return
    raise PoisonedInput(sender=sender, kind=kind, step=step, problem=(
        f"{_count(t, what)} (a poisoned or diverging sender)"))


def check_result(results: Iterable[tuple[str, torch.Tensor | float | None]],
                 given: torch.Tensor, *, sender: str, kind: str, step: int | None,
                 given_as: str, made: str) -> None:
    """Attribute a non-finite result to the input that caused it. `given` (what `sender` sent
    as `kind` of `step`, `given_as` in words: "activations", "gradients") passed the receive
    check, so it is finite; `results` are what this process computed from it (its stage's
    output, the gradient it sends back, its loss, its updated weights and optimiser state),
    each named. This process's own weights were finite before (checked after every update),
    so a non-finite result here was made by that input: raise PoisonedInput naming its sender,
    kind and step, with the input's largest magnitude ("finite gradients up to 1e+38 made
    trainer-1's weights non-finite"), before the result is used or sent on. Costs one
    `finite` pass over each result (the weights: one pass, against Adam's several)."""
    for name, r in results:
        if r is None:
            continue
        if isinstance(r, torch.Tensor):
            if finite(r):
                continue
            detail = _count(r, "values")
        elif math.isfinite(r):
            continue
        else:
            detail = f"it is {r}"
        top = float(given.detach().abs().max()) if given.numel() and \
            given.is_floating_point() else 0.0
        raise PoisonedInput(sender=sender, kind=kind, step=step, problem=(
            f"finite {given_as} up to {top:.3g} made {made.format(name)} non-finite "
            f"({detail})"))


def param_grads(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """A segment's weight gradients of the last backward, each named (`check_result` before
    the update and before the gradient for the previous stage is sent)."""
    for name, p in module.named_parameters():
        if p.grad is not None:
            yield f"gradient of {name}", p.grad


def state_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> Iterable[tuple[str, torch.Tensor]]:
    """A segment's weights and its optimiser's state (Adam's moments: a gradient of 1e20
    squares to infinity there and would silently freeze the weight ever after), each named,
    for `check_result` after an update."""
    for name, p in module.named_parameters():
        yield f"weights in {name}", p
    if optimizer is not None:
        for i, state in enumerate(optimizer.state.values()):
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    yield f"optimiser state {key} #{i}", value


def check_weights(named: Iterable[tuple[str, torch.Tensor]], *, sender: str, kind: str) -> None:
    """Refuse weights that hold NaN or infinity (a model is never saved or certified with
    them): raises PoisonedInput naming `sender` and the first such parameter."""
    for name, value in named:
        if value.is_floating_point():
            finite_problem(value.detach(), sender=sender, kind=kind, step=None,
                           what=f"weights in {name}")


def check_number(value: float, *, sender: str, kind: str, step: int | None, what: str) -> float:
    """`value` if finite, else PoisonedInput naming `what` (a loss, a metric)."""
    if not math.isfinite(value):
        raise PoisonedInput(sender=sender, kind=kind, step=step, problem=f"{what} is {value}")
    return value
