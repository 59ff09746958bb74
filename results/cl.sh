#!/usr/bin/env bash
# The continual-learning re-runs of RESULTS.md §2-§4 (issue 22, items 5-6), as resumable pieces.
# Each piece is one `crma cl` call (one condition, one seed) in runs/clean/NAME, resumed with --resume if cut.
# A finished piece's record (results.json, results.md, config.yaml) is copied to results/cl/NAME,
# which is tracked, and a piece whose record is there is skipped, so this can be stopped at any
# time and rerun until every piece is recorded. `crma cl-table results/cl/...` reads the records.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/clean
LOG=runs/clean/queue.log
P="--model smollm2 --steps 30 --warmup-steps 5 --seq-len 256 --batch-size 4 --max-documents 200 \
   --lr-lora 1e-3 --report-to none --resume"
FIVE="--domains legal,code,docs,changelog,shell"
REVERSED="--domains shell,changelog,docs,code,legal"
PAIR="--domains legal,shell"
QA="--model smollm2 --domains facts-geography,facts-biology,facts-chemistry,facts-history,facts-music \
   --steps 80 --warmup-steps 5 --seq-len 128 --batch-size 4 \
   --lr-lora 2e-3 --report-to none --resume"
LAMBDAS="40 400 4000 40000 400000"

piece() {  # NAME ARGS...: run one piece unless its record exists
  local name=$1; shift
  [ -f "results/cl/$name/results.json" ] && return 0
  echo "start $name $(date -u +%FT%TZ)" >> $LOG
  if .venv/bin/crma cl "$@" --out "runs/clean/$name" >> "runs/clean/$name.log" 2>&1; then
    mkdir -p "results/cl/$name"
    cp "runs/clean/$name"/{results.json,results.md,config.yaml} "results/cl/$name/"
    echo "done $name $(date -u +%FT%TZ)" >> $LOG
  else
    echo "FAILED $name (exit $?) $(date -u +%FT%TZ); see runs/clean/$name.log" >> $LOG
    exit 1
  fi
}

chosen_lambda() {  # the swept lambda with the lowest ACC (mean final holdout loss), seed 0
  .venv/bin/python - $LAMBDAS <<'PY'
import json, sys
acc = {lam: json.load(open(f"results/cl/ewc_{lam}/results.json"))["results"]["ewc"]["0"]["acc"] for lam in sys.argv[1:]}
print(min(acc, key=acc.get))
PY
}

# One condition and one seed per piece (about 20 minutes of a five-domain sequence on 2 cores),
# so that little is lost when a session's machine goes away mid-piece. nfm_s0, the first piece,
# holds NAIVE, FROZEN and MODULAR of seed 0 in one run. `crma cl-table` pools the pieces.
five() { for s in "$@"; do for c in $CONDS; do piece five_${c}_s$s $P $FIVE --conditions $c --seeds $s; done; done; }
CONDS="naive frozen modular"; five 1 2
CONDS="frozen_substrate isolated"; five 0 1 2
for s in 0 1 2; do for c in naive frozen frozen_substrate isolated modular; do
  piece pair_${c}_s$s $P $PAIR --conditions $c --seeds $s; done; done
for lam in $LAMBDAS; do piece ewc_$lam $P $PAIR --conditions ewc --ewc-lambda $lam --seeds 0; done
LAMBDA=$(chosen_lambda) || exit 1
reversed() { for s in "$@"; do for c in naive frozen frozen_substrate isolated modular; do
  piece rev_${c}_s$s $P $REVERSED --conditions $c --seeds $s; done; done; }
reversed 0
for s in 0 1 2; do for c in replay ewc olora inflora; do
  piece five_${c}_s$s $P $FIVE --conditions $c --ewc-lambda $LAMBDA --seeds $s; done; done
reversed 1 2
for s in 0 1 2; do for c in naive frozen modular; do piece qa_${c}_s$s $QA --conditions $c --seeds $s; done; done
echo "all pieces recorded $(date -u +%FT%TZ)" >> $LOG
