"""What the owner leaves in its run directory (`clicooper_bus.layout.RunLayout`): the config
it ran, the assembled model, the owner-only label groups and secret batch order key (0600),
the summary, and the provenance
bundle `clicooper model verify` reads. Every file goes through the one atomic writer."""

from __future__ import annotations

import hashlib
import json

from safetensors.torch import save

from clicooper_bus.config import RunConfig
from clicooper_bus.layout import RunLayout, json_text, write_atomic
from clicooper_bus.ml.delivered import model_metadata
from clicooper_bus.ml.models import state_dict_with_prefix
from clicooper_bus.net import codec
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.services.owner.setup import OwnerSetup


def write_config(layout: RunLayout, cfg: RunConfig) -> None:
    """What the auditor loads the run's data from; the roster commits to its digest."""
    layout.root.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.config, cfg.to_toml())


def write_model(layout: RunLayout, run: OwnerSetup, run_id: str) -> str:
    """The assembled model (safetensors, every segment's weights under its prefix), with what
    `clicooper_bus.load_model` needs in its metadata (spec, plan, release transform; never the
    label groups); returns its SHA-256 (hex), which the owner puts in the log."""
    flt = run.defences.filter
    meta = model_metadata(run_id=run_id, spec=run.spec, plan=run.plan,
                          digest=run.roster.meta["model_spec"],
                          release=flt.spec if flt is not None else None)
    raw = save(state_dict_with_prefix(run.segments), metadata=meta)
    write_atomic(layout.model, raw)
    return hashlib.sha256(raw).hexdigest()


def write_label_groups(layout: RunLayout, groups) -> None:
    """Which pseudo-class is which class, for the owner (and its auditor) only: not in the model
    file, which may be handed on, since with the log's pseudo-labels it would decode every
    retained label."""
    doc = {"groups": [int(g) for g in groups], "note": "output (pseudo-class) -> true class; owner-only"}
    write_atomic(layout.label_groups, json.dumps(doc), mode=0o600)


def write_order_key(layout: RunLayout, key: bytes) -> None:
    """The secret batch order's key, for the owner's auditor only (0600, hex, as the owner's
    secret is kept): the signed roster commits to it (`order_commitment`)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.order_key, key.hex() + "\n", mode=0o600)


def write_summary(layout: RunLayout, summary: dict) -> None:
    """`summary.json`. Raises ValueError naming the key of a NaN or infinity rather than write
    invalid JSON (received values are checked finite before use, so none should reach it)."""
    write_atomic(layout.summary, json_text(summary, what=str(layout.summary)))


def write_provenance(layout: RunLayout, *, cfg: RunConfig, stages: list[str], rounds: int,
                     roster_bytes: bytes, certs: dict[tuple[int, int], bytes], final_note: str,
                     checkpoints: list[str], model_sha: str, owner: PublicIdentity,
                     notary: PublicIdentity, handovers: list[list[bytes]] = ()) -> None:
    """`provenance/`: what `clicooper model verify` needs beside the model (`handovers`:
    each logged handover, [leaf, body], when a standby took a stage over)."""
    bundle = layout.provenance
    bundle.certificates.mkdir(parents=True, exist_ok=True)
    write_atomic(bundle.roster, roster_bytes)
    if handovers:
        write_atomic(bundle.handovers, codec.pack([list(h) for h in handovers]))
    for (k, t), raw in sorted(certs.items()):
        write_atomic(bundle.certificate(k, t), raw)
    write_atomic(bundle.checkpoint, final_note)
    write_atomic(bundle.checkpoints, json_text(checkpoints, what="checkpoints.json", indent=1))
    w = cfg.watermark
    manifest = {"format": "clicooper-provenance/1", "run_id": cfg.run.id, "stages": stages,
                "rounds": rounds, "bits": w.bits, "threshold": w.threshold,
                "model_sha256": model_sha, "owner": owner.vkey, "notary": notary.vkey}
    write_atomic(bundle.manifest, json_text(manifest, what="manifest.json"))
    print(f"owner: wrote {bundle.root} ({len(certs)} certificates)", flush=True)
