#!/usr/bin/env bash
# The peers of bench/rl_iteration.py, each in its own venv under bench/venvs/ (git-ignored):
#   trl-1.16.0  GRPOTrainer
#   trl-1.7.1   trl.experimental.ppo.PPOTrainer (the last release that has a PPOTrainer)
# Both get the transformers version of the project venv (.venv), so the generation and model code
# under every trainer is the same; set TRANSFORMERS_VERSION to choose another (5.23.0 when there is
# no .venv). Both trl versions accept any transformers >= 4.56.2.
#
#   bash bench/setup_peers.sh        # idempotent: a venv that already has the right versions is skipped
#
# torch goes in first, pinned, from local disk (PIP_FIND_LINKS holds the CPU wheel); everything after
# is installed under a constraint that keeps it, because a bare or open-ended torch requirement makes
# pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ -z "${TRANSFORMERS_VERSION:-}" ]; then
  TRANSFORMERS_VERSION=$(.venv/bin/python -c "import transformers; print(transformers.__version__)" 2>/dev/null \
                         || echo 5.23.0)
fi

versions() {  # "torch transformers trl" as installed in venv $1, or nothing
  "$1/bin/python" 2>/dev/null -c \
    "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)" || true
}

for trl_version in 1.16.0 1.7.1; do
  venv=bench/venvs/trl-$trl_version
  have=$(versions "$venv")
  if [[ "$have" == "$TORCH_VERSION+cpu $TRANSFORMERS_VERSION $trl_version" ]]; then
    echo "$venv: ready (torch transformers trl: $have)"
    continue
  fi
  echo "$venv: installing trl $trl_version, transformers $TRANSFORMERS_VERSION, torch $TORCH_VERSION (CPU)"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$TORCH_VERSION"
  torch_installed=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
  if [[ "$torch_installed" != *+cpu ]]; then
    echo "$venv: torch $torch_installed is not the CPU build; a CUDA build is gigabytes." \
         "Put the torch-$TORCH_VERSION+cpu wheel in PIP_FIND_LINKS (here /opt/wheels) and rerun." >&2
    exit 1
  fi
  constraints=$(mktemp)
  echo "torch==$torch_installed" > "$constraints"
  "$venv/bin/pip" install -q -c "$constraints" "trl==$trl_version" "transformers==$TRANSFORMERS_VERSION"
  rm -f "$constraints"
  echo "$venv: installed (torch transformers trl: $(versions "$venv"))"
done
