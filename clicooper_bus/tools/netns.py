"""Two hosts on one machine: two network namespaces joined by a veth pair, optionally rate-limited
with tbf, for the benchmarks and tests that need a real link (`bench_edge`,
`tests/test_two_hosts.py`).

Needs root and iproute2 (`ip`, and `tc` to shape); `missing` says what is lacking. Only
bandwidth can be emulated on these machines: the kernel has no `netem`, so no added delay or
loss (FACTS.md).

Everything made here is named `cco-<tag>...` with a fresh random tag and removed again by
`pair`'s exit, however it is left (an exception, or a signal turned into one by
`stop_on_signals`): first every process still inside either namespace is killed (only ours can
be there: the namespaces are ours), then the namespaces are deleted, which deletes the veth
pair with them. A process killed with SIGKILL cannot clean up: each pair records its creator's
PID in MARKS/<tag>, and `stale` finds the tags whose creator is dead (or unrecorded), which
`remove_all` deletes; a pair whose creator still runs (another benchmark, a test) is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PREFIX = "cco-"
MARKS = Path("/run/clicooper-netns")  # <tag>: the PID of the process that made the pair
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal arrived (`stop_on_signals`); what is being measured is abandoned and
    everything made is removed on the way out."""


def ip(*args: str) -> subprocess.CompletedProcess:
    """`ip ARGS`, its output captured (never raises on a non-zero exit)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"`{' '.join(args)}` failed: {done.stderr.strip()}")


def missing(shaping: bool = False) -> str | None:
    """Why this machine cannot make two namespaces (and, with `shaping`, rate-limit a link
    with tc), in words; None if it can."""
    if os.geteuid() != 0:
        return "not root: network namespaces need root (CI runs this test as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on PATH"
    if shaping and shutil.which("tc") is None:
        return "no `tc` command (iproute2) on PATH: a link cannot be rate-limited"
    probe = f"{PREFIX}probe-{uuid.uuid4().hex[:8]}"
    made = ip("netns", "add", probe)
    ip("netns", "del", probe)
    if made.returncode != 0:
        return f"network namespaces not permitted here: `ip netns add` said {made.stderr.strip()!r}"
    return None


@dataclass(frozen=True)
class Pair:
    """Two namespaces joined by a veth pair: `owner` (at `owner_ip`, interface `owner_if`)
    and `device` (at `device_ip`, interface `device_if`), all named with `tag`."""

    tag: str
    owner: str
    device: str
    owner_if: str
    device_if: str
    owner_ip: str
    device_ip: str

    def exec(self, side: str, *argv: str) -> list[str]:
        """The command line running `argv` inside namespace `side` ("owner" or "device")."""
        return ["ip", "netns", "exec", getattr(self, side), *argv]


@contextmanager
def pair(owner_ip: str = "10.77.0.1", device_ip: str = "10.77.0.2") -> Iterator[Pair]:
    """Make two namespaces joined by a veth pair, addresses on a /24, every link up; yields
    the `Pair`. Removes everything it made on the way out, processes inside killed first
    (`remove`). Raises OSError naming the `ip` command that failed."""
    tag = uuid.uuid4().hex[:6]
    p = Pair(tag, f"{PREFIX}{tag}-o", f"{PREFIX}{tag}-d", f"cco{tag}a", f"cco{tag}b",
             owner_ip, device_ip)
    steps = [("netns", "add", p.owner), ("netns", "add", p.device),
             ("link", "add", p.owner_if, "type", "veth", "peer", "name", p.device_if),
             ("link", "set", p.owner_if, "netns", p.owner),
             ("link", "set", p.device_if, "netns", p.device),
             ("-n", p.owner, "addr", "add", f"{owner_ip}/24", "dev", p.owner_if),
             ("-n", p.device, "addr", "add", f"{device_ip}/24", "dev", p.device_if),
             ("-n", p.owner, "link", "set", p.owner_if, "up"),
             ("-n", p.device, "link", "set", p.device_if, "up"),
             ("-n", p.owner, "link", "set", "lo", "up"), ("-n", p.device, "link", "set", "lo", "up")]
    try:
        MARKS.mkdir(parents=True, exist_ok=True)
        (MARKS / tag).write_text(str(os.getpid()))
        for step in steps:
            _must("ip", *step)
        yield p
    finally:
        with _signals_held():  # a second signal must not cut the removal short
            remove(p)
            (MARKS / tag).unlink(missing_ok=True)


def remove(p: Pair) -> None:
    """Kill every process inside the pair's namespaces, delete both (and with them the veth
    pair), and the root end of the pair if it never left the root namespace."""
    for ns in (p.owner, p.device):
        kill_inside(ns)
        ip("netns", "del", ns)
    if p.owner_if in ip("link", "show").stdout:
        ip("link", "del", p.owner_if)


def kill_inside(ns: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process in namespace `ns`, SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(x) for x in ip("netns", "pids", ns).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline and ip("netns", "pids", ns).stdout.split():
            time.sleep(0.1)


def shape(p: Pair, rate_bit_s: float | None) -> None:
    """Rate-limit both directions of the pair's link with tbf (`rate_bit_s` bits a second,
    bucket `burst_bytes`, at most 400 ms queued), or take the limit off (None). Raises OSError
    naming the `tc` command that failed."""
    for ns, dev in ((p.owner, p.owner_if), (p.device, p.device_if)):
        if rate_bit_s is None:
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=30)  # none there: nothing to do
            continue
        _must("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
              "rate", f"{int(rate_bit_s)}bit", "burst", str(burst_bytes(rate_bit_s)),
              "latency", "400ms")


def burst_bytes(rate_bit_s: float) -> int:
    """tbf's bucket: 32 kbit (4,000 bytes, the size the issue's command gives 100 Mbit/s),
    growing with the rate so that one bucket lasts at least 0.32 ms (at 1 Gbit/s 40,000
    bytes: the qdisc's timer must not be what limits the rate)."""
    return max(4000, int(rate_bit_s / 8 * 0.32e-3))


def tx_bytes(ns: str, dev: str) -> int:
    """Bytes interface `dev` in namespace `ns` has sent, from its kernel counters."""
    out = ip("-n", ns, "-s", "-j", "link", "show", "dev", dev)
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])


