"""The broker's forwarder: publishers connect to its XSUB, subscribers to its XPUB.

With `security = "curve"` (the default) both sockets are CURVE servers with the broker's own
key, and pyzmq's ZAP authenticator (`zmq.auth.thread.ThreadAuthenticator`) admits only the
keys of the run's members, naming each connection by its member (ZAP User-Id). The forwarder
is then a loop of its own instead of `zmq.proxy`, applying `Admission`'s rules to every message
and subscription: a stranger cannot connect at all, a member may publish only what it signed
and subscribe only to what its role may read.

Bounds (FACTS.md and issue 16's measurements):
- `MAXMSGSIZE` on both sockets, set *before bind* (options are copied into the listener at
  bind): on the XPUB 1 KiB (a subscription, or a CURVE handshake command), which keeps
  libzmq's subscription trie from the stack overflow a 128 KiB subscription caused; on the
  XSUB `max_message`.
- The XPUB is manual (`XPUB_MANUAL`): a subscription is applied only once the rules allow it.
- Backpressure: `XPUB_NODROP`, so a full subscriber pipe makes the broker wait instead of
  losing a message (FACTS.md: the default proxy loses messages). A subscriber that stops
  reading would then stall everyone. The bound: once one message has waited `stall_s`, the
  broker sends it *lossy* (it is dropped for the pipes that are full, whoever holds them) and
  stays lossy until a send goes through without waiting again. A reader that stopped thus
  misses messages, which its own verifier (or the owner's step timeout) reports by name, while
  everyone else runs on after one wait of at most `stall_s`; one that alternates reading and
  stopping can cause such a wait each time. `dropped_sends` counts the lossy sends (each may
  have dropped a message for one or more full pipes).
- The witness channel: with `witness_addr`, a third socket (an XPUB, NODROP, no stall bound)
  where only the notary subscribes (its log must have every message: one it missed is a gap in
  its sender's chain, and the run stops). Every message goes to it first, then to the others;
  while the notary does not read (paused, a device asleep), the broker waits and reads nothing
  more, so the whole run waits with it (every member suspects every other, the owner sends no
  new step) until the notary reads again or is declared gone after `rejoin_timeout_s`. The stall
  bound still protects everyone from a slow reader at the ordinary address. Measured before
  it: a notary stopped for 8 s made the broker send lossy after `stall_s` and its log had a
  gap, which stopped the run.
- Subscriptions stay at the broker: it subscribes to the whole run at each publisher itself,
  and passes on only members' own presence signals, once each, never an unsubscription.
- A member refused `MAX_STRIKES` times is banned (ZAP refuses it) and its connection shut.
- Each pass of the loop handles a bounded number of messages from either side, so a flood on
  one socket cannot starve the other or the heartbeats.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections import Counter

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from clicooper_bus.errors import ConfigError
from clicooper_bus.net.admission import Admission
from clicooper_bus.net.curve import make_server
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.wire import Limits

SUBSCRIPTION_HWM = 100_000
# TCP keepalive, answered by the kernel: finds a peer whose host vanished (no FIN) in about
# idle + count x interval seconds, and never drops a process that is merely stopped
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3


def tcp_keepalive(sock: zmq.Socket) -> None:
    """Liveness of the connection itself without ZeroMQ's heartbeats (ZMTP PING/PONG).

    Those fight backpressure and pauses: a connection whose input is stopped by a full queue, or
    whose process is stopped (SIGSTOP, a device asleep), answers no PING, so a heartbeat timeout
    closes it with what was queued on it, and libzmq 4.3.5 then aborts on the reconnect
    (`Assertion failed: _input_stopped (src/stream_engine_base.cpp:396)` and `!_io_error
    (...:310)`, libzmq issues 3937 and 4767; both seen here, one with no pause at all, one in a
    process resumed after its broker had timed it out). Peers' liveness is the application's
    beats (`[bus] timeout_s`, `rejoin_timeout_s`); the kernel's keepalive finds a vanished host."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)

BATCH = 64  # messages handled from one socket before looking at the other
HANDSHAKE_S = 5  # an unauthenticated connection is dropped after this long
log = structlog.get_logger("clicooper.broker")


class _MembersOnly:
    """ZAP credentials provider: a CURVE key is admitted if the run lists it."""

    def __init__(self, admission: Admission, refused: Counter[str]):
        self.admission, self.refused = admission, refused

    def callback(self, domain: str, key: bytes) -> bool:
        name = self.admission.name_of(key)
        if name is None:
            self.refused["connection with a key the roster does not list"] += 1
            log.warning("connection refused", reason="key not in the roster",
                        key=key.decode(errors="replace"))
        return name is not None


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, naming each admitted connection by its member's name."""

    def __init__(self, context: zmq.Context, admission: Admission):
        super().__init__(context)
        self.admission = admission

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.admission.name_of(z85.encode(client_public_key)) or "anonymous"


