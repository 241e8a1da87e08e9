"""``python -m data_synthesis RECIPE.yaml [key=value ...]``: run one synthesis pipeline from a recipe.

A recipe names its ``pipeline`` (a row of ``PIPELINES``); that pipeline's typed config reads the rest, with
the loader of ``alignment/config.py`` (unknown keys and wrong types are errors that name the key). Every
pipeline config shares ``SynthesisConfig``'s fields:

    pipeline: tagging            # which pipeline
    input: data/prompts/train.jsonl
    max_rows: 0                  # the first N input rows (0: all)
    out_dir: outputs/data/tagging
    backend: {kind: local, model: smollm2-135m-instruct}   # or kind: openai, url: http://host:8000/v1
    cache: null                  # null: $ALIGNMENT_CACHE/synthesis/generations.sqlite; "none": no cache
    dry_run: 0                   # N > 0: run every step on the first N rows, print them, write out_dir/dry_run
    batch_size: 64
    seed: 0

A pipeline module defines ``Config`` (a ``SynthesisConfig``), ``steps(cfg) -> list[Step]`` and
``write(result, cfg, out_dir) -> {file name: rows}``; optionally ``read_input(cfg) -> list[Record]`` when its
rows do not come from ``input`` (made offline, e.g. character profiles). The runner writes, next to the
pipeline's files, ``dropped.jsonl`` (every dropped row, its step and reason) and ``stats.json`` (rows in and out
per step, drop reasons, generated and cached samples, seconds, the resolved config).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.config import ConfigError, apply_override, build, load_yaml, to_dict
from alignment.models import cache_dir
from data_synthesis.backends import BackendConfig, make_backend
from data_synthesis.engine import (
    Context,
    GenerationCache,
    Pipeline,
    Record,
    common_columns,
    read_rows,
    write_jsonl,
)

# pipeline name -> module (each defines Config, steps, write).
PIPELINES: dict[str, str] = {
    "tagging": "data_synthesis.tagging",  # InsTag ontology extraction
    "selection": "data_synthesis.selection",  # InsTag complexity-first, diversity-driven selection
    "evolution": "data_synthesis.evolution",  # Evol-Instruct with its elimination rules
    "answers": "data_synthesis.answers",  # several answers per instruction -> Label Studio ranking tasks
    "code_feedback": "data_synthesis.code_feedback",  # execution feedback for code, in the sandbox
    "autoif": "data_synthesis.autoif",  # execution feedback for instruction following (AutoIF)
    "repurposing": "data_synthesis.repurposing",  # literary passages -> instructions
    "roleplay": "data_synthesis.roleplay",  # character profiles -> consistent role-play answers
    "constitutional": "data_synthesis.constitutional",  # principles -> following vs violating answers
    "rejection_sampling": "data_synthesis.rejection_sampling",  # checked reasoning paths of the policy
    "on_policy_negatives": "data_synthesis.on_policy_negatives",  # the policy's wrong answers as rejected
}


def generation_cache_path(cache: str | None) -> Path | None:
    """Where a run keeps its generations: the recipe's path; null: ``$ALIGNMENT_CACHE/synthesis/
    generations.sqlite`` (``~/.cache/alignment`` by default, with the built models and every other cache, so that
    one variable empties or moves them all); ``"none"``: no cache."""
    if cache == "none":
        return None
    return Path(cache).expanduser() if cache else cache_dir() / "synthesis" / "generations.sqlite"


@dataclass
class SynthesisConfig:
    pipeline: str = ""
    input: str = ""
    max_rows: int = 0
    out_dir: str = "outputs/data"
    backend: BackendConfig = field(default_factory=BackendConfig)
    cache: str | None = None
    dry_run: int = 0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_rows < 0 or self.dry_run < 0 or self.batch_size < 1:
            raise ValueError("max_rows and dry_run must be >= 0 and batch_size >= 1")


def pipeline_module(name: str, where: str = "recipe"):
    if name not in PIPELINES:
        raise ConfigError(
            f"{where}: pipeline: unknown pipeline {name!r} (known: {', '.join(sorted(PIPELINES))})"
        )
    return importlib.import_module(PIPELINES[name])


def load_recipe(argv: list[str]) -> tuple[Any, Any]:
    """``[recipe.yaml] [key=value ...]`` -> (the pipeline module, its checked config)."""
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path is not None else argv
    where = path or "command line"
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: recipe file not found")
        data = load_yaml(Path(path).read_text(), path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    for ov in overrides:
        apply_override(data, ov, f"{where} (override {ov.split('=', 1)[0]})")
    if not isinstance(data.get("pipeline"), str):
        raise ConfigError(f"{where}: pipeline: required (one of {', '.join(sorted(PIPELINES))})")
    module = pipeline_module(data["pipeline"], where)
    return module, build(module.Config, data, where)


def run(module, cfg: SynthesisConfig, backend=None, progress: bool = True) -> dict[str, Any]:
    """Run a pipeline end to end and write its files; -> stats (also in ``out_dir/stats.json``).

    ``backend``: use this one instead of the recipe's (tests pass a ScriptedBackend)."""
    t0 = time.perf_counter()
    limit = cfg.dry_run or cfg.max_rows
    if hasattr(module, "read_input"):
        records: list[Record] = module.read_input(cfg)
        records = records[:limit] if limit else records
    else:
        if not cfg.input:
            raise ConfigError(f"pipeline {cfg.pipeline}: input: required (a .jsonl or .json file of rows)")
        records = read_rows(cfg.input, limit)
    pipeline = Pipeline(module.steps(cfg))
    pipeline.check(common_columns(records))  # before any model loads
    own_backend = backend is None
    if own_backend:
        backend = make_backend(cfg.backend)
    cache = GenerationCache(generation_cache_path(cfg.cache))
    ctx = Context(backend, cache, cfg.batch_size, cfg.seed, progress)
    print(f"[synthesis] {cfg.pipeline}: {len(records)} rows, {len(pipeline.steps)} steps", flush=True)
    try:
        result = pipeline.run(records, ctx)
    finally:
        cache.close()
        if own_backend:
            backend.close()
    out = Path(cfg.out_dir) / ("dry_run" if cfg.dry_run else "")
    out.mkdir(parents=True, exist_ok=True)
    files = module.write(result, cfg, out)
    write_jsonl(out / "dropped.jsonl", (d.to_row() for d in result.dropped))
    stats = {"pipeline": cfg.pipeline, **result.stats, "files": files,
             "seconds": round(time.perf_counter() - t0, 2), "config": to_dict(cfg)}  # fmt: skip
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    if cfg.dry_run:
        for r in result.records[: cfg.dry_run]:
            print(json.dumps(r.to_row(), ensure_ascii=False)[:2000])
    why = ", ".join(f"{k} {v}" for k, v in sorted(stats["dropped"].items())) or "none"
    if stats["dropped_items"]:
        why += "; items of rows dropped: " + ", ".join(
            f"{k} {v}" for k, v in sorted(stats["dropped_items"].items())
        )
    made = ", ".join(f"{k} {v}" for k, v in files.items())
    print(f"[synthesis] {cfg.pipeline}: {stats['rows_in']} rows in, {stats['rows_out']} out ({made}); dropped: "
          f"{why}; {stats['generated_samples']} samples generated, {stats['cached_samples']} from the cache; "
          f"{stats['seconds']:.0f} s -> {out}", flush=True)  # fmt: skip
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("pipelines:", ", ".join(sorted(PIPELINES)))
        raise SystemExit(0)
    module, cfg = load_recipe(args)
    return run(module, cfg)
