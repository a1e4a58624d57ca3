#!/usr/bin/env bash
# Noisy-label detection: flip 10% of the MNIST 5k training labels, rank groups by
# self-influence and inspect them in order; fraction of flipped points found after
# inspecting 5/10/20/30% of the data and the ROC-AUC of the ranking, per k and per-sample.
#
#   experiments/noisy_labels.sh                   # tracin, self-attribution
#   METHODS=tracin,influence OUT=/tmp/noisy experiments/noisy_labels.sh
#   experiments/noisy_labels.sh evaluation.noisy_labels.score=val_loss
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
METHODS=${METHODS:-tracin}
LAUNCHER=${LAUNCHER:-joblib}
SWEEP=${SWEEP:-noisy_labels}
export GGDA_OUTPUT_DIR="$OUT" WANDB_MODE=${WANDB_MODE:-offline}
common=(hydra/launcher="$LAUNCHER" method="$METHODS" evaluation=noisy_labels
        dataset.label_noise=0.1 sweep_name="$SWEEP" logger="${LOGGER:-none}"
        trainer.enable_progress_bar=false "$@")
python run.py -m "${common[@]}" grouping=grad_kmeans groups=40,400
python run.py -m "${common[@]}" grouping=singleton
# Recall curves: tables/noisy_labels_curve.csv in each run directory; scalars side by side:
python -m ggda.report "$OUT/multirun/$SWEEP"
