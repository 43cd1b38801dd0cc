"""Strict JSON for every file the project writes: a non-finite number becomes `null`.

Python's `json` writes NaN and Infinity as bare tokens that strict parsers (JavaScript, jq,
most other languages) reject; a metric that is not a number is written as `null` instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (also in nested dicts, lists and 0-d tensors) made None."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return finite_or_none(item())
    return value


def dumps(data: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN/Infinity (they become null); unknown types as `str`."""
    kwargs.setdefault("default", str)
    return json.dumps(finite_or_none(data), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Write strict JSON atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(data, indent=indent))
    os.replace(tmp, path)
