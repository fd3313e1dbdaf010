"""A participant's connection to the broker: publish signed envelopes, receive verified ones.

Sockets (see FACTS.md for why each option is set):
- publishing: an XPUB connected to the broker's XSUB, with `XPUB_NODROP` so that a full pipe
  pushes back (EAGAIN) instead of silently dropping; sends are non-blocking and, while a send is
  refused, inbound messages are read into an inbox so two nodes pushing at each other cannot
  deadlock. Being an XPUB, it also sees which topics the rest of the bus subscribed to: that is
  how `wait_for_subscribers` beats the slow-joiner problem.
- receiving: a SUB connected to the broker's XPUB. Every message goes through the `Verifier`
  before the application sees it; a rejected one is logged with its reason, counted, dropped.
- ZeroMQ heartbeats on both, with a short timeout on the sending side and a long one on the
  receiving side; liveness of peers is application-level (`beat` messages, `silent_peers`).
- CURVE on both (`clicooper_bus.net.curve`) with this participant's key, against the broker's
  public key, unless the run is plaintext (`broker=None`, loopback only).
- A receive pass reads at most `PUMP_BATCH` messages, so that under any inbound rate the
  caller gets back to its beats and timeouts.

Readiness and shutdown use subscriptions as signals, never extra messages: a participant
subscribes to its data topics first and to `run/<id>/hello/<name>` last (`announce`), and to
`run/<id>/done/<name>` once it has read everything it needs (`mark_done`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq

from clicooper_bus.errors import ClicooperError, RejectedMessage
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.forwarder import SUBSCRIPTION_HWM
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope, Sender
from clicooper_bus.protocol import SIGNALS, Topics

log = structlog.get_logger("clicooper.bus")
PUMP_BATCH = 256


class BusError(ClicooperError):
    """The bus is unusable: broker unreachable, a peer silent past the timeout, ..."""


@dataclass(frozen=True)
class BusAddress:
    """Where the broker listens: publishers connect to `pub`, subscribers to `sub`."""

    pub: str = "tcp://127.0.0.1:5555"
    sub: str = "tcp://127.0.0.1:5556"


def _heartbeats(sock: zmq.Socket, interval_s: float, timeout_s: float) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(interval_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(timeout_s * 1000))


class Bus:
    def __init__(self, identity: Identity, run_id: str, address: BusAddress, verifier: Verifier,
                 *, name: str | None = None, hwm: int = 16, beat_s: float = 1.0,
                 timeout_s: float = 5.0, join_timeout_s: float = 120.0,
                 broker: PublicIdentity | None = None):
        self.identity = identity
        self.name = name or identity.name
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.sender = Sender(identity, run_id)
        self.verifier = verifier
        self.beat_s = beat_s
        self.timeout_s = timeout_s
        self.join_timeout_s = join_timeout_s
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.SNDHWM, hwm)
        self.pub.setsockopt(zmq.RCVHWM, SUBSCRIPTION_HWM)  # subscriptions coming in
        self.pub.setsockopt(zmq.LINGER, 500)  # the end-of-run handshake makes more needless
        # a heartbeat timeout shorter than the liveness timeout would let the broker drop a
        # subscriber that merely paused, and lose its messages: never below `timeout_s`
        _heartbeats(self.pub, 0.5, timeout_s)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, hwm)
        self.sub.setsockopt(zmq.SNDHWM, SUBSCRIPTION_HWM)  # subscriptions going out
        self.sub.setsockopt(zmq.LINGER, 0)
        _heartbeats(self.sub, 0.5, max(2.0, timeout_s * 2))
        if broker is not None:
            for sock in (self.pub, self.sub):
                make_client(sock, identity, broker)
        self.pub.connect(address.pub)
        self.sub.connect(address.sub)
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
        self.started = time.monotonic()

    def bind(self, roster: Roster) -> None:
        """Bind to the run `roster` describes: trust its keys, stamp its nonce on every header
        sent from now on, and refuse every received message without it."""
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
        """Send, reading inbound traffic while the bus pushes back; never drops."""
        frames = env.frames()
        deadline = None
        while True:
            try:
                self.pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                self.stalls += 1
                now = time.monotonic()
                deadline = deadline or now + self.timeout_s * 2
                last_heard = max(self.last_seen.values(), default=self.started)
                if self.beating and now - last_heard > self.timeout_s:
                    raise BusError(f"could not send {env.header.kind} and heard nobody for "
                                   f"{self.timeout_s:.0f} s: the broker or everyone is gone"
                                   ) from None
                if now > deadline:
                    raise BusError(f"could not send {env.header.kind} for "
                                   f"{self.timeout_s * 2:.0f} s: the bus pushes back and does "
                                   f"not drain (a reader or the broker is stuck)") from None
                self._pump(10)
        self.sent[env.header.kind] = self.sent.get(env.header.kind, 0) + 1

    def send_array(self, kind: str, to: str, array: Any, **meta: Any) -> Envelope:
        env = self.sender.seal_array(kind, to, array, **meta)
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

    def _pump(self, timeout_ms: int) -> None:
        """Move whatever arrives within `timeout_ms` into the inbox, verified."""
        self._drain_subscriptions()
        if not self.poller.poll(timeout_ms):
            return
        for _ in range(PUMP_BATCH):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                env = self.verifier.verify_frames([f.buffer for f in frames])
            except RejectedMessage as exc:
                log.warning("message rejected", reason=exc.code, detail=str(exc),
                            sender=exc.sender, field=exc.field)
                continue
            self.last_seen[env.header.sender] = time.monotonic()
            self.inbox.append(env)

    def watch(self, peers: dict[str, str]) -> None:
        """Peers (key id -> name) whose silence past the timeout is fatal: every `recv` checks
        them, so a live peer's beats can never hide a dead one."""
        self.watched = dict(peers)

    def _check_watched(self) -> None:
        silent = self.silent_peers(self.watched)
        if silent:
            names = ", ".join(self.watched[k] for k in silent)
            raise BusError(f"no message from {names} for {self.timeout_s:.0f} s: the broker or "
                           f"they are gone")

    def recv(self, timeout_s: float) -> Envelope | None:
        """The next verified message, or None after `timeout_s`. Beats on the way, and raises
        `BusError` if a watched peer has gone silent."""
        deadline = time.monotonic() + timeout_s
        self.beat()
        self._check_watched()
        while not self.inbox:
            self.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(int(min(left, self.beat_s) * 1000) + 1)
            self._check_watched()
        return self.inbox.popleft()

    def start_beating(self) -> None:
        """Beat from now on, and count peers' silence from now (call once the roster is known:
        before it, a beat would be refused as from an unknown key and leave a hole in our
        chain, and peers are still starting)."""
        self.beating = True
        self.started = time.monotonic()
        self.last_seen.clear()
        self.beat(force=True)

    def silent_peers(self, key_ids: Iterable[str]) -> list[str]:
        """Key ids silent for longer than the timeout since we last heard them; a peer not
        heard at all since `start_beating` gets the join timeout (it may still be starting)."""
        now = time.monotonic()
        out = []
        for k in key_ids:
            seen = self.last_seen.get(k)
            if (seen is not None and now - seen > self.timeout_s) or (
                    seen is None and now - self.started > self.join_timeout_s):
                out.append(k)
        return out

    def close(self) -> None:
        log.info("bus closed", sent=sum(self.sent.values()), stalls=self.stalls,
                 rejected=dict(self.verifier.rejected))
        self.pub.close()
        self.sub.close()
        self.ctx.term()
