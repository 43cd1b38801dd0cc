#!/usr/bin/env bash
# Focused checks for a GPU host (one or two GPUs, offline: the wheels it installs are carried in
# .gpu-wheels), stage by stage, each with its own time limit, everything under $OUT. Run from the
# repository root:
#
#   STAGES="tests gate steps ddp" bash scripts/gpu_check.sh
#
#   tests  pytest -m gpu of the fused rational kernel (every tile shape against float64)
#   gate   the rational gate alone, forward + backward: fused kernel, reference, compiled reference
#          (its training-step rows are single steps that include compilation: ignore them)
#   steps  compiled training steps at 2304 x 65536 (ReLU, rational with and without the fused kernel)
#   train  one `python -m rsae.bench train $TRAIN_ARGS` run (raw steps, SAELens, end to end, targets),
#          cut at TRAIN_TIMEOUT seconds (default 420; pass --time-budget below it to keep the tables)
#   ddp    `python -m rsae.bench ddp` variants listed in DDP_VARIANTS ("name|bench args|ddp overrides|env;...",
#          env as VAR=value words for that variant alone)
#   topo   how the GPUs are linked (nvidia-smi topo -m) and a measured NCCL all-reduce bandwidth
set -uo pipefail
OUT=${OUT:-/tmp/rsae-gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/rsae-inductor}
STAGES=${STAGES:-"tests gate steps"}

log "install"
python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf wandb datasets \
  && python3 -m pip install -q --no-deps --no-build-isolation -e . || { log "install failed"; exit 1; }
if [[ " $STAGES " == *" train "* ]] && ls .gpu-wheels/sae_lens-*.whl >/dev/null 2>&1; then  # SAELens beside rsae
  python3 -m pip install -q --no-deps --no-index --find-links .gpu-wheels sae-lens transformer-lens babe nltk plotly \
    plotly-express python-dotenv simple-parsing tenacity beartype better-abc fancy-einsum transformers-stream-generator \
    typeguard docstring-parser || log "SAELens install failed: the benchmark runs without it"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"

for stage in $STAGES; do
  case $stage in
  tests)
    log "tests"
    timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider ${TEST_FILES:-tests/rational/test_kernel.py} > "$OUT/pytest_gpu.log" 2>&1
    log "pytest exit $? ($(tail -1 "$OUT/pytest_gpu.log"))" ;;
  gate|steps)
    [ "$stage" = gate ] && ARGS="--arch rational --shapes 2304x65536,768x24576 --variants compiled --steps 1 --warmup 1 --repeats 1" \
      || ARGS="--arch ${STEP_ARCHS:-relu,rational} --shapes ${STEP_SHAPES:-2304x65536} --variants compiled --no-gate --steps 20 --warmup 5 --repeats 3"
    for kern in ${KERNEL_MODES:-1 0}; do
      log "$stage (RSAE_RATIONAL_KERNEL=$kern)"
      TORCH_LOGS=${TORCH_LOGS_STEPS:-recompiles} RSAE_RATIONAL_KERNEL=$kern timeout 240 python3 -m rsae.bench train $ARGS --no-saelens \
        --json "$OUT/${stage}_kernel$kern.json" > "$OUT/${stage}_kernel$kern.out" 2> "$OUT/${stage}_kernel$kern.err"
      log "exit $?"; cat "$OUT/${stage}_kernel$kern.md"
    done ;;
  train)
    log "train: $TRAIN_ARGS"
    timeout ${TRAIN_TIMEOUT:-420} python3 -m rsae.bench train $TRAIN_ARGS --work-dir /tmp/rsae-train --json "$OUT/train.json" \
      > "$OUT/train.out" 2> "$OUT/train.err"
    log "exit $?"; cat "$OUT/train.md"; tail -n 5 "$OUT/train.err"
    for t in /tmp/rsae-train/e2e-*/timer_trace_rank0.json.gz; do
      [ -f "$t" ] && mkdir -p "$OUT/traces" && cp "$t" "$OUT/traces/$(basename "$(dirname "$t")").json.gz"
    done
    for t in /tmp/rsae-train/profile-*.json.gz; do  # --profile variants' chrome traces
      [ -f "$t" ] && mkdir -p "$OUT/traces" && cp "$t" "$OUT/traces/"
    done ;;
  topo)
    log "topology"
    nvidia-smi topo -m
    timeout 120 torchrun --nproc_per_node=2 -m rsae.bench.allreduce > "$OUT/allreduce.txt" 2>&1; cat "$OUT/allreduce.txt" ;;
  ddp)
    IFS=';' read -ra VARS <<< "${DDP_VARIANTS:-}"
    for v in "${VARS[@]}"; do
      IFS='|' read -r name bargs dover envs <<< "$v"
      log "ddp $name: $bargs -- $dover ${envs:+(env $envs)}"
      env ${envs:-} timeout ${DDP_TIMEOUT:-300} python3 -m rsae.bench ddp $bargs --work-dir /tmp/rsae-ddp --json "$OUT/ddp_$name.json" \
        --ddp-overrides $dover > "$OUT/ddp_$name.md" 2>&1
      log "exit $?"; tail -n 8 "$OUT/ddp_$name.md"
      for run in single ddp; do  # profiled runs' chrome traces, for `python -m rsae.bench timeline`
        ls /tmp/rsae-ddp/$run/timer_trace_rank*.json.gz >/dev/null 2>&1 && mkdir -p "$OUT/traces/$name-$run" \
          && mv /tmp/rsae-ddp/$run/timer_trace_rank*.json.gz "$OUT/traces/$name-$run/"
      done
    done ;;
  esac
done
log "done"
# One archive of everything (one file to copy back from the host).
tar czf /tmp/gpu_check.tgz -C "$OUT" . && mv /tmp/gpu_check.tgz "$OUT/gpu_check.tgz"
