#!/usr/bin/env bash
# The study of docs/results.md (issue 11), end to end and resumable: run it again after a cut and
# every finished step is skipped, an interrupted one resumes from its last checkpoint.
#
#   bash slurm/scitldr_study.sh                  # in the background: nohup ... >> runs/scitldr-study.log 2>&1 &
#   sbatch --ntasks-per-node=1 --cpus-per-task=2 slurm/scitldr_study.sh
#   STUDY_STEPS="main" bash slurm/scitldr_study.sh        # only the pipeline and its report
#
# 1. main: `lastmile pipeline` on trainer/configs/scitldr.yaml (SFT, reward model, PPO, report on
#    validation@report), then the main RL and MLE models evaluated on validation@dev.
# 2. ablations, each one PPO run on the main run's SFT model, changing one thing, evaluated on
#    validation@dev and compared there (`lastmile compare`) with the main RL model, and with the MLE
#    model (its dev predictions scored again as a predictions file, no generation):
#      rm_only          reward model alone: no la-ROUGE-L term
#      no_length        no length penalty
#      no_policy_negs   a reward model trained without the policy's own samples as negatives
#      grpo             critic-free group estimator (4 prompts x 4 samples) instead of GAE with a critic
# 3. confirm: the reward the ablations chose on the dev part (no length penalty), its model evaluated
#    once on validation@report against the report's MLE summaries.
# All runs log to the main run's MLflow store (runs/scitldr/mlflow.db).
#SBATCH --job-name=lastmile-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
VENV=${LASTMILE_VENV:-.venv}
LASTMILE=${LASTMILE:-$VENV/bin/lastmile}
CONFIG=trainer/configs/scitldr.yaml
MAIN=runs/scitldr
ABL=runs/scitldr-ablations
STEPS=${STUDY_STEPS:-main ablations confirm}
TRACK="tracking.uri=sqlite:///$(pwd)/$MAIN/mlflow.db"
DEV="data.eval_split=validation@dev"
FROM_MAIN="ppo.init=$MAIN/sft/model ppo.reward.model=$MAIN/reward_model/model"
say() { echo "[study $(date -u +%H:%M:%S)] $*"; }

if [[ " $STEPS " == *" main "* ]]; then
  say "main pipeline"
  "$LASTMILE" pipeline --config "$CONFIG"
  say "main RL vs MLE on the dev part"
  "$LASTMILE" evaluate --config "$CONFIG" "$DEV" eval.model=$MAIN/ppo/model eval.baseline_model=$MAIN/sft/model
fi

arm() {  # name, then overrides of the main PPO settings
  local name=$1; shift
  say "ablation $name: PPO with $*"
  "$LASTMILE" ppo --config "$CONFIG" output_dir=$ABL/$name "$TRACK" "$@"
  "$LASTMILE" evaluate --config "$CONFIG" output_dir=$ABL/$name "$TRACK" "$DEV" eval.model=$ABL/$name/ppo/model
}

if [[ " $STEPS " == *" ablations "* ]]; then
  # shellcheck disable=SC2086  # FROM_MAIN is two overrides
  arm rm_only $FROM_MAIN ppo.reward.metric=none
  # shellcheck disable=SC2086
  arm no_length $FROM_MAIN ppo.reward.length_penalty=0
  # shellcheck disable=SC2086  # whitened, as every estimator was when the arm ran (rloo and grpo are not by default since 2026-12-06)
  arm grpo $FROM_MAIN ppo.advantage=grpo ppo.prompts_per_iteration=4 ppo.samples_per_prompt=4 ppo.whiten_advantages=true
  say "ablation no_policy_negs: reward model without policy negatives"
  "$LASTMILE" reward-model --config "$CONFIG" output_dir=$ABL/no_policy_negs "$TRACK" rm.init=$MAIN/sft/model \
    rm.policy_negatives_model=null
  arm no_policy_negs ppo.init=$MAIN/sft/model ppo.reward.model=$ABL/no_policy_negs/reward_model/model
  ARMS="$ABL/rm_only/eval/rl $ABL/no_length/eval/rl $ABL/grpo/eval/rl $ABL/no_policy_negs/eval/rl"
  say "compare every arm with the main RL model on the dev part"
  # shellcheck disable=SC2086  # ARMS is four folders
  "$LASTMILE" compare --config "$CONFIG" output_dir=$ABL "$TRACK" $MAIN/eval/rl_vs_sft $ARMS
  say "MLE on the dev part, scored from its saved predictions (no generation), then every arm against it"
  "$LASTMILE" evaluate --config "$CONFIG" output_dir=$ABL/mle "$TRACK" "$DEV" \
    eval.predictions=$MAIN/eval/rl_vs_sft/predictions-baseline.jsonl
  # shellcheck disable=SC2086
  "$LASTMILE" compare --config "$CONFIG" output_dir=$ABL "$TRACK" "$(ls -d $ABL/mle/eval/predictions-*)" \
    $MAIN/eval/rl_vs_sft $ARMS
fi

if [[ " $STEPS " == *" confirm "* ]]; then
  # The ablations on the dev part chose the reward without the length penalty (docs/results.md); its
  # model is evaluated once on the report part against the report's MLE summaries (not generated again).
  say "confirm: the dev-chosen no_length model on the report part"
  "$LASTMILE" evaluate --config "$CONFIG" output_dir=$ABL/no_length "$TRACK" eval.model=$ABL/no_length/ppo/model \
    eval.baseline_predictions=$MAIN/report/predictions-mle.jsonl
  # shellcheck disable=SC2086
  "$LASTMILE" compare --config "$CONFIG" output_dir=$ABL/no_length "$TRACK" "$(ls -d $ABL/no_length/eval/rl_vs_predictions-*)"
fi
say "done"