def leftovers(tag: str = "") -> list[str]:
    """Namespaces and links whose names hold `PREFIX + tag` (all of ours when `tag` is
    empty) or, for links, `cco<tag>`."""
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in ip("-o", "link", "show").stdout.splitlines() if ":" in line]
    return [n for n in names if n.startswith(PREFIX + tag)] + \
        [n for n in links if n.startswith(f"cco{tag}") and len(n) == 10]


def stale() -> list[str]:
    """Tags of pairs left behind: their creator's recorded PID is no longer running, or no
    creator is recorded (made before records were kept, or the record was lost)."""
    tags = {n[len(PREFIX):].split("-")[0] for n in leftovers("") if n.startswith(PREFIX)}
    tags |= {n[3:9] for n in leftovers("") if not n.startswith(PREFIX)}
    return sorted(t for t in tags if not _creator_alive(t))


def _creator_alive(tag: str) -> bool:
    try:
        pid = int((MARKS / tag).read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def remove_all(tag: str | None = None) -> list[str]:
    """Delete the namespaces and links of pair `tag`, or of every `stale` pair when `tag` is
    None (processes inside killed first); returns the names that are gone afterwards. A pair
    whose creator still runs is never touched unless named."""
    tags = [tag] if tag is not None else stale()
    gone = []
    for t in tags:
        found = leftovers(t)
        for name in found:
            if name.startswith(PREFIX):
                kill_inside(name)
                ip("netns", "del", name)
            else:
                ip("link", "del", name)
        left = set(leftovers(t))
        gone += [n for n in found if n not in left]
        if not left:
            (MARKS / t).unlink(missing_ok=True)
    return gone


@contextmanager
def _signals_held() -> Iterator[None]:
    """Inside: SIGINT, SIGTERM and SIGHUP are ignored (in the main thread; elsewhere signals
    are not delivered anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP raise `Stopped`, SIGINT KeyboardInterrupt (even when this
    process was started with SIGINT ignored, as a shell's background job is, where Python
    leaves it ignored), so that every `finally` on the way out runs; the previous handlers are
    back after."""
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
