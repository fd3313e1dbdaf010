"""The `clicooper` command: one entry point, subcommands per tool.

Exit status: 0 success; 1 a verification failed or the input was bad (the message says which
and why); 2 a usage error (argparse); 130 Ctrl-C. `clicooper run` adds 3 (a run stopped on a
refusal of poisoned input) and 128 + a stop signal (`tools/run.py` `EXIT_CODES`, printed by
`clicooper run --help`). torch is never imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from clicooper_bus import __version__, telemetry
from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.net.identity import Identity, load_identity, load_public, write_identity
from clicooper_bus.tools.cli_log import add_log_commands

# --- keys ---------------------------------------------------------------------------------

def cmd_keys_new(args: argparse.Namespace) -> int:
    ident = Identity.generate(args.name)
    write_identity(ident, args.dir, force=args.force)
    print(f"wrote {Path(args.dir) / (args.name + '.key')} (mode 0600) and "
          f"{Path(args.dir) / (args.name + '.pub')}")
    print(f"key id {ident.key_id}; verifier key {ident.public.vkey}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    if Path(args.file).read_text(errors="replace").startswith("PRIVATE+KEY+"):
        raise ClicooperError(f"{args.file} is a private key: show its .pub file instead")
    pub = load_public(args.file)
    print(json.dumps({"name": pub.name, "key_id": pub.key_id, "vkey": pub.vkey}, indent=2))
    return 0


def cmd_keys_ensure(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.run import ensure_keys

    made = ensure_keys(Path(args.dir), args.names)
    print(f"keys in {args.dir}: created {', '.join(made) if made else 'none'}; "
          f"kept {', '.join(n for n in args.names if n not in made) or 'none'}")
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.join import add_public

    directory, remote = Path(args.dir), None
    if args.config:  # the keys directory and the names a device may take come from the run
        cfg = load_config(args.config)
        directory, remote = Path(cfg.participants.keys), cfg.participants.remote
    key, written = add_public(args.line, directory, remote)
    path = directory / f"{key.name}.pub"
    print(f"{'wrote' if written else 'already there, unchanged:'} {path} (key id {key.key_id})")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.join import invite

    path = invite(args.config, args.name, args.host, args.out)
    print(f"wrote {path}: copy it to the device, and there run\n"
          f"  clicooper join {path.name} --name {args.name}\n"
          f"then add the key line it prints: clicooper keys add LINE")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.join import join

    return join(args.file, args.name, args.keys, wait_s=args.wait)


def cmd_run(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.launch import RunStopped
    from clicooper_bus.tools.run import parse_sets, resume, run

    try:
        if args.resume:
            given = [f for f, v in (("--config", args.config), ("--quick", args.quick),
                                    ("--out", args.out), ("--run-id", args.run_id),
                                    ("--set", args.set), ("--force", args.force),
                                    ("--audit", args.audit)) if v]
            if given:
                raise ClicooperError(f"--resume takes the run's own config.toml as it is: "
                                     f"{', '.join(given)} cannot go with it")
            return resume(args.resume)
        overrides = parse_sets(args.set, args.config)
        return run(args.config, quick=args.quick, out=args.out, run_id=args.run_id,
                   audit=args.audit, overrides=overrides, force=args.force)
    except RunStopped as exc:  # one line, no traceback; the run directory is marked
        print(f"clicooper run: {exc}; marked INTERRUPTED (--resume RUN_DIR takes it up again, "
              f"--force starts over)", file=sys.stderr)
        return exc.code


def _run_epilog() -> str:
    """`clicooper run --help`'s examples and exit codes (the table of `tools/run.py`)."""
    from clicooper_bus.tools.run import EXIT_CODES  # torch-free

    codes = "\n".join(textwrap.fill(text, 92, initial_indent=f"  {code:>3}  ",
                                     subsequent_indent=" " * 7) for code, text in EXIT_CODES)
    return (
        "examples:\n"
        "  clicooper run --quick                      a small run under a fresh id\n"
        "  clicooper run --config configs/demo.toml --run-id try-2\n"
        "  clicooper run --config configs/demo.toml --set run.epochs=3 --set run.lr=0.05\n"
        "  clicooper run --config configs/demo.toml --set data.name=synthetic --audit\n"
        "  clicooper run --config configs/demo.toml --force   delete RUN_DIR of this id first\n"
        "  clicooper run --resume runs/demo           take an interrupted run up again\n"
        "\nexit codes:\n" + codes + "\n"
        "\n" + textwrap.fill(
            "Ctrl-C, SIGTERM and SIGHUP stop every process of the run and mark RUN_DIR with an "
            "INTERRUPTED file; running the same id again refuses until you choose another "
            "--run-id or pass --force, or take it up again with --resume RUN_DIR (from its "
            "last round snapshot; not for a run with privacy defences).", 92))


