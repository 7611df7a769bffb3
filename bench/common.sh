# Shared by the bench scripts (sourced): builds ferry into $ferry and makes the bench dataset of
# $count ImageNet-sized JPEGs in $work/images when it is missing or of another size.
prepare_bench() {
  mkdir -p "$work"
  cargo build --release -q
  ferry=${CARGO_TARGET_DIR:-target}/release/ferry
  if [ "$(ls "$work/images" 2>/dev/null | wc -l)" != "$count" ]; then
    rm -rf "$work/images"
    python3 bench/make_dataset.py --out "$work/images" --count "$count"
  fi
}

# The first $1 bench images as links in $work/images-$1, for the slower ResNet-50 jobs.
subset() {
  local dir="$work/images-$1"
  if [ "$(ls "$dir" 2>/dev/null | wc -l)" != "$1" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    ls "$work/images" | sed -n "1,${1}p" | while read -r f; do ln -s "$work/images/$f" "$dir/$f"; done
  fi
  echo "$dir"
}

# ResNet-50 with random weights in $work/resnet50, exported again when an older export lacks the
# features line. Needs Debian's python3-torch and python3-torchvision.
prepare_resnet50() {
  if ! grep -qs '^features' "$work/resnet50/ferry.toml"; then
    /usr/bin/python3 bench/export_resnet50.py --out "$work/resnet50"
  fi
}
