"""A delivered model's verdict with its stages' replay verification (issue 19): `model verify`
fails for a model whose trainer did not compute what it sent.

`ml.watermark.verify.verify_model` proves order and binding (the chained marks, the
certificates, the log's inclusion proofs); it cannot say that a trainer trained as it should.
Replay verification can (`audit.training_replay`). With the run's log given, every stage is
re-executed from it here; without it, the verdicts an audit recorded in the bundle
(`replay.json`, unsigned: a convenience, which anyone holding the bundle could delete) are
read, and only if they name this bundle's run and final checkpoint. A stage that diverged fails
the verdict, naming its trainer and its first wrong step; a stage whose replay stopped early
(its inputs not retained, a rollback) is reported with its coverage and does not fail it,
unless `full_replay` asks for every stage replayed to its end from the log.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clicooper_bus.audit.training_replay import replay_log
from clicooper_bus.layout import ProvenanceLayout
from clicooper_bus.ml.watermark.verify import Verdict, verify_model
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log


def verify_model_replayed(model: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], *,
                          log_dir: str | os.PathLike[str] | None = None,
                          owner: PublicIdentity | None = None, exact: bool = False,
                          threads: int = 1, full_replay: bool = False,
                          unseal: Callable[[bytes], bytes] | None = None) -> Verdict:
    """`verify_model`, then each stage's replay verdict (from the log when `log_dir` is given,
    else from the bundle's `replay.json` if an audit wrote one for this run) on its
    StageResult; a divergence fails the verdict, and with `full_replay` so does a stage not
    replayed to its end (which needs `log_dir`: a recorded verdict is unsigned). `threads`:
    for trainers whose `hello` did not say theirs. `unseal`: the owner's (`Identity.unseal`),
    which opens each stage's sealed round states so that the replay starts again after inputs
    the log did not keep (`training_replay._Stage._resume`). Never raises for a bad model, bundle or
    log: the verdict names the failure."""
    v = verify_model(model, bundle_dir, log_dir=log_dir, owner=owner, exact=exact)
    if not v.ok:
        return v
    if full_replay and log_dir is None:
        v.ok, v.failure = False, {"stage": None, "round": None, "reason": (
            "a full replay needs the run's log (--log): the verdicts an audit recorded in the "
            "bundle are unsigned")}
        return v
    if log_dir is not None:
        checked = verify_log(log_dir)  # replay reads only a log that verifies
        if not checked.ok:
            v.ok, v.failure = False, {"stage": None, "round": None,
                                      "reason": f"the log does not verify: {checked.failure}"}
            return v
        with ProvenanceLog.open(log_dir) as plog:
            rows = [r.to_json() for r in replay_log(plog, threads, unseal=unseal)]
            source = "replayed from the log"
    else:
        rows, source = _recorded(ProvenanceLayout(Path(bundle_dir)), v.run_id)
    by_stage = {r["stage"]: r for r in rows}
    for s in v.stages:
        if s.stage in by_stage:
            s.replay = by_stage[s.stage]["line"] + ("" if log_dir is not None else
                                                    f" ({source})")
        elif not rows and source:
            s.replay = source  # a record was there and was not read: say so
    bad = [r for r in rows if not r["ok"]]
    if bad:
        v.ok = False
        v.failure = {"stage": bad[0]["stage"], "round": None,
                     "reason": f"its trainer did not compute what it sent ({source}): "
                               f"{bad[0]['line']}"}
    elif full_replay:
        short = [r for r in rows if not r.get("complete")]
        if short:
            v.ok = False
            v.failure = {"stage": short[0]["stage"], "round": None,
                         "reason": f"not replayed to its end (--full-replay): "
                                   f"{short[0]['line']}"}
    return v


def record(layout: ProvenanceLayout, run_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What `replay.json` holds: the verdicts, bound to the run and to the bundle's final
    checkpoint (`checkpoint.txt`), so that a record copied from another run is not read. It is
    not signed: whoever holds the bundle can rewrite it; `model verify --log` replays instead."""
    return {"run_id": run_id, "checkpoint_sha256": _checkpoint_digest(layout),
            "unsigned": "written by `clicooper audit`; replay the log to check it",
            "stages": rows}


def _checkpoint_digest(layout: ProvenanceLayout) -> str | None:
    try:
        return hashlib.sha256(layout.checkpoint.read_bytes()).hexdigest()
    except OSError:
        return None


ROW_TYPES = {"stage": int, "ok": bool, "line": str}


def _recorded(layout: ProvenanceLayout, run_id: str) -> tuple[list[dict], str]:
    """The replay verdicts an audit wrote into the bundle for this run and final checkpoint,
    or none (absent, unreadable, malformed, or another run's: nothing is read from it)."""
    path = layout.replay
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return [], ""
    except (OSError, ValueError):
        return [], f"not verified: {path} is unreadable (ignored); replay with --log"
    if (type(doc) is not dict or doc.get("run_id") != run_id
            or doc.get("checkpoint_sha256") != _checkpoint_digest(layout)):
        return [], (f"not verified: {path} is not this run's or not for its final checkpoint "
                    f"(ignored); replay with --log")
    rows = doc.get("stages")
    ok = type(rows) is list and rows and all(
        type(r) is dict and all(type(r.get(k)) is t for k, t in ROW_TYPES.items()) for r in rows)
    if not ok:
        return [], f"not verified: {path} is malformed (ignored); replay with --log"
    return rows, f"as the audit recorded in {path}, unsigned"
