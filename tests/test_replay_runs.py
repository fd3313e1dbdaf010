"""Issue 16, item 6 against a live run: a message of an earlier run with the same run id and
keys, replayed into a new run, is refused by its receiver with a named error, and the new run
completes and verifies. The replay is published with the owner's own key (the only connection
the broker lets publish the owner's messages), the strongest position for it. An earlier run's
message is one signed by the same owner key for the same run id under another roster nonce:
the test seals such messages itself rather than run a whole earlier run to capture one."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from clicooper_bus.config import load_config
from clicooper_bus.net.curve import make_client
from clicooper_bus.net.identity import load_identity, load_public
from clicooper_bus.net.wire import Sender
from clicooper_bus.tools.run import ensure_keys, run
from tests.busrun import write_config


def _replay(cfg, stop: threading.Event) -> None:
    """The owner's activations for trainer-1 from an earlier run (same id, same key, another
    nonce), steps 0, 1, 2, ... as that run sent them, published through the broker."""
    keys = Path(cfg.participants.keys)
    owner = load_identity(keys / "owner.key")
    earlier = Sender(owner, cfg.run.id, nonce=os.urandom(16))
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    make_client(pub, owner, load_public(keys / "broker.pub"))
    pub.connect(cfg.bus.pub)
    step = 0
    try:
        while not stop.is_set():
            env = earlier.seal_array("fwd", "trainer-1", np.zeros((32, 1568), np.float32),
                                     step=step, batch=step, epoch=0)
            pub.send_multipart(env.frames())
            step += 1
            time.sleep(0.1)
    finally:
        pub.close(0)
        ctx.term()


def test_a_message_of_an_earlier_run_is_refused_in_the_new_one(tmp_path):
    new = write_config(tmp_path, run_id="again", trainers=2, run={"max_steps": 30, "epochs": 3})
    cfg = load_config(new)
    ensure_keys(Path(cfg.participants.keys), ["owner", "broker"])  # run() keeps them
    stop = threading.Event()
    replayer = threading.Thread(target=_replay, args=(cfg, stop), daemon=True)
    replayer.start()
    try:
        assert run(str(new), echo=False, timeout_s=240, free_ports=False) == 0  # verified too
    finally:
        stop.set()
        replayer.join(5)
    refusals = [json.loads(line) for line in
                (cfg.run_dir / "telemetry" / "trainer-1.jsonl").read_text().splitlines()
                if '"message rejected"' in line]
    assert refusals and all(r["reason"] == "wrong_run" and r["field"] == "nonce"
                            for r in refusals), refusals[:3]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["steps"] == 30
