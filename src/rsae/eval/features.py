"""Feature report: for chosen latents, firing frequency, an activation histogram and the
top-activating held-out contexts, as one static HTML page (histograms embedded as base64 PNG)
plus the same data as JSON.

Latents are either given explicitly or chosen as the `n_frequent` most frequently firing plus
`n_random` random other alive latents (seeded), so a report shows both the common and the
typical latent.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from rsae import jsonfile


def choose_latents(fires: Tensor, requested: Sequence[int] | None = None, n_frequent: int = 4,
                   n_random: int = 4, seed: int = 0) -> list[int]:
    """`requested` (validated) or the most frequent plus random alive latents.

    `fires` is the per-latent count of tokens where the latent is non-zero.
    """
    d_sae = fires.shape[0]
    if requested:
        bad = [i for i in requested if not 0 <= int(i) < d_sae]
        if bad:
            raise ValueError(f"eval.features: latent indices {bad} out of range [0, {d_sae})")
        return [int(i) for i in requested]
    alive = (fires > 0).nonzero().flatten()
    order = alive[fires[alive].argsort(descending=True, stable=True)]
    frequent = order[:n_frequent].tolist()
    rest = order[n_frequent:]
    g = torch.Generator().manual_seed(seed)
    random = rest[torch.randperm(len(rest), generator=g)[:n_random]].sort().values.tolist()
    return frequent + random


def _histogram_png(values: Tensor, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.2), dpi=80)
    if values.numel():
        ax.hist(values.double().numpy(), bins=40, color="#3b75af")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "never fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("activation (non-zero)", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def feature_report(latents: Sequence[int], acts: Tensor, seq: Tensor, pos: Tensor, input_ids: Tensor,
                   texts: dict[int, str], n_examples: int = 8, before: int = 12, after: int = 4) -> list[dict]:
    """Per latent: frequency, activation statistics and top-activating contexts.

    Args:
        latents: latent indices, one per column of `acts`.
        acts: `[n_rows, len(latents)]` activations at the evaluated positions.
        seq, pos: `[n_rows]` sequence index (into `input_ids`) and position of each row.
        input_ids: `[n_seq, T]` the evaluated sequences; texts: token id -> decoded text.
    """
    n_rows = acts.shape[0]
    grid = torch.full(input_ids.shape, -1, dtype=torch.long)  # (seq, pos) -> row
    grid[seq.long(), pos.long()] = torch.arange(n_rows)
    out = []
    for j, latent in enumerate(latents):
        a = acts[:, j].float()
        nz = a[a != 0]
        entry = {"latent": int(latent), "frequency": float((a != 0).double().mean()) if n_rows else 0.0,
                 "n_fires": int(nz.numel()), "max": float(a.max()) if n_rows else 0.0,
                 "mean_when_active": float(nz.mean()) if nz.numel() else 0.0, "examples": [], "nonzero": nz}
        k = min(n_examples, int(nz.numel()))
        if k:
            top = a.topk(k).indices
            peak = float(a[top[0]]) or 1.0
            for r in top.tolist():
                s, p = int(seq[r]), int(pos[r])
                lo, hi = max(0, p - before), min(input_ids.shape[1], p + after + 1)
                tokens = []
                for q in range(lo, hi):
                    row = int(grid[s, q])
                    value = float(a[row]) if row >= 0 else 0.0
                    tokens.append({"text": texts.get(int(input_ids[s, q]), "?"), "act": value, "is_max": q == p,
                                   "intensity": max(0.0, min(1.0, value / peak))})
                entry["examples"].append({"act": float(a[r]), "sequence": s, "position": p, "tokens": tokens,
                                          "text": "".join(t["text"] for t in tokens)})
        out.append(entry)
    return out


def _token_html(tok: dict) -> str:
    text = tok["text"].replace("\n", "\u21b5")
    style = f"background: rgba(220, 80, 30, {tok['intensity']:.3f});"
    if tok["is_max"]:
        style += " outline: 2px solid #222;"
    return f'<span class="t" style="{style}" title="{tok["act"]:.4g}">{html.escape(text)}</span>'


def write_feature_report(report: list[dict], directory: Path, title: str, meta: dict | None = None) -> dict[str, Path]:
    """Write `features.html` and `features.json` under `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        ".f{border-top:1px solid #ccc;padding:1em 0;display:flex;gap:1.5em}"
        ".ctx{font-family:monospace;white-space:pre-wrap;margin:.2em 0;font-size:13px}"
        ".t{border-radius:2px}.act{color:#777;display:inline-block;width:5.5em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        parts.append("<p>" + " &middot; ".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}"
                                               for k, v in meta.items()) + "</p>")
    parts.append("<p>Shading: the latent's activation on each token relative to its top example; the outlined "
                 "token is the one the example is ranked by. Hover a token for its activation.</p>")
    for entry in report:
        png = _histogram_png(entry["nonzero"], f"latent {entry['latent']}")
        parts.append(f"<div class='f' id='latent-{entry['latent']}'><div><h3>latent {entry['latent']}</h3>"
                     f"<p>fires on {100 * entry['frequency']:.3g}% of tokens ({entry['n_fires']})<br>"
                     f"max {entry['max']:.4g}, mean when active {entry['mean_when_active']:.4g}</p>"
                     f"<img src='data:image/png;base64,{png}' alt='activation histogram'></div><div>")
        if not entry["examples"]:
            parts.append("<p><i>no activating contexts in the evaluated tokens</i></p>")
        for ex in entry["examples"]:
            parts.append(f"<div class='ctx'><span class='act'>{ex['act']:.3g}</span>"
                         + "".join(_token_html(t) for t in ex["tokens"]) + "</div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    html_path = directory / "features.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    json_path = directory / "features.json"
    plain = [{**{k: v for k, v in e.items() if k not in ("nonzero", "examples")},
              "examples": [{**{k: v for k, v in ex.items() if k != "tokens"},
                            "tokens": [[t["text"], round(t["act"], 5)] for t in ex["tokens"]]}
                           for ex in e["examples"]]} for e in report]
    json_path.write_text(jsonfile.dumps({"meta": meta or {}, "latents": plain}, indent=1), encoding="utf-8")
    return {"html": html_path, "json": json_path}