def cmd_summary(args: argparse.Namespace) -> int:
    run = RunLayout(args.run_dir)
    try:
        s = json.loads(run.summary.read_text())
    except FileNotFoundError:
        raise ClicooperError(f"{run.summary} does not exist: the run did not finish (see "
                             f"{run.telemetry} or the processes' output)") from None
    print(f"run {s['run_id']}: {s['model']} on {s['dataset']}, stages {' -> '.join(s['stages'])}")
    if s.get("stopped"):
        st = s["stopped"]
        at = f" of step {st['step']}" if "step" in st else ""
        print(f"STOPPED: {st['by']} refused {st['kind']}{at} from {st['sender']}: "
              f"{st['problem']}; no model; {s['steps']} step(s) done")
        return 0
    for row in s["per_epoch"]:
        acc = f", test accuracy {row['accuracy']:.4f}" if "accuracy" in row else ""
        print(f"  epoch {row['epoch'] + 1}: loss {row['loss']:.4f}, train accuracy "
              f"{row['train_accuracy']:.4f}{acc}, {row['wall_s']:.1f} s")
    msgs = ", ".join(f"{k} {v}" for k, v in s["messages"].items())
    print(f"test accuracy {s['test_accuracy']:.4f} after {s['epochs']} epoch(s), {s['steps']} "
          f"steps, {s['wall_s']:.0f} s\nmessages: {msgs}\nfinal checkpoint: size "
          f"{s['final_checkpoint']['size']}, root {s['final_checkpoint']['root']}")
    return 0


