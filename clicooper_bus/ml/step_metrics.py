"""A training step's loss and accuracy from the last stage's logits, and whether a last stage's
claimed `metrics` agree with them (issue 19: the owner reports only metrics it can check).

Without the owner's tail, the last stage computes the loss; it sends the owner the step's
logits beside its `metrics`, and the owner recomputes both from the logits and the labels it
sent (`step_metrics`, the same operations as `SegmentTrainer.loss_backward`). What the logits
themselves are worth, replay verification checks (`audit.training_replay`).

The logits travel in the run's codec (`net.encoding`), so the owner holds z' with
|z' - z| <= e per value of a row, e bounded by the codec (`error_bound`): 0 for fp32, max|row|
x 2^-11 (+6e-8 flushed) for fp16, max|row| x 2^-8 for bf16, max|row| / 254 for int8. Then:
- the count of correct predictions can differ only on rows whose two largest logits are within
  2e of each other (an argmax flip needs both to move by e);
- the cross-entropy of one row moves by at most 2e (its gradient in the logits is softmax
  minus one-hot, whose L1 norm is at most 2), so the batch mean by at most 2 mean(e).
On top of that, 1e-6 relative for float32 rounding of the mean.
"""

from __future__ import annotations

import torch
from torch import nn

REL = 1e-6  # float32 rounding of a mean over the batch, computed elsewhere


def step_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(mean cross-entropy, count of correct argmax predictions) of logits [N, C] (float32)
    for labels [N] (int64)."""
    loss = nn.functional.cross_entropy(logits, labels)
    return float(loss), int((logits.argmax(1) == labels).sum())


def error_bound(logits: torch.Tensor, codec: str) -> torch.Tensor:
    """Per row [N], the largest error the wire's `codec` can put on one of its logits."""
    top = logits.abs().amax(1)
    if codec == "fp32":
        return torch.zeros_like(top)
    if codec == "fp16":
        return top * 2.0 ** -11 + 6e-8
    if codec == "bf16":
        return top * 2.0 ** -8
    if codec == "int8":
        return top / 254 * (1 + 1e-6)
    raise ValueError(f"codec {codec!r} has no error bound here")


def disagreement(loss: float, correct: int, logits: torch.Tensor, labels: torch.Tensor,
                 codec: str) -> str | None:
    """Why a claimed (`loss`, `correct`) cannot come from `logits` [N, C] as received (in
    `codec`) and `labels` [N], or None when they agree within the codec's bound."""
    own_loss, own_correct = step_metrics(logits, labels)
    e = error_bound(logits, codec)
    top2 = logits.topk(2, dim=1).values if logits.shape[1] > 1 else None
    close = int(((top2[:, 0] - top2[:, 1]) <= 2 * e).sum()) if top2 is not None else 0
    if abs(correct - own_correct) > close:
        return (f"claims {correct} correct, its logits give {own_correct}"
                + (f" (at most {close} could differ in {codec})" if codec != "fp32" else ""))
    slack = 2 * float(e.mean()) + REL * max(1.0, abs(own_loss))
    if abs(loss - own_loss) > slack:
        return f"claims loss {loss:.6g}, its logits give {own_loss:.6g} (tolerance {slack:.2g})"
    return None
