#!/bin/bash
# The evaluation runs of the eval issue (SmolLM2; bf16 unless said), one after another; resumable:
# run it again and finished runs are skipped, a killed run continues where it stopped.
# RUNS=folder (default runs/eval-smollm2). Then: ditto eval compare RUNS/arith-d1s1-fp32-ditto RUNS/arith-d1s1-fp32-hf
cd "$(dirname "$0")/.." && source .venv/bin/activate && mkdir -p "${RUNS:-runs/eval-smollm2}"
E="ditto eval --threads 2 --no-progress --json"
S="--n 8 --temperature 0.7 --seed 0 --max-num-seqs 128 --batch-problems 50"
G="--max-num-seqs 96 --batch-problems 200"
S2="--n 8 --temperature 0.7 --seed 0 --max-num-seqs 200 --batch-problems 25"
G2="--max-num-seqs 96 --batch-problems 50"
for lv in "1 1" "2 1" "1 2"; do set -- $lv
  A="--task arith --arith-digits $1 --arith-steps $2 --limit 200 --prompt fewshot --numerics bf16 --max-tokens 96"
  [ -f ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-greedy/summary.json ] ||   $E $A $G --out ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-greedy > ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-greedy.json
  [ -f ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-t07/summary.json ] || $E $A $S --out ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-t07 > ${RUNS:-runs/eval-smollm2}/arith-d$1s$2-t07.json
done
# backend comparison where the model scores mid-range: fp32 greedy, ditto vs HF transformers
A="--task arith --arith-digits 1 --arith-steps 1 --limit 200 --prompt fewshot --numerics fp32 --max-tokens 96"
$E $A $G --out ${RUNS:-runs/eval-smollm2}/arith-d1s1-fp32-ditto > ${RUNS:-runs/eval-smollm2}/arith-d1s1-fp32-ditto.json
$E $A --backend transformers --batch-problems 32 --out ${RUNS:-runs/eval-smollm2}/arith-d1s1-fp32-hf > ${RUNS:-runs/eval-smollm2}/arith-d1s1-fp32-hf.json
$E --task gsm8k --limit 200 --numerics bf16 --max-tokens 256 $G2 --out ${RUNS:-runs/eval-smollm2}/gsm8k-greedy > ${RUNS:-runs/eval-smollm2}/gsm8k-greedy.json
$E --task gsm8k --limit 200 --numerics bf16 --max-tokens 256 $S2 --out ${RUNS:-runs/eval-smollm2}/gsm8k-t07 > ${RUNS:-runs/eval-smollm2}/gsm8k-t07.json
$E --task math500 --limit 100 --numerics bf16 --max-tokens 512 $G2 --out ${RUNS:-runs/eval-smollm2}/math500-greedy > ${RUNS:-runs/eval-smollm2}/math500-greedy.json
$E --task math500 --limit 100 --numerics bf16 --max-tokens 512 $S2 --out ${RUNS:-runs/eval-smollm2}/math500-t07 > ${RUNS:-runs/eval-smollm2}/math500-t07.json
echo ALLDONE
