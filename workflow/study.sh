#!/usr/bin/env bash
# `make study`: the evidence study of docs/results.md, as DVC experiments over the normal DAG.
#
# A workspace study/ (its own git repo; this repo ignores it) holds the study preset's params
# pointed at the real CIFAR-10 subset, and four experiments run from a queue, two at a time
# (each job one torch thread):
#   aca-plus       the default variant ACA+: the whole DAG (SLF, ALF, AFF, TRADES from scratch,
#                  PGD-20 and AutoAttack, corruptions, transfer, report)
#   aca, ccc       the same pre-training as ACA or as plain MoCo (CCC), with SLF and ALF
#   aca-plus-moco  ACA+ in MoCo's enqueue order (the ablation), ALF only, no AutoAttack
# Then `dvc exp show` and workflow/study_tables.py write study/results.md.
#
#   AMOC_SHARED_DATA=../shared/data make study      # the folder with cifar-10-python-subset.tar.gz
#   AMOC_STUDY_JOBS=1 make study                    # one experiment at a time
# Extra `amoc params` overrides for a quick dry run: AMOC_STUDY_SETS="pretrain.epochs=1 ..."
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
WS=${AMOC_STUDY_DIR:-study}
JOBS=${AMOC_STUDY_JOBS:-2}
SHARED=${AMOC_SHARED_DATA:-$REPO/../shared/data}
t0=$SECONDS
# shellcheck source=workflow/study_lib.sh
source "$REPO/workflow/study_lib.sh"
study_checks study
study_workspace study

say "queue: 4 experiments over the DAG, $JOBS at a time"
dvc exp run --queue -n aca-plus
dvc exp run --queue -n aca -S variant=ACA evaluate@slf evaluate@alf
dvc exp run --queue -n aca-plus-moco -S pretrain.enqueue_order=moco -S evaluate.autoattack=false evaluate@alf
dvc exp run --queue -n ccc -S variant=CCC evaluate@slf evaluate@alf
study_run_queue

say "results"
dvc exp show --md > exp-show.md
python "$REPO/workflow/study_tables.py" . --seconds $((SECONDS - t0)) > results.md
cat results.md
echo "Done in $(((SECONDS - t0) / 60)) min. Tables: $WS/results.md; every experiment: cd $WS && dvc exp show"
