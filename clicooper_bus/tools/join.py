"""The join kit: how a trainer on another machine joins a run, with no shared filesystem.

    owner:  clicooper invite edge-7 --config run.toml --host 10.0.0.5 --out edge-7.join
    device: clicooper join edge-7.join --name edge-7          (prints one `keys add` line)
    owner:  clicooper keys add 'edge-7+1a2b3c4d+AQ...'         (that line)
    owner:  clicooper run --config run.toml                    (waits for edge-7)

The join file (TOML) carries what the device needs and nothing secret: the run id, the broker's
addresses as the device reaches them, the broker's and the owner's public keys (verifier-key
lines: the device pins the broker's CURVE key, and trusts only a roster the owner signed), the
trainer's and the notary's names, and the bus timings. The device makes its own key, which
never leaves it; the owner adds its public half, and the broker admits it from then on.

This module imports neither torch nor the auditor's libraries: a lean trainer install
(`pip install clicooper-bus[trainer]`) runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from clicooper_bus.config import RunConfig, load_config
from clicooper_bus.errors import ClicooperError, ConfigError, KeyFileError
from clicooper_bus.net.identity import (
    Identity,
    PublicIdentity,
    key_paths,
    load_identity,
    load_public,
    write_identity,
)

JOIN_VERSION = 1
WILDCARD_HOSTS = {"*", "0.0.0.0", "::", "[::]", "localhost", "::1", "[::1]"}
# the [bus] keys a trainer needs; the rest (the broker's stall policy, the owner's step timeout,
# the notary's audit timeout) are the owner side's own business
BUS_KEYS = ("security", "beat_s", "timeout_s", "rejoin_timeout_s", "join_timeout_s", "hwm")


# --- public keys ------------------------------------------------------------------------------

def add_public(line: str, directory: Path, remote: Collection[str] | None = None
               ) -> tuple[PublicIdentity, bool]:
    """Store the verifier-key `line` as DIR/NAME.pub. Returns (key, whether it was written);
    the same key already stored is not an error. With `remote` (a config's remote trainers),
    NAME must be one of them: a device cannot slip in a key under the name of a local
    participant or of another device. Raises KeyFileError for a malformed line, a name that is
    not allowed, or when DIR/NAME.pub holds a different key for NAME."""
    if line.strip().startswith("PRIVATE+KEY+"):
        raise KeyFileError("that is a private key: it never leaves its device (make a new one "
                           "there); add the public line `clicooper join` printed")
    key = PublicIdentity.from_vkey(line)
    if key.name == "all":
        raise KeyFileError("'all' is the addressee of broadcast messages, not a participant "
                           "name: the device must join under another name")
    if remote is not None and key.name not in remote:
        raise KeyFileError(f"'{key.name}' is not one of the config's remote trainers "
                           f"{sorted(remote)}: add only the key of a device you invited, under "
                           f"the name you invited it with")
    path = key_paths(directory, key.name)[1]
    if path.exists():
        old = load_public(path)
        if old == key:
            return key, False
        raise KeyFileError(
            f"{path} already holds a different key for '{key.name}' (key id {old.key_id}, this "
            f"line's is {key.key_id}): if '{key.name}' made a new key, remove {path} and add the "
            f"line again; if it is another participant, give it another name")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(key.vkey + "\n")
    return key, True


# --- invite (owner side) -----------------------------------------------------------------------

def reachable(address: str, host: str | None) -> str:
    """`address` (tcp://HOST:PORT) as another machine reaches it: HOST replaced by `host` if
    given. Raises ConfigError for a non-TCP address, or a wildcard or loopback host without
    `host`."""
    scheme, _, rest = address.partition("://")
    old, sep, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not port.isdigit():
        raise ConfigError(f"broker address {address!r} is not tcp://HOST:PORT: a device on "
                          f"another machine cannot reach it; set [bus] pub and sub to TCP addresses")
    if host:
        new = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"tcp://{new}:{port}"
    if old in WILDCARD_HOSTS or old.startswith("127."):
        raise ConfigError(f"broker address {address!r} cannot be reached from another machine: "
                          f"give --host with the address the device reaches this machine at")
    return address


def invite_doc(cfg: RunConfig, name: str, host: str | None) -> str:
    """The join file's text for remote trainer `name` of the run `cfg` configures. Raises
    ConfigError if `name` is not one of the config's remote trainers; KeyFileError if the
    owner's or the broker's public key is missing."""
    p = cfg.participants
    if name not in p.remote:
        raise ConfigError(f"'{name}' is not a remote trainer of this config: list it in "
                          f"[participants] trainers (its stage order) and remote "
                          f"(now trainers = {p.trainers}, remote = {p.remote})")
    if cfg.bus.security != "curve":
        raise ConfigError("[bus] security = 'none' is for loopback only: a remote trainer needs "
                          "'curve'")
    keys = Path(p.keys)
    doc = {"join": {
        "version": JOIN_VERSION, "run_id": cfg.run.id, "name": name,
        "pub": reachable(cfg.bus.pub, host), "sub": reachable(cfg.bus.sub, host),
        "owner": load_public(keys / f"{p.owner}.pub").vkey,
        "broker": load_public(keys / f"{p.broker}.pub").vkey,
        "notary": p.notary, "trainer_threads": cfg.run.trainer_threads},
        "bus": {k: getattr(cfg.bus, k) for k in BUS_KEYS}}
    head = (f"# CliCooper bus join file: trainer '{name}' of run '{cfg.run.id}'. Nothing in it "
            f"is secret.\n# On the device: clicooper join THIS_FILE --name {name}\n")
    return head + "".join(
        f"\n[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for section, values in doc.items())


def invite(config: str, name: str, host: str | None, out: str | None) -> Path:
    """Write the join file for `name` (default NAME.join); makes the owner's, notary's and
    broker's keys if they are missing (the run would). Returns its path."""
    from clicooper_bus.tools.run import ensure_keys

    cfg = load_config(config)
    p = cfg.participants
    ensure_keys(Path(p.keys), [p.owner, p.notary, p.broker])
    text = invite_doc(cfg, name, host)
    path = Path(out or f"{name}.join")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- join (device side) -----------------------------------------------------------------------

@dataclass(frozen=True)
class JoinFile:
    run_id: str
    name: str
    pub: str
    sub: str
    owner: PublicIdentity
    broker: PublicIdentity
    notary: str
    trainer_threads: int
    bus: dict


def read_join_file(path: Path) -> JoinFile:
    """Parse a join file. Raises ConfigError naming what is missing or malformed."""
    try:
        doc = tomllib.loads(path.read_text())
        j = doc["join"]
        if j.get("version") != JOIN_VERSION:
            raise ConfigError(f"{path}: join file version {j.get('version')!r}; this clicooper "
                              f"reads version {JOIN_VERSION}: use the owner's clicooper version")
        bus = {k: v for k, v in doc.get("bus", {}).items() if k in BUS_KEYS}
        return JoinFile(j["run_id"], j["name"], j["pub"], j["sub"],
                        PublicIdentity.from_vkey(j["owner"]), PublicIdentity.from_vkey(j["broker"]),
                        j["notary"], int(j.get("trainer_threads", 1)), bus)
    except FileNotFoundError:
        raise ConfigError(f"join file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not a join file (TOML): {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"{path} is not a complete join file: it lacks {exc}; ask the owner "
                          f"for a new one (`clicooper invite`)") from None
    except KeyFileError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def device_identity(keys: Path, name: str) -> tuple[Identity, bool]:
    """This device's identity NAME in `keys`, made (NAME.key mode 0600) if missing. Returns
    (identity, whether it was made). Raises KeyFileError for a key readable by others."""
    priv, pub = key_paths(keys, name)
    if priv.exists():
        ident = load_identity(priv)
        pub.write_text(ident.public.vkey + "\n")
        return ident, False
    ident = Identity.generate(name)
    write_identity(ident, keys, force=pub.exists())
    return ident, True


def device_config(kit: JoinFile, keys: Path, wait_s: float) -> RunConfig:
    """The trainer's config on the device: everything from the join file, keys from `keys`,
    waiting up to `wait_s` for the roster. Raises ConfigError if the join file's names clash."""
    bus = dict(kit.bus, pub=kit.pub, sub=kit.sub,
               join_timeout_s=max(wait_s, kit.bus.get("join_timeout_s", 0)))
    return load_config(None, {
        "run": {"id": kit.run_id, "trainer_threads": kit.trainer_threads,
                "out_dir": str(keys / "runs")},
        "bus": bus,
        "participants": {"keys": str(keys), "owner": kit.owner.name, "notary": kit.notary,
                         "broker": kit.broker.name, "trainers": [kit.name]}})


class Progress:
    """Turns the trainer's telemetry (JSON lines) into what the person at the device reads,
    and says what it still waits for until the trainer has joined."""

    def __init__(self, kit: JoinFile, telemetry: Path, say: Callable[[str], None],
                 every_s: float):
        self.kit, self.say, self.every_s = kit, say, every_s
        self.out = telemetry.open("a")
        self.joined = threading.Event()
        self.saying = threading.Lock()  # no waiting notice after the line that says joined

    def waiting(self, t0: float) -> None:
        """Until joined: every `every_s`, what it waits for and for how long."""
        while not self.joined.wait(self.every_s):
            with self.saying:
                if self.joined.is_set():
                    return
                self.say(f"join: still waiting for a roster naming '{self.kit.name}' signed by "
                         f"'{self.kit.owner.name}', through the broker at {self.kit.sub} "
                         f"({time.monotonic() - t0:.0f} s; the owner starts the run with "
                         f"`clicooper run`)")

    def line(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        try:
            ev = json.loads(text)
        except ValueError:
            self.say(text.rstrip())  # a plain line: the trainer's own error message
            return
        event = ev.get("event") if isinstance(ev, dict) else None
        if event == "joined":
            with self.saying:
                self.joined.set()
                self.say(f"join: joined run '{self.kit.run_id}' as stage {ev.get('stage')}; "
                         "training")
        elif event == "roster does not list us":
            self.say(f"join: a roster came that does not list '{self.kit.name}' "
                     f"(stages {ev.get('stages')}); still waiting")
        elif event == "roster refused":
            self.say(f"join: a roster was refused: {ev.get('error')}")
        elif event == "watermark claimed":
            self.say(f"join: watermark round {ev.get('round')} claimed")
        elif event == "segment delivered":
            self.say("join: training done; weights delivered, sealed to the owner")


def join(file: str, name: str, keys: str, *, wait_s: float = 3600.0, progress_s: float = 15.0,
         say: Callable[[str], None] = print) -> int:
    """Join the run of join file `file` as trainer `name`: make the device key if missing, say
    the line the owner adds, store the owner's and broker's public keys in `keys`, write the
    trainer's config there, and run the trainer process until the run ends. Returns its exit
    status. Raises ConfigError or KeyFileError before anything starts."""
    kit = read_join_file(Path(file))
    if kit.name != name:
        raise ConfigError(f"{file} invites '{kit.name}', not '{name}': use --name {kit.name}, "
                          f"or ask the owner for `clicooper invite {name}`")
    kdir = Path(keys)
    ident, made = device_identity(kdir, name)
    say(f"join: {'made' if made else 'using'} this device's key {key_paths(kdir, name)[0]} "
        f"(key id {ident.key_id}); on the owner's machine run:")
    say(f"clicooper keys add {ident.public.vkey}")
    for key in (kit.owner, kit.broker):
        add_public(key.vkey, kdir)
    cfg = device_config(kit, kdir, wait_s)
    path = kdir / f"{name}.{kit.run_id}.toml"
    path.write_text(cfg.to_toml())
    return _train(kit, path, kdir / f"{name}.{kit.run_id}.jsonl", progress_s, say)


def _train(kit: JoinFile, config: Path, telemetry: Path, progress_s: float,
           say: Callable[[str], None]) -> int:
    say(f"join: waiting for the owner's roster of run '{kit.run_id}' through the broker at "
        f"{kit.pub} (publish) and {kit.sub} (subscribe); telemetry in {telemetry}")
    cmd = [sys.executable, "-m", "clicooper_bus.services.trainer", "--config", str(config),
           "--name", kit.name]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    progress = Progress(kit, telemetry, say, progress_s)
    threading.Thread(target=progress.waiting, args=(time.monotonic(),), daemon=True).start()
    try:
        for text in proc.stderr:
            progress.line(text)
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    finally:
        progress.joined.set()
        progress.out.close()
    say(f"join: the trainer {'finished' if code == 0 else f'failed (exit {code})'}; "
        f"telemetry in {telemetry}")
    if code != 0:
        raise ClicooperError(f"the trainer of run '{kit.run_id}' exited with status {code}: "
                             f"see {telemetry}")
    return code
