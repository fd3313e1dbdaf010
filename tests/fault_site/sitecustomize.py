"""Loaded at start-up by the processes of `tests/test_restart.py`'s fault tests (on their
PYTHONPATH), in the trainer named in CLICOOPER_TEST_FAULT (NAME:WHAT), once (the file
CLICOOPER_TEST_MARK records it, so a restarted process runs normally):

- WHAT = lose:KIND: the first message of KIND is written to the outbox and never sent, as a
  process killed between its outbox write and ZeroMQ's send would leave it;
- WHAT = hang:rollback: the first rollback of a resumed owner is received and never handled,
  as a process killed between the two would leave it.

Either way the process then hangs until the test's injector kills it."""

import os
import sys
import time

_name, _, _what = os.environ.get("CLICOOPER_TEST_FAULT", "").partition(":")
_mark = os.environ.get("CLICOOPER_TEST_MARK", "")


def _once(note: str) -> None:
    """Record the fault, then hang."""
    with open(_mark, "w") as f:
        f.write(note)
    time.sleep(3600)


if _name and _name in sys.argv and _what.startswith("lose:"):
    from clicooper_bus.net import bus as _bus

    _publish, _kind = _bus.Bus.publish, _what[len("lose:"):]

    def publish(self, env):
        if env.header.kind == _kind and not os.path.exists(_mark):
            self.outbox.append(env)  # on our disk, never on the wire
            _once(str(env.header.seq))
        return _publish(self, env)

    _bus.Bus.publish = publish

if _name and _name in sys.argv and _what == "hang:rollback":
    from clicooper_bus.protocol.recovery import Rollback
    from clicooper_bus.services.trainer import restart as _restart

    _on_rollback = _restart.Restarts._on_rollback

    def on_rollback(self, env):
        rb = Rollback.parse(env.document(), sender=self.roster.owner.name)
        if rb.rejoined == self.roster.owner.name and not os.path.exists(_mark):
            _once(str(rb.step))
        return _on_rollback(self, env)

    _restart.Restarts._on_rollback = on_rollback
