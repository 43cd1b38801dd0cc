#!/usr/bin/env bash
# One command for an offline GPU host where wheels are carried in .gpu-wheels (hydra-core, omegaconf,
# wandb, datasets and, for the SAELens columns, sae-lens and its dependencies): install them, run the
# GPU tests, run the training-step benchmark, leave everything under $OUT. Run from the repository root:
#
#   bash scripts/gpu_run.sh
#
# Stays under ~8.5 minutes (RSAE_GPU_RUN_SECONDS, default 500, sets the limit): each stage has a
# timeout and the benchmark a time budget that drops the least important measurements first (it
# saves its JSON after every measurement, so a cut-off run still returns what it measured).
# Files in $OUT:
#   gpu_run.log        everything printed (install, tests, benchmark progress)
#   pytest_gpu.log     `pytest -m gpu` of the rational kernel and the fast SAE paths
#   train_bench.json   all measurements;  train_bench.md  the tables (also printed last)
#   train_bench_profile.md  kernels by GPU time of each compiled step (torch.profiler)
#   bench_progress.log one line per measurement as it finishes
#   env.txt            GPU, driver, clocks, package versions
set -uo pipefail
OUT=${OUT:-/tmp/rsae-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
START=$(date +%s)
LIMIT=${RSAE_GPU_RUN_SECONDS:-500}  # whole script
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_run +$(elapsed)s] $*"; }
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/rsae-inductor}  # shared by the bench and its train.py runs

log "install"
python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf wandb datasets \
  && python3 -m pip install -q --no-deps --no-build-isolation -e . \
  || { log "install failed"; exit 1; }
if ls .gpu-wheels/sae_lens-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --find-links .gpu-wheels sae-lens transformer-lens babe nltk plotly \
    plotly-express python-dotenv simple-parsing tenacity beartype better-abc fancy-einsum transformers-stream-generator \
    typeguard docstring-parser || log "SAELens install failed: the benchmark runs without it"
else
  log "no SAELens wheels in .gpu-wheels: the benchmark runs without it"
fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv
  python3 -c "import torch, triton, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'lightning', lightning.__version__)"
  python3 -c "import sae_lens; print('sae_lens', sae_lens.__version__)" 2>&1 | tail -1
  nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "GPU tests"
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/rational/test_kernel.py tests/sae/test_fast_paths.py \
  > "$OUT/pytest_gpu.log" 2>&1
log "pytest exit $? ($(tail -1 "$OUT/pytest_gpu.log"))"

REMAIN=$(( LIMIT - $(elapsed) ))
log "benchmark (${REMAIN}s left)"
timeout $(( REMAIN > 60 ? REMAIN : 60 )) python3 -m rsae.bench train \
  --arch relu,jumprelu,topk,batchtopk,rational --shapes 2304x65536,768x24576 --batch 4096 \
  --variants compiled,compiled+cg --profile compiled --steps 20 --warmup 5 --repeats 3 \
  --e2e relu,jumprelu,topk --e2e-steps 150 --e2e-skip 30 --e2e-profile-steps 5 --e2e-workers 3 --e2e-timeout 150 \
  --quality relu,topk,rational --quality-steps 150 \
  --time-budget $(( REMAIN - 70 )) --work-dir /tmp/rsae-bench --json "$OUT/train_bench.json" \
  2> "$OUT/bench_progress.log"
RC=$?
log "benchmark exit $RC"
grep -c '"error"' "$OUT/bench_progress.log" | xargs -I{} echo "measurements with an error: {}"
if [ "$RC" != 0 ] && [ -f "$OUT/train_bench.md" ]; then cat "$OUT/train_bench.md"; fi  # cut short: the tables so far
log "done"
