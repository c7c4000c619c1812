#!/bin/bash
# The determinism issue's `ditto repro` study: 50 GSM8K problems, SmolLM2 (bundled Q4_1 GGUF), greedy,
# 256 tokens; ditto {fp32, bf16, layercast} x {fast, batch_invariant} x {batch 1, 8, 32}, integer/exact
# x {1, 8, 32}, HF transformers fp32 (batch 8), llama-cpp-python (one request at a time), and two
# configs on 1 thread instead of 2. Resumable (finished configs are reused); RUNS=folder.
#
# Phase 1 runs the batched configs on 2 threads. Phase 2 runs the one-request-at-a-time ditto configs
# on 1 thread each, two processes side by side (single-stream decoding of a 135M model does not use
# 2 cores well), in their own folders; phase 3 gathers them and writes the report. Throughput figures
# of phase 2 configs are per process with another process beside it.
cd "$(dirname "$0")/.." && source .venv/bin/activate
# the full GSM8K / MATH-500 files these runs were recorded on (ditto itself ships only a small sample)
export DITTO_DATA=${DITTO_DATA:-../shared/data}
R=${RUNS:-runs/repro-gsm8k}
W="--task gsm8k --limit 50 --max-tokens 256 --no-progress --no-matrix"
BATCHED=""
for b in 32 8; do
  for nd in fp32:batch_invariant fp32:fast bf16:batch_invariant bf16:fast layercast:batch_invariant layercast:fast integer:exact; do
    BATCHED="$BATCHED,ditto:$nd:$b:2"
  done
done
BATCHED="${BATCHED#,},transformers:fp32:-:8:2,llama_cpp:-:-:1:2,ditto:fp32:fast:32:1,ditto:bf16:fast:32:1"
B1A="ditto:fp32:batch_invariant:1:1,ditto:bf16:batch_invariant:1:1,ditto:layercast:fast:1:1"
B1B="ditto:fp32:fast:1:1,ditto:bf16:fast:1:1,ditto:layercast:batch_invariant:1:1,ditto:integer:exact:1:1"
REF="ditto-fp32-batch_invariant-b32-t2"

ditto repro $W --configs "$BATCHED" --reference $REF --out "$R" > "$R.phase1.log" 2>&1 || exit 1
ditto repro $W --configs "$B1A" --out "$R.b1a" > "$R.b1a.log" 2>&1 &
ditto repro $W --configs "$B1B" --out "$R.b1b" > "$R.b1b.log" 2>&1 &
wait
for part in "$R.b1a" "$R.b1b"; do
  for d in "$part"/configs/*/; do
    [ -d "$R/configs/$(basename "$d")" ] || cp -r "$d" "$R/configs/"
  done
done
ditto repro $W --configs "$BATCHED,$B1A,$B1B" --reference $REF --out "$R" > "$R.phase3.log" 2>&1 && echo ALLDONE
