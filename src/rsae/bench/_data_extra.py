"""Parts of `python -m rsae.bench data` beyond the harvest and the stream:

* `multi_hook`: seconds to harvest `--multi-layers` (e.g. 4 8 12) in one forward pass
  (`harvest_many`) against one harvest per layer, the model loaded once beforehand; each harvest
  into a fresh directory, best of `--repeats`. Target: one pass <= 1.3x the deepest layer's
  harvest.
* `live`: training tokens/s of `train.py data=live` against `train.py data=activations` (the cache
  built first, not timed) with the same model, hook point, SAE and batch: train.py's steps after
  the first `--live-skip`, timed by the StepTimer callback. For data=live the LM's forward passes
  are inside them; its first window (`--live-buffer` rows) is computed at setup, so skip at least
  its batches and time whole windows (e.g. buffer 16384, batch 1024: skip 17, 81 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def bench_multi_hook(args, scratch: Path) -> dict:
    from rsae.data.harvest import harvest, harvest_many
    from rsae.data.lm import load_lm, resolve_device

    model, tokenizer = load_lm(args.model, args.gguf_file, device=resolve_device("auto"))  # where harvests run
    common = dict(name_or_path=args.model, gguf_file=args.gguf_file, text_files=args.text, n_tokens=args.n_tokens,
                  context_size=args.context_size, storage_dtype=args.storage_dtype, batch_size=args.harvest_batch_size,
                  progress=False, lm=(model, tokenizer))
    layers = list(args.multi_layers)
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for layer in layers:
            begin = time.perf_counter()
            harvest(scratch / f"r{repeat}-single-{layer}", hook=args.hook, layer=layer, **common)
            best[f"single_{layer}"] = min(best.get(f"single_{layer}", 1e9), time.perf_counter() - begin)
        begin = time.perf_counter()
        harvest_many([(scratch / f"r{repeat}-together-{layer}", args.hook, layer) for layer in layers], **common)
        best["one_pass"] = min(best.get("one_pass", 1e9), time.perf_counter() - begin)
    singles = [best[f"single_{layer}"] for layer in layers]
    result = {"hook": args.hook, "layers": layers, "tokens": args.n_tokens, "repeats": args.repeats,
              "seconds": {k: round(v, 2) for k, v in best.items()},
              "one_pass_vs_deepest_single": round(best["one_pass"] / best[f"single_{max(layers)}"], 3),
              "one_pass_vs_all_singles": round(best["one_pass"] / sum(singles), 3)}
    print(f"multi_hook: {result}", flush=True)
    return result


def _train(args, data: list[str], run_dir: Path) -> dict:
    import rsae

    root = Path(rsae.__file__).resolve().parents[2]
    timer = run_dir / "timer.json"
    overrides = [*data, f"lm.name_or_path={args.model}", f"lm.hook={args.hook}", f"lm.layer={args.layer}",
                 f"data.text_files=[{','.join(args.text)}]", f"data.context_size={args.context_size}",
                 f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.live_steps}",
                 "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                 "logger=none", "~callbacks.downstream_eval", "~callbacks.model_checkpoint",
                 "+callbacks.step_timer._target_=rsae.bench._step_timer.StepTimer", f"+callbacks.step_timer.out={timer}",
                 f"+callbacks.step_timer.skip={args.live_skip}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, str(root / "train.py"), *overrides], cwd=root, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0 or not timer.is_file():
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    out = json.loads(timer.read_text())
    return {"tokens_per_s": round(out["tokens_per_s"], 1), "ms_per_step": round(out["ms"], 1), "timed_steps": out["steps"],
            "wall_s": round(time.perf_counter() - begin, 1), "command": "python train.py " + " ".join(overrides)}


def bench_live(args, cache_dir: Path, scratch: Path) -> dict:
    cached = ["data=activations", f"data.cache_dir={cache_dir}", f"data.n_tokens={args.n_tokens}"]
    # (the cached run builds the cache first when the harvest part did not: untimed)
    live = ["data=live", f"data.shuffle_buffer={args.live_buffer}"]
    result = {"model": args.model, "hook": args.hook, "layer": args.layer, "batch_size": args.batch_size,
              "live_shuffle_buffer": args.live_buffer, "steps": args.live_steps, "timed_after": args.live_skip,
              "cached": _train(args, cached, scratch / "train-cached"),
              "live": _train(args, live, scratch / "train-live")}
    result["live_vs_cached"] = round(result["live"]["tokens_per_s"] / result["cached"]["tokens_per_s"], 4)
    print(f"live: {result}", flush=True)
    return result