class Forwarder:
    def __init__(self, pub_addr: str, sub_addr: str, *, witness_addr: str | None = None,
                 identity: Identity | None = None,
                 admission: Admission | None = None, hwm: int = 16,
                 max_message: int | None = None, stall_s: float = 2.0):
        """`identity` and `admission` together make a CURVE broker with the rules; neither
        makes a plaintext one (`security = "none"`, loopback only, for benchmarks).
        `witness_addr`: the notary's lossless address (see the module's notes), or None.
        Raises ConfigError if an address cannot be bound."""
        if (identity is None) != (admission is None):
            raise ValueError("a CURVE broker needs both its identity and the run's admission")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.admission = admission
        self.stall_s = stall_s
        self.refused: Counter[str] = Counter()  # connections refused by ZAP, by reason
        self.forwarded = 0
        self.dropped_sends = 0  # lossy sends after a subscriber stalled past stall_s
        self.ctx = zmq.Context()
        self.auth: _Authenticator | None = None
        if admission is not None:
            self.auth = _Authenticator(self.ctx, admission)
            self.auth.start()
            self.auth.configure_curve_callback("*", _MembersOnly(admission, self.refused))
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.witness = self.ctx.socket(zmq.XPUB) if witness_addr else None
        self.xpubs = [s for s in (self.witness, self.xpub) if s is not None]  # witness first
        for xpub in self.xpubs:
            xpub.setsockopt(zmq.XPUB_NODROP, 1)
            xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        # data flows xsub -> xpub and is bounded by `hwm`; subscriptions flow the other way,
        # are tiny, and must never be dropped (a full subscription pipe silently loses them)
        self.xsub.setsockopt(zmq.RCVHWM, hwm)
        self.xsub.setsockopt(zmq.SNDHWM, SUBSCRIPTION_HWM)
        for xpub in self.xpubs:
            xpub.setsockopt(zmq.SNDHWM, hwm)
            xpub.setsockopt(zmq.RCVHWM, SUBSCRIPTION_HWM)
        limits = admission.limits if admission is not None else Limits()
        max_topic = limits.max_topic
        # the largest frame a valid message has (its body): bounds what even an unauthenticated
        # connection can make the broker buffer, beside the short handshake timeout
        max_message = max_message or limits.max_body + limits.max_header
        self.xsub.setsockopt(zmq.MAXMSGSIZE, max_message)
        # a subscription is 1 byte + a topic; the limit also bounds the CURVE handshake's
        # commands (INITIATE is about 300 bytes), hence not below 1 KiB
        for xpub in self.xpubs:
            xpub.setsockopt(zmq.MAXMSGSIZE, max(1024, 1 + max_topic))
        for sock in (self.xsub, *self.xpubs):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_S * 1000)
            if identity is not None:
                make_server(sock, identity)
        # no ZeroMQ heartbeats (they closed paused members' connections and crashed libzmq:
        # `tcp_keepalive`); the members' beats tell who is alive, the kernel who vanished
        for sock in (self.xsub, *self.xpubs):
            tcp_keepalive(sock)
        binds = [(self.xsub, pub_addr), (self.xpub, sub_addr)]
        if self.witness is not None:
            binds.append((self.witness, witness_addr))
        for sock, addr in binds:
            try:
                sock.bind(addr)
            except zmq.ZMQError as exc:
                self.close()
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"broker address {addr} is already in use: is another "
                                      f"broker running? Choose free ports ([bus] pub and sub)"
                                      ) from None
                raise ConfigError(f"cannot bind broker address {addr}: {exc}") from None
        self.pub_addr = self.xsub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sub_addr = self.xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.witness_addr = self.witness.getsockopt_string(zmq.LAST_ENDPOINT) \
            if self.witness is not None else None
        if admission is not None:
            # the broker itself takes the whole run from every publisher; members'
            # subscriptions then never travel upstream, except their own presence signals, so
            # no member can subscribe or unsubscribe anything at the publishers
            self.xsub.send(b"\x01" + admission.topics.all.encode())
        self._signalled: set[bytes] = set()
        self._pending: list[zmq.Frame] | None = None
        self._owed: list[zmq.Socket] = []  # the sockets `_pending` has yet to go out on
        self.witness_waits = 0  # messages that waited for the notary to read again
        self._stalled_since: float | None = None
        self._lossy = False
        self._warned: set[tuple[str, str]] = set()

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for xpub in self.xpubs:
            poller.register(xpub, zmq.POLLIN)
        poller.register(self.xsub, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                # while a message waits for a full pipe, read no more data (backpressure)
                ready = dict(poller.poll(1 if self._pending is not None else 100))
                for xpub in self.xpubs:
                    if xpub in ready:
                        self._subscriptions(xpub)
                if self._pending is not None and not self._flush():
                    continue
                if self.xsub in ready:
                    self._messages()
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # sockets closed under it at shutdown
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                raise

    def _who(self, frame: zmq.Frame) -> str | None:
        if self.admission is None:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:  # no metadata: an unsubscription libzmq made for a closed pipe
            return None

    def _refuse(self, who: str | None, reason: str, what: str, frame: zmq.Frame) -> None:
        if (who or "?", reason) not in self._warned:  # once per member and reason; counted
            self._warned.add((who or "?", reason))
            log.warning(f"{what} refused", member=who, reason=reason)
        if self.admission is not None and self.admission.strike(who):
            log.error("member banned: too many refused messages or subscriptions; its "
                      "connection is closed and it cannot reconnect in this run", member=who)
            self._disconnect(frame)

    @staticmethod
    def _disconnect(frame: zmq.Frame) -> None:
        """Close the TCP connection `frame` came in on (libzmq has no call to drop one peer
        of a socket; a shutdown makes it see the connection end and free the pipe)."""
        try:
            fd = os.dup(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, OSError, TypeError):
            return
        try:
            socket.socket(fileno=fd).shutdown(socket.SHUT_RDWR)
        except OSError:
            os.close(fd)

    def _subscriptions(self, xpub: zmq.Socket) -> None:
        for _ in range(BATCH):
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue  # not a subscription: an XPUB peer sent a message; ignore it
            topic, who = data[1:], self._who(frame)
            if self.admission is None:  # plaintext: a plain forwarder both ways
                xpub.setsockopt(zmq.SUBSCRIBE if data[0] else zmq.UNSUBSCRIBE, topic)
                self.xsub.send(data)
                continue
            if data[0] == 0:  # never upstream; a closed pipe's (who None) is libzmq's own
                self.admission.unsubscribe(who, topic)
                if who is not None:
                    xpub.setsockopt(zmq.UNSUBSCRIBE, topic)
                continue
            reason = self.admission.witness_refusal(who) if xpub is self.witness else None
            reason = reason or self.admission.subscribe(who, topic)
            if reason is not None:
                self._refuse(who, reason, "subscription", frame)
                continue
            xpub.setsockopt(zmq.SUBSCRIBE, topic)  # to the pipe it came from
            if self.admission.is_signal(who, topic) and data not in self._signalled:
                self._signalled.add(data)  # a presence signal, passed on once
                self.xsub.send(data)

    def _messages(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self.admission is not None:
                who = self._who(frames[0])
                reason = self.admission.publication_refusal(who, [f.buffer for f in frames])
                if reason is not None:
                    self._refuse(who, reason, "message", frames[0])
                    continue
            self._pending, self._owed = frames, list(self.xpubs)
            if not self._flush():
                return

    def _flush(self) -> bool:
        """Send the pending message on every socket it is owed to, the witness first; True
        once it went out on all (then nothing is pending)."""
        while self._owed:
            xpub = self._owed[0]
            if xpub is self.witness:
                try:  # lossless: the notary's log must have it; the run waits for it
                    self.witness.send_multipart(self._pending, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    if self._stalled_since is None:
                        self.witness_waits += 1
                        self._stalled_since = time.monotonic()
                    return False
                self._stalled_since = None
            elif not self._send(self._pending):
                return False
            self._owed.pop(0)
        self._pending = None
        return True

    def _send(self, frames: list[zmq.Frame]) -> bool:
        """Forward; False if every subscriber could not take it yet and `stall_s` has not
        passed (the caller keeps it pending)."""
        try:
            self.xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            now = time.monotonic()
            self._stalled_since = self._stalled_since or now
            if not self._lossy and now - self._stalled_since < self.stall_s:
                return False
            if not self._lossy:
                log.warning("a subscriber stopped reading; sending without waiting for it",
                            stalled_s=round(now - self._stalled_since, 3))
            self._lossy = True
            self.xpub.setsockopt(zmq.XPUB_NODROP, 0)
            try:
                self.xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
            finally:
                self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
            self.dropped_sends += 1
        else:
            if self._lossy:
                log.info("every subscriber reads again", lossy_sends=self.dropped_sends)
            self._lossy = False
        self._stalled_since = None
        self.forwarded += 1
        return True

    # --- life ------------------------------------------------------------------------------

    def start(self) -> Forwarder:
        """Forward in a background thread (the caller keeps the main thread for signals)."""
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()
        return self

    def stats(self) -> dict[str, object]:
        refused = dict(self.refused)
        if self.admission is not None:
            refused.update(self.admission.refused)
        banned = sorted(self.admission.banned) if self.admission is not None else []
        return {"forwarded": self.forwarded, "lossy_sends": self.dropped_sends,
                "witness_waits": self.witness_waits,
                "refused": refused, "banned": banned}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)
