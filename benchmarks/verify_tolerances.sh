#!/usr/bin/env bash
# Honest-noise tolerances of `fast` receipts, one numerics mode at a time, on the bundled SmolLM2:
# `ditto verify calibrate` generates 8 prompts x 32 tokens at T=0.7 under batch 1 and 8, all cores and
# 1 thread, verifies each alone and writes the thresholds. Resumable: a mode whose file exists is skipped.
# The package's default tolerances (src/ditto/verify/tolerances.json) are made from these files by
# benchmarks/verify_tolerances.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/verify-tolerances
MODES=${MODES:-"fp32 bf16 fp16 layercast int8 w8a8 w4 w4-g128 w4-asym w4-g128-asym mxint8"}
mkdir -p "$OUT"
for mode in $MODES; do
  [ -f "$OUT/$mode.json" ] && continue
  .venv/bin/ditto verify calibrate --numerics "$mode" --determinism fast --prompts 8 --max-tokens 32 \
    --out "$OUT/$mode.json.tmp" && mv "$OUT/$mode.json.tmp" "$OUT/$mode.json"
done
