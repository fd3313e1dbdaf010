"""A trainer's stage trains in step order whatever order its inputs arrive in (pipelining):
the serving loop driven by scripted, already-verified messages, without processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.tensors import Expected
from clicooper_bus.net.bus import BusError
from clicooper_bus.plan import Plan
from clicooper_bus.services.dispatch import Dispatcher
from clicooper_bus.services.trainer.stage import Trainer
from clicooper_bus.services.usage import CpuMeter

OWNER, PREV = "0wner000", "prev0000"


class ScriptedBus:
    """Hands out the scripted messages, records what the trainer sends."""

    timeout_s = 5.0
    suspected = False  # nobody is silent (`Dispatcher.until` asks)

    def __init__(self, messages):
        self.messages = list(messages)
        self.sent: list[tuple[str, str, dict]] = []
        self.docs: list[tuple[str, dict]] = []  # (kind, document) of each document sent

    def recv(self, timeout_s):
        return self.messages.pop(0)

    def send_array(self, kind, to, array, **meta):
        self.sent.append((kind, to, meta))

    def send_doc(self, kind, to, doc, **meta):
        self.sent.append((kind, to, meta))
        self.docs.append((kind, doc))


def _message(kind: str, sender: str, step: int, body: torch.Tensor | None = None):
    body = torch.zeros(0) if body is None else body
    header = SimpleNamespace(kind=kind, sender=sender, step=step, batch=step, epoch=0,
                             dtype="int64" if kind == "labels" else "float32",
                             shape=tuple(body.shape))
    return SimpleNamespace(header=header, array=lambda: body.clone().numpy(), float_codec="fp32",
                           document=lambda: {"reason": "training complete"})


def _last_stage(messages, in_flight: int) -> tuple[Trainer, ScriptedBus]:
    """The last stage (a linear layer over 3 features, 2 classes) of a roster allowing
    `in_flight` batches."""
    t = Trainer.__new__(Trainer)
    torch.manual_seed(0)
    t.seg = SegmentTrainer(torch.nn.Sequential(torch.nn.Linear(3, 2)), lr=0.1)
    t.bus = ScriptedBus(messages)
    t.plan = Plan("small-cnn", (1, 28, 28), 2, (1,), 0, 0.1, 4, in_flight=in_flight)
    t.roster = SimpleNamespace(owner=SimpleNamespace(name="owner"))
    t.kid = {"owner": OWNER, "prev": PREV}
    t.prev, t.next, t.last = "prev", None, True
    t.labels, t.waiting_logits, t.queued = {}, set(), __import__("collections").deque()
    t.given, t.trained, t.eval_seen, t.name = {}, -1, set(), "last"
    t.marker, t.notary_kid, t.ended = None, None, False
    t.roster.stages = ["prev", "last"]
    t.index = 1  # its place in the stages
    # what the plan implies it receives (the receive check): 3 features, 2-class labels
    t.expect_in = Expected("float32", (3,), max_rows=4)
    t.expect_labels = Expected("int64", (), max_rows=4)
    t.meter = CpuMeter()
    t.log = SimpleNamespace(warning=lambda *a, **k: None)
    t.loop = Dispatcher(t.bus, {}, t.log)
    t._routes()
    return t, t.bus


def test_a_batch_queued_behind_a_loss_goes_on_when_its_labels_arrive():
    x = [torch.rand(4, 3) for _ in range(2)]
    y = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])]
    script = [_message("fwd", PREV, 0, x[0]), _message("fwd", PREV, 1, x[1]),
              _message("labels", OWNER, 0, y[0]), _message("labels", OWNER, 1, y[1]),
              _message("end", OWNER, 0)]
    t, bus = _last_stage(script, in_flight=2)
    t._serve()
    bwd = [meta["step"] for kind, _, meta in bus.sent if kind == "bwd"]
    assert bwd == [0, 1] and not t.queued and not t.seg.pending
    # the same two steps in the synchronous order give the same weights
    torch.manual_seed(0)
    ref = SegmentTrainer(torch.nn.Sequential(torch.nn.Linear(3, 2)), lr=0.1)
    for s in (0, 1):
        ref.forward(x[s], s)
        ref.loss_backward(y[s], s)
    for a, b in zip(t.seg.module.parameters(), ref.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_activations_for_a_step_trained_already_are_refused():
    """Step 0 trained, then step 0 again: training it twice would answer it twice (and make
    the stage's replay differ from what it sent), so it is refused naming the sender."""
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 1, 0])
    script = [_message("fwd", PREV, 0, x), _message("labels", OWNER, 0, y),
              _message("fwd", PREV, 0, x)]
    t, _ = _last_stage(script, in_flight=2)
    with pytest.raises(BusError, match="for step 0, where step 1 comes next"):
        t._serve()


def test_more_batches_than_the_roster_allows_are_refused():
    """With one batch in flight the owner never sends step 1 before step 0's gradient is
    back: a stage holding step 0 refuses it."""
    script = [_message("fwd", PREV, s, torch.rand(4, 3)) for s in range(2)]
    t, _ = _last_stage(script, in_flight=1)
    with pytest.raises(BusError, match="allows 1 in flight"):
        t._serve()
