"""A participant's connection to the broker: publish signed envelopes, receive verified ones.

Sockets (see FACTS.md for why each option is set):
- publishing: an XPUB connected to the broker's XSUB, with `XPUB_NODROP` so that a full pipe
  pushes back (EAGAIN) instead of silently dropping; sends are non-blocking and, while a send is
  refused, inbound messages are read into an inbox so two nodes pushing at each other cannot
  deadlock. Being an XPUB, it also sees which topics the rest of the bus subscribed to: that is
  how `wait_for_subscribers` beats the slow-joiner problem.
- receiving: a SUB connected to the broker's XPUB. Every message goes through the `Verifier`
  before the application sees it; a rejected one is logged with its reason, counted, dropped.
- No ZeroMQ heartbeats, TCP keepalive instead (`forwarder.tcp_keepalive` says why): a connection
  to a process that is merely paused (a device asleep, SIGSTOP) must outlive the pause, or what
  was queued for it is lost with it. Liveness of peers is application-level (`beat` messages,
  `net.liveness`): a watched peer silent for `timeout_s` is suspected, one silent for
  `rejoin_timeout_s` is gone (`PeersGone`).
- CURVE on both (`clicooper_bus.net.curve`) with this participant's key, against the broker's
  public key, unless the run is plaintext (`broker=None`, loopback only).
- A receive pass reads at most `PUMP_BATCH` messages, so that under any inbound rate the
  caller gets back to its beats and timeouts.
- Float tensors travel in the codec of the run's signed plan (`[bus] codec`, `net.encoding`),
  known once the roster is bound (`bind`; fp32 before): `send_array` encodes with it, and every
  envelope `recv` hands out carries it (`Envelope.float_codec`), for the receive check to refuse a
  tensor sent in another encoding (`ml.tensors.received`).

- Our last messages are kept, with an outbox each on disk before it is sent (`net.outbox`), and
  what the notary's log misses is sent again, with what we accepted meanwhile (`net.refill`).

Readiness and shutdown use subscriptions as signals, never extra messages: a participant
subscribes to its data topics first and to `run/<id>/hello/<name>` last (`announce`), and to
`run/<id>/done/<name>` once it has read everything it needs (`mark_done`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from clicooper_bus.errors import RejectedMessage
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.encoding import plan_codec
from clicooper_bus.net.forwarder import SUBSCRIPTION_HWM, tcp_keepalive
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.net.liveness import BusError, Liveness
from clicooper_bus.net.refill import Refill
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope, Sender, parse_frames
from clicooper_bus.net.witness import Witness
from clicooper_bus.protocol import SIGNALS, Topics

log = structlog.get_logger("clicooper.bus")
PUMP_BATCH = 256
GAPS = ("seq_gap", "broken_chain")  # refusals that leave a hole in a sender's chain
# refusals of a signed message at a place of its sender's chain already taken (the same seq
# again), taken by another message (its prev), or not reached yet (a gap: the message that
# later fills it must be this one): a resend, or equivocation
CHAIN_CONFLICTS = ("replayed_seq", "broken_chain", "seq_gap")


@dataclass(frozen=True)
class BusAddress:
    """Where the broker listens: publishers connect to `pub`, subscribers to `sub`."""

    pub: str = "tcp://127.0.0.1:5555"
    sub: str = "tcp://127.0.0.1:5556"


class Bus(Liveness, Refill):
    def __init__(self, identity: Identity, run_id: str, address: BusAddress, verifier: Verifier,
                 *, name: str | None = None, hwm: int = 16, beat_s: float = 1.0,
                 timeout_s: float = 5.0, join_timeout_s: float = 120.0,
                 rejoin_timeout_s: float | None = None, broker: PublicIdentity | None = None,
                 notice: Callable[[str], None] | None = None, codec: str = "fp32"):
        """`timeout_s`: a watched peer silent this long is suspected; `rejoin_timeout_s`
        (default, and at least, `timeout_s`): silent this long, it is gone. `notice`: where the
        suspicions go besides the log (the process's console). `codec`: how float tensors
        travel until `bind` sets the roster's (for a bus without a roster: benchmarks)."""
        self.identity = identity
        self.codec = codec
        self.name = name or identity.name
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.sender = Sender(identity, run_id)
        self.verifier = verifier
        self.beat_s = beat_s
        self.timeout_s = timeout_s
        self.rejoin_timeout_s = max(timeout_s, rejoin_timeout_s or timeout_s)
        self.join_timeout_s = join_timeout_s
        self.notice = notice
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.SNDHWM, hwm)
        self.pub.setsockopt(zmq.RCVHWM, SUBSCRIPTION_HWM)  # subscriptions coming in
        self.pub.setsockopt(zmq.LINGER, 500)  # the end-of-run handshake makes more needless
        tcp_keepalive(self.pub)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, hwm)
        self.sub.setsockopt(zmq.SNDHWM, SUBSCRIPTION_HWM)  # subscriptions going out
        self.sub.setsockopt(zmq.LINGER, 0)
        tcp_keepalive(self.sub)
        if broker is not None:
            for sock in (self.pub, self.sub):
                make_client(sock, identity, broker)
        self.pub.connect(address.pub)
        self.sub.connect(address.sub)
        # the connection to the broker, watched: a broker killed and started again on the same
        # address drops it and ZeroMQ connects again by itself; what was in flight is lost
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_DISCONNECTED |
                                                   zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.reconnects = 0  # times the broker connection came back after being lost
        self.lost_at: float | None = None  # when it was lost, while it is
        self.resubscribed: set[str] = set()  # presence signals seen since it last came back
        self.poller = zmq.Poller()
        self.poller.register(self.sub, zmq.POLLIN)
        self.inbox: deque[Envelope] = deque()
        self.seen_subscriptions: set[str] = set()
        self.last_seen: dict[str, float] = {}
        self.last_beat = 0.0
        self.beating = False  # only once the roster is known: an unknown sender's first
        # message would be refused and leave its chain with a hole
        self.sent: dict[str, int] = {}
        self.stalls = 0  # sends the bus pushed back on (a slow reader somewhere)
        self.watched: dict[str, str] = {}
        self.suspected: dict[str, float] = {}  # watched key id -> when we began to suspect it
        self.started = time.monotonic()
        self.last_check = self.started  # when we last judged peers' silence
        self.away_s = 0.0  # time we were not listening ourselves (stopped, or blocked), in all
        self.kept: deque[Envelope] = deque()  # our last messages, for `resend_after`
        self.witness = Witness(identity.key_id)  # what we accepted, for `show_witnessed`
        # sender -> when we last refused one of its messages for a gap in its chain (a full
        # verifier's: the notary's), which only that sender's sending again can close
        self.gap_refused: dict[str, float] = {}
        self.kept_bytes = 0
        # called (it must not send) with each signed message refused as a replay, a broken
        # chain or a gap: the notary compares it with what it logs there (`net.equivocation`)
        self.on_conflict: Callable[[Envelope], None] | None = None
        # called with each of our messages before it is published, and ours dropped unread
        # when they come back: the notary logs its own as it sends them (`own_first`)
        self.before_publish: Callable[[Envelope], None] | None = None

    def bind(self, roster: Roster) -> None:
        """Bind to the run `roster` describes: trust its keys, stamp its nonce on every header
        sent from now on, and refuse every received message without it; float tensors travel
        in the codec its plan signs from now on. Raises RosterError for a plan that does not
        check."""
        self.codec = plan_codec(roster.meta)
        self.sender.nonce = roster.nonce
        self.verifier.use_roster(roster)

    # --- topics ----------------------------------------------------------------------------

    def subscribe(self, *prefixes: str) -> None:
        for p in prefixes:
            self.sub.setsockopt_string(zmq.SUBSCRIBE, p)

    def announce(self) -> None:
        """Subscribe to our hello topic, last: once others see it, our subscriptions are live."""
        self.subscribe(self.topics.hello(self.name))

    def mark_done(self) -> None:
        """Tell whoever waits on it (the notary) that we read everything we needed."""
        self.subscribe(self.topics.done(self.name))

    def linger(self, topic: str, peer: tuple[str, str]) -> bool:
        """After our part of the run: stay on the bus (beating) until `topic` is subscribed,
        for as long as `peer` (key id, name) is alive. The notary keeps a run open while an
        auditor finishes, and a Procfile stops everyone when the first process exits.
        Returns whether `topic` came."""
        self.watch({peer[0]: peer[1]})
        try:
            while topic not in self.seen_subscriptions:
                self.recv(0.5)
            return True
        except BusError as exc:
            log.warning("left without the closing signal", waited_for=topic, error=str(exc))
            return False
        finally:
            self.watch({})

    def observers(self) -> set[str]:
        """Names of silent observers (auditors) that announced themselves on this run."""
        parsed = (self.topics.parse(t) for t in self.seen_subscriptions)
        return {p[1] for p in parsed if p is not None and p[0] == "watching"}

    def _drain_subscriptions(self) -> None:
        """Record the presence signals that reached our publisher (bounded per call; only
        whole signal topics of this run are kept, so nothing else can grow the set)."""
        for _ in range(PUMP_BATCH):
            try:
                msg = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                topic = msg[1:].decode(errors="replace")
                whole = self.topics.parse(topic)
                if whole is not None and whole[0] in SIGNALS:
                    self.seen_subscriptions.add(topic)
                    self.resubscribed.add(topic)

    def wait_for_subscribers(self, kind: str, names: Iterable[str], timeout_s: float) -> None:
        """Block until every name has subscribed to `run/<id>/<kind>/<name>`."""
        want = {self.topics.to(kind, n) for n in names}
        deadline = time.monotonic() + timeout_s
        while not want <= self.seen_subscriptions:
            if time.monotonic() > deadline:
                missing = sorted(self.topics.parse(t)[1] for t in want - self.seen_subscriptions)
                log.error("join timed out", seen=sorted(self.seen_subscriptions))
                raise BusError(f"{', '.join(missing)} did not join within {timeout_s:.0f} s "
                               f"(are they started, with the same run id and broker address?)")
            if self.pub.poll(100, zmq.POLLIN):
                self._drain_subscriptions()

    # --- sending ---------------------------------------------------------------------------

    def publish(self, env: Envelope) -> None:
        """Send, reading inbound traffic while the bus pushes back; never drops. The message
        is kept for `resend_after`."""
        if self.before_publish is not None:
            self.before_publish(env)
        if self.outbox is not None:  # on our disk before anyone can have it (`net.outbox`)
            self.outbox.append(env)
        self._publish(env)
        self.sent[env.header.kind] = self.sent.get(env.header.kind, 0) + 1
        self._keep(env)

    def _publish(self, env: Envelope) -> None:
        frames = env.frames()
        deadline = None
        while True:
            try:
                self.pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                self.stalls += 1
                now = time.monotonic()
                # a paused broker or notary holds every publisher: wait as long as for a
                # paused peer (the rejoin timeout), not the suspicion timeout
                limit = max(self.timeout_s * 2, self.rejoin_timeout_s + self.timeout_s)
                deadline = deadline or now + limit
                self._own_gap()
                last_heard = max(self.last_seen.values(), default=self.started)
                if self.beating and now - last_heard > self.rejoin_timeout_s:
                    raise BusError(f"could not send {env.header.kind} and heard nobody for "
                                   f"{self.rejoin_timeout_s:.0f} s (rejoin_timeout_s): the broker "
                                   f"or everyone is gone") from None
                if now > deadline:
                    raise BusError(f"could not send {env.header.kind} for {limit:.0f} s: the "
                                   f"bus pushes back and does not drain (a reader or the broker "
                                   f"is stuck)") from None
                self._pump(10)

    def send_array(self, kind: str, to: str, array: Any, **meta: Any) -> Envelope:
        """Seal and publish a tensor, a float one encoded with the bus's `codec`; values the
        codec saturated (fp16 beyond 65504) are logged, as a warning."""
        before = self.sender.clamped
        env = self.sender.seal_array(kind, to, array, codec=self.codec, **meta)
        if self.sender.clamped > before:
            log.warning("values saturated by the codec", kind=kind, codec=self.codec,
                        step=meta.get("step"), clamped=self.sender.clamped - before)
        self.publish(env)
        return env

    def send_doc(self, kind: str, to: str, doc: Any, **meta: Any) -> Envelope:
        env = self.sender.seal_document(kind, to, doc, **meta)
        self.publish(env)
        return env

    def send_bytes(self, kind: str, to: str, body: bytes, **meta: Any) -> Envelope:
        env = self.sender.seal(kind, to, body, **meta)
        self.publish(env)
        return env

    def beat(self, force: bool = False) -> None:
        """Publish a liveness beat if `beat_s` has passed since the last one."""
        now = time.monotonic()
        if self.beating and (force or now - self.last_beat >= self.beat_s):
            self.last_beat = now
            self.send_doc("beat", "all", {})

    # --- receiving -------------------------------------------------------------------------

    def _watch_broker(self) -> None:
        """Note the broker connection's losses and returns (its monitor's events)."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self.lost_at is None:
                self.lost_at = time.monotonic()
                self.resubscribed.clear()
                log.warning("broker connection lost")
                self._say("the broker connection was lost; ZeroMQ connects again by itself")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.lost_at is not None:
                down = time.monotonic() - self.lost_at
                self.lost_at = None
                self.reconnects += 1
                log.warning("broker connection back", down_s=round(down, 2))
                self._say(f"connected to the broker again after {down:.1f} s (what was in "
                          f"flight meanwhile is lost)")

    def _pump(self, timeout_ms: int) -> None:
        """Move whatever arrives within `timeout_ms` into the inbox, verified."""
        self._watch_broker()
        self._drain_subscriptions()
        if not self.poller.poll(timeout_ms):
            return
        for _ in range(PUMP_BATCH):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self.before_publish is not None and self._ours(frames):
                continue  # already taken where it was sent
            try:
                env = self.verifier.verify_frames([f.buffer for f in frames])
            except RejectedMessage as exc:
                log.warning("message rejected", reason=exc.code, detail=str(exc),
                            sender=exc.sender, field=exc.field)
                if exc.code in GAPS and exc.sender:
                    self.gap_refused[exc.sender] = time.monotonic()
                if exc.code in CHAIN_CONFLICTS and self.on_conflict is not None:
                    # its signature verified before its place in the chain was checked
                    self.on_conflict(parse_frames([f.buffer for f in frames]))
                continue
            self.last_seen[env.header.sender] = time.monotonic()
            self.witness.note(env)
            self.inbox.append(env)

    def _ours(self, frames) -> bool:
        """Whether these frames carry a header of our own key (unverified: a forged one is
        dropped all the same, which is what verifying it would do)."""
        try:
            return parse_frames([f.buffer for f in frames]).header.sender == \
                self.identity.key_id
        except RejectedMessage:
            return False

    def own_first(self, take: Callable[[Envelope], None]) -> None:
        """Hand each of our messages to `take` before publishing it, and never read our own
        back: the notary logs what it sends as it sends it, so that a notary killed between
        publishing and reading its message back cannot leave a message its peers received
        out of the log (started again, it would sign another at that seq: a fork of its own
        chain that every peer refuses as a replay)."""
        self.before_publish = take

    def _say(self, text: str) -> None:
        if self.notice is not None:
            self.notice(text)

    def recv(self, timeout_s: float) -> Envelope | None:
        """The next verified message, or None after `timeout_s`. Beats on the way; raises
        `PeersGone` if a watched peer has been silent past `rejoin_timeout_s`."""
        deadline = time.monotonic() + timeout_s
        self.beat()
        self.check_watched()
        while not self.inbox:
            self.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(int(min(left, self.beat_s) * 1000) + 1)
            self.check_watched()
        return self.inbox.popleft().expecting(self.codec)

    def start_beating(self) -> None:
        """Beat from now on, and count peers' silence from now (call once the roster is known:
        before it, a beat would be refused as from an unknown key and leave a hole in our
        chain, and peers are still starting)."""
        self.beating = True
        self.started = self.last_check = time.monotonic()
        self.last_seen.clear()
        self.beat(force=True)

    def open_gaps(self) -> list[str]:
        """Key ids whose last message was refused for a gap in their chain (nothing of theirs
        accepted since): what they sent is missing here until they send it again."""
        return [k for k, t in self.gap_refused.items() if t >= self.last_seen.get(k, -1.0)]

    def close(self) -> None:
        log.info("bus closed", sent=sum(self.sent.values()), stalls=self.stalls,
                 rejected=dict(self.verifier.rejected), codec=self.codec,
                 clamped=self.sender.clamped)
        if self.outbox is not None:
            self.outbox.close()
        self.sub.disable_monitor()
        self.monitor.close(linger=0)
        self.pub.close()
        self.sub.close()
        self.ctx.term()
