"""Identities: C2SP key ids, key files and their permissions, the roster."""

from __future__ import annotations

import os
import stat

import pytest

from clicooper_bus.errors import KeyFileError, RosterError
from clicooper_bus.net.identity import (
    Identity,
    PublicIdentity,
    key_id,
    key_paths,
    load_identity,
    load_public,
    write_identity,
)
from clicooper_bus.net.roster import Roster
from clicooper_bus.tools.cli import main

GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"


def test_key_id_matches_signed_note_vector():
    pub = PublicIdentity.from_vkey(GO_VKEY)
    assert pub.key_id == "c74f20a3"
    assert key_id(pub.name, pub.public_key).hex() == "c74f20a3"
    assert pub.vkey == GO_VKEY


def test_vkey_with_wrong_key_id_is_refused():
    with pytest.raises(KeyFileError, match="key id"):
        PublicIdentity.from_vkey(GO_VKEY.replace("c74f20a3", "c74f20a4"))


def test_keys_new_writes_private_0600_and_loads(tmp_path, capsys):
    assert main(["keys", "new", "trainer-7", "--dir", str(tmp_path)]) == 0
    priv, pub = key_paths(tmp_path, "trainer-7")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    ident = load_identity(priv)
    assert load_public(pub) == ident.public
    assert ident.key_id in capsys.readouterr().out
    sig = ident.sign(b"message")
    assert ident.public.verify(b"message", sig)
    assert not ident.public.verify(b"messagf", sig)


def test_keys_new_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keys", "new", "a", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "a.key").read_bytes()
    assert main(["keys", "new", "a", "--dir", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "a.key").read_bytes() == before


def test_private_key_readable_by_others_is_refused(tmp_path):
    ident = Identity.generate("owner")
    write_identity(ident, tmp_path)
    priv, _ = key_paths(tmp_path, "owner")
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(priv, mode)
        with pytest.raises(KeyFileError, match="chmod 600"):
            load_identity(priv)
    os.chmod(priv, 0o400)
    assert load_identity(priv).key_id == ident.key_id


def test_missing_and_malformed_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        load_identity(tmp_path / "nobody.key")
    bad = tmp_path / "bad.key"
    bad.write_text("PRIVATE+KEY+x+00000000+!!!\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_identity(bad)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "x" * 65, "-lead", "é"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError):
        Identity.generate(name)


def test_roster_round_trip_and_pinning(ids, roster):
    data = roster.sign(ids["owner"])
    opened = Roster.open(data, owner=ids["owner"].public)
    assert opened == roster
    assert opened.stages == ("trainer-1", "trainer-2")
    assert opened.by_key_id(ids["notary"].key_id).role == "notary"
    with pytest.raises(RosterError, match="not the expected owner"):
        Roster.open(data, owner=ids["trainer-1"].public)


def test_roster_signed_by_non_owner_is_refused(ids, roster):
    with pytest.raises(RosterError, match="not this roster's owner"):
        roster.sign(ids["trainer-1"])
    # forge: a container whose signature was made by another key
    from clicooper_bus.net import signed_doc
    forged = signed_doc.seal(ids["trainer-1"], "clicooper/roster/v1", roster.to_doc())
    with pytest.raises(RosterError, match="not signed by its owner"):
        Roster.open(forged)


def test_roster_any_bit_flip_is_refused(ids, roster):
    data = roster.sign(ids["owner"])
    for pos in range(0, len(data) * 8, 7):
        flipped = bytearray(data)
        flipped[pos // 8] ^= 1 << (pos % 8)
        try:
            opened = Roster.open(bytes(flipped), owner=ids["owner"].public)
        except RosterError:
            continue
        pytest.fail(f"bit {pos} flipped and the roster still opened: {opened}")


def test_roster_rules(ids):
    o, t = ids["owner"].public, ids["trainer-1"].public
    with pytest.raises(RosterError, match="twice"):
        Roster.build("r", owner=o, trainers=[t, t])
    with pytest.raises(RosterError, match="run id"):
        Roster.build("bad run", owner=o, trainers=[t])
    from clicooper_bus.net.roster import Member
    with pytest.raises(RosterError, match="exactly one owner"):
        Roster("r", (Member("trainer", t),), ("trainer-1",))
    with pytest.raises(RosterError, match="every trainer"):
        Roster("r", (Member("owner", o), Member("trainer", t)), ())
