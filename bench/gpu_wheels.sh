#!/usr/bin/env bash
# Builds, here, what the GPU device lacks and cannot fetch (it has no network), into one folder that git
# ignores and the device tool carries (default bench/gpu_bundle):
#   wheels/   the distributions of bench/gpu_wheels.txt at their .ci/constraints.txt versions, for the device's
#             Python (3.12, x86_64 Linux, no dependencies): the pure-Python wheel where one is published,
#             else the manylinux one, else built here from the sdist (must come out pure Python);
#   smollm2/  SmolLM2-135M-Instruct's config and tokenizer, without weights (about 3.5 MB).
# Then fails when the folder and the working tree would pass the tool's 64 MiB upload.
#
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench/gpu_bundle}
PY=${PYTHON:-.venv/bin/python}
TARGET=(--python-version "${DEVICE_PYTHON:-3.12}" --only-binary=:all: --no-deps)
PURE=(--implementation py --abi none --platform any)
MANYLINUX=(--implementation cp)
for tag in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do MANYLINUX+=(--platform "manylinux_${tag}_x86_64"); done
MANYLINUX+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DIR/wheels"
rm -f "$DIR"/wheels/*.whl
for pin in $("$PY" bench/gpu_bundle.py pins); do
  if "$PY" -m pip download -q "${TARGET[@]}" "${PURE[@]}" -d "$DIR/wheels" "$pin" 2>/dev/null \
     || "$PY" -m pip download -q "${TARGET[@]}" "${MANYLINUX[@]}" -d "$DIR/wheels" "$pin" 2>/dev/null; then
    continue
  fi
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR/wheels" "$pin"
  name=${pin%%==*}
  if ls "$DIR"/wheels/"${name//-/_}"-*.whl | grep -qv -- '-none-any\.whl$'; then
    echo "$pin has no wheel for the device and builds only for this machine's Python; drop it or build it there" >&2
    exit 1
  fi
done
"$PY" bench/gpu_bundle.py export-tokenizer "$DIR/smollm2" >/dev/null
ls -1 "$DIR/wheels"
du -sh "$DIR/wheels" "$DIR/smollm2"
"$PY" bench/gpu_bundle.py size "$DIR"
