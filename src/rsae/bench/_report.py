"""The training-step benchmark's report: Markdown tables, the targets it checks, and the files it
writes (results JSON, the report beside it, profiles)."""

from __future__ import annotations

import json
from pathlib import Path

from rsae.bench._timing import flops_per_step


def fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table_head(title: str, columns: str) -> list[str]:
    """A report section's first lines: its heading, then a Markdown table's header row for
    `columns` ("a | b | c") and the separator row under it."""
    return [f"### {title}", "", f"| {columns} |", "|" + "---|" * len(columns.split(" | "))]


def markdown(results: dict, args) -> str:
    rows = [r for r in results["runs"] if r["kind"] in ("rsae", "saelens") and "ms" in r]
    lines = table_head(f"Training step ({results['device']}, autocast {args.dtype}, roofline {args.peak_tflops:.0f} TFLOP/s at 12 d m FLOP/token)",
                       "arch | d x m | batch | variant | ms/step | tokens/s | TFLOP/s | % roofline | peak GiB | syncs/step")
    for r in rows:
        flop = flops_per_step(r["d"], r["m"], r["batch"])
        tflops = flop / (r["ms"] * 1e-3) / 1e12
        roof = flop / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
        lines.append(f"| {r['arch']} | {r['d']}x{r['m']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['batch'] / (r['ms'] * 1e-3):,.0f} | {tflops:.0f} | {roof:.0f}% | {fmt(r.get('peak_gib'))} | "
                     f"{fmt(r.get('syncs_per_step'))} |")
    errors = [r for r in results["runs"] if "error" in r]
    gates = [r for r in results["runs"] if r["kind"] == "gate"]
    if gates:
        lines += [""] + table_head("Rational gate alone (P5/Q4, per-latent scales), forward + backward",
                                   "batch x d_sae | dtype | fused kernel ms | reference ms | reference compiled ms | kernel GB/s")
        for g in gates:
            bw = g["min_bytes"] / (g["kernel_ms"] * 1e-3) / 1e9 if g.get("kernel_ms") else None
            lines.append(f"| {g['batch']}x{g['m']} | {g['dtype']} | {fmt(g.get('kernel_ms'), 3)} | {fmt(g.get('reference_ms'), 3)} | "
                         f"{fmt(g.get('reference_compiled_ms'), 3)} | {fmt(bw, 0)} |")
    e2e = [r for r in results["runs"] if r["kind"] == "e2e"]
    if e2e:
        lines += [""] + table_head("End to end: train.py on a cached activation stream",
                                   "arch | d x m | batch | module | data workers | ms/step | tokens/s | % roofline | "
                                   "raw step ms (same variant) | e2e / raw | vs SAELens step | host syncs/step")
        for r in e2e:
            if "ms" not in r:
                lines.append(f"| {r['arch']} | {r.get('d')}x{r.get('m')} | {r.get('batch')} | {r.get('variant', '-')} | {r.get('num_workers', '-')} | failed (see JSON) | | | | | | |")
                continue
            raw = find(results, "rsae", r["arch"], r["d"], r["m"], r["batch"], r["variant"])
            sl = find(results, "saelens", r["arch"], r["d"], r["m"], r["batch"])
            roof = flops_per_step(r["d"], r["m"], r["batch"]) / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
            lines.append(f"| {r['arch']} | {r['d']}x{r['m']} | {r['batch']} | {r['variant']} | {r['num_workers']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{roof:.0f}% | {fmt(raw and raw['ms'])} | {fmt(raw and raw['ms'] / r['ms'] * 100, 0)}% | "
                         f"{fmt(sl and sl['ms'] / r['ms'], 2)}x | {fmt((r.get('host_syncs') or {}).get('per_step'), 1)} |")
    qual = [r for r in results["runs"] if r["kind"] == "quality" and "fast" in r]
    if qual:
        lines += [""] + table_head("Quality: fast path vs plain path after the same tokens (held-out synthetic data)",
                                   "arch | d x m | steps | MSE plain | MSE plain (other data) | MSE fast | L0 plain | L0 fast | match")
        for q in qual:
            lines.append(f"| {q['arch']} | {q['d']}x{q['m']} | {q['steps']} | {q['plain']['mse']:.4g} | {q['plain_other_data']['mse']:.4g} | "
                         f"{q['fast']['mse']:.4g} | {q['plain']['l0']:.1f} | {q['fast']['l0']:.1f} | {'yes' if q['match'] else 'NO'} |")
    summary = targets(results, args)
    if summary:
        lines += ["", "### Targets", ""] + [f"* {s}" for s in summary]
    if errors:
        lines += ["", "### Errors", ""] + [f"* {r['kind']} {r.get('arch', '')} {r.get('variant', '')} "
                                           f"{r.get('d', '')}x{r.get('m', '')}: {r['error'].strip().splitlines()[-1][:200] if r['error'].strip() else '?'}"
                                           for r in errors]
    return "\n".join(lines)


