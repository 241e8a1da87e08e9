"""Typed recipe configs: YAML plus ``key=value`` overrides, checked against one dataclass schema per entry point.

Every entry point declares a dataclass composed from the shared parts below (model, data, optimizer,
scheduler, training, logging). The schema is the only home of defaults. Loading checks every key:

- an unknown key is an error naming the key, the file and the keys that are allowed;
- a wrong type is an error naming the key, the file, the expected type and the value;
- a missing required value is an error naming the key and the file.

YAML 1.1 (PyYAML) reads ``lr: 7e-6`` as the string "7e-6"; our loader reads it as a float, as users expect.

Usage::

    cfg = parse_cli(SFTConfig, ["recipes/sft.yaml", "optimizer.lr=1e-5", "training.max_steps=10"])
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema. The message names the file and the key."""


# --------------------------------------------------------------------------------------------------------------
# YAML with floats as people write them
# --------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 requires a dot in a float ("7.0e-6"); accept "7e-6", "1E5" and friends too.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx)
        for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
# Booleans as YAML 1.2 has them: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, so
# `training.mixed_precision=no` became False and failed against the choices 'no' / 'bf16'.
for _first in list("yYnNoOtTfF"):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx)
        for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:bool"
    ]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Building a dataclass from plain data, checking as we go
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return (
            f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
        )
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {msg}")


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    """Convert ``value`` to ``tp`` or raise a ConfigError naming ``key`` and ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = _fail(where, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as e:
                errors.append(e)
        # One non-null alternative: its own message is the most precise.
        if len(errors) == 1:
            raise errors[0]
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise _fail(where, key, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(
                where, key, f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return build(tp, value, where, prefix=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise bad
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        vtp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vtp, v, where, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _fail(where, key, f"expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise _fail(where, key, f"the schema uses a type the loader does not know: {tp!r}")


def build(cls: type, data: dict[str, Any], where: str = "<config>", prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _fail(
            where,
            dotted + unknown[0],
            f"unknown key (allowed under {prefix or 'the top level'}: {', '.join(sorted(fields))})",
        )
    kwargs = {}
    for name, f in fields.items():
        key = dotted + name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], where, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(where, key, f"required ({_type_name(hints[name])}) but not set")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """The config as plain data (for logging, saving next to checkpoints and hashing)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------------------------


def _key_parts(key: str, where: str) -> list[str | int]:
    """``rewards[0].params.name_or_path`` -> ``["rewards", 0, "params", "name_or_path"]``."""
    parts: list[str | int] = []
    for name in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", name)
        if m is None:
            raise ConfigError(
                f"{where}: override key {key!r}: write list items as name[index], e.g. rewards[0]"
            )
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\d+", m.group(2))]
    return parts


def apply_override(data: dict[str, Any], override: str, where: str = "command line") -> None:
    """Apply ``a.b.c=value`` to nested ``data``; ``value`` is parsed as YAML (``lr=7e-6`` is a float).

    ``rewards[0].params.name_or_path=...`` sets a key inside an item of a list the recipe already has; a missing
    mapping on the way is created, a missing list item is an error (an override never grows a list).
    """
    if "=" not in override:
        raise ConfigError(f"{where}: override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{where}: override {override!r} has an empty key")
    value = load_yaml(raw, f"{where} ({key})") if raw.strip() else ""
    parts = _key_parts(key, where)
    node: Any = data
    for i, part in enumerate(parts):
        here = _dotted(parts[:i]) or "the top level"
        if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
            size = f"a list of {len(node)} items" if isinstance(node, list) else "not a list"
            raise ConfigError(f"{where}: {here} is {size}; cannot set {key}")
        if isinstance(part, str) and not isinstance(node, dict):
            raise ConfigError(f"{where}: {here} is not a mapping; cannot set {key}")
        if i == len(parts) - 1:
            node[part] = value
        elif isinstance(part, str) and node.get(part) is None:
            node[part] = {}
        node = node[part]


def _dotted(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if j else p) for j, p in enumerate(parts))


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a recipe file (or nothing) into ``cls``, then apply ``key=value`` overrides, then check."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        loaded = load_yaml(path.read_text(), where)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of keys to values, got {type(loaded).__name__}")
        data = loaded
    for ov in overrides:
        apply_override(data, ov, f"{where} (override {ov.split('=', 1)[0]})")
    return build(cls, data, where)


def parse_cli(cls: type, argv: list[str]) -> Any:
    """``[recipe.yaml] [key=value ...]`` -> a checked config."""
    if argv and argv[0] in ("-h", "--help"):  # the schema on stdout, exit status 0, as argparse does
        print(f"usage: <script> [recipe.yaml] [key=value ...]\nschema: {cls.__name__}\n{describe(cls)}")
        raise SystemExit(0)
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path is not None else argv
    return load_config(cls, path, overrides)


