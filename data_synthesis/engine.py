"""The pipeline runner every data-synthesis recipe runs on: typed records with provenance, steps with checked
columns, a content-addressed generation cache, dry runs, batching, progress, and why rows were dropped.

    records = read_rows("data/prompts/train.jsonl")
    pipeline = Pipeline([Instruction(), Generate("answer", template, output="answer", n=4), MyFilter()])
    result = pipeline.run(records, Context(backend, cache))
    result.records, result.dropped, result.stats

A ``Record`` is one row: ``data`` (its columns), ``provenance`` (for every column a step wrote: which step,
model, template and settings made it) and ``id`` (the input row's ``id`` column, else ``file:line``). A
``Step`` names the columns it ``needs`` and the ones it ``makes``; ``Pipeline.check`` proves, before any model
loads, that every step's inputs exist (a template with a field no step makes is an error that names the step and
the field), and the runner checks after each step that it wrote what it promised.

Nothing is lost: a step that rejects a row calls ``ctx.drop(record, reason, detail)``; the row, its reason and
the step land in ``dropped`` (the runner writes ``dropped.jsonl``) and the reason is counted in the stats.

Generations go through ``Generate`` and a ``GenerationCache`` (SQLite, one row per sample, committed after every
batch). Its key is a sha256 of the backend's model fingerprint, the template, the rendered conversation (the
input row's fields the template reads), the sampling settings and the sample index. So an interrupted run (kill -9
included) redoes only the batch it was in, and a run that changes only a filter or a threshold reuses every
generation: with every answer cached, no model is loaded at all (backends load lazily).
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data import DataError
from alignment.generation import Completion, SamplingConfig

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    id: str
    data: dict[str, Any]
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)

    def set(self, column: str, value: Any, step: str, **made_by: Any) -> None:
        """Write a column and say what made it."""
        self.data[column] = value
        self.provenance[column] = {"step": step, **made_by}

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, **self.data, "provenance": self.provenance}


def read_rows(path: str | Path, limit: int = 0) -> list[Record]:
    """Records of a .jsonl file (one JSON object a line) or a .json list. Errors name the file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json input is a list of rows, got {type(rows).__name__}")
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    numbered.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {lineno}: not valid JSON ({e.msg})") from None
    records = []
    for lineno, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {lineno}: a row is a JSON object, got {type(row).__name__}")
        row = dict(row)
        rid = str(row.pop("id", f"{path.stem}:{lineno}"))
        prov = row.pop("provenance", {}) or {}
        records.append(Record(rid, row, dict(prov)))
        if limit and len(records) >= limit:
            break
    return records


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows to a temporary file and rename it: a crash never leaves half a file. -> rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


# --------------------------------------------------------------------------------------------------------------
# Backends and the generation cache
# --------------------------------------------------------------------------------------------------------------


