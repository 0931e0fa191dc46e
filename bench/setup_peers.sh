#!/usr/bin/env bash
# The peers of bench/rl_iteration.py, each in its own venv under bench/venvs/ (git-ignored):
#   trl 1.16.0 (GRPOTrainer) and trl 1.7.1 (the last release with PPOTrainer), both on transformers 5.23.0.
# CPU torch first, from local disk: a bare torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
for v in 1.16.0 1.7.1; do
  d=venvs/trl-$v
  if [ -x "$d/bin/python" ] && "$d/bin/python" -c "import trl, sys; sys.exit(trl.__version__ != '$v')" 2>/dev/null; then
    echo "$d: ready"; continue
  fi
  python3 -m venv "$d"
  "$d/bin/pip" install -q torch==2.13.0
  "$d/bin/pip" install -q "trl==$v" "transformers==5.23.0" rouge-score
  echo "$d: installed trl $v"
done
