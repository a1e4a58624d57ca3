#!/usr/bin/env bash
# Fidelity vs group size for each method (the paper's main study): point- and group-level
# LDS, attribution time and speedup against k = n, on MNIST 5k (MLP, 4,000 train points,
# 200 test queries, LDS over 50 subsets at alpha 0.5), Grad-K-Means groups.
#
#   experiments/fidelity_vs_k.sh                      # tracin, influence, trak
#   METHODS=tracin OUT=/tmp/fvk experiments/fidelity_vs_k.sh
#   LAUNCHER=submitit_slurm experiments/fidelity_vs_k.sh hydra.launcher.partition=cpu
#
# Extra arguments go to every run.py call (e.g. dataset=digits, seed=0,1,2). Point-level
# retrains are cached under $OUT/cache and shared by every job, method and k; killed? Run it
# again: finished jobs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs}
METHODS=${METHODS:-tracin,influence,trak}
LAUNCHER=${LAUNCHER:-joblib}
SWEEP=${SWEEP:-fidelity_vs_k}
export GGDA_OUTPUT_DIR="$OUT" WANDB_MODE=${WANDB_MODE:-offline}
common=(hydra/launcher="$LAUNCHER" method="$METHODS" sweep_name="$SWEEP"
        logger="${LOGGER:-none}" trainer.enable_progress_bar=false "$@")
python run.py -m "${common[@]}" grouping=grad_kmeans groups=10,40,100,400,1000
# The per-sample (k = n) reference every speedup is measured against.
python run.py -m "${common[@]}" grouping=singleton
python -m ggda.report "$OUT/multirun/$SWEEP"