class Backend:
    """What a generation step samples from (``data_synthesis/backends.py``: the local generation interface, an
    OpenAI-compatible endpoint, a scripted one for tests).

    ``chat(conversations, n, sampling, json_schema)`` -> for each conversation, n ``Completion``s.
    ``fingerprint``: what makes its answers what they are (model weights or endpoint + model name), for the cache.
    """

    name: str = "backend"

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def chat(
        self, conversations: list[Messages], n: int, sampling: SamplingConfig, json_schema: dict | None = None
    ) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class GenerationCache:
    """Content-addressed store of single samples in SQLite (``path``; ``None``: in memory only).

    Each batch is one transaction: a process killed mid-batch loses that batch and nothing else."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if self.path is None else str(self.path))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, text TEXT, finished INTEGER)"
        )
        self.db.commit()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, template: Any, conversation: Messages, settings: dict, index: int) -> str:
        return _sha([1, fingerprint, template, conversation, settings, index])

    def get(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for k, text, finished in self.db.execute(
                f"SELECT key, text, finished FROM samples WHERE key IN ({marks})", chunk
            ):
                found[k] = Completion(text, [], bool(finished))
        return found

    def put(self, items: list[tuple[str, Completion]]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO samples VALUES (?, ?, ?)",
            [(k, c.text, int(c.finished)) for k, c in items],
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Dropped:
    record: Record
    step: str
    reason: str
    detail: str = ""
    item: bool = False  # one solution, test, function, case or answer of a row (``drop_item``), not a row

    def to_row(self) -> dict[str, Any]:
        return {"step": self.step, "reason": self.reason, "detail": self.detail, "row": self.record.to_row()}


def _drop_counts(dropped: list[Dropped]) -> dict[str, dict[str, int]]:
    """Reasons counted apart for rows and for items of a row (a solution, a test, a case, an answer...)."""
    return {
        "dropped": dict(Counter(d.reason for d in dropped if not d.item)),
        "dropped_items": dict(Counter(d.reason for d in dropped if d.item)),
    }


class Context:
    """What steps share: the backend, the cache, the batch size, a seed, and the list of dropped rows."""

    def __init__(
        self,
        backend: Backend | None = None,
        cache: GenerationCache | None = None,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
    ):
        self.backend = backend
        self.cache = cache if cache is not None else GenerationCache(None)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.dropped: list[Dropped] = []
        self.step = "?"
        self.generated_samples = 0

    def drop(self, record: Record, reason: str, detail: str = "", item: bool = False) -> None:
        self.dropped.append(Dropped(record, self.step, reason, detail, item))


class Step:
    """One stage of a pipeline. ``run`` returns the records that go on; it calls ``ctx.drop`` for the others
    (a record neither returned nor dropped is an error: rows are never silently lost, unless the step says it
    ``merges`` rows, e.g. one output per group)."""

    name: str = "step"
    needs: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()
    merges: bool = False

    def run(self, records: list[Record], ctx: Context) -> list[Record]:
        raise NotImplementedError


class Map(Step):
    """A per-record function: ``fn(record) -> None`` (it sets columns) or a string (the reason to drop it, with
    an optional detail after ': ')."""

    def __init__(self, name: str, fn: Callable[[Record], str | None], needs=(), makes=()):
        self.name, self.fn, self.needs, self.makes = name, fn, tuple(needs), tuple(makes)

    def run(self, records, ctx):
        kept = []
        for r in records:
            why = self.fn(r)
            if why:
                reason, _, detail = why.partition(": ")
                ctx.drop(r, reason, detail)
            else:
                kept.append(r)
        return kept


def template_fields(template: Messages | str) -> set[str]:
    """The ``{field}`` names a template reads (``{{`` escapes a brace)."""
    texts = [template] if isinstance(template, str) else [m["content"] for m in template]
    names = set()
    for text in texts:
        for _, fname, _, _ in string.Formatter().parse(text):
            if fname is not None:
                if not fname or not fname.isidentifier():
                    raise ValueError(f"template field {{{fname}}}: write fields as {{name}}")
                names.add(fname)
    return names


def render(template: Messages, data: dict[str, Any]) -> Messages:
    """The conversation a template makes from a record (lists and dicts are written as JSON)."""

    def text(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    values = {k: text(v) for k, v in data.items()}
    return [{"role": m["role"], "content": m["content"].format_map(values)} for m in template]


class Generate(Step):
    """Sample ``n`` answers per record from the context's backend for a chat ``template`` (a list of messages
    whose contents hold ``{column}`` fields), or for the conversation a record holds in column ``conversation``
    (a list of messages, as ``Prompt`` writes it), cached sample by sample.

    Writes ``output`` (the text; a list of n texts when ``n > 1``) and ``output + "_finished"`` (whether each
    answer ended by itself rather than at ``max_new_tokens``). ``json_schema``: the engine constrains the answer
    to that schema where it can (vLLM's structured outputs, an endpoint's ``response_format``)."""

    def __init__(
        self,
        name: str,
        template: Messages | None,
        output: str,
        n: int = 1,
        sampling: SamplingConfig | None = None,
        json_schema: dict | None = None,
        template_name: str | None = None,
        backend: Backend | None = None,
        conversation: str | None = None,
    ):
        if n < 1:
            raise ValueError(f"{name}: n must be >= 1, got {n}")
        if (template is None) == (conversation is None):
            raise ValueError(f"{name}: give a template or a conversation column, not both or neither")
        self.conversation = conversation
        self.name, self.template, self.output, self.n = name, template, output, n
        self.sampling = sampling or SamplingConfig()
        self.json_schema = json_schema
        self.template_name = template_name or name
        # Its own backend (another model for this step; closed when the step ends), else the context's.
        self.backend = backend
        self.needs = (conversation,) if conversation else tuple(sorted(template_fields(template)))
        self.makes = (output, output + "_finished")

    def settings(self) -> dict[str, Any]:
        s = self.sampling
        out = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
               "max_new_tokens": s.max_new_tokens, "stop": list(s.stop)}  # fmt: skip
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        return out

    def run(self, records, ctx):
        backend = self.backend or ctx.backend
        if backend is None:
            raise RuntimeError(f"step {self.name}: needs a model backend, and the pipeline has none")
        try:
            return self._run(records, ctx, backend)
        finally:
            if self.backend is not None:
                self.backend.close()

    def _run(self, records, ctx, backend):
        settings = self.settings()
        made_by = {"model": backend.name, "template": self.template_name, "settings": settings}
        fingerprint = None
        for start in range(0, len(records), ctx.batch_size):
            batch = records[start : start + ctx.batch_size]
            if self.conversation:
                convs = [r.data[self.conversation] for r in batch]
            else:
                convs = [render(self.template, r.data) for r in batch]
            if fingerprint is None:
                fingerprint = backend.fingerprint
            keys = [
                [GenerationCache.key(fingerprint, self.template, c, settings, j) for j in range(self.n)]
                for c in convs
            ]
            found = ctx.cache.get([k for ks in keys for k in ks])
            # Sample each missing key once (rows with the same conversation and settings share their samples:
            # content-addressed), grouped by how many samples each conversation still lacks.
            first: dict[str, int] = {}
            for i, ks in enumerate(keys):
                for k in ks:
                    if k not in found and k not in first:
                        first[k] = i
            lacking: dict[int, list[str]] = {}
            for k, i in first.items():
                lacking.setdefault(i, []).append(k)
            todo: dict[int, list[int]] = {}
            for i, ks in lacking.items():
                todo.setdefault(len(ks), []).append(i)
            new: list[tuple[str, Completion]] = []
            for missing, idx in todo.items():
                answers = backend.chat([convs[i] for i in idx], missing, self.sampling, self.json_schema)
                for i, group in zip(idx, answers, strict=True):
                    new += list(zip(lacking[i], group, strict=True))
            if new:
                ctx.cache.put(new)
                ctx.cache.misses += len(new)
                ctx.generated_samples += len(new)
                found.update(new)
            ctx.cache.hits += sum(len(ks) for ks in keys) - len(new)
            for r, ks in zip(batch, keys):
                texts = [found[k].text for k in ks]
                done = [found[k].finished for k in ks]
                r.set(self.output, texts if self.n > 1 else texts[0], self.name, **made_by)
                r.set(self.output + "_finished", done if self.n > 1 else done[0], self.name, **made_by)
            if ctx.progress:
                _progress(self.name, min(start + ctx.batch_size, len(records)), len(records))
        return records


def _progress(step: str, done: int, total: int) -> None:
    print(f"\r[{step}] {done}/{total} rows", end="\n" if done >= total else "", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    records: list[Record]
    dropped: list[Dropped]
    stats: dict[str, Any]
    steps: list[Step] = field(default_factory=list)  # the step objects, for writers that read their state


class Pipeline:
    def __init__(self, steps: list[Step]):
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique, got {names}")
        self.steps = steps

    def check(self, columns: Iterable[str]) -> None:
        """Every step's needs are made by the input or an earlier step; else a ValueError naming them."""
        have = set(columns)
        for step in self.steps:
            missing = sorted(set(step.needs) - have)
            if missing:
                raise ValueError(
                    f"step {step.name!r} reads column(s) {missing} that neither the input nor an earlier step "
                    f"provides (available: {sorted(have)})"
                )
            have |= set(step.makes)

    def run(self, records: list[Record], ctx: Context, input_columns: Iterable[str] | None = None) -> Result:
        """Run every step over all records, in order; -> the surviving records, the dropped ones, statistics."""
        self.check(input_columns if input_columns is not None else common_columns(records))
        stats: dict[str, Any] = {"rows_in": len(records), "steps": []}
        t0 = time.perf_counter()
        for step in self.steps:
            ctx.step = step.name
            before = len(ctx.dropped)
            t = time.perf_counter()
            n_in = len(records)
            ids_in = Counter(r.id for r in records)
            out = step.run(records, ctx)
            dropped_here = ctx.dropped[before:]
            for r in out:
                missing = [c for c in step.makes if c not in r.data]
                if missing:
                    raise RuntimeError(
                        f"step {step.name!r} promised column(s) {missing} but row {r.id} lacks them"
                    )
            if not step.merges:
                accounted = Counter(r.id for r in out) + Counter(d.record.id for d in dropped_here)
                lost = ids_in - accounted
                if lost:
                    raise RuntimeError(
                        f"step {step.name!r} lost {sum(lost.values())} row(s) without dropping them "
                        f"(first: {next(iter(lost))})"
                    )
            stats["steps"].append({"step": step.name, "rows_in": n_in, "rows_out": len(out),
                                   **_drop_counts(dropped_here), "seconds": round(time.perf_counter() - t, 3)})  # fmt: skip
            records = out
        stats["rows_out"] = len(records)
        stats |= _drop_counts(ctx.dropped)
        stats["generated_samples"] = ctx.generated_samples
        stats["cached_samples"] = ctx.cache.hits
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        return Result(records, list(ctx.dropped), stats, list(self.steps))


def common_columns(records: list[Record]) -> set[str]:
    """Columns every record has (the runner checks the pipeline against these)."""
    if not records:
        return set()
    cols = set(records[0].data)
    for r in records[1:]:
        cols &= set(r.data)
    return cols


# --------------------------------------------------------------------------------------------------------------
# Steps every pipeline uses
# --------------------------------------------------------------------------------------------------------------


def instruction_text(data: dict[str, Any]) -> str | None:
    """The instruction of a row: its ``instruction`` column, else the last user message of ``prompt`` or
    ``messages`` (TRL's conversational formats), else a plain-text ``prompt``."""
    if isinstance(data.get("instruction"), str):
        return data["instruction"]
    for col in ("prompt", "messages"):
        value = data.get(col)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[-1], str):
                return users[-1]
    return None


