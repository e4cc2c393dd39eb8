# Set-up, demo, tests and benchmarks. Everything runs from a virtual environment in .venv.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-engine bench-decode bench-formats bench-prefill bench-serve bench-kv world

install: $(STAMP)

# Re-run only when pyproject.toml changes (or the environment is gone). pip -qq: errors only.
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "Creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "Installing torch (CPU) and dynamic-llava into $(VENV)"
	@$(PIP) install -qq --disable-pip-version-check torch==2.13.0
	@$(PIP) install -qq --disable-pip-version-check -e ".[test]"
	@touch $@

demo: install
	$(VENV)/bin/dynamic-llava demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Methods side by side (speed, memory, accuracy vs budget): tables on screen, JSON and plots in results/.
bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/dynamic-llava bench --output results
	HF_HUB_OFFLINE=1 $(VENV)/bin/dynamic-llava bench-accuracy --output results

# Dense vs Dynamic-LLaVA on one random-weight model, with a per-component breakdown of prefill.
bench-engine: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/engine_benchmark.py

bench-decode: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/decode_vs_stock.py --output results/decode_vs_stock.json

bench-formats: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/world_formats.py --seed 0 --output results/world_formats_seed0.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/world_formats.py --seed 1000 --output results/world_formats_seed1000.json


# Rebuild the synthetic world from nothing: data, the tiny dense LLaVA, its Dynamic-LLaVA, the report.
world: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/dynamic-llava world --output checkpoints --work runs/world

# Prefill of the stock class vs ours, 7B-wide decoders with 8 layers (LLaVA and Qwen2-VL shapes), with the FLOPs ideal.
bench-prefill: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/prefill_vs_stock.py --family llava --hidden 4096 --heads 32 --kv-heads 32 \
		--intermediate 11008 --layers 8 --output results/prefill_vs_stock_llava.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/prefill_vs_stock.py --family qwen2_vl --hidden 3584 --heads 28 --kv-heads 4 \
		--intermediate 18944 --layers 8 --output results/prefill_vs_stock_qwen2_vl.json

# 240 concurrent chat requests through `dynamic-llava serve`, each answer checked against its one-by-one answer.
bench-serve: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/serve_load.py --requests 240 --concurrency 16 --output results/serve_load.json

# KV budgets at equal bytes: Dynamic-LLaVA's learned budget vs H2O and StreamingLLM, on the world model.
bench-kv: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/kv_budget.py --seed 0 --output results/kv_budget_seed0.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/kv_budget.py --seed 1000 --output results/kv_budget_seed1000.json
