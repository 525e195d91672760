#!/usr/bin/env bash
# `make study-claim`: the abstract's claim (AMOC needs a smaller batch and fewer epochs than
# the adversarial contrastive methods before it) against ACL and RoCL, with seeds.
#
# A workspace (default study-claim/, its own git repo) holds the study preset pointed at the
# real CIFAR-10 subset with a longer pre-training (20 epochs), longer linear probes (10
# epochs) and AutoAttack on the first 200 test images. Five configurations x SEEDS run
# from DVC's queue, two at a time, each to `evaluate@slf evaluate@alf` (pre-training with
# its k-NN, SLF and ALF heads, clean / PGD-20 / AutoAttack):
#   amoc-b128      AMOC (ACA+), batch 128, 20 epochs
#   acl-b128       ACL, batch 128, 20 epochs         (claim 1: the small batch)
#   rocl-b128      RoCL, batch 128, 20 epochs
#   acl-b512       ACL, batch 512, 20 epochs         (claim 2: ACL at its own batch size)
#   amoc-b128-e10  AMOC, batch 128, 10 epochs        (claim 3: half the epochs)
# queued seed by seed, so that a study cut short still has whole seeds. Then
# `amoc compare` writes the mean +- sd table and figure (study-claim/compare.md, .png).
#
#   AMOC_SHARED_DATA=../shared/data make study-claim
#   AMOC_CLAIM_SEEDS="1 2 3" make study-claim         # more seeds (default: 1 2; a seed took
#        about 41 min on 2 cores with AVX512-BF16, evaluation about 40 % of it)
#   AMOC_STUDY_RESUME=1 make study-claim              # after a stop, or to add seeds: keep
#        the workspace, queue only the experiments neither finished nor queued (one that
#        was interrupted starts again from its beginning), then write the tables
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
WS=${AMOC_STUDY_DIR:-study-claim}
JOBS=${AMOC_STUDY_JOBS:-2}
SHARED=${AMOC_SHARED_DATA:-$REPO/../shared/data}
SEEDS=${AMOC_CLAIM_SEEDS:-1 2}
t0=$SECONDS
# shellcheck source=workflow/study_lib.sh
source "$REPO/workflow/study_lib.sh"
study_checks study-claim

declare -A CONFIGS=(
    [amoc-b128]=""
    [acl-b128]="-S pretrain.method=acl"
    [rocl-b128]="-S pretrain.method=rocl"
    [acl-b512]="-S pretrain.method=acl -S pretrain.batch_size=512"
    [amoc-b128-e10]="-S pretrain.epochs=10"
)
ORDER=(amoc-b128 acl-b128 rocl-b128 acl-b512 amoc-b128-e10)

if [ "${AMOC_STUDY_RESUME:-0}" = 1 ] && [ -d "$WS/.dvc" ]; then
    cd "$WS"
    say "resuming in $WS/"
else
    study_workspace study pretrain.epochs=20 probe.epochs=10 "probe.milestones=[8]" evaluate.autoattack_images=200
fi

done_names=$(dvc exp list --name-only 2>/dev/null || true)
queued_names=$(dvc queue status 2>/dev/null | awk 'NR > 1 && ($NF == "Queued" || $NF == "Running") {print $2}' || true)
n=0
for seed in $SEEDS; do
    for config in "${ORDER[@]}"; do
        name="$config-s$seed"
        if printf '%s\n%s\n' "$done_names" "$queued_names" | grep -qx "$name"; then continue; fi
        # shellcheck disable=SC2086  # the options are words
        dvc exp run --queue -n "$name" -S "seed=$seed" ${CONFIGS[$config]} evaluate@slf evaluate@alf >/dev/null
        n=$((n + 1))
    done
done
say "queue: $n experiments over the DAG, $JOBS at a time (seeds: $SEEDS)"
study_run_queue

say "results"
dvc exp show --only-changed --md > exp-show.md
amoc compare --workspace . --baseline amoc-b128 --figure compare.png --out compare.md
echo "This run of study_claim.sh took $(((SECONDS - t0) / 60)) min $(((SECONDS - t0) % 60)) s of wall clock." >> compare.md
cat compare.md
echo "Tables: $WS/compare.md, figure: $WS/compare.png; every experiment: cd $WS && dvc exp show"
