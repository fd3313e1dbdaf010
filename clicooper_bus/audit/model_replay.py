"""A delivered model's verdict with its stages' replay verification (issue 19): `model verify`
fails for a model whose trainer did not compute what it sent.

`ml.watermark.verify.verify_model` proves order and binding (the chained marks, the
certificates, the log's inclusion proofs); it cannot say that a trainer trained as it should.
Replay verification can (`audit.training_replay`). With the run's log given, every stage is
re-executed from it here; without it, the verdicts an audit recorded in the bundle
(`replay.json`, unsigned: a convenience, which anyone holding the bundle could delete) are
read. A stage that diverged fails the verdict, naming its trainer and its first wrong step; a
stage whose replay stopped early (its inputs not retained) is reported with its coverage and
does not fail it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clicooper_bus.audit.training_replay import replay_log
from clicooper_bus.layout import ProvenanceLayout
from clicooper_bus.ml.watermark.verify import Verdict, verify_model
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log


def verify_model_replayed(model: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], *,
                          log_dir: str | os.PathLike[str] | None = None,
                          owner: PublicIdentity | None = None, exact: bool = False,
                          threads: int = 1) -> Verdict:
    """`verify_model`, then each stage's replay verdict (from the log when `log_dir` is given,
    else from the bundle's `replay.json` if an audit wrote one) on its StageResult; a
    divergence fails the verdict. `threads`: for trainers whose `hello` did not say theirs.
    Never raises for a bad model, bundle or log: the verdict names the failure."""
    v = verify_model(model, bundle_dir, log_dir=log_dir, owner=owner, exact=exact)
    if not v.ok:
        return v
    if log_dir is not None:
        checked = verify_log(log_dir)  # replay reads only a log that verifies
        if not checked.ok:
            v.ok, v.failure = False, {"stage": None, "round": None,
                                      "reason": f"the log does not verify: {checked.failure}"}
            return v
        with ProvenanceLog.open(log_dir) as plog:
            rows, source = [r.to_json() for r in replay_log(plog, threads)], "replayed from the log"
    else:
        rows, source = _recorded(ProvenanceLayout(Path(bundle_dir)).replay)
    by_stage = {r["stage"]: r for r in rows}
    for s in v.stages:
        if s.stage in by_stage:
            s.replay = by_stage[s.stage]["line"]
    bad = [r for r in rows if not r["ok"]]
    if bad:
        v.ok = False
        v.failure = {"stage": bad[0]["stage"], "round": None,
                     "reason": f"its trainer did not compute what it sent ({source}): "
                               f"{bad[0]['line']}"}
    return v


def _recorded(path: Path) -> tuple[list[dict], str]:
    """The replay verdicts an audit wrote into the bundle, or none."""
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return [], ""
    except (OSError, ValueError):
        return [], ""  # unreadable: no verdict is read from it, as if absent
    ok = type(rows) is list and all(type(r) is dict and {"stage", "ok", "line"} <= set(r)
                                    for r in rows)
    return (rows if ok else []), f"as the audit recorded in {path}"
