#!/bin/bash
# The evaluation runs of the eval issue (SmolLM2; bf16 unless said), one after another; resumable:
# run it again and finished runs are skipped, a killed run continues where it stopped.
# RUNS=folder (default runs/eval-smollm2). Then e.g.: ditto eval compare RUNS/gsm8k-greedy RUNS/gsm8k-greedy-hf
cd "$(dirname "$0")/.." && source .venv/bin/activate
# the full GSM8K / MATH-500 files these runs were recorded on (ditto itself ships only a small sample)
export DITTO_DATA=${DITTO_DATA:-../shared/data}
R=${RUNS:-runs/eval-smollm2}
mkdir -p "$R"
E="ditto eval --threads 2 --no-progress --json"
S="--n 8 --temperature 0.7 --seed 0 --max-num-seqs 128 --batch-problems 50"
G="--max-num-seqs 96 --batch-problems 200"
S2="--n 8 --temperature 0.7 --seed 0 --max-num-seqs 200 --batch-problems 25"
G2="--max-num-seqs 96 --batch-problems 50"
HF="--backend transformers --batch-problems 32"
run() {  # run NAME ARGS...: skipped when NAME finished already
  local name=$1; shift
  [ -f "$R/$name/summary.json" ] || $E "$@" --out "$R/$name" > "$R/$name.json"
}
GSM="--task gsm8k --limit 200 --numerics bf16 --max-tokens 256"
MATH="--task math500 --limit 100 --numerics bf16 --max-tokens 512"
for lv in "1 1" "2 1" "1 2"; do set -- $lv
  A="--task arith --arith-digits $1 --arith-steps $2 --limit 200 --prompt fewshot --numerics bf16 --max-tokens 96"
  run arith-d$1s$2-greedy $A $G
  run arith-d$1s$2-t07 $A $S
done
# backend comparison where the model scores mid-range: fp32 greedy, ditto vs HF transformers
A="--task arith --arith-digits 1 --arith-steps 1 --limit 200 --prompt fewshot --numerics fp32 --max-tokens 96"
run arith-d1s1-fp32-ditto $A $G
run arith-d1s1-fp32-hf $A $HF
run gsm8k-greedy $GSM $G2
run gsm8k-t07 $GSM $S2
run math500-greedy $MATH $G2
run math500-t07 $MATH $S2
# every greedy run again on HF transformers (bf16, through the Backend protocol), paired with ditto's
for lv in "1 1" "2 1" "1 2"; do set -- $lv
  run arith-d$1s$2-greedy-hf --task arith --arith-digits $1 --arith-steps $2 --limit 200 --prompt fewshot \
    --numerics bf16 --max-tokens 96 $HF
done
run gsm8k-greedy-hf $GSM $HF
run math500-greedy-hf $MATH $HF
echo ALLDONE
