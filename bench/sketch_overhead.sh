#!/usr/bin/env bash
# What writing sketches adds to a transform job: plain jobs and jobs with `--sketch`, interleaved,
# for each recipe (classifier and stages) on the bench dataset with MobileNetV2 or ResNet-50, printing mean wall
# and CPU seconds (user + sys) and the overhead of each.
#
# Profiles are fitted once, on 300 of the images, into the bench folder. Each job writes to a new
# folder, all removed at the end: creating files within a minute of deleting thousands in the same
# file system makes ext4 scan for free inodes (`recently_deleted`), a cost of the benchmark loop
# rather than of a job, so leave a minute between runs of this script too.
#
# usage: [RECIPES="classifier stages"] [MODEL=mobilenet_v2|resnet50] bench/sketch_overhead.sh [PAIRS] [COUNT]
#        (defaults 4 pairs; 1000 images for MobileNetV2, the first 300 of them for ResNet-50)
# needs: pip install -r tests/requirements.txt (the dataset generator); Debian python3-torch and
# python3-torchvision for ResNet-50 (random weights, bench/export_resnet50.py)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-4}
name=${MODEL:-mobilenet_v2}
work=${FERRY_BENCH_DIR:-/tmp/ferry-bench}
# shellcheck source=bench/common.sh
. bench/common.sh
case "$name" in
  mobilenet_v2)
    count=${2:-1000}
    prepare_bench
    model=examples/models/mobilenet_v2
    images=$work/images
    # Three stages, deepest first: 1280×7×7, 96×14×14, 32×28×28.
    stages="--stage /features/features.18/features.18.2/Clip_output_0 \
--stage /features/features.13/Add_output_0 --stage /features/features.6/Add_output_0"
    ;;
  resnet50)
    count=1000
    prepare_bench
    prepare_resnet50
    model=$work/resnet50
    images=$(subset "${2:-300}")
    # The last block of layer4, layer3 and layer2 (SKETCHES.md §5.2): 2048×7×7, 1024×14×14, 512×28×28.
    stages="--stage /layer4/layer4.2/relu_2/Relu_output_0 \
--stage /layer3/layer3.5/relu_2/Relu_output_0 --stage /layer2/layer2.3/relu_2/Relu_output_0"
    ;;
  *) echo "MODEL is mobilenet_v2 or resnet50" >&2 && exit 2 ;;
esac
declare -A fit_args=([classifier]="--recipe classifier" [stages]="--recipe stages $stages")
recipes=${RECIPES:-classifier stages}
for recipe in $recipes; do
  profile="$work/profile-$name-$recipe.json"
  if [ ! -f "$profile" ]; then
    # shellcheck disable=SC2086
    "$ferry" sketch fit --model "$model" --input "$images" --limit 300 --output "$profile" ${fit_args[$recipe]} >&2
  fi
done

runs=$(mktemp -d -p "$work" overhead.XXXXXX)
trap 'rm -rf "$runs"' EXIT
# One job; prints "wall cpu".
job() {
  local out
  out=$(mktemp -d -p "$runs")
  /usr/bin/time -f "%e %U %S" -o "$out.time" "$ferry" transform --model "$model" --input "$images" \
    --output "$out/out" --top-k 5 --progress off "$@" 2>/dev/null
  awk '{ printf "%s %.2f\n", $1, $2 + $3 }' "$out.time"
}

printf "%-11s %6s %11s %11s %10s %10s %9s %9s\n" recipe pairs "plain wall" "with wall" "plain CPU" "with CPU" wall CPU
for recipe in $recipes; do
  : >"$runs/times"
  for _ in $(seq "$pairs"); do
    echo "plain $(job)" >>"$runs/times"
    echo "with $(job --sketch "$(mktemp -d -p "$runs")/sketches" --sketch-profile "$work/profile-$name-$recipe.json")" >>"$runs/times"
  done
  awk -v r="$recipe" -v n="$pairs" '{ wall[$1] += $2; cpu[$1] += $3 } END {
    printf "%-11s %6d %10.2fs %10.2fs %9.1fs %9.1fs %+8.1f%% %+8.1f%%\n", r, n, wall["plain"] / n, wall["with"] / n,
      cpu["plain"] / n, cpu["with"] / n, 100 * (wall["with"] / wall["plain"] - 1), 100 * (cpu["with"] / cpu["plain"] - 1) }' "$runs/times"
done
echo "means over the pairs; CPU is user + sys; $(ls "$images" | wc -l) images, $name, --top-k 5, default threads and batch"
