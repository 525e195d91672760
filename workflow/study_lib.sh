# Shared by workflow/study.sh and workflow/study_claim.sh (sourced, not run): a DVC
# workspace over the normal DAG, pointed at the real CIFAR-10 subset, and a queue runner.
# The caller sets REPO (this repository), WS (the workspace), JOBS and SHARED.

SUBSET_SHA256=f1c898c7ca14db7a3a2c6cacfb3057ebab65ea258d0842fb86712666b62d7b01

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

study_checks() {  # $1: the script's name for messages
    for tool in amoc dvc git; do
        command -v "$tool" >/dev/null || { echo "$1: '$tool' not found on PATH; run it with 'make study'" >&2; exit 1; }
    done
    ARCHIVE="$SHARED/cifar-10-python-subset.tar.gz"
    [ -f "$ARCHIVE" ] || { echo "$1: $ARCHIVE not found; set AMOC_SHARED_DATA to the folder that holds it" >&2; exit 1; }
    # glibc's malloc: about 1.45x faster CPU training (benchmarks/README.md), same results
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
}

# study_workspace PRESET [KEY=VALUE ...]: wipe and recreate $WS as a git repo + DVC project
# holding `amoc params --preset PRESET` pointed at the subset (plus the given overrides and
# $AMOC_STUDY_SETS) and a copy of dvc.yaml; cd into it.
study_workspace() {
    local preset=$1
    shift
    say "workspace $WS/ (wiped and recreated), params: amoc params --preset $preset $*"
    rm -rf "$WS"
    mkdir -p "$WS"
    local sets=(--set "data.source=$(cd "$SHARED" && pwd)/cifar-10-python-subset.tar.gz" --set "data.sha256=$SUBSET_SHA256")
    for s in "$@" ${AMOC_STUDY_SETS:-}; do sets+=(--set "$s"); done
    amoc params --preset "$preset" "${sets[@]}" --out "$WS/params.yaml"
    cp "$REPO/dvc.yaml" "$REPO/.gitignore" "$WS/"
    cd "$WS"
    git init -q
    git config user.name >/dev/null || git config user.name "AMOC study"
    git config user.email >/dev/null || git config user.email "study@localhost"
    dvc init -q
    dvc config core.analytics false
    git add -A
    git commit -q -m "AMOC study workspace: params (preset $preset) and dvc.yaml"
}

# study_run_queue: start $JOBS queue workers and wait until nothing is queued or running;
# exit 1 if an experiment failed. Safe to call again on a half-finished queue (resume).
study_run_queue() {
    dvc queue start --jobs "$JOBS"
    queue_status() { dvc queue status 2>/dev/null || true; }  # read whole: grep -q would cut the pipe
    sleep 5
    local status running
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
}
