"""Strangers on the device's link, for tests/test_two_hosts.py: a keyless client and a client
with a CURVE key the roster does not list, each with a SUB socket subscribed to everything (and
to a fake presence signal) and a PUB socket sending junk. Counts what they receive and what
their sockets' monitors report, until SIGTERM, then writes the counts as JSON.

    python -m tests.netns_peer PUB_ADDR SUB_ADDR BROKER_PUB_FILE RUN_ID OUT_JSON
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter

import zmq
from zmq.utils.monitor import recv_monitor_message

from clicooper_bus.net.curve import make_client
from clicooper_bus.net.identity import Identity, load_public

EVENTS = {zmq.EVENT_CONNECTED: "connected",
          zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
          zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
          zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed"}


def main(pub: str, sub: str, broker_file: str, run_id: str, out: str) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ctx = zmq.Context()
    broker = load_public(broker_file)
    stranger = Identity.generate("stranger")
    counts = {who: Counter() for who in ("keyless", "wrong_key")}
    socks, monitors = [], []
    for who in counts:
        s, p = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB)
        if who == "wrong_key":
            for sock in (s, p):
                make_client(sock, stranger, broker)
        for sock in (s, p):
            monitors.append((who, sock.get_monitor_socket()))
        for topic in ("", f"run/{run_id}/hello/edge", f"run/{run_id}/watching/x"):
            s.setsockopt_string(zmq.SUBSCRIBE, topic)
        s.connect(sub)
        p.connect(pub)
        socks.append((who, s, p))
    poller = zmq.Poller()
    for _, s, _ in socks:
        poller.register(s, zmq.POLLIN)
    for _, m in monitors:
        poller.register(m, zmq.POLLIN)
    by_sock = {s: who for who, s, _ in socks}
    by_monitor = {m: who for who, m in monitors}
    last_junk = 0.0
    while not stop:
        if time.monotonic() - last_junk > 0.05:
            for _, _, p in socks:
                p.send_multipart([f"run/{run_id}/fwd/trainer-1".encode(), b"junk"])
            last_junk = time.monotonic()
        for sock, _ in poller.poll(50):
            if sock in by_sock:
                sock.recv_multipart()
                counts[by_sock[sock]]["received"] += 1
            else:
                event = recv_monitor_message(sock)["event"]
                counts[by_monitor[sock]][EVENTS.get(event, "other")] += 1
    with open(out, "w") as f:
        json.dump({who: dict(c) for who, c in counts.items()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