def verify_training_cmd(run_dir: Path) -> int:
    """`clicooper audit --verify-training RUN_DIR`: the log verified, then every stage
    re-executed from it (`audit.training_replay`). Exit 0 when no stage diverged, 1 when one
    did or the log does not verify."""
    from clicooper_bus.audit.training_replay import verify_training
    from clicooper_bus.tlog.logverify import verify_log

    r = verify_log(RunLayout(run_dir).log)
    if not r.ok:
        print(f"clicooper audit: the log does not verify: {r.failure}", file=sys.stderr)
        return 1
    verdicts = verify_training(run_dir)
    for v in verdicts:
        print(v.line())
    return 0 if all(v.ok for v in verdicts) else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from clicooper_bus.audit.report import audit_and_write, compare, print_audit

    if args.compare:
        out = compare([Path(d) for d in args.compare], Path(args.out or "audit-compare"))
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.png'}")
        return 0
    if not args.run_dir:
        raise ClicooperError("name a run directory (clicooper audit RUN_DIR) or --compare RUN...")
    if args.verify_training:
        return verify_training_cmd(Path(args.run_dir))
    owner = load_public(args.owner_key) if args.owner_key else None
    witnessed = [Path(f).read_text() for f in args.checkpoint]
    from clicooper_bus.ml.attacks import select

    attacked, where, doc = audit_and_write(Path(args.run_dir), force=args.force, owner=owner,
                                           witnessed=witnessed or None,
                                           out=Path(args.out) if args.out else None,
                                           attacks=select(args.attacks))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_audit(attacked, where, doc)
    return 0 if attacked else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from clicooper_bus.ml.delivered import load_model, predict, write_predictions

    model = load_model(args.model, label_groups=args.label_groups)
    p = predict(model, args.data, batch_size=args.batch_size)
    out = write_predictions(p, args.out)
    acc = p.accuracy
    if acc is not None:
        print(f"accuracy {acc:.4f} ({int((p.pred == p.labels).sum())}/{len(p.labels)}) on "
              f"{p.source}")
    else:
        print(f"{len(p.pred)} predictions for {p.source} (no labels: no accuracy)")
    print(f"wrote {out}")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    from clicooper_bus.audit.model_replay import verify_model_replayed

    owner = load_public(args.owner_key) if args.owner_key else None
    if args.full_replay and not args.log:
        print("model verify: --full-replay needs --log (the run's log directory): the replay "
              "verdicts an audit records in the bundle are unsigned", file=sys.stderr)
        return 2
    if args.owner_secret and not args.log:
        print("model verify: --owner-secret opens the stages' sealed states for the replay, "
              "which needs --log", file=sys.stderr)
        return 2
    unseal = load_identity(args.owner_secret).unseal if args.owner_secret else None
    v = verify_model_replayed(args.model, args.bundle, log_dir=args.log, owner=owner,
                              exact=args.exact, full_replay=args.full_replay, unseal=unseal)
    if args.json:
        print(json.dumps(v.to_json(), indent=2))
        return 0 if v.ok else 1
    _print_verdict(v)
    return 0 if v.ok else 1


def _print_verdict(v) -> None:
    if v.stages:
        print(f"{'stage':>5}  {'trainer':<14} {'rounds':>6}  {'bit errors':>10}  {'BER':>6}  "
              f"weights")
        for s in v.stages:
            ber = "no weights" if s.bit_errors is None else f"{s.bit_errors}/{s.bits}"
            rate = "" if s.bit_error_rate is None else f"{s.bit_error_rate:.1%}"
            print(f"{s.stage:>5}  {s.trainer:<14} {s.rounds:>6}  {ber:>10}  {rate:>6}  "
                  f"{'as claimed' if s.weights_as_claimed else 'changed since the claim'}")
            if len(s.trainers) > 1:  # handed over to a standby: who trained which rounds
                print("       " + "; ".join(
                    f"{name} rounds {', '.join(map(str, rounds))}"
                    for name, rounds in s.trainers.items()))
            if s.replay:
                print(f"       replay: {s.replay}")
    if v.ok:
        print(f"OK: run {v.run_id}: {v.certificates} certificates, every chain link, signature "
              f"and inclusion proof holds{'; checked against the log' if v.log_checked else ''}; "
              f"bit error threshold {v.threshold:.0%}")
    else:
        f = v.failure
        where = "" if f["stage"] is None else f"stage {f['stage']}" + (
            "" if f["round"] is None else f", round {f['round']}")
        print(f"FAILED{': ' + where if where else ''}: {f['reason']}")


