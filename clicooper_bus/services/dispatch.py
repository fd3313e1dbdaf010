"""One receive loop for a process: every verified message is dispatched by kind through an
explicit handler table, and waiting is only ever "receive and dispatch until a condition on
the process's state holds". No wait handles messages of its own, so what a message does never
depends on who happens to be waiting when it arrives.

A route names the kind, the senders allowed to send it (key ids) and the handler. A message of
a kind with no route is ignored (every participant sees others' traffic on shared topics); one
from a sender the route does not allow is refused with a logged reason. Data messages a process
waits for by step (gradients, outputs, segments) go to a bounded `Mailbox` by their handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from clicooper_bus.errors import ClicooperError, MalformedMessage, PoisonedInput
from clicooper_bus.net.bus import Bus, BusError
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import ProtocolError

Handler = Callable[[Envelope], None]


@dataclass(frozen=True)
class Route:
    senders: frozenset[str]  # key ids allowed to send this kind
    handle: Handler


class Dispatcher:
    """The receive loop of one process over its `Bus`. `names` maps key ids to roster names
    (for errors and logs)."""

    def __init__(self, bus: Bus, names: dict[str, str], log=None):
        self.bus, self.names = bus, names
        self.log = log or structlog.get_logger("clicooper.dispatch")
        self.routes: dict[str, Route] = {}
        # called on every pass of `until`: may raise to interrupt whatever waits (the owner's
        # check that the broker connection came back)
        self.interrupt: Callable[[], None] | None = None

    def only(self, *kinds: str) -> None:
        """Drop every route but those of `kinds` (a process that finished its part)."""
        self.routes = {k: r for k, r in self.routes.items() if k in kinds}

    def route(self, kind: str, senders: Iterable[str], handle: Handler) -> None:
        """Handle `kind` from these key ids with `handle` (replacing an earlier route)."""
        self.routes[kind] = Route(frozenset(senders), handle)

    def dispatch(self, env: Envelope) -> None:
        route = self.routes.get(env.header.kind)
        if route is None:
            return
        if env.header.sender not in route.senders:
            self.log.warning("message from an unexpected sender refused", kind=env.header.kind,
                             sender=self.names.get(env.header.sender, env.header.sender))
            return
        try:
            route.handle(env)
        except (ProtocolError, MalformedMessage) as exc:
            # a member's malformed control document is a refusal naming it, which stops the run
            # cleanly: never a crash (which would leave its stage to be handed to a standby)
            raise PoisonedInput(sender=self.names.get(env.header.sender, env.header.sender),
                                kind=env.header.kind, step=env.header.step,
                                problem=str(exc)) from None

    def pump(self, timeout_s: float) -> bool:
        """Receive and dispatch at most one message; False if none came within `timeout_s`."""
        env = self.bus.recv(timeout_s)
        if env is None:
            return False
        self.dispatch(env)
        return True

    def until(self, ready: Callable[[], bool], *, timeout_s: float,
              timed_out: Callable[[], str] | None) -> bool:
        """Dispatch until `ready()` holds, and return True. After `timeout_s` (checked on every
        pass: beats keep arriving) raises BusError with `timed_out()`'s text, or returns False
        when `timed_out` is None. The clock stops while a watched peer is suspected (a paused
        peer holds the run; waiting for it is not a timeout) and while this process itself was
        stopped, and a watched peer gone past the rejoin timeout raises PeersGone from the bus
        first."""
        deadline = last = time.monotonic()
        deadline += timeout_s
        asked = 0.0  # how long the last pass was to wait at most
        while not ready():
            now = time.monotonic()
            if self.bus.suspected:
                deadline += now - last
            elif now - last > asked + 1.0:  # we were stopped (or blocked) ourselves
                deadline += now - last - asked
            last = now
            left = deadline - now
            if left < 0:
                if timed_out is None:
                    return False
                raise BusError(timed_out())
            asked = min(1.0, left) or 0.01
            self.pump(asked)
            if self.interrupt is not None:
                self.interrupt()
        return True

    def hold(self, who: str) -> None:
        """Return once no watched peer is suspected, dispatching meanwhile: the owner sends no
        new step while a peer is silent (`who` names the process on its console). Raises
        PeersGone when a suspected peer stays silent past the rejoin timeout."""
        self.bus.check_watched()
        if not self.bus.suspected:
            return
        suspects = self.bus.suspects()
        t0 = time.monotonic()
        self.log.warning("paused", suspected=suspects)
        print(f"{who}: paused: sending nothing new while {', '.join(suspects)} "
              f"{'is' if len(suspects) == 1 else 'are'} suspected", flush=True)
        self.until(lambda: not self.bus.suspected, timeout_s=float("inf"), timed_out=None)
        self.log.info("resumed", paused_s=round(time.monotonic() - t0, 2))
        print(f"{who}: resumed after {time.monotonic() - t0:.1f} s paused", flush=True)


class Mailbox:
    """Messages kept until the process takes them, by (kind, sender) in arrival order. At most
    `limit` at once: more means a peer sends more than the protocol allows in flight."""

    def __init__(self, names: dict[str, str], limit: int):
        self.names, self.limit = names, limit
        self.held: list[Envelope] = []
        self.awaited: tuple[str, str, int | None] | None = None  # (kind, sender, step)

    def _is_awaited(self, env: Envelope) -> bool:
        if self.awaited is None:
            return False
        kind, sender, step = self.awaited
        h = env.header
        return h.kind == kind and h.sender == sender and (step is None or h.step == step)

    def put(self, env: Envelope) -> None:
        """Keep `env`. Raises ClicooperError naming the sender when the mailbox is full (the
        message the process is waiting for is always taken)."""
        if len(self.held) >= self.limit and not self._is_awaited(env):
            h = env.header
            raise ClicooperError(f"{self.names.get(h.sender, h.sender)} sent more {h.kind} "
                                 f"messages than the protocol allows in flight")
        self.held.append(env)

    def take(self, kind: str, sender: str, step: int | None = None) -> Envelope | None:
        """The oldest kept message of `kind` from key id `sender` (and of `step`, if given)."""
        for i, env in enumerate(self.held):
            h = env.header
            if h.kind == kind and h.sender == sender and (step is None or h.step == step):
                return self.held.pop(i)
        return None
