# Sourced by the sbatch scripts (from the repository, found through $SLURM_SUBMIT_DIR or $SPARSELM_REPO,
# never from the script's own path: sbatch runs a copy of the script from slurmd's spool directory).
# Sets the Python environment, the rendezvous address and processes per node, and defines run_or_requeue.
cd "$REPO"
export SPARSELM_BIN="${SPARSELM_BIN:-$REPO/.venv/bin}"
export SPARSELM_PYTHON="$SPARSELM_BIN/python"
[[ -x "$SPARSELM_PYTHON" ]] || { echo "sparselm: no $SPARSELM_PYTHON: run 'make setup' in $REPO first" >&2; exit 2; }
# Processes per node: --ntasks-per-node when given, else the GPUs SLURM gave us, else 1.
export PROCS_PER_NODE="${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
REQUEUE_EXIT=75  # sparselm.training.preemption.REQUEUE_EXIT: stopped early after saving a checkpoint
LOST_EXIT=69     # sparselm.errors.PeerLostError: a peer rank was lost or hung; every checkpoint written is complete
MAX_RESTARTS="${SPARSELM_MAX_RESTARTS:-3}"  # requeues after a lost peer, so a broken node cannot loop the job
echo "sparselm: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST at $(date -u +%FT%TZ)"

# The ranks are told to save and stop through a file (--train.stop_file), not a signal: a signal sent to a
# job step reaches every process in it (a compiler or worker a rank started would die of SIGUSR1) and is
# lost while a rank is still starting. The file lives in the repository, which every node sees.
STOP_FILE="$REPO/.sparselm-stop-$SLURM_JOB_ID"
# A rank that exits 69 leaves this mark: when the lost peer's own tasks died of a signal (killed, OOM), srun
# reports that signal (137), not 69, and the mark still says the survivors stopped for a lost peer.
export LOST_FILE="$REPO/.sparselm-lost-$SLURM_JOB_ID"
rm -f "$STOP_FILE" "$LOST_FILE"

# run_or_requeue CMD...: run the job step CMD (an srun) in the background so that this shell can take
# signals meanwhile. On SIGUSR1 (sbatch --signal=B:USR1@SECONDS, sent before the time limit) it creates
# STOP_FILE: the ranks finish their step, save a checkpoint and exit 75; on 75 the job is requeued and
# resumes from that checkpoint. SIGTERM reaches the ranks from SLURM itself (scancel, the time limit).
# On 69 (a peer lost or hung: the survivors stopped within parallel.timeout_minutes) the job is requeued too,
# at most SPARSELM_MAX_RESTARTS times; srun's own status may name the killed peers' signal instead, so a rank
# that exits 69 also leaves LOST_FILE (`mark_lost` below). A node that died outright (its slurmd too) is
# requeued by SLURM itself (--requeue, NODE_FAIL).
# The scripts run srun with --kill-on-bad-exit=0 --wait=60: ranks that stop with 75 leave within moments
# of each other and must not be killed on the way out (srun would then report 143, not 75), while a rank
# that crashed takes the others down after 60 s instead of a collective timeout.
run_or_requeue() {
  # the traps first: a warning that comes while srun starts must not kill this shell
  trap 'echo "sparselm: got SIGUSR1, asking the ranks to save and stop"; touch "$STOP_FILE"' USR1
  trap 'echo "sparselm: got SIGTERM"' TERM
  "$@" &
  local pid=$! rc=0
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  wait "$pid" || rc=$?
  trap - USR1 TERM
  rm -f "$STOP_FILE"
  if [[ -e "$LOST_FILE" && $rc != "$REQUEUE_EXIT" ]]; then
    rc=$LOST_EXIT
    rm -f "$LOST_FILE"
  fi
  if [[ $rc == "$REQUEUE_EXIT" ]]; then
    echo "sparselm: the run saved a checkpoint and stopped early (status $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [[ $rc == "$LOST_EXIT" ]]; then
    if (( ${SLURM_RESTART_COUNT:-0} < MAX_RESTARTS )); then
      echo "sparselm: a peer rank was lost (status $rc): requeueing job $SLURM_JOB_ID" \
           "(restart $((${SLURM_RESTART_COUNT:-0} + 1)) of SPARSELM_MAX_RESTARTS=$MAX_RESTARTS)"
      scontrol requeue "$SLURM_JOB_ID"
      exit 0
    fi
    echo "sparselm: a peer rank was lost (status $rc) and job $SLURM_JOB_ID was already requeued $MAX_RESTARTS" \
         "times (SPARSELM_MAX_RESTARTS): not requeueing again; look for the failing node"
  fi
  echo "sparselm: job step ended with status $rc"
  exit "$rc"
}

# mark_lost CMD...: run CMD (a rank or a node's launcher, inside the job step) and leave LOST_FILE when it exits 69.
mark_lost() {
  local rc=0
  "$@" || rc=$?
  [[ $rc != "$LOST_EXIT" ]] || touch "$LOST_FILE"
  return "$rc"
}
export -f mark_lost
export LOST_EXIT
