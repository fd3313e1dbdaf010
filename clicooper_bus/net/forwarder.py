"""The broker's forwarder: XSUB (publishers connect) to XPUB (subscribers connect).

`XPUB_NODROP` on the XPUB makes a full subscriber pipe push back through the broker to the
publishers instead of dropping (FACTS.md: the default proxy loses messages even without a slow
reader). The high-water mark counts messages, not bytes, so it is kept small. `MAXMSGSIZE` is
set here only: an oversized frame drops that publisher's connection at the broker, whereas on a
SUB socket it would silently stop all delivery. No send timeout on the XPUB: `zmq.proxy` exits
when one fires.
"""

from __future__ import annotations

import errno
import threading

import zmq

from clicooper_bus.errors import ConfigError

SUBSCRIPTION_HWM = 100_000


class Forwarder:
    def __init__(self, pub_addr: str, sub_addr: str, *, hwm: int = 16,
                 max_message: int = 256 << 20, timeout_s: float = 5.0):
        self._thread: threading.Thread | None = None
        self.ctx = zmq.Context()
        self.xsub = self.ctx.socket(zmq.XSUB)
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_NODROP, 1)
        # data flows xsub -> xpub and is bounded by `hwm`; subscriptions flow the other way,
        # are tiny, and must never be dropped (a full subscription pipe silently loses them)
        self.xsub.setsockopt(zmq.RCVHWM, hwm)
        self.xpub.setsockopt(zmq.SNDHWM, hwm)
        self.xsub.setsockopt(zmq.SNDHWM, SUBSCRIPTION_HWM)
        self.xpub.setsockopt(zmq.RCVHWM, SUBSCRIPTION_HWM)
        for sock in (self.xsub, self.xpub):
            sock.setsockopt(zmq.LINGER, 0)
        self.xsub.setsockopt(zmq.MAXMSGSIZE, max_message)
        # heartbeats find a hung peer; their timeout is never below the liveness timeout, or a
        # subscriber that merely paused would be dropped and lose messages
        for sock, t in ((self.xpub, timeout_s), (self.xsub, timeout_s * 2)):
            sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(t * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TTL, int(t * 1000))
        for sock, addr in ((self.xsub, pub_addr), (self.xpub, sub_addr)):
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

    def _run(self) -> None:
        try:
            zmq.proxy(self.xsub, self.xpub)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # sockets closed under it at shutdown
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                raise

    def start(self) -> Forwarder:
        """Forward in a background thread (the caller keeps the main thread for signals)."""
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        if self._thread is not None:
            self._thread.join(timeout=5)
