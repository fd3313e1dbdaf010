"""Logs for replay verification tests (issue 19): the orders a notary could have logged a run
in, and the log as a roster member that signs what it likes would have made it."""

from __future__ import annotations

from collections.abc import Callable

from clicooper_bus.audit.training_replay import replay_log


def sender_orders(plog) -> list[list[int]]:
    """The log's entries grouped by sender (each sender's kept in its chain's order), the
    senders first to last and last to first: a resend after a notary restart, or a message a
    sender held back, puts a sender's messages after what others computed from them."""
    heads = [plog.header(i) for i in range(plog.size)]
    senders = list(dict.fromkeys(h.sender for h in heads))
    return [sorted(range(plog.size), key=lambda i: (ranked.index(heads[i].sender), i))
            for ranked in (senders, senders[::-1])]


def assert_same_verdicts_in_any_sender_order(plog) -> list[dict]:
    """Replaying `plog` in each of `sender_orders` gives the verdicts of its own order, which
    are returned."""
    base = [v.to_json() for v in replay_log(plog)]
    for order in sender_orders(plog):
        assert [v.to_json() for v in replay_log(plog, order=order)] == base
    return base


class Forged:
    """`plog` as a member that signs what it likes would have made it (the checks of the
    notary and `verify_log` pass on such a log: each message is its sender's own): `edit(i,
    header, body) -> (header, body)` rewrites entries, `extra` (header, signature, body)
    entries follow the log's."""

    def __init__(self, plog, edit: Callable | None = None, extra: tuple = ()):
        self.plog, self.edit, self.extra = plog, edit, list(extra)
        self.roster_bytes, self.size = plog.roster_bytes, plog.size + len(self.extra)

    def entry(self, i: int):
        if i >= self.plog.size:
            return self.extra[i - self.plog.size]
        h, sig, body = self.plog.entry(i)
        if self.edit is not None:
            h, body = self.edit(i, h, body)
        return h, sig, body

    def header(self, i: int):
        return self.entry(i)[0]
