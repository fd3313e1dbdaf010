"""The owner's part of training: epochs of steps with up to `in_flight` batches out, releases
through the defences, the owner's tail if it keeps one, and evaluation (through the chain, or
locally on the delivered model)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from clicooper_bus.config import RunConfig
from clicooper_bus.errors import PoisonedInput
from clicooper_bus.ml.data import batch_order, to_float
from clicooper_bus.ml.privacy.release import inference_model
from clicooper_bus.ml.tensors import (
    Expected,
    check_result,
    param_grads,
    received,
    state_tensors,
)
from clicooper_bus.net.bus import Bus
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import Metrics
from clicooper_bus.services.dispatch import Dispatcher, Mailbox
from clicooper_bus.services.owner.books import Books
from clicooper_bus.services.owner.own_metrics import OwnMetrics
from clicooper_bus.services.owner.rollback import OwnerSnapshots
from clicooper_bus.services.owner.setup import OwnerSetup
from clicooper_bus.services.usage import CpuMeter

EVAL_WINDOW = 8  # evaluation batches in flight (no gradients flow back, so they pipeline)


@dataclass
class InFlight:
    """A training step whose forward is out."""

    step: int
    idx: np.ndarray  # the batch's sample indices
    meta: dict  # step, batch, epoch: the header fields of its messages
    shape: tuple[int, ...]  # of the released activations
    labels: np.ndarray  # what the step trains with (`_trained_labels`), drawn once at its send


class Training:
    def __init__(self, cfg: RunConfig, bus: Bus, loop: Dispatcher, mailbox: Mailbox,
                 books: Books, setup: OwnerSetup, kid: dict[str, str]):
        self.cfg, self.bus, self.loop, self.mailbox = cfg, bus, loop, mailbox
        self.books, self.setup, self.kid = books, setup, kid
        self.first, self.last = books.stages[0], books.stages[-1]
        self.meter = CpuMeter()  # the owner's CPU over its part of the training steps
        self.evaluating = False  # an evaluation is under way: its outputs are awaited
        self.eval_sent: set[int] = set()  # evaluation batches out and not yet back
        # the head (and tail) at the steps the trainers snapshot theirs (`[run] snapshot_every`,
        # each epoch boundary): a rollback restores them
        self.snapshots = OwnerSnapshots(setup.head, setup.tail)
        # without the tail the last stage computes the loss: the owner checks it (issue 19)
        self.own = None if setup.tail is not None else OwnMetrics(
            self.last, setup.spec.shapes[-1][0], setup.plan.codec, books.metrics, books.stale)
        self.per = -(-len(setup.data.x_train) // cfg.run.batch_size)  # steps an epoch

    def _after_step(self, step: int) -> None:
        """After training step `step` (the head's update): keep the head of `step + 1` if the
        trainers snapshot theirs there."""
        nxt = step + 1
        if nxt % self.cfg.run.snapshot_every == 0 or nxt % self.per == 0:
            self.snapshots.take(nxt)

    def roll_back(self, step: int) -> None:
        """Back to training step `step`: the head (and tail) of that step, no step sent from
        it on, their metrics forgotten (they will come again), nothing kept or awaited.
        Raises ClicooperError if the owner has no snapshot of `step`."""
        self.snapshots.restore(step)
        self.books.replayed_steps += max(0, self.books.sent - step)
        self.books.sent = step
        for s in [s for s in self.books.metrics if s >= step]:
            del self.books.metrics[s]
        if self.own is not None:
            self.own.forget_from(step)
        self.mailbox.held.clear()
        self.evaluating, self.eval_sent = False, set()
        self.meter.steps = step  # replayed steps count once, as the trainers count them

    # --- receiving what a step waits for -------------------------------------------------------

    def wait(self, what: str, ready) -> None:
        """Dispatch until `ready()`. Raises BusError after `[bus] step_timeout_s` with everyone
        alive, naming `what` was awaited."""
        timeout = self.cfg.bus.step_timeout_s
        self.loop.until(ready, timeout_s=timeout, timed_out=lambda: (
            f"waited {timeout:.0f} s for {what} while everyone is alive: a message was lost or a "
            f"peer is stuck"))

    def receive(self, what: str, kind: str, name: str, step: int | None = None) -> Envelope:
        """The next `kind` message from `name` (of `step`, if given), dispatching meanwhile.
        Raises BusError after `[bus] step_timeout_s` with everyone alive."""
        got: list[Envelope] = []

        def arrived() -> bool:
            env = self.mailbox.take(kind, self.kid[name], step)
            if env is not None:
                got.append(env)
            return bool(got)

        self.mailbox.awaited = (kind, self.kid[name], step)
        try:
            self.wait(what, arrived)
        finally:
            self.mailbox.awaited = None
        return got[0]

    def _checked(self, env: Envelope, shape: tuple[int, ...] | None, n: int | None = None
                 ) -> torch.Tensor:
        """The body once it passed the receive check (`ml.tensors.received`): float32 of
        exactly `shape`, or else `n` rows of what the owner's tail takes (the last stage's
        output, by the signed plan), and finite. Raises PoisonedInput naming the sender."""
        if shape is not None:
            want = Expected("float32", tuple(shape[1:]), rows=shape[0])
        else:
            want = Expected("float32", tuple(self.setup.spec.shapes[self.setup.plan.tail]), rows=n)
        h = env.header
        return received(env, want, self.books.names.get(h.sender, h.sender))

    # --- training ------------------------------------------------------------------------------

    def epoch(self, epoch: int, step: int, start: int = 0) -> tuple[dict, int]:
        """One epoch from its batch `start`, global step `step` (after a rollback the epoch's
        earlier steps' metrics are kept): its summary row and the next step."""
        cfg, data = self.cfg, self.setup.data
        batches = batch_order(len(data.x_train), cfg.run.batch_size, cfg.run.seed, epoch,
                              self.setup.order_key)
        report = max(1, len(batches) // 10)
        t0, seen = time.perf_counter(), sum(len(i) for i in batches[:start])
        first_step, fresh = step - start, 0
        if step == 0:
            self.snapshots.take(0)
        window: deque[InFlight] = deque()
        for b in range(start, len(batches)):
            idx = batches[b]
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                break
            if len(window) == cfg.run.in_flight:  # pipelined: the oldest batch must finish
                self._complete(window.popleft())
            self.meter.step_started()
            window.append(self._send(idx, {"step": step, "batch": b, "epoch": epoch}))
            seen += len(idx)
            fresh += len(idx)
            step += 1
            if (b + 1) % report == 0:
                self._progress(epoch, b + 1, len(batches), first_step,
                               fresh / (time.perf_counter() - t0))
        while window:  # an epoch ends with nothing in flight
            self._complete(window.popleft())
        steps = range(first_step, step)
        own = self.own
        self.wait("training metrics", lambda: all(
            s in self.books.metrics and (own is None or s in own.checked) for s in steps))
        ms = [self.books.metrics[s] for s in steps]
        sizes = [len(i) for i in batches[:len(steps)]]
        n = max(1, seen)
        return {"epoch": epoch, "loss": sum(m.loss * k for m, k in zip(ms, sizes, strict=True)) / n,
                "train_accuracy": sum(m.correct for m in ms) / n, "steps": len(steps),
                "wall_s": time.perf_counter() - t0}, step

    def _progress(self, epoch: int, done: int, total: int, first_step: int, rate: float) -> None:
        latest = max((s for s in self.books.metrics if s >= first_step), default=None)
        loss = self.books.metrics[latest].loss if latest is not None else float("nan")
        print(f"  epoch {epoch + 1} step {done}/{total} loss {loss:.4f} {rate:,.0f} samples/s",
              flush=True)

    def hold(self) -> None:
        """Send nothing new while a peer is suspected (see `Dispatcher.hold`); raises
        PeersGone when one stays silent past `[bus] rejoin_timeout_s`."""
        self.loop.hold(self.cfg.participants.owner)

    def _send(self, idx: np.ndarray, meta: dict) -> InFlight:
        """A step's forward: the released activations to stage 1, labels to the last stage.
        Not while a peer is suspected: a step starts only with everyone heard."""
        self.hold()
        self.books.sent = max(self.books.sent, meta["step"] + 1)  # its metrics may now come
        trained = self._trained_labels(idx)
        if self.setup.penalty is not None:
            self.setup.penalty.labels(meta["step"], trained)
        act = self._release(self.setup.data.x_train[idx], idx, meta["step"])
        self.bus.send_array("fwd", self.first, act, **meta)
        if self.own is not None:
            codec = self.setup.defences.codec
            labels = codec.encode(idx, trained) if codec is not None else trained
            self.own.sent(meta["step"], labels)
            self.bus.send_array("labels", self.last, labels, **meta)
        return InFlight(meta["step"], idx, meta, tuple(act.shape), trained)

    def _complete(self, s: InFlight) -> None:
        """The rest of a training step once its forward is out: the owner's tail (if it keeps
        one), then the gradients from the first stage into the head."""
        if self.setup.tail is not None:
            self._tail_step(s)
        env = self.receive(f"gradients of step {s.step} from {self.first}", "bwd", self.first,
                           s.step)
        grad = self._checked(env, s.shape)
        if not self.setup.defences.head_fixed:
            head = self.setup.head
            head.backward(grad, s.step)
            # the head's weights were finite: a finite gradient that made them non-finite is
            # refused naming stage 1 (no activation is released from non-finite weights)
            check_result(state_tensors(head.module, head.optimizer), grad, sender=self.first,
                         kind="bwd", step=s.step, given_as="gradients",
                         made="the owner's head {}")
        self.meter.step_done()
        self._after_step(s.step)

    def _release(self, images, idx, step: int) -> torch.Tensor:
        """The head's activation of one training batch, through the privacy filter."""
        d, x, head = self.setup.defences, to_float(images), self.setup.head
        flt = d.filter
        if d.head_fixed:  # `once`: the fixed head and per-sample noise give the same release
            out = head.evaluate(x)
            return flt(out, ids=idx, split="train") if flt is not None else out
        post = (lambda a: flt(a, ids=idx, split="train", step=step)) if flt is not None else None
        return head.forward(x, step, post=post)

    def _trained_labels(self, idx: np.ndarray) -> np.ndarray:
        """The labels the run trains samples `idx` with: randomised under randomised response
        (`[privacy] label_epsilon`), else the true ones; never the true ones leave otherwise."""
        return self.setup.defences.train_labels(idx, self.setup.data.y_train[idx])

    def _tail_step(self, s: InFlight) -> None:
        """Owner tail: the last stage's output comes back; the owner computes the loss and sends
        the gradient back down the chain."""
        env = self.receive(f"the output of step {s.step} from {self.last}", "fwd", self.last,
                           s.step)
        tail = self.setup.tail
        x = self._checked(env, None, len(s.idx))
        # the owner's labels are the plan's and its tail's weights finite: whatever of the
        # tail's turns non-finite was made by the last stage's output, refused naming it
        blame = {"sender": self.last, "kind": "fwd", "step": s.step, "given_as": "outputs",
                 "made": "the owner's tail {}"}
        check_result([("output", tail.forward(x, s.step))], x, **blame)
        r = tail.loss_backward(torch.from_numpy(s.labels).long(), s.step, update=False)
        check_result([("loss", r.loss), ("gradient for the last stage", r.grad_in),
                      *param_grads(tail.module)], x, **blame)
        self.bus.send_array("bwd", self.last, r.grad_in, **s.meta)
        tail.update()
        check_result(state_tensors(tail.module, tail.optimizer), x, **blame)
        self.books.metrics[s.step] = Metrics(r.loss, r.correct)

    # --- evaluation ----------------------------------------------------------------------------

    def _decode(self, logits: torch.Tensor) -> torch.Tensor:
        codec = self.setup.defences.codec
        return codec.decode(logits) if codec is not None else logits

    def evaluate_locally(self) -> float:
        """Test accuracy of the delivered model on the owner: nothing is released."""
        flt = self.setup.defences.filter
        model = inference_model(self.setup.segments, flt.spec if flt is not None else None)
        x, y, bs = self.setup.data.x_test, self.setup.data.y_test, self.cfg.run.batch_size
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), bs):
                pred = self._decode(model(to_float(x[i:i + bs]))).argmax(1).numpy()
                correct += int((pred == y[i:i + bs]).sum())
        return correct / max(1, len(x))

    def evaluate(self, epoch: int) -> float:
        """Test accuracy through the chain, `EVAL_WINDOW` batches in flight."""
        x, y, bs = self.setup.data.x_test, self.setup.data.y_test, self.cfg.run.batch_size
        batches = [slice(i * bs, (i + 1) * bs) for i in range((len(x) + bs - 1) // bs)]
        kind = "eval_fwd" if self.setup.tail is not None else "eval_out"
        correct, sent, done = 0, 0, 0
        self.evaluating, self.eval_sent = True, set()
        while done < len(batches):
            while sent < len(batches) and sent - done < EVAL_WINDOW:
                self.eval_sent.add(sent)  # before it is sent: its output may come at once
                self._send_eval(x, batches[sent], sent, epoch * len(batches) + sent, epoch)
                sent += 1
            env = self.receive("evaluation outputs", kind, self.last)
            i = env.header.step  # one the owner has out (`on_eval_out`)
            n = len(y[batches[i]])
            if self.setup.tail is not None:
                got = self._checked(env, None, n)
                logits = self.setup.tail.evaluate(got)
                check_result([("evaluation output", logits)], got, sender=self.last,
                             kind=kind, step=i, given_as="outputs", made="the owner's tail {}")
            else:
                logits = self._checked(env, (n, self.setup.plan.n_outputs))
            correct += int((self._decode(logits).argmax(1).numpy() == y[batches[i]]).sum())
            done += 1
        self.evaluating = False
        return correct / max(1, len(x))

    def on_eval_out(self, env: Envelope) -> None:
        """The last stage's output of an evaluation batch the owner has out, kept until taken;
        any other (no evaluation under way, a batch not asked for or already back) is refused
        naming the last stage (a clean stop): it sends only what it was given."""
        h = env.header
        if not self.evaluating or h.step not in self.eval_sent:
            raise PoisonedInput(sender=self.last, kind=h.kind, step=h.step, problem=(
                f"an evaluation output the owner did not ask for (evaluation batches out: "
                f"{sorted(self.eval_sent) if self.evaluating else 'none'})"))
        self.eval_sent.discard(h.step)
        self.mailbox.put(env)

    def _send_eval(self, x, sl: slice, i: int, noise_step: int, epoch: int) -> None:
        self.hold()
        act, flt = self.setup.head.evaluate(to_float(x[sl])), self.setup.defences.filter
        if flt is not None:
            ids = np.arange(sl.start, min(sl.stop, len(x)))
            act = flt(act, ids=ids, split="test", step=noise_step)
        self.bus.send_array("eval_fwd", self.first, act, step=i, batch=i, epoch=epoch)
