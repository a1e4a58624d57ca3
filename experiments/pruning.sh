#!/usr/bin/env bash
# Dataset pruning guided by group attribution to the validation loss: test accuracy after
# removing 10/20/30/50% of the training points, harmful groups first (helpful first and
# random groups as checks), against the no-removal baseline and per-sample (k = n) scores.
# MNIST 5k, MLP, Grad-K-Means groups, 2 retrain seeds per pruned set.
#
#   experiments/pruning.sh                 # tracin
#   METHODS=tracin,influence OUT=/tmp/prune experiments/pruning.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
METHODS=${METHODS:-tracin}
LAUNCHER=${LAUNCHER:-joblib}
SWEEP=${SWEEP:-pruning}
export GGDA_OUTPUT_DIR="$OUT" WANDB_MODE=${WANDB_MODE:-offline}
common=(hydra/launcher="$LAUNCHER" method="$METHODS" evaluation=pruning sweep_name="$SWEEP"
        logger="${LOGGER:-none}" trainer.enable_progress_bar=false "$@")
python run.py -m "${common[@]}" grouping=grad_kmeans groups=40,400
python run.py -m "${common[@]}" grouping=singleton
# Accuracy per fraction and order: tables/pruning_curve.csv in each run directory;
# time and the pruning/* scalars of every run side by side:
python -m ggda.report "$OUT/multirun/$SWEEP"
