"""Fitted coefficient tables shipped with the package (src/rsae/rational/tables/<name>.json).

Each table holds one fit of r = P/Q to a fixed gate on 4001 points of [-1, 1] (see
`rsae.rational.fit`, which regenerates them with `python -m rsae.rational.fit --regenerate`):

    name                 gate      degrees  cut-off (normalised units)
    relu_3_2             relu      (3, 2)   -          (also relu_5_4, relu_9_8)
    jumprelu_9_8_t0.1    jumprelu  (9, 8)   t0 = 0.1   (also t0.2, t0.3, t0.5)
    jumprelu_3_2_t0.3    jumprelu  (3, 2)   t0 = 0.3   (also jumprelu_5_4_t0.3)
    topk_9_8             topk      (9, 8)   tau = 0.2  (also topk_3_2, topk_5_4)

Those are version B (Q = 1 + |sum_j b_j t^j|); each has a version-A twin `<name>_A`
(Q = 1 + sum_j |b_j| |t|^j), which an upgrade with `sae.denominator=A` starts from.

JSON fields: name, gate, degrees [p, q], cutoff, method, denominator, a [a_0..a_p],
b [b_1..b_q], max_error, mse, max_error_outside_window (jumps), window, n_points, bound, command.
Loading needs only the standard library and torch (no scipy).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TABLE_DIR = Path(__file__).with_name("tables")


def available_tables() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    path = TABLE_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no rational coefficient table {name!r}; available: {available_tables()}")
    return path.read_text()


def load_table(name: str) -> dict:
    """The table `name` as a dict (a fresh copy each call)."""
    table = json.loads(_read(name))
    table["degrees"] = tuple(int(x) for x in table["degrees"])
    return table
