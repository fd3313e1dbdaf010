"""Replay verification's comparisons (issue 19), a part of `training_replay._Stage`: what a
stage sent against what its replay computed, with no tolerance (`docs/ARCHITECTURE.md`,
"Replay verification"): tensors as the wire carried them, a last stage's metrics, snapshot
and watermark-claim weight digests, evaluation outputs; and, after a span, what the stage sent
that nothing it received computes."""

from __future__ import annotations

import numpy as np

from clicooper_bus.audit.replay_verdict import Divergence
from clicooper_bus.chain.documents import Claim
from clicooper_bus.ml.state import weights_digest
from clicooper_bus.ml.tensors import as_sent, tensor_of
from clicooper_bus.ml.watermark.claim import weights_digest as claim_digest
from clicooper_bus.net.codec import unpack
from clicooper_bus.protocol import Metrics
from clicooper_bus.protocol.recovery import Snapshot


class Comparisons:
    """The comparing methods of `training_replay._Stage` (a mixin: it uses the stage's log,
    index, segment, verdict and codec)."""

    def _expect(self, computed: dict[tuple, object]) -> None:
        """Compare what the replay computed with what the stage sent under the same names,
        in the order the stage sent them (so the first divergence is its first wrong
        message)."""
        sent = sorted((i, key) for key in computed for i in self.index.sent.pop(key, []))
        for i, key in sent:
            if self.verdict.first is not None:
                return
            if key[0] == "metrics":
                self._compare_metrics(i, computed[key])
            else:
                self._compare_tensor(i, computed[key])

    def _evaluate(self, i: int) -> None:
        """Evaluation input `i` with the weights held: the outputs the stage sent for it."""
        h, _, body = self.plog.entry(i)
        key = ("eval", h.epoch, h.step)  # as the stage named what it sent for it
        if body is None:  # not kept: what the stage sent from it is not checked
            self.unkept += len(self.index.sent.pop(key, []))
            return
        self._threads()
        out = self.seg.evaluate(tensor_of(h.dtype, h.shape, body))
        self._expect({key: as_sent(out, self.codec).numpy()})

    def _compare_tensor(self, i: int, want: np.ndarray) -> None:
        h, _, body = self.plog.entry(i)
        if body is None:  # not kept: not counted as checked, and the replay not complete
            self.unkept += 1
            return
        v = self.verdict
        got = tensor_of(h.dtype, h.shape, body).numpy()
        v.checked += 1
        diff = float(np.abs(got - want).max(initial=0.0)) if got.shape == want.shape else None
        v.largest = max(v.largest, diff if diff is not None else float("inf"))
        if diff is None or not np.array_equal(got, want):
            v.first = Divergence(h.kind, h.step, i, "differs from what the replay computes",
                                 diff)

    def _compare_metrics(self, i: int, want: tuple[float, int]) -> None:
        h, _, body = self.plog.entry(i)
        m = Metrics.parse(unpack(bytes(body)), sender=self.name)
        self.verdict.checked += 1
        if (m.loss, m.correct) != want:
            self.verdict.first = Divergence(
                "metrics", h.step, i, f"reports loss {m.loss:.6g} and {m.correct} correct, the "
                                      f"replay computes {want[0]:.6g} and {want[1]}")

    def _compare_doc(self, i: int, kind: str) -> None:
        snap = Snapshot.parse(unpack(self._doc(i)), sender=self.name)
        mine = weights_digest(self.seg.module)
        self.verdict.checked += 1
        if mine != snap.weights:
            self.verdict.first = Divergence("snapshot", snap.step, i,
                                            f"commits weights {snap.weights[:16]}..., the "
                                            f"replay holds {mine[:16]}...")

    def _compare_claim(self, i: int, claim: Claim) -> None:
        mine = claim_digest(self.seg.module)
        self.verdict.checked += 1
        if mine != claim.weights_sha256:
            self.verdict.first = Divergence(
                "wm_claim", None, i, f"claims weights {claim.weights_sha256.hex()[:16]}... at the "
                                     f"end of round {claim.round}, the replay holds "
                                     f"{mine.hex()[:16]}...")

    def _unmatched(self) -> None:
        """After the span's replay: the first thing the stage sent in it, for a step it did
        not abandon, that nothing it received computes (an evaluation output nobody asked
        for, metrics of a step it never trained, a snapshot of a step it never reached)."""
        ix, per = self.index, self.per or 1
        self.discarded += sum(len(e) for key, e in ix.sent.items() if self._abandoned(key, per))
        left = sorted((i, key) for key, entries in ix.sent.items() for i in entries
                      if not self._abandoned(key, per))
        if left:
            i, key = left[0]
            h = self.plog.header(i)
            self.verdict.first = Divergence(h.kind, h.step, i, "was sent without the input "
                                                               "the replay computes it from")

    def _abandoned(self, key: tuple, per: int) -> bool:
        """Whether output `key` of the span is of the steps the rollback after it abandoned."""
        end = self.index.end
        if end is None:
            return False
        if key[0] == "eval":
            return (key[1] + 1) * per > end  # after the evaluation of the epoch at `end`
        if key[0] == "snapshot":
            return key[1] > end
        return key[1] >= end
