"""Evaluate one SAE on a held-out set: reconstruction and sparsity (`ReconstructionMetrics`),
downstream CE with the reconstruction spliced in (`downstream_metrics`), k-sparse probing and a
feature report. Plain objects in, a flat metrics dict out; `rsae.jobs.evaluate` wires it to
the config, the loggers and the run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from rsae import jsonfile
from rsae.eval.downstream import downstream_metrics, sae_reconstructor
from rsae.eval.features import choose_latents, feature_report, write_feature_report
from rsae.eval.heldout import HeldOut
from rsae.eval.metrics import ReconstructionMetrics, feature_recovery
from rsae.eval.probing import ProbeData, sequence_split, sparse_probing, token_labels, token_texts
from rsae.sae.base import SAE

log = logging.getLogger(__name__)

RECONSTRUCTION_KEYS = ("mse", "mse_per_dim", "fvu", "explained_variance", "l0", "alive", "dense", "l2_ratio")


@dataclass
class EvalOptions:
    """What to compute; mirrors the `eval` config block (see conf/evaluate.yaml)."""

    batch_size: int = 4096  # activation rows per SAE forward pass
    lm_batch_size: int = 8  # sequences per LM forward pass
    autocast: str | None = "auto"  # LM autocast dtype: auto = bf16 on CUDA, none on CPU
    downstream: bool = True
    probing: bool = True
    probe_ks: Sequence[int] = (1, 5, 20)
    probe_test_fraction: float = 0.3
    probe_min_examples: int = 10
    features: bool = True
    feature_latents: Sequence[int] | None = None  # explicit latents, else frequent + random
    n_frequent: int = 4
    n_random: int = 4
    n_examples: int = 8
    seed: int = 0
    progress: bool = True
    l0_tolerances: Sequence[float] = field(default_factory=tuple)


def _latent_batches(sae: SAE, held: HeldOut, opts: EvalOptions, device, desc: str | None = None):
    batches = held.batches(opts.batch_size, device)
    if desc:
        batches = tqdm(batches, total=-(-held.n_rows // opts.batch_size), desc=desc, disable=not opts.progress,
                       dynamic_ncols=True)
    for x in batches:
        yield x, sae.encode(x)


@torch.no_grad()
def evaluate_sae(sae: SAE, held: HeldOut, opts: EvalOptions, out_dir: Path | None = None, lm=None,
                 hook: str | None = None, layer: int | None = None, tokenizer=None,
                 ground_truth: torch.Tensor | None = None, report_meta: dict | None = None) -> tuple[dict[str, float], dict]:
    """Returns `(metrics, details)`: flat float metrics (eval.json's keys) and extra information.

    `lm` (a loaded HF causal LM) enables the downstream metrics; `tokenizer` enables probing and
    the feature report's contexts (both need `held.has_tokens`). Files (`probing.json`,
    `features.html`, `features.json`) go to `out_dir` when given.
    """
    device = next(sae.parameters()).device
    sae.eval()
    recon = ReconstructionMetrics(sae.d_in, sae.d_sae, l0_tolerances=tuple(opts.l0_tolerances)).to(device)
    for x, z in _latent_batches(sae, held, opts, device, desc="reconstruction"):
        recon.update(x, sae.decode(z), z)
    fires = recon.fires.detach().cpu()
    metrics = {k: float(v) for k, v in recon.compute().items()}
    metrics["n_tokens"] = held.n_rows
    details: dict = {"files": {}}
    if ground_truth is not None:
        metrics.update(feature_recovery(ground_truth, sae.W_dec))

    if opts.downstream and lm is not None and held.has_tokens:
        out = downstream_metrics(lm, hook, layer, sae_reconstructor(sae), held.input_ids, held.keep,
                                 batch_size=opts.lm_batch_size, autocast_dtype=opts.autocast,
                                 progress=opts.progress, desc="downstream")
        metrics.update(out)
    elif opts.downstream:
        details["downstream_skipped"] = "no language model / token sequences for this data"

    texts = None
    if tokenizer is not None and held.has_tokens and (opts.probing or opts.features):
        texts = token_texts(tokenizer, held.input_ids.unique().tolist())

    if opts.probing and tokenizer is not None and held.has_tokens:
        labels_grid = token_labels(held.input_ids, tokenizer)
        labels = {name: grid[held.seq, held.pos] for name, grid in labels_grid.items()}
        data = ProbeData(labels=labels, train=sequence_split(held.seq, opts.probe_test_fraction, opts.seed),
                         sae_batches=lambda: (z for _, z in _latent_batches(sae, held, opts, device)),
                         raw_batches=lambda: held.batches(opts.batch_size, device))
        probing = sparse_probing(data, ks=tuple(int(k) for k in opts.probe_ks), min_positives=opts.probe_min_examples)
        for k in opts.probe_ks:
            for src, prefix in (("sae", "probe_f1"), ("raw", "probe_raw_f1")):
                value = probing["mean"].get(f"{src}_f1_k{k}")
                if value is not None:
                    metrics[f"{prefix}_k{k}"] = value
        details["probing"] = probing
        if out_dir is not None:
            (Path(out_dir) / "probing.json").write_text(jsonfile.dumps(probing, indent=1))
            details["files"]["probing"] = str(Path(out_dir) / "probing.json")

    if opts.features and texts is not None:
        latents = choose_latents(fires, opts.feature_latents, opts.n_frequent, opts.n_random, opts.seed)
        cols = torch.tensor(latents, dtype=torch.long, device=device)
        acts = torch.cat([z[:, cols].float().cpu() for _, z in _latent_batches(sae, held, opts, device)])
        report = feature_report(latents, acts, held.seq, held.pos, held.input_ids, texts, n_examples=opts.n_examples)
        details["features"] = [{k: v for k, v in e.items() if k != "nonzero"} for e in report]
        if out_dir is not None:
            meta = {**(report_meta or {}), "tokens": held.n_rows,
                    "alive": f"{metrics['alive']:.3f}", "l0": f"{metrics['l0']:.2f}"}
            paths = write_feature_report(report, Path(out_dir), "SAE feature report", meta)
            details["files"].update({"features_html": str(paths["html"]), "features_json": str(paths["json"])})
    return metrics, details
