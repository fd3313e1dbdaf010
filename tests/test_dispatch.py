"""The shared receive loop: a roster member's malformed control document is a refusal naming
it (the run stops cleanly), never a crash of the receiving process (review of issue 17: a
crashed honest trainer would have its stage handed to a standby)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from clicooper_bus.errors import PoisonedInput
from clicooper_bus.protocol.recovery import Restored
from clicooper_bus.services.dispatch import Dispatcher


def _env(doc: dict, kind: str = "restored"):
    header = SimpleNamespace(kind=kind, sender="k2", step=7)
    return SimpleNamespace(header=header, document=lambda: doc)


def test_a_malformed_control_document_is_a_refusal_naming_its_sender():
    loop = Dispatcher(bus=None, names={"k2": "trainer-2"})
    loop.route("restored", {"k2"}, lambda env: Restored.parse(env.document(), sender="trainer-2"))
    with pytest.raises(PoisonedInput) as info:
        loop.dispatch(_env({"step": -1, "state": "x"}))
    assert (info.value.sender, info.value.kind, info.value.step) == ("trainer-2", "restored", 7)
    # anything else a handler raises is not turned into a refusal
    loop.route("restored", {"k2"}, lambda env: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loop.dispatch(_env({}))