def run_cli(main) -> None:
    """Run an entry point; a bad recipe or bad data ends with its one-line message and exit code 2."""
    import sys

    from alignment.data import DataError

    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def describe(cls: type, indent: str = "  ") -> str:
    """Every key with its type and default: what ``--help`` prints."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = (
            "required"
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            else f"default {f.default!r}"
            if f.default is not dataclasses.MISSING
            else "default: see schema"
        )
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        lines.append(f"{indent}{f.name}: {_type_name(tp)} ({default})")
        for sub in inner:
            lines.append(describe(sub, indent + "  "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA through peft. ``target_modules: all-linear`` adapts every linear layer but the output head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError("lora.r must be positive")


@dataclass
class RopeScalingConfig:
    """YaRN RoPE scaling, so a model with a shorter native context trains at a longer one.

    ``factor: null`` derives it from the data's ``max_length`` and the model's native context.
    """

    type: Literal["yarn"] = "yarn"
    factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclass
class DCAConfig:
    """Dual Chunk Attention (alignment/dca.py) for inputs longer than the model's native window, at inference.

    Chunks of ``chunk_size - local_size`` tokens; no relative position exceeds ``chunk_size``, which must stay
    below the native window. null: ChunkLlama's defaults, 3/4 of the native window and 1/16 of it.
    """

    chunk_size: int | None = None
    local_size: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"dca.chunk_size must be positive, got {self.chunk_size}")
        if self.local_size is not None and self.local_size <= 0:
            raise ValueError(f"dca.local_size must be positive, got {self.local_size}")


@dataclass
class ModelConfig:
    # A built-in name (smollm2-135m-instruct, tiny-qwen2, tiny-qwen2-moe), a local HF folder, or a hub id.
    name_or_path: str = "smollm2-135m-instruct"
    # Weights are loaded in this dtype. Mixed precision is `training.mixed_precision`.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # auto: flash_attention_2 on CUDA when installed, else our packed SDPA (exact, no attention across examples).
    # dca: Dual Chunk Attention for long inputs (inference and evaluation only; settings under `dca`).
    attn_implementation: Literal["auto", "packed_sdpa", "flash_attention_2", "sdpa", "eager", "dca"] = "auto"
    rope_scaling: RopeScalingConfig | None = None
    # Only with attn_implementation: dca (null there: DCAConfig's defaults).
    dca: DCAConfig | None = None
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dca is not None and self.attn_implementation != "dca":
            raise ValueError(
                f"model.dca is set but model.attn_implementation is {self.attn_implementation}; "
                "set attn_implementation: dca, or dca: null"
            )
        if self.attn_implementation == "dca" and self.dca is None:
            self.dca = DCAConfig()


@dataclass
class DataSource:
    # A .jsonl / .json / .parquet file, or a `datasets` name (hub or local dataset folder).
    path: str
    split: str = "train"
    # `datasets` config name, for hub datasets that have several.
    subset: str | None = None
    # How many times this source is taken: 0.5 takes half its rows (sampled with the seed), 2.0 repeats it twice.
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"data source {self.path}: weight must be positive, got {self.weight}")


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    # Seed for the mixture sampling and the shuffle of the training order.
    seed: int = 0
    # error: a bad row stops the run, naming the file, row and field. skip: bad rows are skipped and counted.
    on_bad_row: Literal["error", "skip"] = "error"
    # Longest tokenized example (SFT: a whole conversation; preference: prompt + the longer answer).
    max_length: int = 2048

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ValueError("data.max_length must be positive")


@dataclass
class OptimizerConfig:
    """AdamW, or the online merging optimizer (OnDARE / OnTIES, Lu et al. 2024) built on the same AdamW step."""

    name: Literal["adamw", "ondare", "onties"] = "adamw"
    lr: float = 1.0e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    # --- online merging only ---
    # The pretrained base (theta_b) and the reference (theta_r, default: the model being trained, at start).
    base: str | None = None
    reference: str | None = None
    reserve_p: float = 1.0
    alpha: float = 0.0
    rescale: bool = False
    use_merge: bool = True
    merge_every: int = 1
    clip: float = 1.0
    tau_dtype: Literal["float32", "bfloat16"] | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.name in ("ondare", "onties") and self.base is None:
            raise ValueError(
                f"optimizer.base is required for {self.name}: the pretrained model that tau is taken from"
            )
        if not 0 < self.reserve_p <= 1:
            raise ValueError(f"optimizer.reserve_p must be in (0, 1], got {self.reserve_p}")


@dataclass
class SchedulerConfig:
    """Linear warmup, then cosine (or linear) from ``optimizer.lr`` down to ``min_lr`` at the last step."""

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/run"
    num_epochs: float = 1.0
    # > 0 overrides num_epochs.
    max_steps: int = -1
    # Sequences (packs when packing) per process per micro-batch; global batch = this x processes x accumulation.
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # bf16 autocast (fp32 master weights). "auto": bf16 where the hardware runs it fast (a CUDA GPU with bf16,
    # a CPU with AVX512-BF16 or AMX), else fp32 (alignment.training.resolve_mixed_precision). fp16 has no grad
    # scaler here.
    mixed_precision: Literal["no", "bf16", "auto"] = "no"
    seed: int = 42
    logging_steps: int = 1
    # Save a resumable checkpoint every N optimizer steps (0: only the final model).
    save_steps: int = 0
    # Keep at most this many checkpoints (oldest deleted); 0 keeps all.
    save_total_limit: int = 2
    # "latest" (the newest checkpoint in output_dir), a checkpoint folder, or null.
    resume_from_checkpoint: str | None = None
    # Tokens per chunk when turning hidden states into log-probs; the full (T, vocab) logits never exist at once.
    logits_chunk_size: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "logits_chunk_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"training.{name} must be positive, got {getattr(self, name)}")


@dataclass
class LoggingConfig:
    # Any of wandb, tensorboard. A metrics.jsonl file is always written to the output folder.
    report_to: list[Literal["wandb", "tensorboard"]] = field(default_factory=lambda: ["wandb"])
    project: str = "alignment"
    run_name: str | None = None
    # offline unless you log in and set online (or WANDB_MODE in the environment).
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress_bar: bool = True
