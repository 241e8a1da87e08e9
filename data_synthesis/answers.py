"""Several answers per instruction, from different models or sampling settings, as Label Studio ranking tasks.

    python -m data_synthesis recipes/data/answers.yaml [key=value ...]
    # rank them in Label Studio (import tasks.json into a project with label_config.xml), export JSON, then:
    python -m data_synthesis.label_studio import outputs/data/answers/rows.jsonl EXPORT.json outputs/data/ranked

The Qwen2 report's collaborative annotation ends with human preference: several responses per instruction,
from models of different sizes and sampling settings, ranked by annotators; the top one becomes a
demonstration, and the ranking gives preference pairs. This pipeline makes the responses and the ranking tasks;
``data_synthesis/label_studio.py`` carries the round trip through Label Studio and turns rankings into data.

Steps: ``instruction`` (rows without one are dropped as ``no_instruction``); one ``Generate`` step per entry of
``sources`` (a name, a model: empty for ``backend.model``, sampling settings and ``n``; a source with its own
model loads it for its step only); ``collect``: the answers of every source in order, where an unfinished answer
(cut at ``max_new_tokens``) is left out unless ``keep_unfinished``, and an answer whose text equals an earlier
one up to whitespace is kept once (its sources listed in ``also_from``): annotators never rank a tie by
accident. Rows left with fewer than ``min_answers`` answers are dropped as ``too_few_answers``.

Writes ``rows.jsonl`` (``id``, ``prompt``, ``answers``: ``[{"text", "source", "also_from"}]``, the row's other
columns), ``tasks.json`` (Label Studio's import format, made by ``label_studio.to_tasks``: the sources are
hidden from the annotator) and ``label_config.xml`` (the shipped ranking interface).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignment.generation import SamplingConfig
from data_synthesis.backends import LocalBackend, OpenAIBackend
from data_synthesis.engine import Generate, Instruction, Step, write_jsonl
from data_synthesis.runner import SynthesisConfig

ANSWER_TEMPLATE = [{"role": "user", "content": "{instruction}"}]


@dataclass
class AnswerSource:
    # A short name (letters, digits, _): the column answer_<name> and the source shown in rows.jsonl.
    name: str = "greedy"
    # A model folder, a built-in name or (openai backend) a served model name; empty: backend.model.
    model: str = ""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=256)
    )
    n: int = 1

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"sources: name {self.name!r} must be letters, digits and _")
        if self.n < 1:
            raise ValueError(f"sources: {self.name}: n must be >= 1")


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "answers"
    input: str = "data/prompts/train.jsonl"
    out_dir: str = "outputs/data/answers"
    sources: list[AnswerSource] = field(
        default_factory=lambda: [
            AnswerSource("greedy"),
            AnswerSource("sampled", sampling=SamplingConfig(temperature=0.9, max_new_tokens=256), n=2),
        ]
    )
    min_answers: int = 2
    keep_unfinished: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"sources: names must be present and unique, got {names}")
        if self.min_answers < 2:
            raise ValueError("min_answers must be >= 2 (a ranking needs two answers)")


def _norm(text: str) -> str:
    return " ".join(text.split())


class Collect(Step):
    name = "collect"
    makes = ("answers",)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.needs = tuple(f"answer_{s.name}" for s in cfg.sources)

    def run(self, records, ctx):
        kept = []
        for r in records:
            answers: list[dict] = []
            seen: dict[str, dict] = {}
            unfinished = 0
            for s in self.cfg.sources:
                texts = r.data[f"answer_{s.name}"]
                done = r.data[f"answer_{s.name}_finished"]
                texts, done = (texts, done) if s.n > 1 else ([texts], [done])
                for j, (text, finished) in enumerate(zip(texts, done)):
                    source = s.name if s.n == 1 else f"{s.name}_{j}"
                    if not finished and not self.cfg.keep_unfinished:
                        unfinished += 1
                        continue
                    key = _norm(text)
                    if not key:
                        continue
                    if key in seen:
                        seen[key]["also_from"].append(source)
                        continue
                    seen[key] = {"text": text, "source": source, "also_from": []}
                    answers.append(seen[key])
            if len(answers) < self.cfg.min_answers:
                ctx.drop(r, "too_few_answers", f"{len(answers)} distinct answers, {unfinished} unfinished")
                continue
            r.set("answers", answers, self.name)
            kept.append(r)
        return kept


def _source_backend(cfg: Config, src: AnswerSource):
    if not src.model or src.model == cfg.backend.model:
        return None
    own = replace(cfg.backend, model=src.model)
    return OpenAIBackend(own) if own.kind == "openai" else LocalBackend(own)


def steps(cfg: Config) -> list[Step]:
    out: list[Step] = [Instruction()]
    for s in cfg.sources:
        out.append(Generate(f"answer_{s.name}", ANSWER_TEMPLATE, f"answer_{s.name}", n=s.n, sampling=s.sampling,
                            template_name="answer", backend=_source_backend(cfg, s)))  # fmt: skip
    out.append(Collect(cfg))
    return out


def write(result, cfg: Config, out: Path) -> dict[str, int]:
    from data_synthesis import label_studio

    skip = {"instruction"} | {
        c for s in cfg.sources for c in (f"answer_{s.name}", f"answer_{s.name}_finished")
    }
    rows = []
    for r in result.records:
        row = {k: v for k, v in r.to_row().items() if k not in skip}
        if not isinstance(row.get("prompt"), list):
            row["prompt"] = [{"role": "user", "content": r.data["instruction"]}]
        rows.append(row)
    n = write_jsonl(out / "rows.jsonl", rows)
    tasks = label_studio.to_tasks(rows)
    (out / "tasks.json").write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
    (out / "label_config.xml").write_text(label_studio.LABEL_CONFIG)
    return {"rows.jsonl": n, "tasks.json": len(tasks)}
