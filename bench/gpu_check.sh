#!/usr/bin/env bash
# Launcher of the GPU check (bench/gpu_check.py says what it checks and times).
#
#   bash bench/gpu_check.sh [OUT] [ARGS]     on the device: installs, offline, what it lacks from the bundle that
#                                            bench/gpu_wheels.sh built here (carried as bench/gpu_bundle) and this
#                                            project, then runs the checks (ARGS go to gpu_check.py, e.g.
#                                            --only logprob); results and log in OUT (default $OUT)
#   bash bench/gpu_check.sh --dry-run DIR    here, on CPU at toy sizes, in the project's .venv: nothing installed
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--dry-run" ]]; then
  exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
fi
PY=${PYTHON:-python3}
BUNDLE=${LASTMILE_GPU_BUNDLE:-bench/gpu_bundle}
if [[ $# -gt 0 && $1 != -* ]]; then RESULTS=$1; shift; else RESULTS=${OUT:?give a results folder, or set OUT}; fi
SITE=${LASTMILE_GPU_SITE:-/tmp/lastmile-site}  # installs go here, beside the image's own packages, not over them
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device",
          torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
if [[ ! -f "$BUNDLE/smollm2/config.json" ]]; then
  echo "$BUNDLE is missing: run 'bash bench/gpu_wheels.sh' here and carry bench/gpu_bundle" >&2
  exit 2
fi
wheels=$("$PY" bench/gpu_bundle.py missing "$BUNDLE/wheels")  # prints present/missing per distribution
PIP=(-m pip install -q --no-index --no-deps --no-cache-dir --upgrade --root-user-action=ignore --target "$SITE")
if [[ -n "$wheels" ]]; then
  # shellcheck disable=SC2086  # one path per line, no spaces
  "$PY" "${PIP[@]}" $wheels
fi
"$PY" "${PIP[@]}" --find-links "$BUNDLE/wheels" .  # built here from the tree: never older than the code
"$PY" bench/gpu_check.py "$RESULTS" --bundle "$BUNDLE" "$@"
