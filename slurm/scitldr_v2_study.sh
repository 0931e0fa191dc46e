#!/usr/bin/env bash
# The v2 study of docs/results.md (issue 19), end to end and resumable: run it again after a cut and
# every finished step is skipped, an interrupted one resumes from its last checkpoint.
#
#   bash slurm/scitldr_v2_study.sh                  # in the background: nohup ... >> runs/scitldr_v2/study.log 2>&1 &
#   sbatch --ntasks-per-node=1 --cpus-per-task=2 slurm/scitldr_v2_study.sh
#   STUDY_STEPS="main" bash slurm/scitldr_v2_study.sh        # only the pipeline and its report
#
# 1. main: `lastmile pipeline` on trainer/configs/scitldr_v2.yaml: SFT, reward model, best-of-n,
#    PPO (ReMax, 4 x 4, T = 0.7, 10,080 episodes, the dev curve every 1,008), and the report on the
#    310 papers of train@holdout (untuned, MLE, best-of-n, RL, each raw and post-processed).
# 2. t1: the same PPO at T = 1 (the v1 study's rollout temperature), 1,008 episodes, on the main run's
#    SFT and reward models: the other point of the budget curve's temperature comparison (dev only).
# 3. blind: predictions of the final systems on the 618 blind SciTLDR-A test abstracts, made once,
#    after every choice is final (BLIND=<the blind jsonl>; refused when docs/results/blind/ holds any),
#    with a README naming each file's commit, config, model and sha256 (bench/blind_manifest.py).
# All runs log to the main run's MLflow store (runs/scitldr_v2/mlflow.db).
#SBATCH --job-name=lastmile-study-v2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
VENV=${LASTMILE_VENV:-.venv}
LASTMILE=${LASTMILE:-$VENV/bin/lastmile}
CONFIG=trainer/configs/scitldr_v2.yaml
MAIN=runs/scitldr_v2
STEPS=${STUDY_STEPS:-main t1}
TRACK="tracking.uri=sqlite:///$(pwd)/$MAIN/mlflow.db"
FROM_MAIN="ppo.init=$MAIN/sft/model ppo.reward.model=$MAIN/reward_model/model"
say() { echo "[study $(date -u +%H:%M:%S)] $*"; }

if [[ " $STEPS " == *" main "* ]]; then
  say "main pipeline"
  "$LASTMILE" pipeline --config "$CONFIG"
fi

if [[ " $STEPS " == *" t1 "* ]]; then
  say "PPO at T = 1, 1,008 episodes"
  # shellcheck disable=SC2086  # FROM_MAIN is two overrides
  "$LASTMILE" ppo --config "$CONFIG" output_dir=runs/scitldr_v2-t1 "$TRACK" $FROM_MAIN ppo.temperature=1.0 ppo.iterations=63
fi

if [[ " $STEPS " == *" blind "* ]]; then
  BLIND=${BLIND:?set BLIND to the blind documents, e.g. ../shared/data/blind/scitldr_a_blind.jsonl}
  OUT=docs/results/blind
  if compgen -G "$OUT/*.jsonl" > /dev/null; then
    echo "$OUT already holds predictions: the blind set is predicted once. Nothing done." >&2
    exit 2
  fi
  mkdir -p runs/scitldr_v2/blind
  for system in mle:sft best-of-n:best_of_n rl:ppo; do
    name=${system%%:*}; stage=${system#*:}
    say "blind predictions: $name ($MAIN/$stage/model)"
    # batches of 32 as the study's evaluation (greedy: the same summaries at any batch size, faster)
    "$LASTMILE" predict --config "$CONFIG" predict.model=$MAIN/$stage/model predict.input="$BLIND" predict.batch_size=32 \
      predict.output=runs/scitldr_v2/blind/$name.jsonl predict.postprocessed_output=runs/scitldr_v2/blind/$name+post.jsonl
  done
  mkdir -p "$OUT"
  cp runs/scitldr_v2/blind/*.jsonl runs/scitldr_v2/blind/*.jsonl.meta.json "$OUT"/
  # the README: the commit, config, model and sha256 of every file (refused if they were made differently)
  "$VENV/bin/python" bench/blind_manifest.py "$OUT" --config "$CONFIG" --input "$BLIND"
fi
say "done: $STEPS"
