#!/usr/bin/env bash
# BENCHMARKS.md §9's grid (issue 21, item 7): 3 models x 2 bases x 2 context lengths x 9 targets.
# Each row is appended to results/grid.jsonl once compiled, and a rerun takes the rows already
# there, so this can be stopped at any time and rerun until it prints the whole table. The file
# is tracked: a session that ends mid-grid loses at most the row it was compiling.
#
# Flags given to this script follow the grid's own and so override them (argparse keeps the last):
#   results/grid.sh --columns model,base,T,target,total,fits    # reprint a finished grid, narrow
#   results/grid.sh --target v4-8,v5p-8 --append results/grid_b.jsonl   # a second process on 2 cores
# (two processes each append to a file of their own; join the files when both are done).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
export XLA_FLAGS=--xla_force_host_platform_device_count=8
.venv/bin/crma bench memory --arch mistral-7b,gemma2-9b,tinyllama --quant nf4,bf16 --seq-len 2048,8192 \
  --target a10g,l4,h100,v5e-1,v5e-4,v5e-8,v4-8,v5p-8,v6e-8 --per-chip-batch 1 --cpu-beside \
  --append results/grid.jsonl "$@" 2>> runs/grid.log | tee -a runs/grid.log
echo "exit ${PIPESTATUS[0]} $(date -u +%FT%TZ)" >> runs/grid.log
