"""The attackers of issue 16 against a live run, as a context manager (`siege`): what the
transport benchmark (`tools/bench_transport.py`) times and tests/test_bus_faults.py checks.

- `strangers`: a keyless client and one with a CURVE key the roster does not list each
  subscribe to everything, never read, and flood one-frame garbage;
- `BIG_SUBSCRIPTIONS`: a separate process subscribing with a 256 KiB topic, keyless and with a
  listed key (libzmq's subscription trie overflows the stack of whichever process holds such
  a topic: once the broker's, here the attacker's own);
- `rogue_member`: a listed observer (`spy`) gone rogue: it tries another member's inbox, fakes
  another member's presence, republishes what it reads as its own, and keeps one subscription
  it never reads.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import zmq

from clicooper_bus.config import RunConfig
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.identity import Identity, load_identity, load_public
from clicooper_bus.protocol import Topics


def strangers(cfg: RunConfig, stop: threading.Event, seen: dict) -> None:
    """Issue 16's attacks from outside the roster: a keyless client and one with a CURVE key
    the roster does not list each subscribe to everything, never read, and flood one-frame
    garbage. Sets seen["received"] to the number of subscribers that got anything."""
    ctx = zmq.Context()
    broker = load_public(Path(cfg.participants.keys) / "broker.pub")
    socks = []
    try:
        for key in (None, Identity.generate("mallory")):
            for topic in (b"", b"run/"):
                sub = ctx.socket(zmq.SUB)
                if key is not None:
                    make_client(sub, key, broker)
                sub.connect(cfg.bus.sub)
                sub.subscribe(topic)
                socks.append(("sub", sub))
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, 1000)
            if key is not None:
                make_client(pub, key, broker)
            pub.connect(cfg.bus.pub)
            socks.append(("pub", pub))
        while not stop.is_set():
            for kind, sock in socks:
                if kind == "pub":
                    for _ in range(200):
                        try:
                            sock.send(b"garbage", zmq.NOBLOCK)
                        except zmq.Again:
                            break
            time.sleep(0.01)
        seen["received"] = sum(s.poll(0) for kind, s in socks if kind == "sub")
    finally:
        for _, s in socks:
            s.close(0)
        ctx.term()


# A subscription of 256 KiB, keyless and from the rogue member's key, in a process of its own:
# libzmq's subscription trie overflows the stack of whichever process holds such a topic (it
# killed the broker once, FACTS.md), here the attacker's own.
BIG_SUBSCRIPTIONS = """
import sys, time, zmq
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.identity import load_identity, load_public
keys, sub_addr = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
for key in (None, load_identity(keys + "/spy.key")):
    s = ctx.socket(zmq.SUB)
    if key is not None:
        make_client(s, key, load_public(keys + "/broker.pub"))
    s.connect(sub_addr)
    s.subscribe(b"run/" + b"x" * (256 << 10))
time.sleep(3)
"""


def rogue_member(cfg: RunConfig, stop: threading.Event, seen: dict) -> None:
    """A listed observer (`spy`) gone rogue: it authenticates, then tries to read trainer-1's
    inbox, fakes trainer-2's presence, replays the owner's signed beats as its own
    publications, and never reads what it may read (a stalled subscriber). Adds the kinds of
    message it read to seen["kinds"]."""
    me = load_identity(Path(cfg.participants.keys) / "spy.key")
    broker = load_public(Path(cfg.participants.keys) / "broker.pub")
    topics = Topics(cfg.run.id)
    ctx = zmq.Context()
    socks = []
    try:
        def sock(kind):
            s = ctx.socket(kind)
            make_client(s, me, broker)
            s.connect(cfg.bus.sub if kind == zmq.SUB else cfg.bus.pub)
            socks.append(s)
            return s

        reader, stalled, pub = sock(zmq.SUB), sock(zmq.SUB), sock(zmq.PUB)
        for t in (topics.to("fwd", "trainer-1"), topics.hello("trainer-2"), topics.kind("beat")):
            reader.subscribe(t)
        reader.subscribe(topics.watching("spy"))  # its own signal: the owner waits for it
        stalled.subscribe(topics.all[:-1])  # refused: the whole run
        stalled.subscribe(topics.kind("beat"))  # allowed, and never read
        grabbed = 0
        while not stop.is_set():
            if reader.poll(100):
                frames = reader.recv_multipart()
                seen.setdefault("kinds", set()).add(frames[0].split(b"/")[2].decode())
                pub.send_multipart(frames)  # the owner's (or anyone's) beat, as our own
                grabbed += 1
            if grabbed > 20:
                reader.subscribe(topics.done("spy"))  # let the notary close the run
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


@contextlib.contextmanager
def siege(cfg: RunConfig) -> Iterator[dict]:
    """Every attacker above against the run of `cfg` (its keys directory must hold
    broker.pub and spy.key, and the roster list `spy` as an observer) until the block ends;
    yields the dict they report into ("received", "kinds"), complete once the block is left."""
    stop, seen = threading.Event(), {}
    threads = [threading.Thread(target=f, args=(cfg, stop, seen), daemon=True)
               for f in (strangers, rogue_member)]
    for t in threads:
        t.start()
    big = subprocess.Popen([sys.executable, "-c", BIG_SUBSCRIPTIONS, cfg.participants.keys,
                            cfg.bus.sub], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        big.kill()
        big.wait()
