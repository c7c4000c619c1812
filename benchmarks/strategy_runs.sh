#!/bin/bash
# The strategy issue's comparison: every strategy at two token budgets on 200 arith problems (d1s1, where
# greedy scores 20-60% with the few-shot chat prompt) and 200 GSM8K-train problems, SmolLM2 bf16 policy,
# gemma-3-270m as the second model where a strategy needs one. Resumable: finished runs are skipped, a
# killed run continues. Self-consistency also runs at smaller budgets (1-2 samples), so majority voting has a
# curve of accuracy against tokens for strategies that spend less than their cap.
# Then: python benchmarks/strategy_table.py (the table, compare folders and plots), or by hand:
# ditto eval compare RUNS/<task>-* --baseline RUNS/<task>-self_consistency-b<B>
# RUNS=folder (default runs/strategies-smollm2); TASKS="arith gsm8k" to choose; BUDGETS="1024" to run one
# budget; ONLY=regex to run just the runs whose folder name matches it; THREADS (default 2). On a
# 2-core box two 1-thread jobs side by side (TASKS=arith and TASKS=gsm8k) finish sooner than one 2-thread job
# (measured: 2 x 352 tok/s vs 529 tok/s sampling 128 sequences, 1.33x). Several jobs may share one task: each
# run holds a lock (flock, released when its job dies), so a second job skips what the first is computing.
# The matrix takes longer than one working session and runs/ is not kept: the run records (manifest, results,
# summary; not reports) are kept in git under benchmarks/results/<folder>. `SNAPSHOT=1 bash ...` copies them
# there; every start first copies in the kept records of runs the folder lacks, so unfinished runs resume.
cd "$(dirname "$0")/.." && source .venv/bin/activate
# the full GSM8K / MATH-500 files these runs were recorded on (ditto itself ships only a small sample)
export DITTO_DATA=${DITTO_DATA:-../shared/data}
R=${RUNS:-runs/strategies-smollm2}
K=benchmarks/results/$(basename "$R")
mkdir -p "$R"
if [ -n "${SNAPSHOT:-}" ]; then
  for d in "$R"/*/; do
    [ -f "$d/results.jsonl" ] || continue
    mkdir -p "$K/$(basename "$d")" && cp "$d"/{manifest.json,results.jsonl} "$K/$(basename "$d")/"
    if [ -f "$d/summary.json" ]; then cp "$d/summary.json" "$K/$(basename "$d")/"; fi
  done
  echo "kept in $K"; exit 0
fi
[ -d "$K" ] && cp -rn "$K"/. "$R"/
E="ditto eval --threads ${THREADS:-2} --no-progress --json --limit 200 --numerics bf16 --batch-problems 32 --max-num-seqs 128"
run() {  # run NAME ARGS...
  local name=$1; shift
  [ -f "$R/$name/summary.json" ] && return
  [[ -n "${ONLY:-}" && ! "$name" =~ $ONLY ]] && return
  exec {lock}> "$R/$name.lock"
  flock -n $lock && $E "$@" --out "$R/$name" > "$R/$name.json"
  exec {lock}>&-
}
for task in ${TASKS:-arith gsm8k}; do
  if [ "$task" = arith ]; then
    T="--task arith --arith-digits 1 --arith-steps 1 --prompt chat-fewshot --max-tokens 96"; budgets=${BUDGETS:-384 768}; STEP=16; CURVE="96 192"
  else
    T="--task gsm8k --prompt chat --max-tokens 256"; budgets=${BUDGETS:-512 1024}; STEP=48; CURVE="256"
  fi
  P="--strategy-arg prompt=task"
  SAMPLE="--strategy-arg n=auto --strategy-arg temperature=0.7"
  SECOND="--second-model gemma3-270m"
  run $task-greedy $T $P --strategy greedy
  for B in $CURVE; do  # majority voting with fewer samples: its accuracy at the token counts other strategies used (cheap: first)
    run $task-self_consistency-b$B $T $P --budget $B --strategy self_consistency $SAMPLE
  done
  for B in $budgets; do
    S="$T $P --budget $B"
    run $task-self_consistency-b$B $S --strategy self_consistency $SAMPLE
    run $task-best_of_n-self-b$B $S --strategy best_of_n $SAMPLE --strategy-arg scorer=self
    run $task-best_of_n-second-b$B $S --strategy best_of_n $SAMPLE --strategy-arg scorer=second $SECOND
    run $task-weighted_majority-b$B $S --strategy weighted_majority $SAMPLE --strategy-arg scorer=self
    run $task-beam_search-b$B $S --strategy beam_search --strategy-arg step_rule=$STEP --strategy-arg step_tokens=$STEP
    run $task-astar-b$B $S --strategy astar --strategy-arg step_rule=$STEP --strategy-arg step_tokens=$STEP
    run $task-early_rejection-b$B $S --strategy early_rejection --strategy-arg step_tokens=$STEP
    run $task-chunk_guided-cgs-b$B $S --strategy chunk_guided --strategy-arg mode=cgs $SECOND
    run $task-chunk_guided-lgs-b$B $S --strategy chunk_guided --strategy-arg mode=lgs $SECOND
    run $task-glimp_router-b$B $S --strategy glimp_router --strategy-arg threshold=calibrate --strategy-arg step_tokens=$STEP $SECOND
    run $task-early_exit-b$B $S --strategy early_exit
    run $task-tool_integrated-b$B $S --strategy tool_integrated
    run $task-program_of_thought-b$B $S --strategy program_of_thought --strategy-arg n=auto
    run $task-code_self_verification-b$B $S --strategy code_self_verification
  done
done
echo ALLDONE
