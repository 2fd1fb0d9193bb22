#!/usr/bin/env bash
# The release job: sign a pack, then check the signature with the published public key (and the pack's
# format, hashes and loading on this host, as `aotpack verify` does).
# Usage: examples/ci/sign-release.sh PACK PUBLIC_KEY
# The private key comes from the environment, as CI secret stores hand it over: AOTPACK_SIGNING_KEY holds the
# PEM text (written only to a private temporary file, removed on exit), or AOTPACK_SIGNING_KEY_FILE names a
# file. Writes PACK.sig next to the pack (the pack itself is unchanged) and prints the pack's sha256.
set -euo pipefail
pack=${1:?usage: sign-release.sh PACK PUBLIC_KEY}
pub=${2:?usage: sign-release.sh PACK PUBLIC_KEY}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${AOTPACK_SIGNING_KEY:-}" ]; then
  key="$work/signing.key"
  (umask 077 && printf '%s\n' "$AOTPACK_SIGNING_KEY" > "$key")
elif [ -n "${AOTPACK_SIGNING_KEY_FILE:-}" ]; then
  key=$AOTPACK_SIGNING_KEY_FILE
else
  echo "error: no signing key: set AOTPACK_SIGNING_KEY to the PEM private key (from the CI secret store) or" \
       "AOTPACK_SIGNING_KEY_FILE to its path" >&2
  exit 1
fi
aotpack sign "$pack" --key "$key" -o "$pack.sig"
aotpack verify "$pack" --signature "$pack.sig" --public-key "$pub"
echo "release: $(sha256sum "$pack" | cut -d' ' -f1)  $pack (signature $pack.sig)"
