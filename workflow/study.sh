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
ARCHIVE="$SHARED/cifar-10-python-subset.tar.gz"
SUBSET_SHA256=f1c898c7ca14db7a3a2c6cacfb3057ebab65ea258d0842fb86712666b62d7b01
t0=$SECONDS

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
for tool in amoc dvc git; do
    command -v "$tool" >/dev/null || { echo "study: '$tool' not found on PATH; run it with 'make study'" >&2; exit 1; }
done
[ -f "$ARCHIVE" ] || { echo "study: $ARCHIVE not found; set AMOC_SHARED_DATA to the folder that holds it" >&2; exit 1; }
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

say "workspace $WS/ (wiped and recreated), params: amoc params --preset study"
rm -rf "$WS"
mkdir -p "$WS"
sets=(--set "data.source=$(cd "$SHARED" && pwd)/cifar-10-python-subset.tar.gz" --set "data.sha256=$SUBSET_SHA256")
for s in ${AMOC_STUDY_SETS:-}; do sets+=(--set "$s"); done
amoc params --preset study "${sets[@]}" --out "$WS/params.yaml"
cp dvc.yaml .gitignore "$WS/"
cd "$WS"
git init -q
git config user.name >/dev/null || git config user.name "AMOC study"
git config user.email >/dev/null || git config user.email "study@localhost"
dvc init -q
dvc config core.analytics false
git add -A
git commit -q -m "AMOC study workspace: params (preset study) and dvc.yaml"

say "queue: 4 experiments over the DAG, $JOBS at a time"
dvc exp run --queue -n aca-plus
dvc exp run --queue -n aca -S variant=ACA evaluate@slf evaluate@alf
dvc exp run --queue -n aca-plus-moco -S pretrain.enqueue_order=moco -S evaluate.autoattack=false evaluate@alf
dvc exp run --queue -n ccc -S variant=CCC evaluate@slf evaluate@alf
dvc queue start --jobs "$JOBS"
queue_status() { dvc queue status 2>/dev/null || true; }  # read whole: grep -q would cut the pipe
sleep 5
while status=$(queue_status) && grep -qE "Queued|Running" <<< "$status"; do
    running=$(grep -cE " Running *$" <<< "$status" || true)
    # a DVC worker may stop while tasks are still queued (treeverse/dvc#10562): start more
    if grep -qE " Queued *$" <<< "$status" && [ "$running" -lt "$JOBS" ]; then
        dvc queue start --jobs "$JOBS" >/dev/null  # -j is the total number of workers
    fi
    sleep 30
done
queue_status
if grep -q "Failed" <<< "$(queue_status)"; then
    echo "study: an experiment failed; see \`dvc queue logs <name>\` in $WS" >&2
    exit 1
fi

say "results"
dvc exp show --md > exp-show.md
python "$REPO/workflow/study_tables.py" . --seconds $((SECONDS - t0)) > results.md
cat results.md
echo "Done in $(((SECONDS - t0) / 60)) min. Tables: $WS/results.md; every experiment: cd $WS && dvc exp show"
