#!/usr/bin/env bash
# The serving side: accept a pack only if it is signed by the release key, passes every check and loads on
# this host; then put it and its signature in place.
# Usage: examples/ci/deploy.sh PACK PUBLIC_KEY DEST_DIR [SIGNATURE]
# SIGNATURE defaults to PACK.sig. Installs DEST_DIR/NAME and DEST_DIR/NAME.sig (NAME is PACK's file name). On
# any failure it exits 1 and leaves DEST_DIR as it was. Needs aotpack and cryptography, not the signing package.
set -euo pipefail
usage="usage: deploy.sh PACK PUBLIC_KEY DEST_DIR [SIGNATURE]"
pack=${1:?$usage}
pub=${2:?$usage}
dest=${3:?$usage}
sig=${4:-$pack.sig}
name=$(basename "$pack")
mkdir -p "$dest"
incoming=$(mktemp -d "$dest/.incoming.XXXXXX")
trap 'rm -rf "$incoming"' EXIT
cp "$pack" "$incoming/$name"
cp "$sig" "$incoming/$name.sig"
# Check the copies, which are what will be served: signature, format, every hash, this host, a load.
aotpack verify "$incoming/$name" --public-key "$pub"
# Renames within one folder are atomic. The signature goes first: a server that starts between the two
# renames refuses the old pack with the new signature; it never accepts a pack the key did not sign.
mv -f "$incoming/$name.sig" "$dest/$name.sig"
mv -f "$incoming/$name" "$dest/$name"
echo "deployed $dest/$name: $(sha256sum "$dest/$name" | cut -d' ' -f1)"
echo "serve it with: python examples/serve/app.py $dest/$name --public-key $pub"
