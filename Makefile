# dist_nmt: `make train` (prepare Multi30k + train the default model) and `make test`.
# Both bootstrap everything they need first (Debian MPI, .venv, Horovod build); re-runs skip what is done.
SHELL := /bin/bash
VENV ?= .venv
GPU ?= 0
PY := $(VENV)/bin/python
CONFIG ?= configs/multi30k.yaml
ARGS ?=
PYTEST_ARGS ?=

.PHONY: bootstrap ops train prepare test test-kill test-slow test-slurm test-cluster-slow test-all lint bench clean

bootstrap:  # GPU=1: CUDA MXNet wheel + Horovod with NCCL
	@GPU=$(GPU) bash scripts/bootstrap.sh

ops:
	$(PY) -m dist_nmt.ops build

prepare: bootstrap
	$(VENV)/bin/dist-nmt prepare --config $(CONFIG) $(ARGS)

train: prepare
	$(PY) -m dist_nmt.train --config $(CONFIG) $(ARGS)

test: bootstrap
	$(PY) -m pytest -q -m "not slow and not cluster_slow" $(PYTEST_ARGS) tests

test-kill: bootstrap
	$(PY) -m pytest -q -s -m slow -k kill_campaign_long $(PYTEST_ARGS) tests/integration/test_faults.py

test-slurm: bootstrap
	$(PY) -m pytest -q -m slurm $(PYTEST_ARGS) tests

test-slow: bootstrap  # everything make test leaves out: the long kill campaign, longer simulated-cluster runs
	$(PY) -m pytest -q -m "slow or cluster_slow" $(PYTEST_ARGS) tests

test-cluster-slow: bootstrap
	$(PY) -m pytest -q -m cluster_slow $(PYTEST_ARGS) tests/integration/test_cluster.py

test-all: bootstrap
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: bootstrap
	$(VENV)/bin/ruff check dist_nmt tests scripts

bench: bootstrap
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_train.py --preset transformer_base --batch-sentences 128 --seq-len 25
	$(PY) scripts/bench_decode.py

clean:
	rm -rf runs data-bin .pytest_cache