class Prompt(Step):
    """Reads each row's conversation into the ``prompt`` column (a list of messages ending with a user or system
    turn), from any of TRL's prompt formats (``prompt`` as text or turns, or ``messages`` whose last assistant
    turn is left out); a row that has none is dropped as ``bad_prompt`` with the reason."""

    name = "prompt"
    makes = ("prompt",)

    def run(self, records, ctx):
        from alignment.data import normalize_prompt_row

        kept = []
        for r in records:
            try:
                example = normalize_prompt_row(r.data, f"row {r.id}")
            except DataError as e:
                ctx.drop(r, "bad_prompt", str(e))
                continue
            if r.data.get("prompt") != example.prompt:
                r.set("prompt", example.prompt, self.name)
            kept.append(r)
        return kept


class Instruction(Step):
    """Reads each row's instruction into the ``instruction`` column; rows with none (or an empty one) are dropped
    as ``no_instruction``."""

    name = "instruction"
    makes = ("instruction",)

    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars

    def run(self, records, ctx):
        kept = []
        for r in records:
            text = instruction_text(r.data)
            if text is None or len(text.strip()) < self.min_chars:
                ctx.drop(r, "no_instruction", "no instruction, prompt or messages column with a user turn")
                continue
            if r.data.get("instruction") != text:
                r.set("instruction", text.strip(), self.name)
            kept.append(r)
        return kept


