"""`clicooper run`: start a whole run on this machine and wait for it.

Makes the missing keys, picks two free ports for the broker (so runs never collide; not with
remote trainers, which reach the config's addresses), writes the
effective config to `<out>/<id>/config.toml`, starts broker, notary, owner and trainers as
separate processes (telemetry of each in `<out>/<id>/telemetry/<name>.jsonl`, the owner's
progress on the console), and waits. If any process fails, the others are stopped and the
failing one's last lines are shown. On success it verifies the log against the owner's key and
the final checkpoint the owner saw, and prints the summary. With `--audit` an auditor follows
the run (`clicooper_bus.services.auditor --follow`) and its report ends up in `<out>/<id>/audit/`.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop every process of the run, mark the run directory
(`INTERRUPTED`, see `RunLayout.interrupted`) and exit 128 + the signal's number (130, 143, 129).
A run that a participant stopped on a refusal (poisoned input) exits 3, its `summary.json`
saying why under `stopped`. Exit codes: `EXIT_CODES`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import tomllib
from pathlib import Path

from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError, ConfigError
from clicooper_bus.layout import RunLayout, write_atomic
from clicooper_bus.ml.npz_check import CheckedNpz, check_npz
from clicooper_bus.net.identity import Identity, key_paths, write_identity
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.launch import (
    AUDITOR,
    EXIT_STOPPED,
    RunStopped,
    launch,
    mark_interrupted,
)

QUICK = {"run": {"epochs": 1}, "data": {"train_limit": 6000, "test_limit": 2000}}
# `clicooper run`'s exit codes (its --help epilog and README "Exit codes" print this table)
EXIT_CODES = (
    (0, "the run completed and its log verified"),
    (1, "a process failed, the log did not verify, or the input (config, dataset, model spec, "
        "--set) was refused before anything started"),
    (2, "a usage error (an unknown flag or a missing argument)"),
    (EXIT_STOPPED, "a participant refused poisoned input (a NaN, infinite, mistyped or misshapen "
                   "tensor, loss or weight) or a member proven to equivocate, or a peer was "
                   "silent past [bus] rejoin_timeout_s: the run stopped cleanly; summary.json "
                   "says why under 'stopped' (who sent what, or who is gone), no model was "
                   "saved; the log verifies (an owner proven to equivocate is stopped by the "
                   "notary, and writes no summary if it ignores the proof)"),
    (128 + signal.SIGHUP, "stopped by SIGHUP; RUN_DIR/INTERRUPTED marks the run"),
    (128 + signal.SIGINT, "stopped by SIGINT (Ctrl-C); RUN_DIR/INTERRUPTED marks the run"),
    (128 + signal.SIGTERM, "stopped by SIGTERM; RUN_DIR/INTERRUPTED marks the run"),
)


def parse_sets(items: list[str], config: str | None = None) -> dict[str, dict]:
    """`--set section.key=value` overrides as {section: {key: value}}. The value is read as TOML
    (`3`, `0.1`, `true`, `"text"`, `[1, 2]`), else taken as a bare string (`data.name=mnist`),
    then typed by the config's field for that key. Raises ConfigError naming the `--set` item
    and, for a bad key or value, what the config expects."""
    over: dict[str, dict] = {}
    for item in items:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not section or not name:
            raise ConfigError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set run.epochs=3")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word: a string
        one = {section: {name: value}}
        try:
            load_config(config, one)  # each alone, so that an error names its own item
        except ConfigError as exc:
            raise ConfigError(f"--set {item}: {exc}") from None
        over.setdefault(section, {})[name] = value
    return over


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


PORT_TRIES = 3  # runs started on freshly chosen ports when another process took the broker's


def free_port() -> int:
    """A loopback TCP port free now, chosen below the kernel's ephemeral range: a port from
    inside it (what binding port 0 gives) can be taken, before our broker binds it, as the
    source port of any outgoing connection on the machine (a run's own ZeroMQ connects
    included), which made `clicooper run` fail with 'address already in use' now and then."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    with socket.socket() as s:  # a machine with every such port taken: the kernel's choice
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


