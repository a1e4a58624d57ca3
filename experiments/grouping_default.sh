#!/usr/bin/env bash
# Which Grad-K-Means is the default? Free cluster sizes against size-controlled ones
# (grouping.max_size_factor = 2 and 4: no group above f * n / k points; balanced: equal
# sizes), point- and group-level LDS, 3 grouping seeds, k = 40, 100, 400 on MNIST 5k (MLP,
# 4,000 train, 200 test queries), TracIn and TRAK, LDS over 20 subsets (alpha 0.5).
#
#   OUT=/tmp/gdefault experiments/grouping_default.sh            # ~25 min on 2 cores
#   python experiments/grouping_default.py /tmp/gdefault         # the markdown tables
#
# Group-level retrains are cached per grouping and shared by both methods; point-level
# retrains are shared by every job.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gdefault}
export GGDA_OUTPUT_DIR="$OUT" WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(logger=none evaluation.lds.num_subsets=20 retrain.backend=sequential
        trainer.enable_progress_bar=false sweep_name=grouping_default)
# grouping.seed varies slowest: one full seed lands first if the sweep is cut short.
python run.py -m grouping.seed=0,1,2 method=tracin,trak grouping=grad_kmeans \
  groups=40,100,400 'grouping.max_size_factor=null,2,4' "${COMMON[@]}"
python run.py -m grouping.seed=0,1,2 method=tracin,trak grouping=grad_kmeans grouping.balanced=true \
  grouping.max_size_factor=null groups=40,100,400 "${COMMON[@]}"
# the per-sample (k = n) reference, point level (group level at k = n is the same question)
python run.py -m method=tracin,trak grouping=singleton 'evaluation.lds.levels=[point]' \
  "${COMMON[@]}"
