#!/usr/bin/env bash
# On the offline host: collect the parts that arrived (possibly over several transfers) into
# STORE, and once all are there, join them into STORE/<name> and check the sha256.
#
#   bash scripts/assemble_model.sh [DIR] [STORE] [N_PARTS]
#
# Exits 0 with the model's path on its last line once the file is complete and verified, 3 while
# parts are still missing, 1 on a checksum mismatch.
set -euo pipefail
DIR=${1:-.gpu-model}
STORE=${2:-$HOME/rsae-model}
N=${3:-}
mkdir -p "$STORE"
for p in "$DIR"/part_* ; do [ -f "$p" ] && mv -f "$p" "$STORE/"; done
[ -f "$DIR/SHA256" ] && cp "$DIR/SHA256" "$STORE/SHA256"
[ -f "$STORE/SHA256" ] || { echo "no SHA256 yet in $STORE"; exit 3; }
read -r sum name < "$STORE/SHA256"
have=$(ls "$STORE"/part_* 2>/dev/null | wc -l)
if [ -n "$N" ] && [ "$have" -lt "$N" ]; then echo "$have of $N parts in $STORE"; exit 3; fi
cat "$STORE"/part_* > "$STORE/$name.tmp"
if [ "$(sha256sum "$STORE/$name.tmp" | cut -d' ' -f1)" != "$sum" ]; then
  echo "checksum mismatch for $name ($have parts): a part is missing or damaged"; rm -f "$STORE/$name.tmp"; exit 1
fi
mv "$STORE/$name.tmp" "$STORE/$name"
echo "$STORE/$name"
