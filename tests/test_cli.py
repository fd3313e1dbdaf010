"""The `clicooper` command line: keys, log verify/show/export/checkpoint/prove/repair/demo."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clicooper_bus.net.identity import load_public
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.merkle import leaf_hash, verify_consistency, verify_inclusion
from clicooper_bus.tools.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_ok_and_json(small_log, capsys):
    code, out, _ = _run(capsys, "log", "verify", str(small_log))
    assert code == 0 and out.startswith("OK: 200 entries")
    code, out, _ = _run(capsys, "log", "verify", str(small_log), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and doc["entries"] == 200 and doc["failure"] is None
    assert doc["checkpoints"] == 4 and doc["per_sender"]["owner"] == 81


def test_verify_names_the_first_failing_entry(small_log, capsys):
    with ProvenanceLog.open(small_log) as plog:
        off = plog.leaves.offsets[17]
    p = small_log / "leaves.dat"
    data = bytearray(p.read_bytes())
    data[off + 20] ^= 0x04
    p.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "log", "verify", str(small_log))
    assert code == 1 and "leaves.dat" in out and "record 17" in out and "checksum" in out
    code, out, _ = _run(capsys, "log", "verify", str(small_log), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["failure"]["index"] == 17


def test_verify_with_pinned_owner_key(small_log, capsys):
    keys = small_log.parent / "keys"
    code, out, _ = _run(capsys, "log", "verify", str(small_log), "--owner-key",
                        str(keys / "owner.pub"))
    assert code == 0 and "owner key not pinned" not in out
    code, out, _ = _run(capsys, "log", "verify", str(small_log), "--owner-key",
                        str(keys / "trainer-1.pub"))
    assert code == 1 and "not the expected owner" in out


def test_verify_with_witnessed_checkpoint(small_log, tmp_path, capsys):
    _, note, _ = _run(capsys, "log", "checkpoint", str(small_log))
    (tmp_path / "seen.txt").write_text(note)
    code, out, _ = _run(capsys, "log", "verify", str(small_log), "--checkpoint",
                        str(tmp_path / "seen.txt"))
    assert code == 0 and "witnessed" not in out


def test_show(small_log, capsys):
    code, out, _ = _run(capsys, "log", "show", str(small_log))
    assert code == 0
    assert "200 entries" in out and "owner (owner): 81" in out and "checkpoints: 4" in out
    assert "stages trainer-1 -> trainer-2" in out


def test_export_leaves(small_log, capsys):
    code, out, _ = _run(capsys, "log", "export", str(small_log), "--leaves")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 200
    with ProvenanceLog.open(small_log) as plog:
        assert all(leaf_hash(base64.b64decode(line)) == plog.leaf_hash(i)
                   for i, line in enumerate(lines))


def test_checkpoint_is_the_exact_signed_note(small_log, capsys):
    code, out, _ = _run(capsys, "log", "checkpoint", str(small_log))
    notary = load_public(small_log.parent / "keys" / "notary.pub")
    cp = open_checkpoint(out, notary, "clicooper.bus/run/demo")
    with ProvenanceLog.open(small_log) as plog:
        assert code == 0 and out == plog.latest_note() and cp.size == 200
        assert cp.root == plog.tree.root()


def test_prove_inclusion_and_consistency(small_log, capsys):
    code, out, _ = _run(capsys, "log", "prove", str(small_log), "--index", "37", "--size", "150")
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"leafIdx", "treeSize", "leafHash", "proof", "root"}
    b = base64.b64decode
    verify_inclusion(doc["leafIdx"], doc["treeSize"], b(doc["leafHash"]),
                     [b(p) for p in doc["proof"]], b(doc["root"]))
    code, out, _ = _run(capsys, "log", "prove", str(small_log), "--consistency", "50", "200")
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"size1", "size2", "root1", "root2", "proof"}
    verify_consistency(doc["size1"], doc["size2"], b(doc["root1"]), b(doc["root2"]),
                       [b(p) for p in doc["proof"]])
    code, _, err = _run(capsys, "log", "prove", str(small_log), "--index", "200")
    assert code == 1 and "index" in err


def test_repair(small_log, capsys):
    p = small_log / "leaves.dat"
    p.write_bytes(p.read_bytes() + b"\x00\x00\x01")
    code, out, _ = _run(capsys, "log", "verify", str(small_log))
    assert code == 1 and "clicooper log repair" in out
    code, out, _ = _run(capsys, "log", "repair", str(small_log))
    assert code == 0 and "cut back" in out
    code, _, _ = _run(capsys, "log", "verify", str(small_log))
    assert code == 0


def test_errors_are_clear(tmp_path, capsys):
    code, out, _ = _run(capsys, "log", "verify", str(tmp_path / "missing"))
    assert code == 1 and "not a provenance log" in out
    code, _, err = _run(capsys, "log", "show", str(tmp_path / "missing"))
    assert code == 1 and "not a provenance log" in err
    code, _, err = _run(capsys, "log", "demo", str(tmp_path / "d"), "--retention", "some")
    assert code == 1 and "retention" in err


@pytest.mark.parametrize("argv,message", [
    (["keys", "new", "bad name", "--dir", "{tmp}"], "not allowed"),
    (["keys", "show", "{tmp}/k/owner.key"], "private key"),
    (["log", "verify", "{log}", "--checkpoint", "/nonexistent"], "nonexistent"),
    (["log", "demo", "{tmp}/d2", "--shape", "32"], "BATCH,WIDTH"),
    (["log", "prove", "{log}", "--consistency", "1", "2", "--size", "5"], "--size"),
])
def test_bad_input_is_a_clean_error(small_log, tmp_path, capsys, argv, message):
    from clicooper_bus.net.identity import Identity, write_identity

    write_identity(Identity.generate("owner"), tmp_path / "k")
    argv = [a.format(tmp=tmp_path, log=small_log) for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "d2").exists()


def test_console_script_runs_without_torch(small_log):
    """The installed entry point works, and log tools never pay for importing torch."""
    code = ("import sys; from clicooper_bus.tools.cli import main; "
            "rc = main(['log', 'verify', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(small_log)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("False"), proc.stdout
    script = Path(sys.executable).parent / "clicooper"
    proc = subprocess.run([str(script), "log", "verify", str(small_log)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr


def test_every_entry_point_says_its_version(capsys):
    from clicooper_bus import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"clicooper {__version__}"
    for role in ("broker", "notary", "owner", "trainer", "auditor"):
        out = subprocess.run([sys.executable, "-m", f"clicooper_bus.services.{role}", "--version"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip().endswith(__version__), (role, out)
