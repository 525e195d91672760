#!/usr/bin/env bash
# bf16 vs fp32: does accuracy pay for the speed? The tiny preset (embedded digits data,
# ResNet-18 width 0.0625, ACA+) pre-trained and ALF-probed once per setting, evaluated
# (always in fp32) on the whole test set with PGD-20; a second fp32 seed gives the noise.
#
#   benchmarks/precision_accuracy.sh WORKSPACE [RUN ...]
#
# RUN is name:override,override (default: the three below; e.g. add
# bf16-attackfp32-seed1:runtime.precision=bf16,runtime.attack_precision=fp32,seed=1).
# Epochs: PRETRAIN_EPOCHS (3), PROBE_EPOCHS (2); key momentum 0.99, since at the preset's
# 0.999 the key net barely moves in so few steps. Uses `amoc` from PATH; runs already
# done in WORKSPACE are kept; prints one table row per run at the end.
set -euo pipefail
ws=${1:?usage: $0 WORKSPACE [name:key=value,... ...]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(
    fp32-seed1:runtime.precision=fp32,seed=1
    fp32-seed2:runtime.precision=fp32,seed=2
    bf16-seed1:runtime.precision=bf16,seed=1
)
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$ws"
amoc params --params "$repo/params.yaml" --preset tiny --out "$ws/params.yaml" \
    --set pretrain.epochs="${PRETRAIN_EPOCHS:-3}" --set probe.epochs="${PROBE_EPOCHS:-2}" --set model.key_momentum=0.99 \
    --set evaluate.n_images=0 --set evaluate.pgd.steps=20 --set evaluate.autoattack=false
[ -f "$ws/data/train.npz" ] || amoc download --params "$ws/params.yaml" --out "$ws/data"

for run in "${runs[@]}"; do
    name=${run%%:*} out=$ws/${run%%:*} sets=()
    IFS=, read -ra kv <<<"${run#*:}"
    for s in "${kv[@]}"; do sets+=(--set "$s"); done
    common=(--params "$ws/params.yaml" "${sets[@]}" --data "$ws/data")
    echo "== $name: ${kv[*]}" >&2
    [ -f "$out/pretrain/encoder.pt" ] || amoc pretrain "${common[@]}" --out "$out/pretrain"
    [ -f "$out/alf/classifier.pt" ] || amoc probe "${common[@]}" --mode alf --encoder "$out/pretrain/encoder.pt" --out "$out/alf"
    [ -f "$out/alf/eval/metrics.json" ] || amoc evaluate "${common[@]}" --model "$out/alf/classifier.pt" --out "$out/alf/eval"
done

python3 - "$ws" "${runs[@]%%:*}" <<'EOF'
import csv, json, sys
from pathlib import Path
ws = Path(sys.argv[1])
print("| run | pretrain loss per epoch | k-NN % | ALF loss per epoch | ALF train adv acc % | clean % | PGD-20 % | pretrain s |")
print("|---|---|---|---|---|---|---|---|")
for name in sys.argv[2:]:
    pre = list(csv.DictReader(open(ws / name / "pretrain/log.csv")))
    alf = list(csv.DictReader(open(ws / name / "alf/log.csv")))
    m = json.loads((ws / name / "alf/eval/metrics.json").read_text())
    knn = 100 * json.loads((ws / name / "pretrain/metrics.json").read_text())["knn_acc"]
    losses = [" ".join("%.3f" % float(r["loss"]) for r in log) for log in (pre, alf)]
    seconds = sum(float(r["seconds"]) for r in pre)
    print(f"| {name} | {losses[0]} | {knn:.2f} | {losses[1]} | {alf[-1]['train_adv_acc']} | {m['clean']} | {m['pgd']} | {seconds:.0f} |")
EOF
