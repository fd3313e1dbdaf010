"""Loaded at start-up by the processes of `tests/test_restart.py`'s lost-message test (on their
PYTHONPATH): in the trainer named by CLICOOPER_TEST_LOSE (NAME:KIND), the first message of
KIND is written to the outbox and never sent; the process then hangs until it is killed, as a
process killed between its outbox write and ZeroMQ's send would leave it. The file
CLICOOPER_TEST_LOSE_MARK records the seq, so a restarted process sends normally."""

import os
import sys
import time

_lose = os.environ.get("CLICOOPER_TEST_LOSE", "")
_name, _, _kind = _lose.partition(":")
if _lose and _name in sys.argv:
    from clicooper_bus.net import bus as _bus

    _publish = _bus.Bus.publish
    _mark = os.environ["CLICOOPER_TEST_LOSE_MARK"]

    def publish(self, env):
        if env.header.kind == _kind and not os.path.exists(_mark):
            with open(_mark, "w") as f:
                f.write(str(env.header.seq))
            self.outbox.append(env)  # on our disk, never on the wire
            time.sleep(3600)
        return _publish(self, env)

    _bus.Bus.publish = publish
