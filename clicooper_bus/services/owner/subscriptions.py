"""What the owner reads from the bus: the kinds addressed to it and the broadcasts of the
control traffic (a new run's join and a resumed run's, alike)."""

from __future__ import annotations

from clicooper_bus.net.bus import Bus

INBOX = ("bwd", "eval_out", "metrics", "logits", "segment", "usage", "fwd", "eval_fwd", "end", "snapshot",
         "rejoin", "stage_state")
BROADCASTS = ("hello", "checkpoint", "beat", "wm_commit", "wm_claim", "wm_cert", "restored",
              "tip", "equivocation")


def subscribe(bus: Bus, owner: str) -> None:
    """Subscribe the owner's `bus` to everything it reads, then announce it (the last)."""
    for kind in INBOX:
        bus.subscribe(bus.topics.to(kind, owner))
    for kind in BROADCASTS:
        bus.subscribe(bus.topics.kind(kind))
    bus.announce()
