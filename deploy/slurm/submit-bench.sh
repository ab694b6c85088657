#!/usr/bin/env bash
# Queues a `vdg bench` over N Slurm array tasks (one GPU each):
#   deploy/slurm/submit-bench.sh N OUT -- <vdg bench run options>
# e.g. deploy/slurm/submit-bench.sh 8 /scratch/bench -- --benchmark ucf_hmdb \
#        --data /scratch/ucf-hmdb --backbone resnet50 --backbone-weights r50.safetensors --device cuda
# Writes the plan now (on this host: it prepares the data and checks every cell), then
# queues the array and a report job that runs after it whatever the tasks' outcome (it
# names the cells that did not finish). DRY_RUN=1 prints the commands and submits nothing.
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 N OUT -- <vdg bench run options>" >&2
  exit 2
fi
n="$1" out="$2"
shift 3
here="$(cd "$(dirname "$0")" && pwd)"
vdg="${VDG:-vdg}"
export OUT="$out" BENCH_OPTIONS="$*"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "$vdg" bench plan --out "$out" "$@"
  echo
  for ((i = 0; i < n; i++)); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$n bash "$here/bench.sbatch"
  done
  printf '%q ' "$vdg" bench report "$out"
  echo
  exit 0
fi
"$vdg" bench plan --out "$out" "$@"
array=$(sbatch --parsable --array="0-$((n - 1))" --export=ALL "$here/bench.sbatch")
report=$(sbatch --parsable --dependency="afterany:${array%%;*}" --job-name=vdg-bench-report \
  --output=vdg-bench-report-%j.log --wrap="$(printf '%q ' "$vdg" bench report "$out")")
echo "planned $out; queued bench array $array ($n tasks) and report $report"
