"""Which watched peers are alive, as a part of `bus.Bus`: a peer silent for `timeout_s` is
*suspected* (logged, said on the console, in `suspected`, which the owner's pause reads), one
silent for `rejoin_timeout_s` is *gone* (`PeersGone`). Silence is measured from the last
message of any kind (every participant beats about once a second), and a stretch in which this
process did not listen itself (stopped, asleep, blocked) does not count. The ZeroMQ guide's
heartbeating (chapter 4, "Paranoid Pirate"), at the application level: ZeroMQ's own
heartbeats would drop the connection of a peer that is merely paused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from clicooper_bus.errors import ClicooperError

log = structlog.get_logger("clicooper.bus")


class BusError(ClicooperError):
    """The bus is unusable: broker unreachable, a peer silent past the timeout, ..."""


class PeersGone(BusError):
    """Watched peers silent for longer than `rejoin_timeout_s` (or never heard within the join
    timeout). `names`: who, in the order they were watched."""

    def __init__(self, text: str, names: list[str]):
        super().__init__(text)
        self.names = names


class Liveness:
    """The liveness methods of `bus.Bus` (a mixin: it uses the bus's `watched`, `suspected`,
    `last_seen`, `started`, `last_check`, `away_s`, the three timeouts and `_say`)."""

    def watch(self, peers: dict[str, str]) -> None:
        """Peers (key id -> name) whose silence is suspected past `timeout_s` and fatal past
        `rejoin_timeout_s`: every `recv` checks them, so a live peer's beats can never hide a
        dead one. A peer no longer watched is no longer suspected."""
        self.watched = dict(peers)
        for k in [k for k in self.suspected if k not in self.watched]:
            del self.suspected[k]

    def unwatch(self, names: Iterable[str]) -> None:
        """Stop watching these peers (by name): they are gone, and the run goes on without
        them for as long as it takes to stop it cleanly."""
        drop = set(names)
        self.watch({k: n for k, n in self.watched.items() if n not in drop})

    def suspects(self) -> list[str]:
        """Names of the watched peers suspected now, in the order they were watched."""
        return [n for k, n in self.watched.items() if k in self.suspected]

    def _own_gap(self) -> None:
        """Our own absence is not our peers' silence: when this process was not listening for
        a while (it was stopped, SIGSTOP or a device asleep, or blocked), what they sent waits
        in its queues, so every peer's silence clock moves on by that gap; measured without it,
        a process resumed after a pause would declare everyone gone before reading a thing."""
        now = time.monotonic()
        gap = now - self.last_check
        self.last_check = now
        if gap <= self.timeout_s:  # (a computation between two receives stays below it)
            return
        self.away_s += gap
        self.started += gap
        for k in self.last_seen:
            self.last_seen[k] += gap
        log.warning("we were not listening", away_s=round(gap, 2))

    def check_watched(self) -> None:
        """Update who is suspected (each change logged and said on the console) and raise
        `PeersGone` naming every watched peer silent past `rejoin_timeout_s`; a stretch in which
        this process did not listen itself is not counted (`_own_gap`)."""
        self._own_gap()
        now = time.monotonic()
        silent = set(self.silent_peers(self.watched))
        for k in silent - set(self.suspected):
            self.suspected[k] = now
            quiet = now - self.last_seen.get(k, self.started)
            log.warning("peer suspected", peer=self.watched[k], silent_s=round(quiet, 2),
                        rejoin_timeout_s=self.rejoin_timeout_s)
            self._say(f"{self.watched[k]} silent for {quiet:.1f} s: suspected; waiting up to "
                      f"{self.rejoin_timeout_s:.0f} s (rejoin_timeout_s) for it to come back")
        for k in set(self.suspected) - silent:
            since = self.suspected.pop(k)
            log.info("peer back", peer=self.watched[k], suspected_s=round(now - since, 2))
            self._say(f"{self.watched[k]} is back after {now - since:.1f} s suspected")
        gone = [k for k in self.watched if k in silent and (
            k not in self.last_seen or now - self.last_seen[k] > self.rejoin_timeout_s)]
        if gone:
            names = [self.watched[k] for k in gone]
            log.error("peers gone", peers=names, rejoin_timeout_s=self.rejoin_timeout_s)
            raise PeersGone(f"no message from {', '.join(names)} for "
                            f"{self.rejoin_timeout_s:.0f} s (rejoin_timeout_s): the broker or "
                            f"they are gone", names)

    def presume_heard(self, key_ids: Iterable[str]) -> None:
        """Count these peers' silence from now, as if just heard (a resumed process whose
        peers were in the run before: silent past `timeout_s` from here they are suspected,
        rather than given the join timeout of a peer never heard)."""
        now = time.monotonic()
        for k in key_ids:
            self.last_seen.setdefault(k, now)

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
