"""The evaluation job that `evaluate.py` calls: load an exported SAE, evaluate it on held-out
data, write `eval.json` (+ `probing.json`, `features.html`) and log the metrics.

Held-out data: the data module's validation split (for `data=activations`, the cache's held-out
sequences, harvested first when the cache is missing; see `rsae.eval.heldout`). The SAE is
loaded with `rsae.io.saelens.load_sae` and works on raw activations.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsae.data.cache import CacheMismatchError
from rsae.data.lm import load_lm, load_tokenizer, resolve_device
from rsae.eval.heldout import load_heldout
from rsae.eval.suite import EvalOptions, evaluate_sae
from rsae.io.saelens import CFG_FILE, WEIGHTS_FILE, build_sae, read_sae_dir
from rsae.jobs.common import finish_loggers, output_dir, require_finite, run_guarded, write_json
from rsae.sae.base import ConfigError
from rsae.validate import check_config

log = logging.getLogger(__name__)

# eval.json keys, in the order the README lists them.
EVAL_KEYS = ("mse", "fvu", "explained_variance", "l0", "alive", "dense", "l2_ratio",
             "ce_clean", "ce_spliced", "ce_zero", "delta_ce", "loss_recovered", "kl")


def eval_options(cfg: DictConfig) -> EvalOptions:
    e = cfg.eval
    features = e.get("features")
    explicit = list(features) if isinstance(features, (list, tuple)) or OmegaConf.is_list(features) else None
    return EvalOptions(
        batch_size=int(e.batch_size), lm_batch_size=int(e.lm_batch_size), autocast=e.get("autocast", "auto"),
        downstream=bool(e.downstream), probing=bool(e.probing), probe_ks=tuple(int(k) for k in e.probe_ks),
        probe_test_fraction=float(e.probe_test_fraction), probe_min_examples=int(e.probe_min_examples),
        features=features is not False and features is not None, feature_latents=explicit,
        n_frequent=int(e.n_frequent), n_random=int(e.n_random), n_examples=int(e.n_examples),
        seed=int(cfg.seed), progress=bool(e.progress), l0_tolerances=tuple(float(t) for t in e.get("l0_tolerances") or ()),
    )


def build_data(cfg: DictConfig, d_in: int, sae_path: str):
    """Instantiate and prepare the data module, requiring width `d_in`; a mismatch is one line."""
    declared = cfg.data.get("d_in")
    if declared is not None and int(declared) != d_in:
        raise ConfigError(f"SAE {sae_path} has d_in={d_in} but the data has d_in={declared}")
    dm = instantiate(cfg.data, **({"d_in": d_in} if "d_in" in cfg.data and declared is None else {}))
    try:
        dm.prepare_data()
        dm.setup("validate")
    except CacheMismatchError as err:
        raise ConfigError(f"SAE {sae_path} (d_in={d_in}) does not fit the data: {err}") from None
    if getattr(dm, "d_in", None) is not None and int(dm.d_in) != d_in:
        raise ConfigError(f"SAE {sae_path} has d_in={d_in} but the data has d_in={dm.d_in}")
    return dm


def read_sae(sae_path: Any):
    """(cfg.json, SAE) of an exported SAE directory, or one line saying what is wrong with it."""
    if not sae_path:
        raise ConfigError("give the SAE to evaluate: sae_path=<exported SAE directory> (e.g. <train run>/sae)")
    path = Path(str(sae_path))
    if not path.exists():
        raise ConfigError(f"sae_path does not exist: {sae_path} (give an exported SAE directory, e.g. <train run>/sae)")
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"sae_path {sae_path} is not an SAE directory (needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        sae_cfg, tensors = read_sae_dir(path)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt cfg.json or weights file: one line
        raise ConfigError(f"sae_path {sae_path}: cannot read the SAE ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    require_finite(tensors, str(path / WEIGHTS_FILE))  # a diverged SAE has nothing to evaluate
    return sae_cfg, build_sae(sae_cfg, tensors)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    run_dir = output_dir()
    check_config(cfg)
    sae_path = cfg.get("sae_path")
    sae_cfg, sae = read_sae(sae_path)
    opts = eval_options(cfg)
    device = resolve_device(cfg.eval.get("device", "auto"))
    torch.manual_seed(int(cfg.seed))

    dm = build_data(cfg, sae.d_in, str(sae_path))
    held = load_heldout(dm, int(cfg.eval.n_tokens))
    info: dict[str, Any] = {
        "sae_path": str(Path(sae_path).resolve()),
        "architecture": sae_cfg.get("rsae_architecture", sae_cfg.get("architecture")),
        "d_in": sae.d_in, "d_sae": sae.d_sae, "device": str(device), "n_rows": held.n_rows,
        "data": OmegaConf.select(cfg, "data._target_"),
    }
    if held.has_tokens:
        n_seq, context = held.input_ids.shape
        requested = math.ceil(int(cfg.eval.n_tokens) / context)
        if requested > n_seq:
            log.warning("eval.n_tokens=%d asks for %d held-out sequences of %d tokens; the cache holds %d: using all "
                        "(%d positions). Harvest more (data.n_tokens, data.val_fraction) to evaluate more.",
                        cfg.eval.n_tokens, requested, context, n_seq, n_seq * context)
        info.update({
            "model": dm.lm_kwargs["name_or_path"], "hook": dm.hook, "layer": dm.layer, "cache_dir": str(dm.cache_dir),
            "sequences": n_seq, "context_size": context, "available_sequences": held.available_sequences,
            "eval_tokens_file": str(run_dir / "eval_tokens.safetensors"),
            "convention": ("held-out sequences = the first `sequences` of the cache's eval_tokens (BOS at position 0, "
                           "packed text, no padding). Spliced / zero-ablated positions: keep-mask True (all but "
                           "BOS/EOS/pad/special tokens); others keep the clean activation. Scored: next-token targets "
                           "at positions 1..T-1 of every sequence (all real tokens), natural-log CE averaged over "
                           "all scored tokens; kl = mean over the same positions of KL(p_clean || p_spliced)."),
        })
        from safetensors.torch import save_file

        run_dir.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": held.input_ids.contiguous(), "keep": held.keep.contiguous()},
                  str(run_dir / "eval_tokens.safetensors"))

    sae = sae.to(device)
    lm = tokenizer = None
    needs_tokens = held.has_tokens and (opts.downstream or opts.probing or opts.features)
    if needs_tokens:
        kw = dm.lm_kwargs
        if opts.downstream:
            lm, tokenizer = load_lm(kw["name_or_path"], kw.get("gguf_file"), kw.get("dtype", "float32"), device,
                                    kw.get("revision"))
        else:
            tokenizer = load_tokenizer(kw["name_or_path"], kw.get("gguf_file"), kw.get("revision"))
    ground_truth = getattr(dm, "ground_truth", None)
    metrics, details = evaluate_sae(
        sae, held, opts, out_dir=run_dir, lm=lm, hook=getattr(dm, "hook", None), layer=getattr(dm, "layer", None),
        tokenizer=tokenizer, ground_truth=None if ground_truth is None else ground_truth.to(device),
        report_meta={"SAE": str(sae_path), "architecture": info["architecture"], "d_sae": sae.d_sae,
                     **({"model": info["model"], "hook": f"{info['hook']}@{info['layer']}"} if held.has_tokens else {})},
    )
    if "downstream_skipped" in details:
        info["downstream_skipped"] = details["downstream_skipped"]
    info["files"] = details["files"]
    ordered = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    ordered.update({k: v for k, v in metrics.items() if k not in ordered})
    write_json(run_dir / "eval.json", {"status": "ok", **ordered, "info": info})
    log_metrics(cfg, ordered)
    log.info("eval: %s", json.dumps({k: round(v, 5) for k, v in ordered.items() if isinstance(v, float)}))
    return ordered


def log_metrics(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Log the eval.json keys (same names) and the resolved config to the configured logger."""
    if not cfg.get("logger"):
        return
    logger = instantiate(cfg.logger)
    try:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    finally:
        finish_loggers(SimpleNamespace(loggers=[logger]))


def main(cfg: DictConfig) -> float | None:
    metrics = run_guarded(evaluate, cfg)
    if metrics.get("status") == "failed":
        return float("nan")
    value = metrics.get("loss_recovered", metrics.get("fvu"))
    return float(value) if value is not None else None
