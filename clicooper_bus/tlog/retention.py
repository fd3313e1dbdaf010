"""Which message bodies the provenance log keeps.

Every header is always kept (it is the leaf). A policy names, per kind, `all`, `none` or
`sample:N`; `sample:N` keeps the first N bodies of each (kind, sender, epoch), so every sender's
stream is sampled in every epoch. The spec is a string: a single policy (`all`), or
comma-separated `kind=policy` items with `*` for the rest (`fwd=sample:8,bwd=sample:8,*=all`).
Every kind named must be one of `net.kinds.KINDS` (ConfigError otherwise).

Named presets stand for a whole spec (`PRESETS`): `verify` keeps what replay verification
(`audit.training_replay`) reads, which today is every body: each stage's tensor inputs and
outputs, evaluation traffic, labels, snapshot and watermark documents. Its cost on the demo is
in `docs/BENCHMARKS.md` ("Replay verification").

The decision depends only on the headers in log order, so a verifier replays it to know which
bodies must be present.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace

from clicooper_bus.errors import ConfigError
from clicooper_bus.net.kinds import KINDS
from clicooper_bus.net.wire import Header

PRESETS = {"verify": "all"}
_ITEM_RE = re.compile(r"^(all|none|sample:(0|[1-9][0-9]{0,8}))$")


def _limit(policy: str, spec: str) -> int | None:
    if not _ITEM_RE.fullmatch(policy):
        raise ConfigError(f"retention {spec!r}: {policy!r} is not all, none, sample:N or a "
                          f"preset ({', '.join(PRESETS)})")
    if policy == "all":
        return None
    return 0 if policy == "none" else int(policy.split(":", 1)[1])


@dataclass(frozen=True)
class Retention:
    spec: str
    default: int | None  # None keeps all; N keeps the first N per (kind, sender, epoch)
    per_kind: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Retention:
        spec = spec.strip()
        if spec in PRESETS:
            return replace(cls.parse(PRESETS[spec]), spec=spec)
        if "=" not in spec:
            return cls(spec, _limit(spec, spec))
        default: int | None = None
        per_kind: dict[str, int | None] = {}
        for item in spec.split(","):
            kind, sep, policy = item.strip().partition("=")
            if not sep or not kind:
                raise ConfigError(f"retention {spec!r}: item {item!r} is not kind=policy")
            if kind == "*":
                default = _limit(policy, spec)
            elif kind in per_kind:
                raise ConfigError(f"retention {spec!r}: kind {kind!r} appears twice")
            elif kind not in KINDS:
                # A misspelt kind would silently fall to the `*` policy (`evl_out=sample:2,*=all`
                # kept every evaluation output), so an unknown one is a mistake, not a no-op.
                raise ConfigError(f"retention {spec!r}: {kind!r} is not a message kind; the "
                                  f"kinds are {', '.join(sorted(KINDS))}")
            else:
                per_kind[kind] = _limit(policy, spec)
        return cls(spec, default, tuple(sorted(per_kind.items())))

    def limit(self, kind: str) -> int | None:
        return dict(self.per_kind).get(kind, self.default)


class RetentionTracker:
    """Replays a policy over headers in log order."""

    def __init__(self, policy: Retention):
        self.policy = policy
        self._seen: Counter[tuple[str, str, int]] = Counter()
        self._limits = dict(policy.per_kind)

    def keep(self, h: Header) -> bool:
        """Whether the body of `h` is kept; call once per header, in log order."""
        limit = self._limits.get(h.kind, self.policy.default)
        if limit is None:
            return True
        key = (h.kind, h.sender, -1 if h.epoch is None else h.epoch)
        n = self._seen[key]
        self._seen[key] = n + 1
        return n < limit
