"""The message kinds a run may carry, and what each one's body must be.

A kind not listed here is rejected by the verifier (`UnknownKind`). Later capabilities add kinds
by extending `KINDS`; the wire format does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BodyType = Literal["tensor", "msgpack", "bytes"]


@dataclass(frozen=True)
class KindSpec:
    """What a kind's body is (`tensor` needs dtype and shape in the header) and a size cap."""

    name: str
    body: BodyType
    max_body: int | None = None  # None: the verifier's `Limits.max_body`
    doc: str = ""


SMALL = 1 << 20  # 1 MiB: ample for control documents

KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        KindSpec("roster", "msgpack", SMALL, "the owner's signed roster of the run"),
        KindSpec("hello", "msgpack", SMALL, "a participant announces itself"),
        KindSpec("fwd", "tensor", None, "activations sent forward to the next stage"),
        KindSpec("bwd", "tensor", None, "gradients sent back to the previous stage"),
        KindSpec("labels", "tensor", SMALL * 8, "obfuscated labels, owner to the last stage"),
        KindSpec("eval_fwd", "tensor", None, "evaluation activations (no gradients flow back)"),
        KindSpec("eval_out", "tensor", None, "evaluation outputs returned to the owner"),
        KindSpec("checkpoint", "msgpack", SMALL, "a signed tlog checkpoint note from the notary"),
        KindSpec("segment", "msgpack", None, "a trainer's final weights, sealed to the owner"),
        KindSpec("metrics", "msgpack", SMALL, "the last stage's loss for a step, to the owner"),
        KindSpec("logits", "tensor", SMALL * 8, "the last stage's logits of a training step, to "
                                                "the owner, which checks the step's metrics"),
        KindSpec("beat", "msgpack", 64, "liveness, about once a second from everyone (an "
                                        "empty map)"),
        KindSpec("usage", "msgpack", 1024, "the CPU seconds and steps a process measured of "
                                           "itself: trainers and the notary to the owner, the "
                                           "owner's own to all (each signs only its own)"),
        KindSpec("end", "msgpack", SMALL, "the owner ends training: trainers deliver segments"),
        KindSpec("ack", "msgpack", SMALL, "the owner has every segment: the notary closes the log"),
        KindSpec("round", "msgpack", SMALL, "the owner starts or ends a watermark round"),
        KindSpec("wm_commit", "msgpack", SMALL, "a trainer commits to its watermark key of a "
                                                "stage and round, before the round"),
        KindSpec("wm_claim", "msgpack", SMALL, "a trainer claims a round: its weights' hash "
                                               "and the bits they carry"),
        KindSpec("wm_cert", "msgpack", SMALL, "the notary's certificate of a claim"),
        KindSpec("snapshot", "msgpack", 1024, "a trainer commits to its stage's snapshot at a "
                                              "step: weights and state digests (the owner, "
                                              "to its round snapshot file)"),
        KindSpec("tip", "msgpack", 16 * 1024, "the notary tells a silent trainer where its "
                                              "signed chain (and watermark chain) stands in the "
                                              "log (for a restarted process)"),
        KindSpec("rejoin", "msgpack", 64 * 1024, "a restarted trainer is back: the snapshots "
                                                 "it can restore"),
        KindSpec("rollback", "msgpack", 1024, "the owner rolls the run back to a step every "
                                              "stage committed a snapshot of"),
        KindSpec("restored", "msgpack", 1024, "a trainer restored its snapshot of the "
                                              "rollback's step"),
        KindSpec("stage_state", "msgpack", None, "a trainer's whole stage state at a round "
                                                 "boundary, sealed to the owner (for a standby "
                                                 "to take it over)"),
        KindSpec("handover", "msgpack", None, "the owner hands a gone trainer's stage to a "
                                              "standby: its committed state, sealed to it"),
        KindSpec("equivocation", "msgpack", 16 * 1024, "the notary's proof that a member signed "
                                                      "two different messages at one place in "
                                                      "its chain (`net.equivocation`)"),
        KindSpec("witnessed", "msgpack", 1 << 20, "a member shows the notary the leaves of the "
                                                  "messages it accepted lately (after a notary "
                                                  "restart), to compare with its log"),
    )
}
