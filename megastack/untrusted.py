"""Reading files megastack did not write: one discipline for every JSON file and every field taken from one.

A file's values are the file's: any type, any size, any depth. Everything read from config.json, a
safetensors header, an index, megastack.json, Megatron-LM's args or a DCP metadata goes through here, so a
malformed value is always the same kind of one-line error (file, field, what was found, what to do) and
never an ``int()`` traceback or a silently truthy string.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megastack.errors import UserError


class _Refused(Exception):
    """A JSON document that parses but is not plain JSON (a key twice, NaN)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json keeps the last silently; the safetensors library and a careful reader refuse
            raise _Refused(f"names key '{key[:80]}' twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which JSON does not allow")


def loads_json(raw: bytes | str, where: str | os.PathLike, fix: str) -> Any:
    """Parse untrusted JSON: UTF-8, no duplicate keys, no NaN/Infinity, any depth refused cleanly."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Refused as exc:
        raise UserError(f"{where}: {exc}; {fix}") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be what it claims; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not valid JSON ({detail}); {fix}") from None


def read_json(path: str | os.PathLike, max_bytes: int, fix: str) -> Any:
    """An untrusted JSON file of at most ``max_bytes`` (checked before anything is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{path}: {size} bytes, more than such a file can be ({max_bytes}); {fix}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__}); {fix}") from None
    return loads_json(raw, path, fix)


def is_count(value: Any) -> bool:
    """A non-negative int that is not a bool (JSON's true is Python's 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_counts(values: Any, length: int | None = None) -> bool:
    return (
        isinstance(values, (tuple, list))
        and (length is None or len(values) == length)
        and all(is_count(v) for v in values)
    )


_KIND_NAMES = {
    int: "an integer",
    float: "a finite number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def typed(
    value: Any,
    kind: type,
    where: str | os.PathLike,
    name: str,
    fix: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
) -> Any:
    """``value`` if it is exactly ``kind`` and in range, else a one-line UserError.

    Nothing converts (the string "false" is not a bool, true is not an int, "12" is not 12) except an int
    standing for a float; floats must be finite. ``name`` is how the error names the value (``field 'x'``)."""
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind in (int, float):
        ok = (
            (kind is int or math.isfinite(value))
            and (not positive or value > 0)
            and (minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)
        )
    if ok:
        return value
    expected = _KIND_NAMES.get(kind, kind.__name__)
    if positive:
        expected = "a positive " + expected.split(" ", 1)[1]
    if minimum is not None and maximum is not None:
        expected += f" in [{_number(minimum)}, {_number(maximum)}]"
    elif minimum is not None:
        expected += f" >= {_number(minimum)}"
    elif maximum is not None:
        expected += f" up to {_number(maximum)}"
    try:
        shown = json.dumps(value)[:40]
    except (TypeError, ValueError):
        shown = f"a {type(value).__name__}"
    raise UserError(f"{where}: {name} is {shown}; expected {expected}; {fix}")