def cmd_model_dispute(args: argparse.Namespace) -> int:
    from clicooper_bus.ml.watermark.verify import dispute

    if len(args.bundle) < 2:
        raise ClicooperError("a dispute needs at least two --bundle")
    winner, verdicts, reason = dispute(args.model, args.bundle)
    for i, v in enumerate(verdicts):
        state = "verifies" if v.ok else f"fails: {v.failure['reason']}"
        print(f"bundle {i + 1} ({args.bundle[i]}, run {v.run_id or '?'}): {state}")
    if winner is None:
        print(f"undecided: {reason}")
        return 1
    print(f"the model belongs to bundle {winner + 1} ({args.bundle[winner]}): {reason}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.sweep import sweep

    return sweep(args.grid, only=args.only.split(",") if args.only else None, fresh=args.fresh,
                 doc=args.doc, status=args.status)


def cmd_config_defaults(args: argparse.Namespace) -> int:
    from clicooper_bus.config import load_config

    sys.stdout.write(load_config(None).to_toml())
    return 0


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.finetune import finetune_run

    finetune_run(args.run_dir)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from clicooper_bus.ml.compute import config_compute
    from clicooper_bus.ml.data import load_dataset

    cfg = load_config(args.config)
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed)
    plan = config_compute(cfg, data.input_shape, data.classes)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    shape = "x".join(str(v) for v in plan.input_shape)
    print(f"{plan.model} on {cfg.data.name} ({shape}, {plan.outputs} outputs), cuts "
          f"{list(plan.cuts)}{f', owner tail from layer {plan.tail}' if plan.tail else ''}; "
          f"per training sample, FLOPs from torch.utils.flop_counter (batch {plan.batch_size})")
    print(f"{'participant':<16} {'layers':<8} {'fwd FLOPs':>10} {'bwd FLOPs':>10} {'params':>9} "
          f"{'sent B':>8} {'recv B':>8}  ops")
    for p in plan.participants:
        first, end = p.layers
        print(f"{p.participant:<16} {f'{first}-{end - 1}':<8} {_si(p.fwd_flops):>10} "
              f"{_si(p.bwd_flops):>10} {p.params:>9,} {p.bytes_sent:>8,} "
              f"{p.bytes_received:>8,}  {' '.join(p.layer_ops)}")
    for e in plan.edges:
        back = f", {e.bwd_bytes:,} B of gradients back" if e.bwd_bytes else ""
        where = "the loss" if e.what == "labels" else f"cut at layer {e.at_layer}"
        print(f"  {e.sender} -> {e.receiver} ({where}): {e.fwd_bytes:,} B of {e.what}{back} "
              f"per sample")
    print(f"owner's share of training FLOPs: {plan.owner_share:.1%} ({_si(plan.owner_flops)} of "
          f"{_si(plan.train_flops)} FLOPs per sample, forward and backward)")
    return 0


