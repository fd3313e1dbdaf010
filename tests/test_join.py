"""The join kit's offline parts: `keys add`, `invite`, the join file, the device's config, and
`clicooper run`'s checks for remote trainers; and the lean trainer install. The join over a
network is tests/test_two_hosts.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError, ConfigError, KeyFileError
from clicooper_bus.net.identity import Identity, load_public, write_identity
from clicooper_bus.tools.cli import main
from clicooper_bus.tools.join import Progress, device_config, join, read_join_file
from clicooper_bus.tools.launch import _commands
from clicooper_bus.tools.run import ensure_keys, prepare, run
from tests.busrun import write_config

ROOT = Path(__file__).resolve().parents[1]
AUDIT_LIBS = ("sklearn", "skimage", "matplotlib")


def _config(tmp: Path, **bus) -> Path:
    return write_config(tmp, run_id="rj", trainers=2, participants={"remote": ["edge"],
                        "trainers": ["trainer-1", "edge"]}, bus=bus)


# --- clicooper keys add -----------------------------------------------------------------------

def test_keys_add_is_idempotent_and_refuses_another_key_under_the_name(tmp_path, capsys):
    line = Identity.generate("edge").public.vkey
    assert main(["keys", "add", line, "--dir", str(tmp_path)]) == 0
    assert load_public(tmp_path / "edge.pub").vkey == line
    assert main(["keys", "add", line, "--dir", str(tmp_path)]) == 0
    assert "unchanged" in capsys.readouterr().out
    other = Identity.generate("edge").public.vkey
    assert main(["keys", "add", other, "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "already holds a different key for 'edge'" in err and "remove" in err
    assert load_public(tmp_path / "edge.pub").vkey == line  # the first key stays


@pytest.mark.parametrize("line,says", [
    ("edge", "not 'name+keyid+base64'"),
    ("edge+00000000+not-base64!", "not valid base64"),
    ("edge+00000000+AAAA", "not an Ed25519 key"),
    ("PRIVATE+KEY+edge+00000000+AAAA", "that is a private key"),
])
def test_keys_add_refuses_a_malformed_line(tmp_path, capsys, line, says):
    assert main(["keys", "add", line, "--dir", str(tmp_path)]) == 1
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_keys_add_refuses_a_line_whose_key_id_does_not_match(tmp_path, capsys):
    name, _, b64 = Identity.generate("edge").public.vkey.split("+", 2)
    assert main(["keys", "add", f"{name}+00000000+{b64}", "--dir", str(tmp_path)]) == 1
    assert "has key id 00000000" in capsys.readouterr().err


def test_keys_add_with_the_config_takes_only_its_remote_trainers(tmp_path, capsys):
    """A device cannot slip its key in under the name of a local participant or of another
    device (it would then hold two stages, or a local process would fail on its key)."""
    path = write_config(tmp_path, run_id="kr", trainers=2,
                        participants={"trainers": ["trainer-1", "edge-7"], "remote": ["edge-7"]})
    keys = Path(load_config(path).participants.keys)
    for name in ("trainer-1", "notary", "auditor", "all"):
        assert main(["keys", "add", Identity.generate(name).public.vkey, "--config",
                     str(path)]) == 1
        err = capsys.readouterr().err
        assert "not one of the config's remote trainers" in err or "'all'" in err, err
    assert not keys.exists() or not any(keys.iterdir())
    assert main(["keys", "add", Identity.generate("edge-7").public.vkey, "--config",
                 str(path)]) == 0
    assert (keys / "edge-7.pub").exists()


# --- clicooper invite -------------------------------------------------------------------------

def test_invite_writes_what_the_device_needs_and_no_owner_path(tmp_path, capsys):
    path = _config(tmp_path / "owner", pub="tcp://0.0.0.0:7101", sub="tcp://0.0.0.0:7102")
    out = tmp_path / "edge.join"
    assert main(["invite", "edge", "--config", str(path), "--out", str(out)]) == 1
    assert "--host" in capsys.readouterr().err  # a wildcard address is no address to reach
    assert main(["invite", "edge", "--config", str(path), "--out", str(out),
                 "--host", "10.1.2.3"]) == 0
    kit = read_join_file(out)
    keys = tmp_path / "owner" / "keys"
    assert (kit.run_id, kit.name, kit.notary) == ("rj", "edge", "notary")
    assert (kit.pub, kit.sub) == ("tcp://10.1.2.3:7101", "tcp://10.1.2.3:7102")
    assert kit.owner == load_public(keys / "owner.pub")
    assert kit.broker == load_public(keys / "broker.pub")
    assert kit.bus["security"] == "curve"
    assert str(tmp_path) not in out.read_text()

    device = device_config(kit, tmp_path / "device", wait_s=900)
    assert device.participants.keys == str(tmp_path / "device")
    assert device.participants.trainers == ["edge"] and device.bus.join_timeout_s == 900
    assert (device.bus.pub, device.bus.sub) == (kit.pub, kit.sub)
    assert str(tmp_path / "owner") not in device.to_toml()


def test_invite_refuses_a_trainer_that_is_not_remote(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["invite", "trainer-1", "--config", str(path), "--host", "10.1.2.3"]) == 1
    assert "'trainer-1' is not a remote trainer" in capsys.readouterr().err


def test_a_broken_join_file_is_a_named_error(tmp_path):
    path = _config(tmp_path / "owner", pub="tcp://10.1.2.3:7101", sub="tcp://10.1.2.3:7102")
    assert main(["invite", "edge", "--config", str(path), "--out", str(tmp_path / "e.join")]) == 0
    doc = (tmp_path / "e.join").read_text()
    (tmp_path / "cut.join").write_text(doc.replace("broker = ", "brocker = "))
    with pytest.raises(ConfigError, match="lacks 'broker'"):
        read_join_file(tmp_path / "cut.join")
    (tmp_path / "junk.join").write_text("not [toml")
    with pytest.raises(ConfigError, match="is not a join file"):
        read_join_file(tmp_path / "junk.join")


def test_join_refuses_another_name_and_a_changed_owner_key_before_starting(tmp_path):
    path = _config(tmp_path / "owner", pub="tcp://10.1.2.3:7101", sub="tcp://10.1.2.3:7102")
    join_file = tmp_path / "edge.join"
    assert main(["invite", "edge", "--config", str(path), "--out", str(join_file)]) == 0
    device = tmp_path / "device"
    said: list[str] = []
    with pytest.raises(ConfigError, match="invites 'edge', not 'edge-2'"):
        join(str(join_file), "edge-2", str(device), say=said.append)
    write_identity(Identity.generate("owner"), device / "other")  # another owner of that name

    (device / "owner.pub").write_text((device / "other" / "owner.pub").read_text())
    with pytest.raises(KeyFileError, match="already holds a different key for 'owner'"):
        join(str(join_file), "edge", str(device), say=said.append)
    assert (device / "edge.key").stat().st_mode & 0o777 == 0o600
    line = f"clicooper keys add {load_public(device / 'edge.pub').vkey}"
    assert line in said  # the line the owner needs comes first, whatever follows
    assert not list(device.glob("*.toml"))  # nothing started


# --- clicooper run with remote trainers -------------------------------------------------------

def test_run_refuses_a_remote_trainer_without_its_key_before_starting(tmp_path):
    path = _config(tmp_path)
    with pytest.raises(ClicooperError, match="clicooper keys add"):
        run(str(path), echo=False)
    assert not (tmp_path / "runs" / "rj").exists()


def test_run_keeps_the_addresses_and_starts_no_remote_trainer(tmp_path):
    path = _config(tmp_path, pub="tcp://10.1.2.3:7101", sub="tcp://10.1.2.3:7102")
    ensure_keys(tmp_path / "keys", ["edge"])
    cfg, cfg_path = prepare(str(path), {}, None, free_ports=True)
    assert (cfg.bus.pub, cfg.bus.sub) == ("tcp://10.1.2.3:7101", "tcp://10.1.2.3:7102")
    started = [name for name, _ in _commands(cfg, cfg_path)]
    assert "trainer-1" in started and "edge" not in started
    local = load_config(write_config(tmp_path / "local", trainers=2))
    assert prepare(str(tmp_path / "local" / "t.toml"), {}, None)[0].bus.pub != local.bus.pub


# --- the lean trainer install -----------------------------------------------------------------

# Refuses to import the auditor's libraries, as a lean install that lacks them would; a mere
# probe (`importlib.util.find_spec`, which torch makes for sklearn) finds them, loads nothing.
BLOCKER = f"""
import importlib.abc, importlib.machinery, sys
class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {AUDIT_LIBS!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError(f"the trainer's code path imported {{module.__name__}}")
sys.meta_path.insert(0, Refuse())
"""


def _imports(*modules: str) -> subprocess.CompletedProcess:
    code = BLOCKER + "".join(f"import {m}\n" for m in modules)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_trainer_imports_no_audit_library():
    ok = _imports("clicooper_bus.services.trainer.__main__", "clicooper_bus.services.trainer.stage",
                  "clicooper_bus.tools.cli", "clicooper_bus.tools.join")
    assert ok.returncode == 0, ok.stderr
    caught = _imports("clicooper_bus.audit.scoring")  # the blocker does catch one
    assert caught.returncode != 0 and "the trainer's code path imported" in caught.stderr


def test_the_trainer_extra_brings_no_audit_library():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lean = project["dependencies"] + project["optional-dependencies"]["trainer"]
    audit = project["optional-dependencies"]["audit"]
    for dist in ("scikit-learn", "scikit-image", "matplotlib"):
        assert not any(d.startswith(dist) for d in lean), dist
        assert any(d.startswith(dist) for d in audit), dist
    for dist in ("torch", "safetensors", "pyzmq", "msgpack", "pynacl", "structlog", "numpy"):
        assert any(d.startswith(dist) for d in lean), dist


# --- what the device's person reads -----------------------------------------------------------

def test_join_progress_says_what_it_waits_for_and_what_happened(tmp_path):
    path = _config(tmp_path / "owner", pub="tcp://10.1.2.3:7101", sub="tcp://10.1.2.3:7102")
    assert main(["invite", "edge", "--config", str(path), "--out", str(tmp_path / "e.join")]) == 0
    said: list[str] = []
    progress = Progress(read_join_file(tmp_path / "e.join"), tmp_path / "t.jsonl", said.append,
                        every_s=0.01)
    waiter = threading.Thread(target=progress.waiting, args=(0.0,))
    waiter.start()
    for _ in range(1000):  # the waiting notice comes until the trainer has joined
        if said:
            break
        time.sleep(0.01)
    assert "still waiting for a roster naming 'edge' signed by 'owner'" in said[0]
    assert "tcp://10.1.2.3:7102" in said[0]
    for event in ({"event": "roster does not list us", "stages": ["a"]},
                  {"event": "joined", "stage": 2}, {"event": "segment delivered"}):
        progress.line(json.dumps(event) + "\n")
    progress.line("trainer: error: something plain\n")
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    said = said[said.index(next(s for s in said if "does not list" in s)):]
    joined = said.index(next(s for s in said if "joined run" in s))
    said = [s for s in said[:joined] if "still waiting for" not in s] + said[joined:]
    assert said == ["join: a roster came that does not list 'edge' (stages ['a']); still waiting",
                    "join: joined run 'rj' as stage 2; training",
                    "join: training done; weights delivered, sealed to the owner",
                    "trainer: error: something plain"]
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 4  # kept as telemetry


def test_the_two_hosts_config_invites_its_remote_trainer(tmp_path):
    cfg = load_config(ROOT / "configs" / "two-hosts.toml", {"participants": {
        "keys": str(tmp_path / "keys")}})
    assert cfg.participants.remote == ["edge-7"] and cfg.bus.security == "curve"
    path = tmp_path / "cfg.toml"
    path.write_text(cfg.to_toml())
    assert main(["invite", "edge-7", "--config", str(path), "--host", "192.0.2.10",
                 "--out", str(tmp_path / "edge-7.join")]) == 0
    kit = read_join_file(tmp_path / "edge-7.join")
    assert (kit.pub, kit.sub) == ("tcp://192.0.2.10:5555", "tcp://192.0.2.10:5556")