def parse_json_answer(text: str) -> Any:
    """The JSON value in a model's answer: the whole text, else the first fenced or braced block. Raises
    ValueError when there is none."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import re

    for m in re.finditer(r"```(?:json)?\s*(.*?)```", text, re.S):
        try:
            return json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            pass
    raise ValueError("no JSON value in the answer")


def chat_row(prompt: Messages, answer: str, /, **extra: Any) -> dict[str, Any]:
    """An SFT demonstration in the trainers' format."""
    return {"messages": [*prompt, {"role": "assistant", "content": answer}], **extra}


def preference_row(prompt: Messages, chosen: str, rejected: str, /, **extra: Any) -> dict[str, Any]:
    """A preference pair in the trainers' format (TRL's conversational implicit-prompt-free form)."""
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}  # fmt: skip


# Helpers the pipelines share.


def as_list(value: Any) -> list:
    """A Generate column as a list (it holds a bare value when n == 1)."""
    return value if isinstance(value, list) else [value]


def drop_item(ctx: Context, record: Record, kind: str, index: int, text: Any, reason: str, detail: str = ""):
    """Drop one solution, test, function, case or answer of a row: it is listed in dropped.jsonl with the id
    ``<row id>#<kind><index>`` and counted by reason under ``dropped_items``, apart from the rows' ``dropped``."""
    item = Record(
        f"{record.id}#{kind}{index}", {"item": kind, "row": record.id, "index": index, "text": text}
    )
    ctx.drop(item, reason, detail, item=True)


def pick(chosen: list[str], rejected: list[str], rng: random.Random, pairs: int, demos: int):
    """(pairs, demos) from candidate texts: each side deduplicated in order, texts found on both sides left
    out, then a seeded shuffle of each side; up to ``pairs`` (chosen, rejected) with no text used twice, and
    the first ``demos`` chosen texts."""
    good = list(dict.fromkeys(chosen))
    bad = list(dict.fromkeys(rejected))
    both = set(good) & set(bad)
    good = rng.sample([t for t in good if t not in both], len(good) - len(both))
    bad = rng.sample([t for t in bad if t not in both], len(bad) - len(both))
    k = min(pairs, len(good), len(bad))
    return list(zip(good[:k], bad[:k])), good[:demos]


def row_rng(cfg: Any, record: Record) -> random.Random:
    # Seeded by the row id too, so a row's choice does not depend on which rows came before it.
    return random.Random(f"{cfg.seed}:{record.id}")


def check_templates(overrides: dict[str, list[dict[str, str]]], known: dict[str, Messages]) -> None:
    for name, messages in overrides.items():
        if name not in known:
            raise ValueError(f"templates.{name}: unknown template (known: {', '.join(sorted(known))})")
        if not messages or any(set(m) != {"role", "content"} for m in messages):
            raise ValueError(f"templates.{name}: a list of messages, each with exactly a role and a content")
