"""C2SP signed notes and tlog checkpoints."""

from __future__ import annotations

import pytest

from clicooper_bus.errors import NoteError
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.tlog.checkpoint import Checkpoint, open_checkpoint, parse_checkpoint
from clicooper_bus.tlog.note import open_note, sign_note

GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_SIG = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvq"
          "fqdngotpRZb6KE6RyyBwJnAM=\n")


def test_go_signed_note_vector_verifies():
    text, by = open_note(GO_TEXT + "\n" + GO_SIG, [PublicIdentity.from_vkey(GO_VKEY)])
    assert text == GO_TEXT and by == ["PeterNeumann"]


def test_go_vector_tampered_text_fails():
    with pytest.raises(NoteError, match="does not verify"):
        open_note(GO_TEXT.replace("answer", "Answer") + "\n" + GO_SIG,
                  [PublicIdentity.from_vkey(GO_VKEY)])


def test_sign_and_open_round_trip_and_unknown_keys():
    a, b = Identity.generate("log-a"), Identity.generate("log-b")
    note = sign_note("hello\n", a)
    assert open_note(note, [a.public, b.public]) == ("hello\n", ["log-a"])
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(note, [b.public])


@pytest.mark.parametrize("note", [
    "no blank line\n\u2014 x AAAA\n", "text\n\n", "text\n\n\u2014 x\n", "text\n\n- x AAAAAAAA\n",
    "text\n\n\u2014 x !!!!\n", "text\n\n\u2014 x AAAAAAAA",
])
def test_malformed_notes_fail(note):
    with pytest.raises(NoteError):
        open_note(note, [Identity.generate("x").public])


def test_checkpoint_round_trip():
    key = Identity.generate("notary")
    cp = Checkpoint("example.com/log", 42, bytes(range(32)), ("ext one",))
    note = cp.sign(key)
    assert note.startswith("example.com/log\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n")
    assert open_checkpoint(note, key.public, "example.com/log") == cp
    with pytest.raises(NoteError, match="origin"):
        open_checkpoint(note, key.public, "other")


@pytest.mark.parametrize("body", [
    "o\n01\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    "o\n-1\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    "o\n1\nAAEC\n",
    "\n1\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    "o\n1\n",
])
def test_malformed_checkpoints(body):
    with pytest.raises(NoteError):
        parse_checkpoint(body)
