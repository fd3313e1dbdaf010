"""The roster: who takes part in a run, with which key and role, and in which stage order.

The owner signs it; every other process trusts a message only if its sender's key id is in a
roster signed by the owner key it was given. The roster is self-contained (it carries the
public keys), so a log and its roster can be verified anywhere; pin the owner's key with
`owner=` to make that verification mean something.

Each roster carries a fresh random run `nonce`. Every message header of the run commits to it,
and receivers refuse a message with another nonce (`WrongRun`): a message captured in an
earlier run with the same id and keys is not accepted in this one.

A `standby` member holds no stage: in roster order, each is ready to take over the stage of a
trainer gone for good, when the owner hands it over (a signed, logged `handover`, which is the
roster's amendment: from then on that stage is the standby's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clicooper_bus.errors import DecodeError, KeyFileError, RosterError
from clicooper_bus.net import signed_doc
from clicooper_bus.net.identity import Identity, PublicIdentity, check_name
from clicooper_bus.net.wire import NONCE_LEN

DOC_TYPE = "clicooper/roster/v1"
ROLES = ("owner", "trainer", "notary", "auditor", "standby")


@dataclass(frozen=True)
class Member:
    role: str
    identity: PublicIdentity

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def key_id(self) -> str:
        return self.identity.key_id


@dataclass(frozen=True)
class Roster:
    """Run id, members, the trainers' stage order, and free-form string metadata (model spec
    hash, config hash, log origin...)."""

    run_id: str
    members: tuple[Member, ...]
    stages: tuple[str, ...] = ()
    created_ns: int = 0
    meta: Mapping[str, str] = field(default_factory=dict)
    nonce: bytes = bytes(NONCE_LEN)  # the run's fresh random nonce: every header commits to it

    def __post_init__(self) -> None:
        try:
            check_name(self.run_id, "run id")
        except ValueError as exc:
            raise RosterError(str(exc)) from None
        names, kids = set(), set()
        for m in self.members:
            if m.role not in ROLES:
                raise RosterError(f"member '{m.name}' has role {m.role!r}; roles are {ROLES}")
            if m.name in names:
                raise RosterError(f"member name '{m.name}' appears twice")
            if m.key_id in kids:
                raise RosterError(f"key id {m.key_id} appears twice (member '{m.name}')")
            names.add(m.name)
            kids.add(m.key_id)
        owners = [m for m in self.members if m.role == "owner"]
        if len(owners) != 1:
            raise RosterError(f"a roster needs exactly one owner, found {len(owners)}")
        if sum(m.role == "notary" for m in self.members) > 1:
            raise RosterError("a roster has at most one notary")
        trainers = [m.name for m in self.members if m.role == "trainer"]
        if sorted(self.stages) != sorted(trainers) or len(set(self.stages)) != len(self.stages):
            raise RosterError(f"stages {list(self.stages)} must list every trainer "
                              f"{trainers} exactly once")
        if not all(type(k) is str and type(v) is str for k, v in self.meta.items()):
            raise RosterError("roster metadata must map strings to strings")
        if type(self.nonce) is not bytes or len(self.nonce) != NONCE_LEN:
            raise RosterError(f"the run nonce must be {NONCE_LEN} bytes")

    @classmethod
    def build(cls, run_id: str, *, owner: PublicIdentity, trainers: Iterable[PublicIdentity],
              notary: PublicIdentity | None = None, auditors: Iterable[PublicIdentity] = (),
              meta: Mapping[str, str] | None = None,
              standby: Iterable[PublicIdentity] = ()) -> Roster:
        """A roster whose stage order is the order of `trainers`, with a fresh run nonce."""
        trainers = list(trainers)
        members = [Member("owner", owner)] + [Member("trainer", t) for t in trainers]
        if notary is not None:
            members.append(Member("notary", notary))
        members += [Member("auditor", a) for a in auditors]
        members += [Member("standby", s) for s in standby]
        return cls(run_id, tuple(members), tuple(t.name for t in trainers), time.time_ns(),
                   dict(meta or {}), os.urandom(NONCE_LEN))

    @property
    def owner(self) -> Member:
        return next(m for m in self.members if m.role == "owner")

    @property
    def standby(self) -> tuple[str, ...]:
        """The standby members' names, in roster order (the order of takeover)."""
        return tuple(m.name for m in self.members if m.role == "standby")

    @property
    def notary(self) -> Member | None:
        return next((m for m in self.members if m.role == "notary"), None)

    def by_key_id(self, kid: str) -> Member | None:
        return next((m for m in self.members if m.key_id == kid), None)

    def by_name(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def keys(self) -> dict[str, PublicIdentity]:
        """Key id -> public key, what a `Verifier` needs."""
        return {m.key_id: m.identity for m in self.members}

    def to_doc(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "created_ns": self.created_ns,
            "members": [{"role": m.role, "key": m.identity.vkey} for m in self.members],
            "stages": list(self.stages),
            "meta": dict(self.meta),
            "nonce": self.nonce,
        }

    @classmethod
    def from_doc(cls, doc: Any) -> Roster:
        try:
            if type(doc) is not dict or set(doc) != {"run_id", "created_ns", "members", "stages",
                                                      "meta", "nonce"}:
                raise RosterError("roster document has the wrong fields")
            if type(doc["members"]) is not list or type(doc["stages"]) is not list or \
                    type(doc["meta"]) is not dict or type(doc["created_ns"]) is not int:
                raise RosterError("roster fields have the wrong types")
            members = []
            for m in doc["members"]:
                if type(m) is not dict or type(m.get("role")) is not str \
                        or type(m.get("key")) is not str:
                    raise RosterError("a roster member is not {role: str, key: str}")
                members.append(Member(m["role"], PublicIdentity.from_vkey(m["key"])))
            if not all(type(s) is str for s in doc["stages"]):
                raise RosterError("roster stages must be names")
            return cls(doc["run_id"], tuple(members), tuple(doc["stages"]), doc["created_ns"],
                       dict(doc["meta"]), doc["nonce"])
        except (KeyError, TypeError, ValueError, AttributeError, KeyFileError) as exc:
            raise RosterError(f"malformed roster: {exc}") from None

    def sign(self, owner: Identity) -> bytes:
        """The signed roster bytes. Only the roster's own owner may sign it."""
        if owner.public != self.owner.identity:
            raise RosterError(f"'{owner.name}' is not this roster's owner '{self.owner.name}'")
        return signed_doc.seal(owner, DOC_TYPE, self.to_doc())

    @classmethod
    def open(cls, data: bytes, *, owner: PublicIdentity | None = None) -> Roster:
        """Parse signed roster bytes and check the owner's signature (and key, if pinned)."""
        try:
            unverified = signed_doc.parse(data, DOC_TYPE)
            roster = cls.from_doc(unverified.document())
        except DecodeError as exc:
            raise RosterError(f"malformed signed roster: {exc}") from None
        if owner is not None and owner != roster.owner.identity:
            raise RosterError(f"roster owner {roster.owner.identity.vkey} is not the expected "
                              f"owner {owner.vkey}")
        if not unverified.verify(roster.owner.identity):
            raise RosterError(f"roster of run '{roster.run_id}' is not signed by its owner "
                              f"'{roster.owner.name}' ({roster.owner.key_id})")
        return roster
