# Sourced by the sbatch scripts: the Python environment and the rendezvous address.
REPO="${SPARSELM_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$REPO"
export SPARSELM_BIN="${SPARSELM_BIN:-$REPO/.venv/bin}"
export SPARSELM_PYTHON="$SPARSELM_BIN/python"
[[ -x "$SPARSELM_PYTHON" ]] || { echo "no $SPARSELM_PYTHON: run 'make setup' in $REPO first" >&2; exit 2; }
# Processes per node: the GPUs SLURM gave us, else PROCS_PER_NODE (CPU nodes), else 1.
if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  export PROCS_PER_NODE="${PROCS_PER_NODE:-$SLURM_GPUS_ON_NODE}"
else
  export PROCS_PER_NODE="${PROCS_PER_NODE:-1}"
fi
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
