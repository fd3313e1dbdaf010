"""Stopping `clicooper run`: SIGTERM or SIGHUP to it alone stops every process of the run, marks
the run directory INTERRUPTED and exits 128 + the signal; Ctrl-C prints one line and exits 130;
the interrupted id is refused until --force; --set overrides typed keys; a bad dataset leaves
no run directory."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.layout import RunLayout
from clicooper_bus.tools.run import check_run_dir, parse_sets
from tests.busrun import write_config


def _command_lines() -> dict[str, str]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[p.name] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:  # gone meanwhile
                pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_clicooper_run_stops_every_process_of_the_run(tmp_path, sig, capsys):
    """`clicooper run` starts each process in its own session; SIGTERM or SIGHUP to it alone
    must still stop them all (none left 5 s later), say so in one line, exit 128 + the signal,
    and mark the run directory, whose id is then refused until --force."""
    path = write_config(tmp_path, run_id="term", trainers=2, run={"epochs": 50})
    cfg = load_config(path)
    proc = subprocess.Popen([sys.executable, "-m", "clicooper_bus.tools.cli", "run", "--config",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    out = cfg.run_dir / "telemetry" / "owner.out"
    while not (out.exists() and "trainers joined" in out.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, (proc.returncode, err[-500:])
    assert err.strip().splitlines() == [f"clicooper run: stopped by {name}: every process of the "
                                        f"run was stopped; what the notary logged so far is in "
                                        f"the run directory; marked INTERRUPTED (--resume "
                                        f"RUN_DIR takes it up again, --force starts over)"], \
        err[-800:]
    gone_by = time.monotonic() + 5
    while (left := [pid for pid, cmd in _command_lines().items() if str(cfg.run_dir) in cmd]):
        assert time.monotonic() < gone_by, f"orphaned processes: {left}"
        time.sleep(0.2)
    marker = json.loads(RunLayout(cfg.run_dir).interrupted.read_text())
    assert marker["signal"] == name
    from clicooper_bus.tools.cli import main

    assert main(["run", "--config", str(path)]) == 1
    said = capsys.readouterr().err
    assert f"run term was interrupted by {name}" in said and "--force" in said, said
    assert f"clicooper run --resume {cfg.run_dir}" in said
    check_run_dir(cfg.run_dir, force=True)  # what --force does before anything starts
    assert not cfg.run_dir.exists()


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    """SIGINT raises RunStopped like the other signals (the handler `launch` installs); the
    command prints one line, no traceback, and exits 130."""
    import clicooper_bus.tools.run as tr
    from clicooper_bus.tools.cli import main
    from clicooper_bus.tools.launch import RunStopped, _stop_on_signal

    with pytest.raises(RunStopped) as info:
        _stop_on_signal(signal.SIGINT, None)
    assert info.value.code == 130

    def interrupted(*args, **kwargs):
        raise info.value

    monkeypatch.setattr(tr, "run", interrupted)
    assert main(["run"]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "stopped by SIGINT" in err, err

    def ctrl_c(*args, **kwargs):  # before the processes start: the plain KeyboardInterrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "run", ctrl_c)
    assert main(["run"]) == 130
    assert capsys.readouterr().err == "clicooper: interrupted\n"


def test_set_overrides_are_typed_and_errors_name_the_key(tmp_path, capsys):
    assert parse_sets(["run.epochs=3", "run.lr=0.05", "data.name=synthetic",
                       'participants.trainers=["a", "b"]']) == {
        "run": {"epochs": 3, "lr": 0.05}, "data": {"name": "synthetic"},
        "participants": {"trainers": ["a", "b"]}}
    for item, said in [("run.epochs=many", "--set run.epochs=many: "),
                       ("run.epoch=3", "unknown key [run] epoch"),
                       ("epochs=3", "write SECTION.KEY=VALUE"),
                       ("run.epochs", "write SECTION.KEY=VALUE")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            parse_sets([item])
    from clicooper_bus.tools.cli import main

    path = write_config(tmp_path, run_id="set", trainers=1)
    assert main(["run", "--config", str(path), "--set", "run.epochs=-1"]) == 1
    assert "--set run.epochs=-1: " in capsys.readouterr().err
    assert not load_config(path).run_dir.exists()


def test_a_bad_dataset_leaves_no_run_directory(tmp_path, capsys):
    """The dataset is checked before any key, directory or process exists."""
    from clicooper_bus.tools.cli import main

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((8, 4, 4), np.float32), y_train=np.zeros(8, np.int64))
    path = write_config(tmp_path, run_id="bad-data", trainers=1,
                        data={"name": "npz", "path": str(bad)})
    assert main(["run", "--config", str(path)]) == 1
    assert "x_train" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "keys").exists()


def test_a_config_that_names_the_auditor_starts_it_and_names_the_observers_it_does_not(
        tmp_path, monkeypatch, capsys):
    """configs/demo.toml lists `auditor` as an observer (for the Procfile); `clicooper run
    --config configs/demo.toml` without --audit used to start no auditor, and the owner waited
    for it until the join timeout. Now it starts the following auditor; an observer it does
    not start is named, with how long the owner waits for it."""
    from clicooper_bus.tools import run as run_tool
    from clicooper_bus.tools.launch import _commands

    path = write_config(tmp_path, run_id="watched", trainers=1,
                        participants={"observers": ["auditor", "watcher"]})
    launched = {}

    class Launched(Exception):
        pass

    def fake_launch(cfg, config_path, **kw):
        launched.update(kw, names=[n for n, _ in _commands(cfg, config_path, kw["audit"])])
        raise Launched

    monkeypatch.setattr(run_tool, "launch", fake_launch)
    with pytest.raises(Launched):
        run_tool.run(str(path))
    assert launched["audit"] is True and "auditor" in launched["names"]
    assert "watcher" not in launched["names"]
    out = capsys.readouterr().out
    assert "not starting observer(s) watcher: the owner waits up to" in out


def test_force_deletes_only_a_run_directory(tmp_path):
    """--out and --run-id can point at any directory: --force must not delete one that
    `clicooper run` did not make (a reviewer's `--run-id Documents --force` removed a thesis)."""
    from clicooper_bus.errors import ClicooperError

    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.toml").write_text("[run]\n")  # even with a config.toml of its own
    with pytest.raises(ClicooperError, match="does not look like a run directory"):
        check_run_dir(mine, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    run = tmp_path / "run"
    layout = RunLayout(run)
    layout.telemetry.mkdir(parents=True)
    layout.config.write_text("[run]\n")
    check_run_dir(run, force=True)
    assert not run.exists()


def test_how_a_run_settles_from_its_processes_exit_codes():
    """`tools.launch.settle`, the launcher's decision each poll: a failure is 1 naming whom; all
    done is 0, or 3 when the owner or the notary stopped the run; processes still running
    after the run was stopped are gone peers once GONE_GRACE_S has passed (a deaf owner the
    notary proved to equivocate among them), unless a following auditor is still at work."""
    from clicooper_bus.tools.launch import AUDITOR, GONE_GRACE_S, settle, stopping

    up = {"broker": None, "notary": None, "owner": None, "trainer-1": None}
    assert settle(up, None) is None
    assert settle({**up, "trainer-1": -9}, None) == (1, "", ["trainer-1"])
    assert settle({**up, "broker": 1}, None) == (1, "", ["broker"])
    assert settle({**up, "notary": 0, "owner": 0, "trainer-1": 0}, None) == (0, "", [])
    assert settle({**up, "notary": 0, "owner": 3, "trainer-1": 3}, None)[0] == 3
    deaf = {**up, "notary": 3, "trainer-1": 3}  # the owner proven to equivocate runs on
    assert stopping(deaf) and not stopping({**up, "trainer-1": 3})
    assert settle(deaf, ended=100.0, now=100.0 + GONE_GRACE_S / 2) is None
    code, why, names = settle(deaf, ended=100.0, now=101.0 + GONE_GRACE_S)
    assert (code, names) == (3, []) and why.startswith("owner still running")
    assert settle({**deaf, AUDITOR: None}, ended=100.0, now=101.0 + GONE_GRACE_S) is None
    assert settle({**deaf, "owner": 1}, ended=100.0, now=100.0)[0] == 3  # it failed its own way


def test_a_broker_port_taken_before_the_broker_bound_it_starts_the_run_again(tmp_path,
                                                                             monkeypatch):
    """`free_port` checks a port is free, but another process may take it before the broker
    binds it (a sweep beside a test suite lost a 6-epoch run so): the run starts again on other
    ports, saying why, and completes; the failed attempt's directory is replaced."""
    import socket

    from clicooper_bus.tools import run as run_tool

    path = write_config(tmp_path, run_id="port-race", trainers=1, run={"max_steps": 4})
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = run_tool.free_port
    monkeypatch.setattr(run_tool, "free_port", lambda: next(ports, None) or real())
    try:
        assert run_tool.run(str(path), echo=False, timeout_s=120) == 0
    finally:
        taken.close()
    cfg = load_config(path)
    summary = json.loads(RunLayout(cfg.run_dir).summary.read_text())
    assert summary["steps"] == 4
    assert not run_tool.lost_port_race(cfg)  # the telemetry is the second attempt's