# --- wiring -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clicooper", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="group", required=True)

    keys = sub.add_parser("keys", help="Ed25519 identities").add_subparsers(dest="cmd",
                                                                            required=True)
    k = keys.add_parser("new", help="write NAME.key (0600) and NAME.pub in DIR")
    k.add_argument("name", help="the identity's name (letters, digits, . _ -)")
    k.add_argument("--dir", required=True, help="the key directory")
    k.add_argument("--force", action="store_true", help="overwrite an existing identity")
    k.set_defaults(func=cmd_keys_new)
    k = keys.add_parser("show", help="print a public key file's name, key id and verifier key")
    k.add_argument("file", help="a NAME.pub file")
    k.set_defaults(func=cmd_keys_show)

    k = keys.add_parser("ensure", help="create the named identities that do not exist yet")
    k.add_argument("names", nargs="+", help="identity names")
    k.add_argument("--dir", required=True, help="the key directory")
    k.set_defaults(func=cmd_keys_ensure)

    k = keys.add_parser("add", help="store a public key line a device printed (`clicooper join`) "
                                    "as DIR/NAME.pub")
    k.add_argument("line", help="the verifier-key line, NAME+KEYID+BASE64")
    k.add_argument("--dir", default=load_config(None).participants.keys,
                   help="key directory (default: %(default)s, the config's [participants] keys)")
    k.add_argument("--config", help="the run's config: its keys directory, and NAME must be "
                                    "one of its [participants] remote (recommended)")
    k.set_defaults(func=cmd_keys_add)

    i = sub.add_parser("invite", help="write the join file a remote trainer needs (owner side)")
    i.add_argument("name", help="the trainer, one of the config's [participants] remote")
    i.add_argument("--config", required=True, help="the run config `clicooper run` will use")
    i.add_argument("--host", help="the address devices reach the broker at (replaces the "
                                  "host of [bus] pub and sub, e.g. a wildcard 0.0.0.0)")
    i.add_argument("--out", help="the join file to write (default NAME.join)")
    i.set_defaults(func=cmd_invite)
    j = sub.add_parser("join", help="join a run as a remote trainer and train (device side)")
    j.add_argument("file", help="the join file the owner's `clicooper invite` wrote")
    j.add_argument("--name", required=True, help="this trainer's name, as invited")
    j.add_argument("--keys", default="keys", help="this device's key directory (default: "
                                                  "%(default)s); its key is made if missing")
    j.add_argument("--wait", type=float, default=3600.0,
                   help="seconds to wait for the owner's roster (default: %(default)s)")
    j.set_defaults(func=cmd_join)

    r = sub.add_parser("run", help="run broker, notary, owner and trainers on this machine",
                       description="Run broker, notary, owner and trainers on this machine, "
                                   "wait for them, verify the log and print the summary.",
                       epilog=_run_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--config", help="run config (TOML); see `clicooper config defaults`")
    r.add_argument("--quick", action="store_true",
                   help="a small subset in one epoch (under a minute on 2 cores), under a "
                        "fresh run id unless --run-id is given")
    r.add_argument("--out", help="output directory (default: the config's run.out_dir)")
    r.add_argument("--run-id", help="run id (default: the config's run.id)")
    r.add_argument("--audit", action="store_true",
                   help="an auditor follows the run and writes RUN_DIR/audit/ at its end")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable); VALUE is TOML (3, 0.05, true, "
                        "\"text\", [1, 2]) or a bare word, typed by the key's field, e.g. "
                        "--set run.epochs=3")
    r.add_argument("--force", action="store_true",
                   help="delete an existing run directory of the same id (an interrupted or "
                        "finished run) and start over; a directory clicooper run did not make "
                        "is never deleted")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="take an interrupted run up again from its last round snapshot, with "
                        "its own config.toml (no other flag); not a run with privacy defences")
    r.set_defaults(func=cmd_run)
    ft = sub.add_parser("finetune", help="the owner's fine-tune of a finished run's head and "
                        "tail, stages frozen ([privacy] finetune_epochs; `run` does it itself)")
    ft.add_argument("run_dir", help="the run directory (runs/<id>)")
    ft.set_defaults(func=cmd_finetune)
    pl = sub.add_parser("plan", help="who computes what: FLOPs, parameters and bytes per "
                                     "sample of each participant, and the owner's share")
    pl.add_argument("--config", help="run config (TOML; default: every default)")
    pl.add_argument("--json", action="store_true", help="machine-readable table")
    pl.set_defaults(func=cmd_plan)
    r = sub.add_parser("summary", help="print a finished run's summary.json readably")
    r.add_argument("run_dir", help="the run directory (holding summary.json)")
    r.set_defaults(func=cmd_summary)
    a = sub.add_parser("audit", help="verify a finished run's log, attack it, write the report "
                                     "to RUN_DIR/audit/")
    a.add_argument("run_dir", nargs="?", help="the run directory (holding log/, config.toml, "
                                              "model.safetensors)")
    a.add_argument("--force", action="store_true",
                   help="attack even a log that does not verify (the report says so first)")
    a.add_argument("--owner-key", help="pin the roster's owner to this public key file")
    a.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a checkpoint note seen elsewhere that the log must contain (default: "
                        "RUN_DIR/checkpoint.txt, the final one the owner saw)")
    a.add_argument("--out", help="report directory (default RUN_DIR/audit; with --compare "
                                 "./audit-compare)")
    a.add_argument("--json", action="store_true", help="print report.json instead of a summary")
    a.add_argument("--attacks", help="comma-separated attack names (default: the whole suite)")
    a.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="side-by-side table and figure of runs already audited")
    a.add_argument("--verify-training", action="store_true",
                   help="re-execute every trainer's stage from the log and name the first "
                        "message or weight commitment it did not compute as it should (exit 1); "
                        "prints each stage's coverage")
    a.set_defaults(func=cmd_audit)
    pr = sub.add_parser("predict", help="run a delivered model on an npz: print its accuracy, "
                                        "write its predictions")
    pr.add_argument("model", metavar="RUN_DIR_OR_MODEL",
                    help="a run directory or a model.safetensors file")
    pr.add_argument("--data", required=True,
                    help="npz with uint8 images x_test (else x), N x H x W or N x H x W x C, "
                         "and optional integer labels y_test (else y)")
    pr.add_argument("--out", default="predictions.npz",
                    help="predictions: .csv (index,prediction[,label]) or npz (prediction, "
                         "scores[, label]) (default: %(default)s)")
    pr.add_argument("--label-groups", metavar="FILE",
                    help="the owner's label_groups.json, for a model trained on obfuscated "
                         "labels (default: the one beside the model)")
    pr.add_argument("--batch-size", type=int,
                    help="default: the run's batch size (the owner's evaluation batches)")
    pr.set_defaults(func=cmd_predict)
    mp = sub.add_parser("model", help="a delivered model's provenance").add_subparsers(
        dest="cmd", required=True)
    m = mp.add_parser("verify", help="check a model against its provenance bundle")
    m.add_argument("model", help="model.safetensors")
    m.add_argument("--bundle", required=True, help="the run's provenance/ directory")
    m.add_argument("--log", help="the run's log directory: also verify it, check every index "
                                 "and root, and replay every stage from it (issue 19; a stage "
                                 "that did not compute what it sent fails the model)")
    m.add_argument("--owner-key", help="pin the roster's owner to this public key file")
    m.add_argument("--owner-secret", metavar="OWNER.key",
                   help="with --log: the owner's private key file, which opens each stage's "
                        "sealed round states so that a log keeping only some inputs is "
                        "replayed span by span, not only up to its first gap")
    m.add_argument("--json", action="store_true", help="machine-readable verdict")
    m.add_argument("--exact", action="store_true",
                   help="also require the weights the last claims certify, byte for byte (the "
                        "marks alone can be written by anyone holding the bundle)")
    m.add_argument("--full-replay", action="store_true",
                   help="with --log: also fail unless every stage was replayed to its end (a "
                        "log that did not keep every input leaves a stage not verified; "
                        "without this it is reported, not failed)")
    m.set_defaults(func=cmd_model_verify)
    m = mp.add_parser("dispute", help="decide between competing bundles claiming one model")
    m.add_argument("model", help="the disputed model.safetensors")
    m.add_argument("--bundle", action="append", default=[], required=True,
                   help="a run's provenance/ directory, its delivered model.safetensors beside it")
    m.set_defaults(func=cmd_model_dispute)
    sw = sub.add_parser("sweep", help="run and audit a grid of privacy configurations; write "
                                      "the frontier (docs/PRIVACY.md) or the paper table")
    sw.add_argument("grid", help="grid file (TOML), e.g. configs/sweep.toml")
    sw.add_argument("--only", help="comma-separated run names to run (default: all)")
    sw.add_argument("--fresh", action="store_true", help="rerun runs that already have a report")
    sw.add_argument("--doc", help="write this document instead of the grid's (from the same "
                    "runs and the grid's record)")
    sw.add_argument("--status", action="store_true",
                    help="say which runs are measured (in the grid's out directory), recorded "
                         "(beside the document: docs/PRIVACY.runs.json) or left; run nothing")
    sw.set_defaults(func=cmd_sweep)

    cfgp = sub.add_parser("config", help="run configuration").add_subparsers(dest="cmd",
                                                                            required=True)
    c = cfgp.add_parser("defaults", help="print a complete config with every key documented")
    c.set_defaults(func=cmd_config_defaults)

    add_log_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    telemetry.configure("cli")
    if getattr(args, "messages", 1) < 1:
        print("clicooper: error: --messages must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside a run's processes: one line, no traceback
        print("clicooper: interrupted", file=sys.stderr)
        return 130
    except (ClicooperError, ValueError, OSError) as exc:
        print(f"clicooper: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
