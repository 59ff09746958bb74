#!/usr/bin/env bash
# The continual-learning re-runs of RESULTS.md §2-§4 (issue 22, items 5-6), as resumable pieces.
# Each piece is one `crma cl` call (one seed) in runs/clean/NAME, resumed with --resume if cut.
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
   --conditions naive,frozen,modular --steps 80 --warmup-steps 5 --seq-len 128 --batch-size 4 \
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

for s in 0 1 2; do piece nfm_s$s $P $FIVE --conditions naive,frozen,modular --seeds $s; done
for s in 0 1 2; do piece fsi_s$s $P $FIVE --conditions frozen_substrate,isolated --seeds $s; done
for s in 0 1 2; do piece pair_s$s $P $PAIR --conditions naive,frozen,frozen_substrate,isolated,modular --seeds $s; done
for lam in $LAMBDAS; do piece ewc_$lam $P $PAIR --conditions ewc --ewc-lambda $lam --seeds 0; done
LAMBDA=$(chosen_lambda) || exit 1
piece rev_s0 $P $REVERSED --conditions naive,frozen,frozen_substrate,isolated,modular --seeds 0
for s in 0 1 2; do piece rest_s$s $P $FIVE --conditions replay,ewc,olora,inflora --ewc-lambda $LAMBDA --seeds $s; done
for s in 1 2; do piece rev_s$s $P $REVERSED --conditions naive,frozen,frozen_substrate,isolated,modular --seeds $s; done
for s in 0 1 2; do piece qa_s$s $QA --seeds $s; done
echo "all pieces recorded $(date -u +%FT%TZ)" >> $LOG