def find(results, kind, arch, d, m, batch, variant=None):
    """The fastest matching run."""
    best = None
    for r in results["runs"]:
        if r["kind"] == kind and r.get("arch") == arch and r.get("d") == d and r.get("m") == m and r.get("batch") == batch \
                and "ms" in r and (variant is None or r.get("variant") == variant):
            if best is None or r["ms"] < best["ms"]:
                best = r
    return best


def targets(results, args) -> list[str]:
    out = []
    shapes = sorted({(r["d"], r["m"], r["batch"]) for r in results["runs"] if r["kind"] == "rsae" and "ms" in r})
    for d, m, b in shapes:
        relu = find(results, "rsae", "relu", d, m, b)
        rat = find(results, "rsae", "rational", d, m, b)
        topk = find(results, "rsae", "topk", d, m, b)
        tag = f"{d}x{m}, batch {b}"
        if relu and rat:
            ratio = rat["ms"] / relu["ms"]
            out.append(f"rational / ReLU step ({tag}, best variants {rat['variant']} / {relu['variant']}): {ratio:.2f}x "
                       f"(target <= 1.15x: {'met' if ratio <= 1.15 else 'NOT met'})")
        if relu and topk:
            ratio = topk["ms"] / relu["ms"]
            out.append(f"TopK / ReLU step ({tag}): {ratio:.2f}x (target <= 1: {'met' if ratio <= 1.0 else 'NOT met'})")
        for arch in ("relu", "jumprelu"):
            mine, sl = find(results, "rsae", arch, d, m, b), find(results, "saelens", arch, d, m, b)
            if mine and sl:
                out.append(f"{arch} raw step vs SAELens ({tag}): {sl['ms'] / mine['ms']:.2f}x faster")
    for r in results["runs"]:
        if r["kind"] != "e2e" or "ms" not in r:
            continue
        tag = f"{r['d']}x{r['m']}, batch {r['batch']}"
        roof = flops_per_step(r["d"], r["m"], r["batch"]) / (args.peak_tflops * 1e12) * 1e3 / r["ms"] * 100
        sl = find(results, "saelens", r["arch"], r["d"], r["m"], r["batch"])
        raw = find(results, "rsae", r["arch"], r["d"], r["m"], r["batch"], r["variant"])
        parts = [f"{roof:.0f}% of roofline"]
        if r["arch"] in ("relu", "jumprelu") and sl:
            parts.append(f"{sl['ms'] / r['ms']:.2f}x SAELens step rate (target >= 2x: {'met' if sl['ms'] / r['ms'] >= 2 else 'NOT met'})")
        if raw:
            frac = raw["ms"] / r["ms"]
            parts.append(f"{frac * 100:.0f}% of the raw {r['variant']} step rate (target >= 85%: {'met' if frac >= 0.85 else 'NOT met'})")
        out.append(f"e2e {r['arch']} ({tag}, {r['num_workers']} data workers): " + "; ".join(parts))
    for q in results["runs"]:
        if q["kind"] == "quality" and "match" in q:
            out.append(f"quality {q['arch']}: fast vs plain MSE / L0 {'match' if q['match'] else 'DIFFER'} within noise")
    return out


def write_files(results: dict, args, out_path: str) -> None:
    """The results as JSON at `out_path`, the report beside it (.md) and the profiles (<stem>_profile.md)."""
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(results, indent=1, default=str))
    Path(out_path).with_suffix(".md").write_text(markdown(results, args) + "\n")
    texts = [f"## {r['arch']} {r['variant']} {r['d']}x{r['m']} batch {r['batch']}: {r['ms']:.2f} ms/step measured, "
             f"{r['profile']['gpu_busy_ms_per_step']:.2f} ms/step of kernels\n\n```\n{r['profile']['table']}\n```"
             for r in results["runs"] if r.get("profile")]
    texts += [f"## end to end (train.py) {r['arch']} {r['variant']} {r['d']}x{r['m']} batch {r['batch']}, "
              f"{r.get('num_workers')} data workers: {r.get('ms', float('nan')):.2f} ms/step measured\n\n```\n{r['profile_text']}\n```"
              for r in results["runs"] if r.get("profile_text")]
    if texts:
        Path(out_path).with_name(Path(out_path).stem + "_profile.md").write_text("\n\n".join(texts) + "\n")
