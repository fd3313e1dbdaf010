"""Measured CPU: a process's meter, and the owner's receive loop taking each usage report from
its own signer only. (The bus run's cpu table, log messages and report line: test_audit.py.)"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from clicooper_bus.net.identity import Identity
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol import Usage
from clicooper_bus.services.dispatch import Dispatcher, Mailbox
from clicooper_bus.services.owner.books import Books
from clicooper_bus.services.owner.process import Owner
from clicooper_bus.services.usage import CpuMeter


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_meter_counts_the_cpu_of_the_training_window_only():
    meter = CpuMeter()
    assert meter.usage().steps == 0 and meter.usage().train_cpu_s == 0.0
    _spin(0.05)  # before the first step: in cpu_s, not in the window
    for _ in range(3):
        meter.step_started()
        _spin(0.02)
        meter.step_done()
    _spin(0.05)  # after the last step
    u = meter.usage()
    assert u.steps == 3
    assert 0.06 <= u.train_cpu_s < 0.06 + 0.04, u  # the three steps, little else
    assert u.cpu_s >= u.train_cpu_s + 0.1 and u.train_wall_s >= u.train_cpu_s * 0.5
    assert Usage.parse(u.to_doc()) == u  # what the process sends parses as it measured


@pytest.fixture
def owner():
    """The owner's real handler table over a dispatcher with no bus: two stages, a notary, and
    an observer that is a roster member but may send nothing."""
    ids = {n: Identity.generate(n) for n in ("owner", "trainer-1", "trainer-2", "notary",
                                              "auditor")}
    kid = {n: i.key_id for n, i in ids.items()}
    names = {v: k for k, v in kid.items()}
    o = Owner.__new__(Owner)
    o.kid, o.stages = kid, ["trainer-1", "trainer-2"]
    o.cfg = SimpleNamespace(participants=SimpleNamespace(notary="notary"))
    o.setup = SimpleNamespace(tail=None)
    o.books = Books(o.stages, names, ids["notary"].public, "origin", "spec", 1)
    o.loop = Dispatcher(None, names)
    o.mailbox = Mailbox(names, 8)
    o._routes()
    o.ids = ids
    return o


def _usage(ident: Identity, cpu_s: float = 3.0) -> object:
    return Sender(ident, "r1").seal_document("usage", "owner",
                                             Usage(cpu_s, 2.0, 2.5, 40).to_doc())


def test_the_owner_takes_each_usage_report_from_its_own_signer_only(owner):
    ids, books = owner.ids, owner.books
    owner.loop.dispatch(_usage(ids["trainer-1"]))
    owner.loop.dispatch(_usage(ids["notary"], 9.0))
    assert books.usage == {"trainer-1": Usage(3.0, 2.0, 2.5, 40),
                           "notary": Usage(9.0, 2.0, 2.5, 40)}
    # an observer is no computing party: its report is refused, not recorded
    owner.loop.dispatch(_usage(ids["auditor"]))
    # the report is filed under its signer: trainer-1 cannot speak for trainer-2, and a second
    # report does not replace the first
    owner.loop.dispatch(_usage(ids["trainer-1"], 4.0))
    assert set(books.usage) == {"trainer-1", "notary"}
    assert books.usage["trainer-1"].cpu_s == 3.0


def test_an_unreadable_usage_report_is_ignored_not_fatal(owner):
    """A reviewer's trainer sent `steps` as a float after training: every process exited 1 and
    the finished run had no summary. The report is only its sender's word: it is left out."""
    ids, books = owner.ids, owner.books
    doc = {**Usage(3.0, 2.0, 2.5, 40).to_doc(), "steps": 40.5}
    owner.loop.dispatch(Sender(ids["trainer-2"], "r1").seal_document("usage", "owner", doc))
    assert "trainer-2" not in books.usage
    owner.loop.dispatch(_usage(ids["trainer-2"]))  # a readable one after it still counts
    assert books.usage["trainer-2"].steps == 40