def looks_like_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` was made by `clicooper run`: its config.toml beside a log, telemetry
    or an INTERRUPTED marker (what `prepare` and `launch` write first)."""
    layout = RunLayout(run_dir)
    return layout.config.is_file() and any(
        p.exists() for p in (layout.log, layout.telemetry, layout.interrupted))


def check_run_dir(run_dir: Path, force: bool = False) -> None:
    """Refuse to reuse a run directory that is not empty (an interrupted run says so, and
    when), unless `force`, which deletes it. Raises ClicooperError with what to do."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if force:
        if run_dir.is_symlink() or not run_dir.is_dir():
            raise ClicooperError(f"{run_dir} is not a directory: remove it by hand")
        if not looks_like_a_run(run_dir):
            # --out and --run-id can point anywhere: never delete a directory we did not make
            raise ClicooperError(
                f"--force refused: {run_dir} does not look like a run directory (no config.toml "
                f"beside a log/, telemetry/ or INTERRUPTED); remove it by hand if you mean it, "
                f"or choose another --run-id or --out")
        shutil.rmtree(run_dir)
        print(f"clicooper run: --force: removed the earlier {run_dir}", file=sys.stderr)
        return
    marker = RunLayout(run_dir).interrupted
    if marker.exists():
        try:
            what = json.loads(marker.read_text())
            when = f" by {what['signal']} at {what['time']}"
        except (OSError, ValueError, KeyError, TypeError):
            when = ""
        raise ClicooperError(
            f"run {run_dir.name} was interrupted{when} ({marker}); its log holds what was logged "
            f"until then. `clicooper run --resume {run_dir}` takes it up again from its last "
            f"round snapshot; run again with --force to delete it and start over under the same "
            f"id, or choose another --run-id")
    raise ClicooperError(f"{run_dir} already exists and is not empty: choose another run id "
                         f"(--run-id) or output directory (--out), or --force to delete it and "
                         f"start over")


def prepare(config: str | None, overrides: dict, out: str | None,
            free_ports: bool = True, force: bool = False) -> tuple[RunConfig, Path]:
    """Load the effective config, make the missing keys and the run directory, and write the
    config into it. Returns (config, path of RUN_DIR/config.toml). Raises ClicooperError if
    the run directory exists and is not empty (`check_run_dir`; `force` deletes it),
    ConfigError for a bad config or model spec (`check_model`; DataError for a bad npz
    dataset, whose warnings are printed on stderr). Nothing is made (no key, no directory)
    before every check passed."""
    over = {k: dict(v) for k, v in overrides.items()}
    if out:
        over.setdefault("run", {})["out_dir"] = out
    if free_ports and not load_config(config, over).participants.remote:
        # remote trainers must reach the config's addresses, which their join file names
        over.setdefault("bus", {}).update({"pub": f"tcp://127.0.0.1:{free_port()}",
                                           "sub": f"tcp://127.0.0.1:{free_port()}",
                                           "witness": f"tcp://127.0.0.1:{free_port()}"})
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
    run_dir = cfg.run_dir
    check_run_dir(run_dir, force)
    local = [t for t in p.trainers if t not in p.remote]  # a remote one brings its own key
    ensure_keys(Path(p.keys), [p.owner, p.notary, p.broker, *local, *p.standby, *p.observers])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunLayout(run_dir).config
    write_atomic(path, cfg.to_toml())
    return cfg, path


def fresh_run_id(prefix: str) -> str:
    """`PREFIX-YYYYmmdd-HHMMSS-xxxx`: a new id each call (the time, and 16 random bits)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def run(config: str | None, *, quick: bool = False, out: str | None = None,
        run_id: str | None = None, echo: bool = True, timeout_s: float | None = None,
        free_ports: bool = True, audit: bool | str = False,
        overrides: dict | None = None, force: bool = False) -> int:
    """`overrides` ({section: {key: value}}) apply on top of the config file; `force` deletes
    an existing run directory of the same id first. Returns an exit code of `EXIT_CODES`;
    raises RunStopped on a stop signal, after marking the run directory INTERRUPTED."""
    base = {k: dict(v) for k, v in (overrides or {}).items()}
    for k, v in (QUICK.items() if quick else ()):
        base.setdefault(k, {}).update(v)
    overrides = base
    if quick and not run_id and not load_config(config, overrides).participants.remote:
        run_id = fresh_run_id("quick")  # a quick run never reuses an earlier one's id
    if run_id:
        overrides.setdefault("run", {})["id"] = run_id
    observers = load_config(config, overrides).participants.observers
    if AUDITOR in observers and not audit:
        # The config says an auditor follows the run (configs/demo.toml does, for the
        # Procfile): the owner waits for every observer, so not starting it would stall the
        # run until the join timeout.
        audit = True
    if audit:
        overrides.setdefault("participants", {})["observers"] = sorted({*observers, AUDITOR})
    for attempt in range(PORT_TRIES):
        cfg, path = prepare(config, overrides, out, free_ports, force or attempt > 0)
        if cfg.participants.remote:
            print(remote_notice(cfg), flush=True)
        if others := [o for o in cfg.participants.observers if o != AUDITOR]:
            print(f"clicooper run: not starting observer(s) {', '.join(others)}: the owner waits "
                  f"up to {cfg.bus.join_timeout_s:.0f} s for them to join through {cfg.bus.pub}",
                  flush=True)
        t0 = time.perf_counter()
        try:
            code = launch(cfg, path, echo=echo, timeout_s=timeout_s, audit=audit)
        except RunStopped as exc:
            mark_interrupted(cfg.run_dir, exc)
            raise
        if code == 0 or not free_ports or attempt + 1 == PORT_TRIES or \
                not lost_port_race(cfg):
            break
        print(f"clicooper run: another process took the port chosen for the broker before it "
              f"bound it ({cfg.bus.pub} or {cfg.bus.sub}); starting the run again on others",
              flush=True)
    if code == 0 and cfg.privacy.finetune_epochs:  # the run is over: nothing can reach a trainer
        from clicooper_bus.tools.finetune import finetune_run

        finetune_run(cfg.run_dir)
    return _conclude(cfg, code, audit, t0)


def lost_port_race(cfg: RunConfig) -> bool:
    """Whether the run's broker failed because its address was taken between `free_port`
    choosing it and the broker binding it (its telemetry says so): nothing ran, and the run
    may start again on other ports."""
    path = RunLayout(cfg.run_dir).telemetry / "broker.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == "failed" and \
                "already in use" in str(ev.get("error", "")):
            return True
    return False


def resume(run_dir: str, *, echo: bool = True, timeout_s: float | None = None) -> int:
    """`clicooper run --resume RUN_DIR`: take an interrupted run up again, every process
    started as before with the run's own `config.toml` (the roster signed its digest; same
    addresses): the notary goes on with the log, the owner from its newest round snapshot,
    trainers from theirs (`services/owner/resume.py`). Returns an exit code of `EXIT_CODES`;
    raises RunStopped on a stop signal (the directory marked INTERRUPTED again), and
    ClicooperError, before anything starts, for a directory that holds no resumable run."""
    layout = RunLayout(Path(run_dir))
    if not looks_like_a_run(layout.root) or not (layout.log / "log.json").exists():
        raise ClicooperError(f"{run_dir} holds no run to resume (no config.toml beside a log/ "
                             f"made by clicooper run)")
    if layout.summary.exists():
        raise ClicooperError(f"{layout.summary} exists: run {layout.root.name} finished (or "
                             f"stopped); there is nothing to resume")
    cfg = load_config(layout.config)
    if cfg.run_dir.resolve() != layout.root.resolve():
        raise ClicooperError(f"{layout.config} puts its run in {cfg.run_dir} (its out_dir "
                             f"{cfg.run.out_dir!r} is relative to where the run was started): "
                             f"resume from that directory")
    if cfg.privacy.on:
        raise ClicooperError("a run with privacy defences cannot be resumed: the run key behind "
                             "its noise and pseudo-labels was never stored (by design); start it "
                             "over with --force")
    if layout.interrupted.exists():
        layout.interrupted.unlink()
    print(f"clicooper run: resuming run {cfg.run.id} in {layout.root}", flush=True)
    audit = AUDITOR in cfg.participants.observers
    t0 = time.perf_counter()
    try:
        code = launch(cfg, layout.config, echo=echo, timeout_s=timeout_s, audit=audit,
                      resume=True)
    except RunStopped as exc:
        mark_interrupted(cfg.run_dir, exc)
        raise
    return _conclude(cfg, code, audit, t0)


def _conclude(cfg: RunConfig, code: int, audit: bool | str, t0: float) -> int:
    """After the run's processes left: verify the log and say how the run ended; the exit
    code (`EXIT_CODES`)."""
    if code not in (0, EXIT_STOPPED):
        return code
    owner_key = Path(cfg.participants.keys) / f"{cfg.participants.owner}.pub"
    from clicooper_bus.net.identity import load_public

    layout = RunLayout(cfg.run_dir)
    witnessed = [layout.checkpoint.read_text()] if layout.checkpoint.exists() else []
    result = verify_log(layout.log, owner=load_public(owner_key), witnessed=witnessed)
    summary = json.loads(layout.summary.read_text())
    if code == EXIT_STOPPED:
        st = summary.get("stopped", {})
        at = f" of step {st['step']}" if "step" in st else ""
        why = (f"{', '.join(st['gone'])} gone (silent past [bus] rejoin_timeout_s, "
               f"{cfg.bus.rejoin_timeout_s:g} s)" if "gone" in st else
               f"{st.get('by')} refused {st.get('kind')}{at} from {st.get('sender')}: "
               f"{st.get('problem')}")
        print(f"run {cfg.run.id} STOPPED: {why}; no model saved; log "
              f"{'verified' if result.ok else 'verification FAILED: ' + str(result.failure)} "
              f"({layout.log})", file=sys.stderr)
        return EXIT_STOPPED
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
