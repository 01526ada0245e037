#!/usr/bin/env bash
# Prints the folder of the converted SmolLM2-135M-Instruct on the device (nothing, exit 1, when it cannot be
# made): $KVPRESS_CACHE's (or ~/.cache/kvpress's) copy, else /tmp/kvc/smollm2-135m-instruct, converted
# there once from the GGUF's three pieces (carried one or two per call into /tmp/smol by gpu_round.sh,
# or all in .smol/) with the gguf wheel in .whl/. Usage: SMOL=$(bash benchmarks/gpu_smol_model.sh) || ...
for d in "${KVPRESS_CACHE:-$HOME/.cache/kvpress}/smollm2-135m-instruct" /tmp/kvc/smollm2-135m-instruct; do
  [ -f "$d/config.json" ] && [ -f "$d/model.safetensors" ] && echo "$d" && exit 0
done
for src in /tmp/smol .smol; do
  pieces=$(ls "$src"/*.part00 "$src"/*.part01 "$src"/*.part02 2>/dev/null) || continue
  out=/tmp/kvc/smollm2-135m-instruct
  pip install -q --no-index --no-deps --target /tmp/smol-site .whl/gguf-*.whl >/dev/null 2>&1
  # shellcheck disable=SC2086
  PYTHONPATH=${PYTHONPATH:-}:/tmp/smol-site timeout 90 python models/fetch_smollm2.py --from $pieces --out $out >&2
  [ -f $out/model.safetensors ] && echo $out && exit 0
done
echo "SmolLM2 not on this machine (nor its 3 GGUF pieces in /tmp/smol or .smol)" >&2
exit 1
