#!/usr/bin/env bash
# ferry transform against the peers a user would pick instead, side by side on one dataset:
#   - ferry model-bench: the model alone (the ceiling for end to end),
#   - ferry transform: list, read, decode, batch, run, write,
#   - Python onnxruntime + Pillow (bench/peer.py): same model, threads and batch size,
#   - Ray Data map_batches with an onnxruntime actor (bench/ray_peer.py), when `ray` is installed.
# for MobileNetV2 (the shipped weights) and ResNet-50 (random weights, exported with torchvision).
#
# Each measurement runs ROUNDS times (default 3), interleaved, and the median is reported, so a
# noisy neighbour slows every column alike.
#
# usage: bench/transform.sh [COUNT] [RESNET_COUNT]     (defaults 1000 and 300 images)
# needs: pip install -r tests/requirements.txt; Debian python3-torch python3-torchvision for
# ResNet-50; pip install 'ray[data]' for the Ray column.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000}
resnet_count=${2:-300}
work=${FERRY_BENCH_DIR:-/tmp/ferry-bench}
threads=$(nproc)
batch=${BATCH:-2}
rounds=${ROUNDS:-3}
# shellcheck source=bench/common.sh
. bench/common.sh
prepare_bench
resnet_images=$(subset "$resnet_count")
prepare_resnet50

rm -rf "$work/out"
results=$work/results.jsonl
: >"$results"
row() { echo "{\"model\": \"$1\", \"what\": \"$2\", \"result\": $3}" >>"$results"; }

for spec in "mobilenet_v2:examples/models/mobilenet_v2:$work/images" "resnet50:$work/resnet50:$resnet_images"; do
  IFS=: read -r name model images <<<"$spec"
  echo "== $name: $(ls "$images" | wc -l) images, $threads threads, batch $batch, $rounds rounds" >&2
  for round in $(seq "$rounds"); do
    row "$name" model-only "$("$ferry" model-bench --model "$model" --max-batch-size "$batch" --threads "$threads" --backend ort --seconds 10)"
    # A new folder per round, all removed at the end: creating files right after deleting
    # thousands in the same file system makes ext4 scan for free inodes, a cost of the
    # benchmark loop rather than of a job.
    out="$work/out/$name-$round"
    "$ferry" transform --model "$model" --input "$images" --output "$out" --top-k 5 --backend ort \
      --max-batch-size "$batch" --threads "$threads" --progress off --report "$work/report.json" 2>/dev/null
    row "$name" ferry "$(python3 -c "import json; r = json.load(open('$work/report.json')); \
print(json.dumps({'images': r['records'], 'seconds': r['wall_seconds'], 'images_per_second': r['records_per_second']}))")"
    row "$name" "onnxruntime+Pillow" "$(python3 bench/peer.py --model "$model" --input "$images" --batch "$batch" --threads "$threads")"
    if python3 -c "import ray.data" 2>/dev/null; then
      row "$name" "Ray Data" "$(python3 bench/ray_peer.py --model "$model" --input "$images" --batch "$batch" --cpus "$threads" 2>/dev/null | tail -n 1)"
    fi
  done
done

rm -rf "$work/out"

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    res = r["result"]
    by.setdefault(r["model"], {}).setdefault(r["what"], []).append(res.get("images_per_second", res.get("records_per_second")))
print(f"{'model':<14}{'model-only':>12}{'ferry':>10}{'ort+Pillow':>12}{'Ray Data':>10}{'ferry/model':>13}{'ferry/ort+Pillow':>18}{'ferry/Ray':>11}")
for m, v in by.items():
    med = {k: statistics.median(x) for k, x in v.items()}
    mo, f, p, ray = med.get("model-only"), med.get("ferry"), med.get("onnxruntime+Pillow"), med.get("Ray Data")
    fmt = lambda x: f"{x:.1f}" if x else "-"
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
    print(f"{m:<14}{fmt(mo):>12}{fmt(f):>10}{fmt(p):>12}{fmt(ray):>10}{ratio(f, mo):>13}{ratio(f, p):>18}{ratio(f, ray):>11}")
print("images/s, median of each column's rounds; model-only is ferry model-bench on synthetic input at the same")
print("batch size and threads; ferry's figure includes model loading, listing, reading and writing.")
PY
