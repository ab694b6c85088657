#!/usr/bin/env bash
# Queues a `vdg prep` over N Slurm array tasks and the merge after them:
#   deploy/slurm/submit-prep.sh N OUT PARTS -- <benchmark and its input flags>
# e.g. deploy/slurm/submit-prep.sh 8 /scratch/ucf-hmdb /scratch/ucf-hmdb-parts -- \
#        ucf-hmdb --ucf101 /data/UCF-101 --hmdb51 /data/hmdb51
# PREP_OPTIONS (e.g. "--max-fps 10") is passed to every part. DRY_RUN=1 prints, for each
# array index, the command that task would run, then the merge command, and submits nothing.
set -euo pipefail
if [[ $# -lt 5 || "$4" != "--" ]]; then
  echo "usage: $0 N OUT PARTS -- <benchmark> <input flags>" >&2
  exit 2
fi
n="$1" out="$2" parts="$3"
shift 4
here="$(cd "$(dirname "$0")" && pwd)"
export BENCHMARK_ARGS="$*" PARTS="$parts" OUT="$out"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$n bash "$here/prep.sbatch"
  done
  bash "$here/merge.sbatch"
  exit 0
fi
mkdir -p "$parts"
array=$(sbatch --parsable --array="0-$((n - 1))" --export=ALL "$here/prep.sbatch")
merge=$(sbatch --parsable --dependency="afterok:${array%%;*}" --export=ALL "$here/merge.sbatch")
echo "queued prep array $array ($n tasks) and merge $merge -> $out"
