"""Strict msgpack for bytes that come from another party.

msgpack is not canonical (FACTS.md): we never re-encode to verify, we only parse. Parsing here
is strict so that two readers can never disagree about what a document says: no duplicate map
keys, only string keys, no extension types, bounded nesting, no trailing bytes, and every
declared length bounded by the input (msgpack's own `unpackb` guarantees the last).
"""

from __future__ import annotations

from typing import Any

import msgpack

from clicooper_bus.errors import DecodeError

MAX_DEPTH = 32


def pack(obj: Any) -> bytes:
    """Encode with bin for bytes and str for text; map order is the dict's order."""
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if type(key) is not str:
            raise DecodeError(f"map key {key!r} is not a string")
        if key in out:
            raise DecodeError(f"duplicate map key '{key}'")
        out[key] = value
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


_SCALARS = (type(None), bool, int, float, str, bytes)


def _check_tree(obj: Any, max_depth: int) -> None:
    """Bound the nesting and allow only plain types (msgpack maps its timestamp ext natively)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) in _SCALARS:
            continue
        if type(item) not in (list, dict):
            raise DecodeError(f"value of type {type(item).__name__} is not allowed")
        if depth > max_depth:
            raise DecodeError(f"nesting deeper than {max_depth} levels")
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children)


def unpack(data: bytes | memoryview, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one strict msgpack document or raise `DecodeError` saying what was wrong."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs_to_dict,
            ext_hook=_reject_ext,
            timestamp=0,
        )
    except DecodeError:
        raise
    except msgpack.StackError:
        raise DecodeError("nesting too deep") from None
    except msgpack.ExtraData as exc:
        raise DecodeError(f"trailing bytes after the document ({len(exc.extra)} bytes)") from None
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
        # ValueError covers truncated input, declared lengths beyond the buffer and StackError.
        raise DecodeError(f"not valid msgpack: {exc}") from None
    _check_tree(obj, max_depth)
    return obj
