"""The notary's side of restarts and lost messages, as a part of `notary.Notary`: a notary
started again with `--resume` goes on with the run's log (`_reopen`); a member silent past
`timeout_s` is told where its signed chain stands in the log (`tip`, and with watermarks on its
watermark chain), which a restarted process of it continues from; a sender whose messages the
notary never received (it was restarted, or the broker was) is told so (`tip` with `resend`)
and sends them again, a gap still open after `rejoin_timeout_s` stopping the run
(`_chain_gap`); and a stage handed over to a standby is the standby's in the watermark register
from its `handover` on."""

from __future__ import annotations

import time

from clicooper_bus.chain.registry import WatermarkRegistry
from clicooper_bus.errors import ClicooperError, LogCorrupted, RejectedMessage
from clicooper_bus.layout import RunLayout
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Envelope
from clicooper_bus.net.witness import KEEP_WITNESSED
from clicooper_bus.protocol.recovery import MAX_WITNESSED, ChainTip, Handover
from clicooper_bus.services.notary_evidence import SIGNING
from clicooper_bus.tlog.log import ProvenanceLog


class NotaryRestarts:
    """The restart and resend methods of `notary.Notary` (a mixin: it uses the notary's bus,
    log, roster and watermark register)."""

    def _reopen(self) -> None:
        """`--resume`: go on with the run's log, as it is on disk (a torn tail cut, nothing
        covered by a signed checkpoint lost, else LogCorrupted). Every entry is verified again
        and replayed: each sender's chain (so the next message must continue it, and a
        restarted member's `tip` says where), the watermark register, the training steps. Our
        own chain goes on from our last logged message. A checkpoint is signed and published
        at once (the first thing a resumed run sees), and members silent past `timeout_s` are
        sent their tips as in a running run."""
        path = RunLayout(self.cfg.run_dir).log
        self.plog = plog = ProvenanceLog.open(path, writable=True, fsync=self.cfg.log.fsync,
                                              signer=self.ident)
        roster = Roster.open(plog.roster_bytes, owner=self.owner_key)  # RosterError: not ours
        self.roster = roster
        self.bus.bind(roster)
        self.registry = WatermarkRegistry(
            roster, plog.roster_bytes,
            root_at=lambda n: plog.tree.root(n) if n <= plog.size else None)
        shown: list[Envelope] = []  # members' `witnessed` documents
        for i in range(plog.size):
            h, sig, body = plog.entry(i)
            try:
                self.bus.verifier.verify_leaf(h.raw + sig, body)
            except RejectedMessage as exc:
                raise LogCorrupted(f"entry {i} of {path} does not verify on resuming ({exc}): "
                                   f"run `clicooper log verify {path}`") from None
            self.chains[h.sender] = (h.seq, h.digest)
            self.logged_at[h.sender, h.seq] = i
            if h.kind in ("wm_commit", "wm_claim") and body is None:
                raise ClicooperError(f"the log did not keep the body of entry {i} ({h.kind}), "
                                     f"which the watermark register needs: this run cannot "
                                     f"be resumed ([log] retention)")
            if h.kind in ("wm_commit", "wm_claim", "fwd"):
                self.registry.observe(Envelope(h.topic, h, sig, body or b""), i)
            if h.kind == "handover" and body is not None:
                self._handed_over(Envelope(h.topic, h, sig, body))
            if h.kind == "equivocation" and h.sender == self.ident.key_id and body is not None:
                self._accused_before(Envelope(h.topic, h, sig, body))
            if h.kind == "witnessed" and body is not None:
                shown.append(Envelope(h.topic, h, sig, body))
            if h.kind == "fwd" and h.sender == roster.owner.key_id and h.step is not None:
                self.logged_steps.add(h.step)
        # what members showed us before, compared again over the whole log: a message a member
        # accepted whose place our earlier life had not yet filled is judged when it is
        for env in shown:
            self._witnessed(env, replayed=True)
        if self.ident.key_id in self.chains:
            self.bus.sender.seq, self.bus.sender.prev = self.chains[self.ident.key_id]
        self.last_cp_size = plog.checkpoint_at(plog.checkpoint_count - 1).size \
            if plog.checkpoint_count else 0
        self.log.info("log reopened", path=str(path), entries=plog.size,
                      torn=plog.torn, chains=len(self.chains))
        print(f"notary: resuming run '{self.cfg.run.id}' on its log ({plog.size} entries"
              f"{', torn tail cut' if plog.torn else ''}); waiting for its members",
              flush=True)
        signing = {m.key_id: m.name for m in roster.members
                   if m.role in ("owner", "trainer", "standby")}
        # their subscriptions live (the broker passes the hellos it has to a new connection),
        # so that what we send now reaches them
        self.bus.wait_for_subscribers("hello", signing.values(), self.cfg.bus.join_timeout_s)
        self.bus.start_beating()
        others = {m.key_id: m.name for m in roster.members if m.role != "notary"}
        self.bus.watch(others)
        self.bus.presume_heard(others)  # members of the run: tipped once silent past timeout_s
        self._checkpoint(force=True)
        # everyone learns where its chain stands in the log: a live member sends again what
        # we never logged (`Bus.resend_after`), a restarted one goes on from there; until
        # each has, its next messages are refused for a gap (`_chain_gap`)
        for kid, name in signing.items():
            self._send_tip(kid, name, resend=True)

    def _open_gaps(self) -> list[str]:
        """Key ids whose chain has a gap in the log now (a member proven to equivocate aside:
        its chain goes on from the message the log refused, and the log holds the proof)."""
        return [k for k in self.bus.open_gaps() if k not in self.accused]

    def _chain_gap(self) -> bool:
        """Whether a sender's chain has a gap the log cannot close: its messages are refused
        for a missing predecessor (or a broken `prev`), nothing of it accepted since, for
        longer than `rejoin_timeout_s`. Meanwhile it is sent a tip (`resend`, every
        `timeout_s`): what we never received (we were restarted, or the broker was, or it
        refused one of the sender's own) it sends again, and the gap closes."""
        now = time.monotonic()
        gaps = self._open_gaps()
        for kid in [k for k in self.gap_since if k not in gaps]:
            del self.gap_since[kid]
        names = {m.key_id: m.name for m in self.roster.members
                 if m.role in ("owner", "trainer", "standby")}
        fatal = []
        for kid in gaps:
            if now - self.gap_since.setdefault(kid, now) > self.cfg.bus.rejoin_timeout_s:
                fatal.append(names.get(kid, kid))
            elif now - self.tipped.get(kid, 0.0) < self.cfg.bus.timeout_s:
                continue
            elif kid in names:
                self._send_tip(kid, names[kid], resend=True)
        if fatal:
            self.log.error("chain gap", senders=fatal, error=(
                f"the chains of {', '.join(fatal)} have had a gap for "
                f"{self.cfg.bus.rejoin_timeout_s:.0f} s (rejoin_timeout_s): what was lost "
                f"before reaching the log was not sent again"))
        return bool(fatal)

    def _tips(self) -> None:
        """Each trainer or the owner, suspected now (silent past timeout_s, not gone), is told
        every timeout_s where its chain stands in the log: a process of it restarted after a
        crash (or in a resumed run) continues from there (`ChainTip`)."""
        now, bus = time.monotonic(), self.bus
        roles = {m.key_id: m.role for m in self.roster.members
                 if m.role in ("trainer", "owner", "standby")}
        for kid in list(bus.suspected):
            name = bus.watched.get(kid)
            if kid not in roles or name is None or name in self.gone or \
                    now - self.tipped.get(kid, 0.0) < self.cfg.bus.timeout_s:
                continue
            self._send_tip(kid, name)

    def _send_tip(self, kid: str, name: str, resend: bool = False) -> None:
        """Tell `name` where its chain stands in the log (and, a trainer with watermarks on,
        its watermark chain: `chain.resume`); `resend`: the log misses what it sent after."""
        self.tipped[kid] = time.monotonic()
        seq, prev = self.chains.get(kid, (0, bytes(32)))
        marks = None
        if self.roster.meta.get("watermark") and name in self.registry.stages:
            marks = self.registry.marks_of(self.registry.stages.index(name) + 1)
        if resend:  # it answers with what it accepted meanwhile (`Bus.refill`): that many
            others = sum(m.role in SIGNING for m in self.roster.members) - 1
            per_tip = -(-KEEP_WITNESSED * others // MAX_WITNESSED)
            self.witness_docs[kid] = min(self.witness_docs.get(kid, 0) + per_tip, 2 * per_tip)
        self.bus.send_doc("tip", name, ChainTip(name, seq, prev, marks, resend).to_doc())
        self.log.info("chain tip sent", member=name, seq=seq)

    def _handed_over(self, env: Envelope) -> None:
        """The owner's `handover`: the register takes the standby for the gone trainer."""
        if env.header.sender != self.roster.owner.key_id:
            return
        try:
            h = Handover.parse(env.document(), sender=self.roster.owner.name)
            self.registry.hand_over(h.stage, h.round, h.replaced, h.by)
        except (ClicooperError, ValueError) as exc:
            self.log.warning("handover refused", error=str(exc))
            print(f"notary: refused a handover: {exc}", flush=True)
            return
        self.log.warning("stage handed over", stage=h.stage, replaced=h.replaced, by=h.by)
