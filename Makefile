# The two newcomer commands (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-readme study study-claim lint test bench clean

$(BIN)/amoc: pyproject.toml
	@echo $$(date +%s) > .setup-start
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned to the builds that import together (see README)
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
	@echo $$(( $$(date +%s) - $$(cat .setup-start) )) > $(VENV)/.setup-seconds; rm -f .setup-start
	touch $@

setup: $(BIN)/amoc

# The full DAG (dvc repro) on the embedded real data set, offline, on the CPU.
demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash workflow/demo.sh

# The evidence study of docs/results.md (about 90 minutes on 2 CPU cores; needs the CIFAR-10 subset).
study: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash workflow/study.sh

# The claim study of docs/results.md: AMOC against ACL and RoCL, batch and epochs, 2 seeds
# (82 min measured on 2 cores of an AMD EPYC with AVX512-BF16; needs the CIFAR-10 subset;
# AMOC_STUDY_RESUME=1 AMOC_CLAIM_SEEDS="1 2 3" adds the third seed of docs/results.md, 43 min).
study-claim: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash workflow/study_claim.sh

# Put the numbers of the last `make demo` into the README (between its demo markers).
demo-readme:
	$(BIN)/python workflow/demo_block.py --install demo/readme-block.md README.md

# ruff: formatting and lint (pyproject.toml); the device lint: tensor factories without
# device= and host syncs in the per-step paths (tools/device_lint.py). CI runs it before the tests.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python tools/device_lint.py

# Two pytest-xdist workers, whole modules each (their module fixtures run once), the slow
# modules first (tests/conftest.py). Every test uses one torch thread, so 2 workers fill
# the 2 cores CI has; `make test TEST_WORKERS=8` on a bigger machine, 0 for one process.
TEST_WORKERS ?= 2
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python benchmarks/pretrain_step.py
	$(BIN)/python benchmarks/augment.py

clean:
	rm -rf demo study study-claim .snakemake .pytest_cache
