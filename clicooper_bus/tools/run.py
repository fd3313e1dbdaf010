"""`clicooper run`: start a whole run on this machine and wait for it.

Makes the missing keys, picks two free ports for the broker (so runs never collide; not with
remote trainers, which reach the config's addresses), writes the
effective config to `<out>/<id>/config.toml`, starts broker, notary, owner and trainers as
separate processes (telemetry of each in `<out>/<id>/telemetry/<name>.jsonl`, the owner's
progress on the console), and waits. If any process fails, the others are stopped and the
failing one's last lines are shown. On success it verifies the log against the owner's key and
the final checkpoint the owner saw, and prints the summary. With `--audit` an auditor follows
the run (`clicooper_bus.services.auditor --follow`) and its report ends up in `<out>/<id>/audit/`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout, write_atomic
from clicooper_bus.ml.npz_check import CheckedNpz, check_npz
from clicooper_bus.net.identity import Identity, key_paths, write_identity
from clicooper_bus.tlog.logverify import verify_log

QUICK = {"run": {"epochs": 1}, "data": {"train_limit": 6000, "test_limit": 2000}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_keys(directory: Path, names: list[str]) -> list[str]:
    """Create the identities that do not exist yet; returns the names created."""
    made = []
    for name in names:
        priv, pub = key_paths(directory, name)
        if not pub.exists():
            write_identity(Identity.generate(name), directory)
            made.append(name)
    return made


def check_remote_keys(cfg: RunConfig) -> None:
    """Raise ClicooperError naming every remote trainer whose public key is not in the keys
    directory yet (the broker could not admit it, the roster could not list it)."""
    keys = Path(cfg.participants.keys)
    missing = [t for t in cfg.participants.remote if not key_paths(keys, t)[1].exists()]
    if missing:
        raise ClicooperError(
            f"no public key for remote trainer(s) {', '.join(missing)} in {keys}: on each device "
            f"run `clicooper join JOIN_FILE --name NAME` (the join file from `clicooper invite "
            f"NAME --config ...`), then here run `clicooper keys add` with the line "
            f"`clicooper join` printed")


def remote_notice(cfg: RunConfig) -> str:
    """What `clicooper run` says about the trainers it does not start."""
    b = cfg.bus
    return (f"clicooper run: not starting remote trainer(s) {', '.join(cfg.participants.remote)}"
            f": the owner waits up to {b.join_timeout_s:.0f} s for them to join run "
            f"'{cfg.run.id}' through the broker at {b.pub} (publish) and {b.sub} (subscribe); on "
            f"each device: clicooper join NAME.join --name NAME")


def check_model(cfg: RunConfig, checked: CheckedNpz | None = None) -> None:
    """Resolve the config's model on its dataset's shape and classes and check its cuts, as the
    owner will (`ml.models.configured_split`), so that a bad layer, shape or cut is an error
    before any key, directory or process exists. `checked`: the npz already checked (data name
    npz). Raises ConfigError naming the layer and the shapes."""
    from clicooper_bus.ml.models import configured_split

    if checked is not None:
        shape, classes = tuple(checked.x_train.shape[1:]), checked.classes
    else:
        from clicooper_bus.ml.data import load_dataset

        data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed)
        shape, classes = data.input_shape, data.classes
    configured_split(cfg, shape, classes)


def prepare(config: str | None, overrides: dict, out: str | None,
            free_ports: bool = True) -> tuple[RunConfig, Path]:
    """Load the effective config, make the missing keys and the run directory, and write the
    config into it. Returns (config, path of RUN_DIR/config.toml). Raises ClicooperError if
    the run directory exists and is not empty, ConfigError for a bad config or model spec
    (`check_model`; DataError for a bad npz dataset, whose warnings are printed on stderr)."""
    over = {k: dict(v) for k, v in overrides.items()}
    if out:
        over.setdefault("run", {})["out_dir"] = out
    if free_ports and not load_config(config, over).participants.remote:
        # remote trainers must reach the config's addresses, which their join file names
        over.setdefault("bus", {}).update({"pub": f"tcp://127.0.0.1:{free_port()}",
                                           "sub": f"tcp://127.0.0.1:{free_port()}"})
    cfg = load_config(config, over)
    checked = None
    if cfg.data.name == "npz":  # the whole file, before any key, directory or process
        checked = check_npz(cfg.data.path, train_limit=cfg.data.train_limit,
                            test_limit=cfg.data.test_limit)
        for warning in checked.warnings:
            print(f"clicooper run: warning: {cfg.data.path}: {warning}", file=sys.stderr)
    check_model(cfg, checked)
    p = cfg.participants
    check_remote_keys(cfg)
    local = [t for t in p.trainers if t not in p.remote]  # a remote one brings its own key
    ensure_keys(Path(p.keys), [p.owner, p.notary, p.broker, *local, *p.observers])
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ClicooperError(f"{run_dir} already exists and is not empty: choose another run id "
                             f"(--run-id) or output directory (--out), or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(run_dir).config
    write_atomic(path, cfg.to_toml())
    return cfg, path


def _commands(cfg: RunConfig, config_path: Path, audit: bool | str = False
              ) -> list[tuple[str, list[str]]]:
    """The processes of a run; `audit` adds a following auditor (a string: its --attacks)."""
    py, c = sys.executable, ["--config", str(config_path)]
    cmds = [("broker", [py, "-m", "clicooper_bus.services.broker", *c])]
    if audit:  # first, so that it is watching before the run can end
        names = ["--attacks", audit] if isinstance(audit, str) else []
        cmds.append(("auditor", [py, "-m", "clicooper_bus.services.auditor", "--follow", *c, *names]))
    cmds += [("notary", [py, "-m", "clicooper_bus.services.notary", *c]),
             ("owner", [py, "-m", "clicooper_bus.services.owner", *c])]
    cmds += [(t, [py, "-m", "clicooper_bus.services.trainer", *c, "--name", t])
             for t in cfg.participants.trainers if t not in cfg.participants.remote]
    return cmds


class RunStopped(ClicooperError):
    """`clicooper run` was told to stop (SIGTERM); it stopped every process of the run."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise RunStopped(f"stopped by {signal.Signals(signum).name}: every process of the run was "
                     f"stopped; what the notary logged so far is in the run directory")


