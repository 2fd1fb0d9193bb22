#!/usr/bin/env bash
# Build the pack twice in separate folders, compiling both times (--no-cache: a build cache hit would compare
# a pack with its own copy), and fail on any difference, printing `aotpack diff`.
# Usage: examples/ci/check-reproducible.sh MODEL.py[:NAME] [SHIPPED.pack]
# With SHIPPED.pack, also check that the shipped pack is the one the source produces.
set -euo pipefail
model=${1:?usage: check-reproducible.sh MODEL.py[:NAME] [SHIPPED.pack]}
shipped=${2:-}
case "$model" in
  /*) source=$model ;;          # absolute: as given
  *) source=$PWD/$model ;;      # relative to where the script was started (the builds run elsewhere)
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/a" "$work/b"
(cd "$work/a" && TMPDIR="$work/a" aotpack build "$source" -o "$work/a/model.pack" --no-cache --quiet)
(cd "$work/b" && TMPDIR="$work/b" aotpack build "$source" -o "$work/b/model.pack" --no-cache --quiet)
status=0
aotpack diff "$work/a/model.pack" "$work/b/model.pack" || status=1
if [ -n "$shipped" ]; then
  aotpack verify "$shipped" || status=1
  aotpack diff "$shipped" "$work/a/model.pack" || status=1
fi
exit $status
