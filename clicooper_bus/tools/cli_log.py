"""`clicooper log ...`: the provenance log tools (verify, show, export, checkpoint, prove,
repair, demo). torch is never imported here."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.identity import load_public
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tlog.merkle import verify_consistency, verify_inclusion


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty() and total:
        print(f"\r{stage}: {done}/{total} ({100 * done // total}%)", end="", file=sys.stderr,
              flush=True)


# --- commands ----------------------------------------------------------------------------------

def cmd_log_verify(args: argparse.Namespace) -> int:
    owner = load_public(args.owner_key) if args.owner_key else None
    witnessed = [Path(f).read_text() for f in args.checkpoint]
    result = verify_log(args.dir, owner=owner, witnessed=witnessed, progress=_progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.ok:
        print(f"OK: {result.entries} entries, {result.body_records} bodies "
              f"({result.body_bytes} bytes), {result.checkpoints} checkpoints verified; "
              f"run {result.run_id}; root {result.root}")
        for w in result.warnings:
            print(f"warning: {w}")
        for e in result.equivocations:
            print(f"EQUIVOCATION proven by the log ({e}): the log is whole, but a member showed "
                  f"its receivers other messages than it logged")
    else:
        f = result.failure
        where = f.file + (f" entry {f.index}" if f.index is not None and f.file == "leaves.dat"
                          else f" record {f.index}" if f.index is not None else "")
        print(f"FAILED at {where or 'log'}: {f.reason}")
    if not result.ok:
        return 1
    return 3 if result.equivocations else 0


def cmd_log_show(args: argparse.Namespace) -> int:
    with ProvenanceLog.open(args.dir) as plog:
        roster = Roster.open(plog.roster_bytes)
        names = {m.key_id: f"{m.name} ({m.role})" for m in roster.members}
        per: dict[str, dict[str, int]] = {}
        leaf_bytes = 0
        for i in range(plog.size):
            leaf = plog.leaf(i)
            leaf_bytes += len(leaf)
            h = parse_header(split_leaf(leaf)[0])
            row = per.setdefault(names.get(h.sender, h.sender), {})
            row[h.kind] = row.get(h.kind, 0) + 1
        print(f"log {plog.dir}\n  run {plog.run_id}, origin {plog.origin}")
        body_bytes = sum(plog.bodies.lengths) - 32 * plog.body_records()
        print(f"  retention {plog.retention.spec}; {plog.size} entries ({leaf_bytes} bytes of "
              f"leaves), {plog.body_records()} bodies ({body_bytes} bytes)")
        print(f"  roster: owner {roster.owner.name}, stages {' -> '.join(roster.stages)}, "
              f"notary {roster.notary.name if roster.notary else '-'}")
        print("  entries per sender and kind:")
        for sender, kinds in sorted(per.items()):
            detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            print(f"    {sender}: {sum(kinds.values())} ({detail})")
        n = plog.checkpoint_count
        print(f"  checkpoints: {n}")
        for i in range(max(0, n - 3), n):
            cp = plog.checkpoint_at(i)
            print(f"    #{i}: size {cp.size}, root {cp.root.hex()}")
        for t in plog.torn:
            print(f"  TORN TAIL: {t} (run `clicooper log repair {plog.dir}`)")
    return 0


def cmd_log_export(args: argparse.Namespace) -> int:
    with ProvenanceLog.open(args.dir) as plog:
        out = sys.stdout
        for i in range(plog.size):
            out.write(_b64(plog.leaf(i)) + "\n")
    return 0


def cmd_log_checkpoint(args: argparse.Namespace) -> int:
    with ProvenanceLog.open(args.dir) as plog:
        note = plog.latest_note()
        if note is None:
            raise ClicooperError(f"log {args.dir} has no checkpoint yet")
        sys.stdout.write(note)
    return 0


def cmd_log_prove(args: argparse.Namespace) -> int:
    with ProvenanceLog.open(args.dir) as plog:
        tree = plog.tree
        if args.consistency:
            if args.size is not None:
                raise ClicooperError("--size applies to --index; --consistency takes N M")
            m, n = args.consistency
            if not 0 < m <= n <= tree.size:
                raise ClicooperError(f"need 0 < N <= M <= {tree.size} (the log's size)")
            proof = tree.consistency_proof(m, n)
            doc = {"size1": m, "size2": n, "root1": _b64(tree.root(m)),
                   "root2": _b64(tree.root(n)), "proof": [_b64(p) for p in proof]}
            verify_consistency(m, n, tree.root(m), tree.root(n), proof)  # never print a bad one
        else:
            size = tree.size if args.size is None else args.size
            if not 0 <= args.index < size <= tree.size:
                raise ClicooperError(f"need 0 <= index < size <= {tree.size} (the log's size)")
            proof = tree.inclusion_proof(args.index, size)
            lh = tree.leaf_hash_at(args.index)
            verify_inclusion(args.index, size, lh, proof, tree.root(size))
            doc = {"leafIdx": args.index, "treeSize": size, "leafHash": _b64(lh),
                   "proof": [_b64(p) for p in proof], "root": _b64(tree.root(size))}
    print(json.dumps(doc, indent=2))
    return 0


def cmd_log_repair(args: argparse.Namespace) -> int:
    with ProvenanceLog.open(args.dir, writable=True) as plog:
        print(f"log {args.dir}: {plog.size} entries; "
              + ("cut back: " + "; ".join(plog.torn) if plog.torn else "nothing to repair"))
    return 0


def cmd_log_demo(args: argparse.Namespace) -> int:
    from clicooper_bus.tools.log_demo import write_demo

    keys = Path(args.keys) if args.keys else Path(args.dir).resolve().parent / "keys"
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError
    except ValueError:
        raise ClicooperError(f"--shape {args.shape!r} is not BATCH,WIDTH (two positive "
                             f"integers)") from None
    plog = write_demo(args.dir, messages=args.messages, keys_dir=keys, run_id=args.run_id,
                      seed=args.seed, shape=shape, retention=args.retention,
                      checkpoint_every=args.checkpoint_every)
    with plog:
        print(f"wrote {plog.size} signed messages and {plog.checkpoint_count} checkpoints to "
              f"{args.dir} (keys in {keys}); owner key: {keys / 'owner.pub'}")
    return 0



def add_log_commands(sub) -> None:
    """The `log` subcommands, under the `clicooper` parser's subparsers `sub`."""
    logp = sub.add_parser("log", help="provenance log tools").add_subparsers(dest="cmd",
                                                                             required=True)
    c = logp.add_parser("verify", help="verify every record, signature, chain, body, checkpoint",
                        epilog="exit codes: 0 the log verifies; 1 it does not (the first failure "
                               "is named); 2 a usage error; 3 it verifies and holds the "
                               "notary's proof that a member equivocated (signed two messages "
                               "at one place of its chain)")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    c.add_argument("--json", action="store_true", help="machine-readable result")
    c.add_argument("--owner-key", help="pin the roster's owner to this public key file")
    c.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a signed checkpoint seen elsewhere; the log must contain its tree "
                        "(repeatable)")
    c.set_defaults(func=cmd_log_verify)
    c = logp.add_parser("show", help="human summary")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    c.set_defaults(func=cmd_log_show)
    c = logp.add_parser("export", help="export leaves, base64, one per line, in log order")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    c.add_argument("--leaves", action="store_true", required=True,
                   help="print every leaf (header || signature), base64, one per line, in log order")
    c.set_defaults(func=cmd_log_export)
    c = logp.add_parser("checkpoint", help="print the latest signed checkpoint note")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    c.set_defaults(func=cmd_log_checkpoint)
    c = logp.add_parser("prove", help="inclusion (--index) or consistency (--consistency) proof")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--index", type=int, help="inclusion proof of entry INDEX in the latest checkpoint")
    g.add_argument("--consistency", type=int, nargs=2, metavar=("N", "M"),
                   help="consistency proof from tree size N to size M")
    c.add_argument("--size", type=int, help="tree size for --index (default: the whole log)")
    c.set_defaults(func=cmd_log_prove)
    c = logp.add_parser("repair", help="cut a torn tail back to the last whole record")
    c.add_argument("dir", help="the log directory (RUN_DIR/log)")
    c.set_defaults(func=cmd_log_repair)
    c = logp.add_parser("demo", help="write a demo log of signed random-tensor messages")
    c.add_argument("dir", help="directory to create the demo log in")
    c.add_argument("--messages", type=int, default=1000,
                   help="messages to log (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    c.add_argument("--run-id", default="demo", help="run id (default: %(default)s)")
    c.add_argument("--keys", help="key directory (default: keys/ beside DIR)")
    c.add_argument("--shape", default="32,64", help="activation shape BATCH,WIDTH")
    c.add_argument("--retention", default="all", help="all, none, sample:N or kind=policy,...")
    c.add_argument("--checkpoint-every", type=int, default=100,
                   help="sign a checkpoint every N entries (default: %(default)s)")
    c.set_defaults(func=cmd_log_demo)
