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
