#!/usr/bin/env bash
# Runs `isonn bench` and bench/pytorch_bench.py on the same training
# workloads, one after the other, and prints their throughput ratios.
#
# Usage: bench/side-by-side.sh [OUT_DIR]   (default bench-results)
# Environment variables:
#   PYTHON       a python with torch and numpy (default python3)
#   THREADS      threads for both (default 1)
#   BATCHES      MLP batches per repetition (default 100); the CNN runs a
#                tenth, at least 2
#   REPETITIONS  timed repetitions (default 5)
#   MODELS       comma-separated models (default mlp,cnn)
#   ISONN        an isonn binary to time (default: a release build that
#                this script makes with cargo)
# CI does not run it.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^# CI does not run it/s/^# \{0,1\}//p' "$0"
    exit 0
fi
# OUT_DIR and an ISONN path are relative to the caller's directory, so
# they are resolved before the script moves to the repository root. An
# ISONN without a slash is a command looked up in PATH.
out=$(realpath -m "${1:-bench-results}")
isonn=${ISONN:-}
if [[ $isonn == */* ]]; then
    isonn=$(realpath -m "$isonn")
fi
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import torch, numpy' 2>/dev/null; then
    echo "error: $python cannot import torch and numpy; set PYTHON to a python that has them, e.g." >&2
    echo "  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch numpy && PYTHON=/tmp/venv/bin/python $0" >&2
    exit 2
fi
threads=${THREADS:-1}
batches=${BATCHES:-100}
repetitions=${REPETITIONS:-5}
models=${MODELS:-mlp,cnn}
mkdir -p "$out"

if [[ -z $isonn ]]; then
    cargo build --release --quiet
    target_dir=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    isonn=$target_dir/release/isonn
fi

echo "== uptime before: $(uptime)"
RAYON_NUM_THREADS=$threads "$isonn" bench --models "$models" \
    --workloads regular-train,nonneg-train --batches "$batches" --repetitions "$repetitions" \
    --json "$out/isonn.json"
echo "== uptime between: $(uptime)"
OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$python" bench/pytorch_bench.py --models "$models" \
    --batches "$batches" --repetitions "$repetitions" --threads "$threads" --json "$out/pytorch.json"
echo "== uptime after: $(uptime)"

"$python" - "$out/isonn.json" "$out/pytorch.json" <<'PY'
import json
import sys

isonn, torch = (json.load(open(path)) for path in sys.argv[1:3])
key = lambda m: (m["arch"], m["workload"])
ours = {key(m): m for m in isonn["measurements"]}
theirs = {key(m): m for m in torch["measurements"]}
print()
print(f"isonn {isonn['environment']['isonn']} ({isonn['environment']['threads']} threads) vs "
      f"torch {torch['environment']['torch']} ({torch['environment']['threads']} threads), medians")
print("| model | workload | isonn s/epoch | PyTorch s/epoch | throughput ratio isonn/PyTorch |")
print("| --- | --- | --- | --- | --- |")
for k in ours:
    if k in theirs:
        a, b = ours[k], theirs[k]
        print(f"| {k[0]} | {k[1]} | {a['seconds_per_epoch']:.3f} | {b['seconds_per_epoch']:.3f} | "
              f"{a['images_per_second'] / b['images_per_second']:.2f} |")
print()
print("| model | isonn nonneg/regular time | PyTorch nonneg/regular time |")
print("| --- | --- | --- |")
for arch in sorted({k[0] for k in ours}):
    def ratio(table):
        regular, nonneg = table.get((arch, "regular-train")), table.get((arch, "nonneg-train"))
        return f"{nonneg['seconds_per_epoch'] / regular['seconds_per_epoch']:.2f}" if regular and nonneg else "-"
    print(f"| {arch} | {ratio(ours)} | {ratio(theirs)} |")
PY
