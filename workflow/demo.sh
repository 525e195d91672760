#!/usr/bin/env bash
# `make demo`: the whole AMOC DAG, run by DVC (the real engine), on the embedded digits data
# set: offline, on the CPU, in a few minutes. The numbers are a smoke test, not a result.
#
# It builds a fresh workspace demo/ (its own git repo; this repo ignores it) holding the
# demo params, a copy of dvc.yaml and .gitignore, runs `dvc repro` there and commits the
# result, so that afterwards you can experiment:
#   cd demo && dvc exp run -S queue_size=512 && dvc exp show --md && dvc metrics diff
#
# dvc.yaml is copied, not symlinked: a symlink works for `dvc repro` and a plain
# `dvc exp run`, but `dvc exp run --temp` / `--queue` run from a copy of the git tree,
# where a relative link to ../dvc.yaml dangles ("dvc.yaml is not a .dvc file").
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
WS=${AMOC_DEMO_DIR:-demo}
PRESET=${AMOC_DEMO_PRESET:-demo}
t0=$SECONDS

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
elapsed() { local s=$((SECONDS - t0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

for tool in amoc dvc git; do
    command -v "$tool" >/dev/null || { echo "demo: '$tool' not found on PATH; run it with 'make demo'" >&2; exit 1; }
done
# glibc's malloc maps and unmaps every large activation; this makes CPU training about
# 1.45x faster (benchmarks/README.md, "CPU allocator"). It changes speed, never results.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}

say "workspace $WS/ (wiped and recreated), params: amoc params --preset $PRESET"
rm -rf "$WS"
mkdir -p "$WS"
amoc params --preset "$PRESET" --out "$WS/params.yaml"
cp dvc.yaml .gitignore "$WS/"
cd "$WS"
git init -q
git config user.name >/dev/null || git config user.name "AMOC demo"
git config user.email >/dev/null || git config user.email "demo@localhost"
dvc init -q
dvc config core.analytics false
dvc config core.autostage true  # dvc repro / exp run stage dvc.lock and .gitignore for git
git add -A
git commit -q -m "AMOC demo workspace: params (preset $PRESET) and dvc.yaml"
echo "git repo + DVC project in $(pwd)"

say "dvc repro: download -> pretrain -> probe slf/alf, finetune aff/scratch -> evaluate x4, corruptions, transfer -> report"
dag_start=$SECONDS
times=$(mktemp)  # per-stage wall times, outside the workspace's git tree
dvc repro 2>&1 | python "$REPO/workflow/stage_times.py" --out "$times"
dag_seconds=$((SECONDS - dag_start))
git add -A
git commit -q -m "demo run: dvc repro" # the baseline for dvc exp run / dvc metrics diff
python "$REPO/workflow/demo_block.py" . --seconds "$dag_seconds" > readme-block.md

say "report/report.md"
cat report/report.md

say "figures"
for png in report/*.png; do
    echo "$WS/$png"
done

say "done in $(elapsed)"
# One line to compare runs by: where the time went (a regression shows here first).
made="$REPO/.venv/.setup-seconds"  # written by `make setup` when it (re)built the venv
venv="ready"
if [ -f "$made" ]; then venv="$(cat "$made") s"; rm -f "$made"; fi
stages=$(python -c "import json, sys; sys.path.insert(0, '$REPO/workflow'); import stage_times; \
print(stage_times.summary(json.load(open('$times'))))")
rm -f "$times"
echo "demo time: venv $venv, workspace $((dag_start - t0)) s, DAG $dag_seconds s ($stages), total $((SECONDS - t0)) s"
python "$REPO/workflow/demo_block.py" . --learning
echo "The README's demo block from this run is in $WS/readme-block.md (make demo-readme copies it in)."
cat <<EOF
Try next (from $WS/):
  dvc exp run -S queue_size=512      # re-runs pretrain and what depends on it, not scratch
  dvc exp run -S variant=AAA
  dvc exp show --md                  # params and metrics of every experiment
  dvc metrics diff                   # workspace against the committed demo run
EOF
