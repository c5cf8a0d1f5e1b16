# Two commands on a fresh machine: `make train` and `make test` (each runs `make setup` first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup train test test-multinode gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, pinned: anything else would pull CUDA wheels.
	$(PIP) install -q torch==$(TORCH_VERSION)
	# compat mode: the checkout goes on sys.path, so a folder named like the package (a clone called
	# sparselm, from its parent directory) cannot shadow the installed package.
	$(PIP) install -q --no-build-isolation -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

train: setup
	$(PY) -m sparselm.train --config tiny_dense --train.out_dir=runs/tiny_dense

# Two workers (pytest-xdist), each taking whole files so that a module's expensive runs happen once.
# The multi-node tests (root, namespaces, SLURM) have their own target: .ci/run runs both.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 --ignore=tests/e2e/multinode tests

# Launches and failures across namespace "nodes" (tools/local_cluster.py; root, slurm/install_local_cluster.sh).
test-multinode: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests/e2e/multinode

# The first thing to run on a GPU machine, with its own torch and no setup (make setup would pin a CPU
# torch from a registry): GPU-only tests, every block kind under ZeRO-1/3/3-offload in bf16, a save and
# resume, the layer benchmarks and a throughput table (tools/gpu_check.py; about 5 minutes on one H200;
# stops at once without CUDA).
gpu-check:
	$(PYTHON) tools/gpu_check.py

clean:
	rm -rf $(VENV) runs
