"""The broker's rules for authenticated connections: who may connect, subscribe and publish.

Every connection to the broker is authenticated by CURVE with a key the run's roster lists
(`clicooper_bus.net.curve`), so the broker knows which member is behind each frame (ZAP's
User-Id, which the broker's authenticator sets to the member's name). On top of that:

- **publishing**: a member may publish only envelopes it signed itself, for this run: the
  header's sender is the key it connected with, the signature verifies, the topic is the
  header's, the body is within the kind's size cap, and the member is not an observer (which
  sends nothing). Anything else is dropped at the broker and counted with its reason. The
  broker does not check which kinds a roster member sends: dropping a member's own signed
  message would leave a gap in its chain, which stops the run at the notary, whereas passing
  it on lets every receiver refuse or ignore it by name (tests/test_bus_faults.py);
- **subscribing**: a trainer or observer reads the run's broadcast topics and its own inbox
  only (so that, without collusion, trainer 2 never sees what the owner sends trainer 1); the
  owner and the notary read the whole run. A presence signal (`hello/NAME`, `watching/NAME`,
  `done/NAME`, `closed/NAME`) may come only from NAME. A subscription is at most
  `Limits.max_topic` bytes and a member holds at most `max_subscriptions` of them.

Sources: ZeroMQ RFC 27 (ZAP) for the User-Id; the threat model of DESIGN.md for the rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from clicooper_bus.errors import RejectedMessage
from clicooper_bus.net.curve import z85_public
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.kinds import KINDS
from clicooper_bus.net.wire import DEFAULT_LIMITS, Limits, parse_frames, signed_bytes
from clicooper_bus.protocol import SIGNALS, Topics

# kinds only the addressee may read: the tensors and sealed weights of one party
INBOX_KINDS = frozenset({"fwd", "bwd", "labels", "eval_fwd", "eval_out", "segment", "metrics",
                         "logits", "usage"})
FULL_VIEW = frozenset({"owner", "notary"})  # roles that read the whole run (the owner's side)
MAX_STRIKES = 16  # refusals after which a member is banned and disconnected


@dataclass(frozen=True)
class Member:
    """A member as the broker knows it: its name, role and key."""

    name: str
    role: str
    key: PublicIdentity


@dataclass
class Admission:
    """The rules of one run, from its members (every key the roster lists)."""

    run_id: str
    members: Mapping[str, Member]
    limits: Limits = DEFAULT_LIMITS
    max_subscriptions: int = 64
    refused: Counter[str] = field(default_factory=Counter)  # reason -> count
    held: dict[str, set[str]] = field(default_factory=dict)  # name -> live subscriptions
    strikes: Counter[str] = field(default_factory=Counter)  # name -> refusals
    banned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.topics = Topics(self.run_id)
        self._by_curve = {z85_public(m.key): m.name for m in self.members.values()}

    @classmethod
    def of(cls, run_id: str, members: Sequence[Member], **kw) -> Admission:
        return cls(run_id, {m.name: m for m in members}, **kw)

    # --- connecting ------------------------------------------------------------------------

    def name_of(self, curve_public_z85: bytes) -> str | None:
        """The member whose CURVE public key (Z85) this is, or None: not admitted (a stranger,
        or a member banned for misbehaving)."""
        name = self._by_curve.get(bytes(curve_public_z85))
        return None if name in self.banned else name

    def strike(self, name: str | None) -> bool:
        """Count a refusal against `name`; True when it has just reached `MAX_STRIKES` and is
        banned (the broker then refuses its connections and closes the one it has)."""
        if name is None or name in self.banned or name not in self.members:
            return False
        self.strikes[name] += 1
        if self.strikes[name] >= MAX_STRIKES:
            self.banned.add(name)
            return True
        return False

    def is_signal(self, name: str, topic: bytes) -> bool:
        """Whether `topic` is one of `name`'s own presence signals (the only subscriptions
        the broker passes on to publishers; it subscribes to the whole run itself)."""
        whole = self.topics.parse(topic.decode(errors="replace"))
        return whole is not None and whole[0] in SIGNALS and whole[1] == name

    # --- subscribing -----------------------------------------------------------------------

    def subscribe(self, name: str | None, topic: bytes) -> str | None:
        """Record `name`'s subscription to `topic`; None if allowed, else the refusal reason
        (also counted in `refused`)."""
        reason = self._subscription_refusal(name, topic)
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self.held.setdefault(name, set()).add(topic.decode())  # type: ignore[arg-type]
        return None

    def witness_refusal(self, name: str | None) -> str | None:
        """None if `name` may subscribe at the broker's witness address (the notary only: the
        run waits for whoever reads there), else the refusal reason (also counted)."""
        member = self.members.get(name) if name is not None else None
        if member is not None and member.role == "notary":
            return None
        reason = "subscription at the witness address, which is the notary's"
        self.refused[reason] += 1
        return reason

    def unsubscribe(self, name: str | None, topic: bytes) -> None:
        if name is not None:
            self.held.get(name, set()).discard(topic.decode(errors="replace"))

    def _subscription_refusal(self, name: str | None, topic: bytes) -> str | None:
        member = self.members.get(name) if name is not None else None
        if member is None:
            return "subscription from an unknown connection"
        if len(topic) > self.limits.max_topic:
            return "subscription longer than a topic"
        try:
            t = topic.decode()
        except UnicodeDecodeError:
            return "subscription is not UTF-8"
        held = self.held.get(member.name, set())
        if t not in held and len(held) >= self.max_subscriptions:
            return "too many subscriptions"
        if not t.startswith(self.topics.all):
            return "subscription outside the run"
        whole = self.topics.parse(t)
        if whole is not None and whole[0] in SIGNALS and whole[1] != member.name \
                and not (whole[0] == "hello" and whole[1] == "all"):
            return "presence signal of another member"
        if member.role in FULL_VIEW:
            return None
        return None if self._readable_by(member.name, t) else "topic of another member's inbox"

    def _readable_by(self, name: str, prefix: str) -> bool:
        """Whether every topic of the run that `prefix` matches may be read by `name` (a
        trainer or observer): broadcast kinds, and inbox kinds addressed to `name` itself."""
        rest = prefix[len(self.topics.all):]
        kind, sep, to = rest.partition("/")
        if not sep:  # a prefix of kind names: all kinds it covers must be broadcast
            return not any(k.startswith(kind) for k in INBOX_KINDS)
        if kind not in INBOX_KINDS:
            return kind in KINDS or kind in SIGNALS
        return to == f"{name}/" or to.startswith(f"{name}/")

    # --- publishing ------------------------------------------------------------------------

    def publication_refusal(self, name: str | None, frames: Sequence[bytes | memoryview]
                            ) -> str | None:
        """None if `name` may publish `frames`, else the reason (counted in `refused`)."""
        reason = self._publication_refusal(name, frames)
        if reason is not None:
            self.refused[reason] += 1
        return reason

    def _publication_refusal(self, name: str | None, frames: Sequence[bytes | memoryview]
                             ) -> str | None:
        member = self.members.get(name) if name is not None else None
        if member is None:
            return "message from an unknown connection"
        try:
            env = parse_frames(frames, self.limits)
        except RejectedMessage as exc:
            return f"malformed message ({exc.code})"
        h = env.header
        spec = KINDS.get(h.kind)
        if spec is None:
            return "unknown kind"
        if h.run != self.run_id:
            return "message of another run"
        if h.sender != member.key.key_id:
            return "signed by another key than the connection's"
        if member.role == "auditor":
            return "an observer publishes nothing"
        limit = spec.max_body if spec.max_body is not None else self.limits.max_body
        if h.body_len > limit or len(env.body) != h.body_len:
            return "body over its kind's cap or not the length its header says"
        if not member.key.verify(signed_bytes(h.raw), env.signature):
            return "bad signature"
        return None