def launch(cfg: RunConfig, config_path: Path, *, echo: bool = True,
           timeout_s: float | None = None, audit: bool | str = False) -> int:
    """Run every process; returns 0 if all succeeded. Raises RunStopped on SIGTERM, after
    stopping them (each runs in its own session, so a signal to us alone would orphan them)."""
    tel = RunLayout(cfg.run_dir).telemetry
    tel.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        for name, cmd in _commands(cfg, config_path, audit):
            procs[name] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE if name == "owner" else open(tel / f"{name}.out", "w"),
                stderr=open(tel / f"{name}.jsonl", "w"), env=env, text=True,
                start_new_session=True)
            if name == "broker":
                time.sleep(0.3)
                if procs[name].poll() is not None:
                    break
        owner_out = open(tel / "owner.out", "w")

        def pump():
            for line in procs["owner"].stdout:
                owner_out.write(line)
                owner_out.flush()
                if echo:
                    print(line, end="", flush=True)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout_s if timeout_s else None
        workers = [n for n in procs if n != "broker"]
        while True:
            codes = {n: procs[n].poll() for n in procs}
            failed = [n for n, c in codes.items() if c not in (None, 0)]
            if failed or procs["broker"].poll() is not None and codes["broker"] != 0:
                _report(failed or ["broker"], tel)
                return 1
            if all(codes[n] == 0 for n in workers):
                return 0
            if deadline and time.monotonic() > deadline:
                print(f"clicooper run: timed out after {timeout_s:.0f} s", file=sys.stderr)
                _report([n for n in workers if codes[n] is None], tel)
                return 1
            time.sleep(0.2)
    finally:
        if previous is not None:  # a second SIGTERM must not cut the cleanup short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _report(names: list[str], tel: Path) -> None:
    for name in names:
        print(f"clicooper run: process '{name}' failed; last lines of {tel / (name + '.jsonl')}:",
              file=sys.stderr)
        try:
            lines = (tel / f"{name}.jsonl").read_text().splitlines()[-8:]
        except OSError:
            lines = []
        for line in lines:
            print(f"  {line}", file=sys.stderr)


def fresh_run_id(prefix: str) -> str:
    """`PREFIX-YYYYmmdd-HHMMSS-xxxx`: a new id each call (the time, and 16 random bits)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def run(config: str | None, *, quick: bool = False, out: str | None = None,
        run_id: str | None = None, echo: bool = True, timeout_s: float | None = None,
        free_ports: bool = True, audit: bool | str = False,
        overrides: dict | None = None) -> int:
    """`overrides` ({section: {key: value}}) apply on top of the config file."""
    base = {k: dict(v) for k, v in (overrides or {}).items()}
    for k, v in (QUICK.items() if quick else ()):
        base.setdefault(k, {}).update(v)
    overrides = base
    if quick and not run_id and not load_config(config, overrides).participants.remote:
        run_id = fresh_run_id("quick")  # a quick run never reuses an earlier one's id
    if run_id:
        overrides.setdefault("run", {})["id"] = run_id
    if audit:
        observers = load_config(config, overrides).participants.observers
        overrides.setdefault("participants", {})["observers"] = sorted({*observers, "auditor"})
    cfg, path = prepare(config, overrides, out, free_ports)
    if cfg.participants.remote:
        print(remote_notice(cfg), flush=True)
    t0 = time.perf_counter()
    code = launch(cfg, path, echo=echo, timeout_s=timeout_s, audit=audit)
    if code != 0:
        return code
    owner_key = Path(cfg.participants.keys) / f"{cfg.participants.owner}.pub"
    from clicooper_bus.net.identity import load_public

    layout = RunLayout(cfg.run_dir)
    result = verify_log(layout.log, owner=load_public(owner_key),
                        witnessed=[layout.checkpoint.read_text()])
    summary = json.loads(layout.summary.read_text())
    print(f"run {cfg.run.id}: test accuracy {summary['test_accuracy']:.4f} after "
          f"{summary['epochs']} epoch(s); {time.perf_counter() - t0:.1f} s")
    if result.ok:
        print(f"log verified: {result.entries} entries, {result.checkpoints} checkpoints "
              f"({layout.log})")
        if audit:
            from clicooper_bus.audit.report import print_audit

            report = json.loads(layout.audit_report.read_text())
            print_audit(not report.get("refused"), layout.audit, report)
        return 0
    print(f"log verification FAILED: {result.failure}", file=sys.stderr)
    return 1
