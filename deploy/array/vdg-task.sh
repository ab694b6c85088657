#!/usr/bin/env bash
# A `vdg` job for any batch scheduler: TASK=prep (one part of a prep array: task I of N
# decodes part I/N into $PARTS/part-I), TASK=merge (joins the parts into $OUT once every
# part is done), TASK=bench (one worker of a bench array: the cells K of the plan in $OUT
# with K mod N = I) or TASK=report (the leaderboard of $OUT from whatever finished).
# README, "Scaling out", gives the submission commands. The scheduler's own variables say
# which task of the array this is:
#   Slurm        sbatch --array=0-7             SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT
#   PBS Pro      qsub -J 0-7 (OpenPBS too)      PBS_ARRAY_INDEX; set ARRAY_SIZE=8
#   Torque       qsub -t 0-7                    PBS_ARRAYID; set ARRAY_SIZE=8
#   Grid Engine  qsub -t 1-8 (SGE, UGE, AGE)    SGE_TASK_ID, _FIRST, _LAST, _STEPSIZE
#   LSF          bsub -J "vdg[1-8]" < this      LSB_JOBINDEX; set ARRAY_SIZE=8
#   Kubernetes   an Indexed Job                 JOB_COMPLETION_INDEX; set ARRAY_SIZE=8
# ARRAY_SIZE, where given, must match what the scheduler says. --jobs is the task's cores
# (SLURM_CPUS_PER_TASK, NCPUS, PBS_NUM_PPN, NSLOTS or LSB_DJOB_NUMPROC; all cores without).
# Every prep task sees the same inputs and options (BENCHMARK_ARGS, PREP_OPTIONS), so the
# parts fit together; a bench worker takes the options the plan was made with
# (BENCH_OPTIONS). A task that is preempted or fails resumes its work when run again.
# DRY_RUN=1 prints the command instead of running it. Directives for each scheduler follow
# (each reads only its own); resources beyond cores go on the submission command line.
#SBATCH --job-name=vdg
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#PBS -N vdg
#PBS -V
#PBS -S /bin/bash
#PBS -r y
#$ -N vdg
#$ -V
#$ -S /bin/bash
#$ -cwd
#$ -r y
#BSUB -n 8
set -euo pipefail

fail() {
  echo "vdg-task: $*" >&2
  exit 2
}
# need VAR WHAT: fails (exit 2, as every refusal here) unless VAR is set.
need() {
  [[ -n ${!1:-} ]] || fail "set $1 $2"
}

need TASK "to prep, merge, bench or report"
task="${TASK:-}"
vdg="${VDG:-vdg}"
cpus="${SLURM_CPUS_PER_TASK:-${NCPUS:-${PBS_NUM_PPN:-${NSLOTS:-${LSB_DJOB_NUMPROC:-0}}}}}"

# Sets index (0-based) and count from whichever scheduler started this array task.
array_task() {
  local size="${ARRAY_SIZE:-}"
  count=""
  if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    index=$(((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1}))
    count="${SLURM_ARRAY_TASK_COUNT:-}"
  elif [[ -n ${PBS_ARRAY_INDEX:-} ]]; then
    index="$PBS_ARRAY_INDEX"
  elif [[ -n ${PBS_ARRAYID:-} ]]; then
    index="$PBS_ARRAYID"
  elif [[ -n ${SGE_TASK_ID:-} && $SGE_TASK_ID != undefined ]]; then
    local step="${SGE_TASK_STEPSIZE:-1}"
    index=$(((SGE_TASK_ID - SGE_TASK_FIRST) / step))
    count=$(((SGE_TASK_LAST - SGE_TASK_FIRST) / step + 1))
  elif [[ -n ${LSB_JOBINDEX:-} && $LSB_JOBINDEX != 0 ]]; then
    index=$((LSB_JOBINDEX - 1))
  elif [[ -n ${JOB_COMPLETION_INDEX:-} ]]; then
    index="$JOB_COMPLETION_INDEX"
  else
    fail "TASK=$task runs as an array task, and none of SLURM_ARRAY_TASK_ID," \
      "PBS_ARRAY_INDEX, PBS_ARRAYID, SGE_TASK_ID, LSB_JOBINDEX, JOB_COMPLETION_INDEX is set"
  fi
  if [[ -n $count && -n $size && $count != "$size" ]]; then
    fail "ARRAY_SIZE=$size, but the scheduler runs $count tasks"
  fi
  count="${count:-$size}"
  [[ -n $count ]] || fail "set ARRAY_SIZE to the number of tasks (this scheduler does not say)"
  if ((index < 0 || index >= count)); then
    fail "task $index is outside 0..$((count - 1)) (LSF and Grid Engine arrays count" \
      "from 1, [1-N] and -t 1-N; the others from 0)"
  fi
}

# BENCHMARK_ARGS, PREP_OPTIONS and BENCH_OPTIONS are word lists on purpose (paths without
# spaces).
case $task in
  prep)
    need BENCHMARK_ARGS 'to the benchmark and its inputs, e.g. "ucf-hmdb --ucf101 DIR --hmdb51 DIR"'
    need PARTS "to a folder on shared storage for the part folders"
    array_task
    # shellcheck disable=SC2206
    cmd=("$vdg" prep $BENCHMARK_ARGS --out "$PARTS/part-$index" --part "$index/$count"
      --jobs "$cpus" ${PREP_OPTIONS:-})
    ;;
  merge)
    need PARTS "to the folder holding part-0 .. part-N-1"
    need OUT "to the merged prep folder"
    shopt -s nullglob
    parts=("$PARTS"/part-*)
    [[ ${#parts[@]} -gt 0 || ${DRY_RUN:-0} == 1 ]] || fail "no part folders in $PARTS"
    cmd=("$vdg" prep merge --out "$OUT" --jobs "$cpus" "${parts[@]}")
    ;;
  bench)
    need OUT "to the shared bench folder (made by vdg bench plan)"
    array_task
    # shellcheck disable=SC2206
    cmd=("$vdg" bench run --out "$OUT" --part "$index/$count" ${BENCH_OPTIONS:-})
    ;;
  report)
    need OUT "to the shared bench folder"
    cmd=("$vdg" bench report "$OUT")
    ;;
  *) fail "TASK=$task: expected prep, merge, bench or report" ;;
esac

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# Exit status 1 of a prep or a merge (some videos failed, recorded in the output) is not a
# failed task.
status=0
"${cmd[@]}" || status=$?
if [[ $status -eq 1 && ($task == prep || $task == merge) ]]; then
  exit 0
fi
exit "$status"
