VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: test test-ecosystem demo lint install clean bench bench-full bench-gpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test,demo]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -n auto tests

# A second environment without HF PEFT: the dev venv's packages less `peft`, hard-linked (seconds, no download).
# tests_ecosystem/ runs transformers / diffusers / TRL on fastpeft through fastpeft.install_as_peft() there.
ECO_VENV := .venv-eco
ECO_STAMP := $(ECO_VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

$(ECO_STAMP): $(STAMP)
	rm -rf $(ECO_VENV)
	python3 -m venv --without-pip $(ECO_VENV)
	$(PY) tests_ecosystem/make_env.py $(VENV) $(ECO_VENV)
	touch $(ECO_STAMP)

test-ecosystem: $(ECO_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ORACLE_PYTHON=$(abspath $(PY)) $(ECO_VENV)/bin/python -m pytest -n auto tests_ecosystem

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/fastpeft demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tests_ecosystem examples $(wildcard benchmarks)

# Benchmarks: fastpeft vs HF PEFT ratios (benchmarks/README.md). `bench`: quick runs; `bench-full`: the runs
# behind the numbers in benchmarks/README.md (minutes each on a 2-core CPU).
BENCH_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
BENCH_NEW := lora_train inference_overhead injection road_mixed_batch big_model_load real_shapes many_adapters

bench: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/mixed_batch.py --repeats 3
	$(BENCH_ENV) $(PY) benchmarks/dora.py --quick
	$(BENCH_ENV) $(PY) benchmarks/load_speed.py --repeats 3 --layers 24
	for b in $(BENCH_NEW); do $(BENCH_ENV) $(PY) benchmarks/$$b.py --quick || exit 1; done
	$(BENCH_ENV) $(PY) benchmarks/lora_dropout_memory.py --repeats 3

bench-full: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/mixed_batch.py
	$(BENCH_ENV) $(PY) benchmarks/dora.py
	$(BENCH_ENV) $(PY) benchmarks/load_speed.py
	for b in $(BENCH_NEW); do $(BENCH_ENV) $(PY) benchmarks/$$b.py || exit 1; done
	$(BENCH_ENV) $(PY) benchmarks/lora_dropout_memory.py --repeats 11

# One CUDA device: LoRA / DoRA / QLoRA training steps and mixed-adapter decoding (benchmarks/gpu_results.json / .md)
bench-gpu: $(STAMP)
	$(BENCH_ENV) $(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) $(ECO_VENV)
