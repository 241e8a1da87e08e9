"""Several answers per instruction -> deduplicated ranking rows and Label Studio tasks (scripted backend)."""

from __future__ import annotations

import json

import pytest

from alignment.config import ConfigError
from data_synthesis import answers, label_studio
from data_synthesis.backends import ScriptedBackend
from data_synthesis.runner import load_recipe, run


def respond(conv, j):
    q = conv[-1]["content"]
    temp_greedy = j == 0
    if q == "Name a colour.":
        return "Blue." if temp_greedy else ["Blue.", "  Blue. "][j % 2]  # all the same up to whitespace
    return f"{q} answer {j}"


def test_answers_pipeline_deduplicates_and_writes_tasks(tmp_path):
    rows = [{"id": "a", "prompt": [{"role": "user", "content": "Add 2 and 3."}]},
            {"id": "b", "prompt": [{"role": "user", "content": "Name a colour."}]},
            {"id": "c", "prompt": "no messages"}, {"id": "d", "text": "none"}]  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, cfg = load_recipe(
        ["recipes/data/answers.yaml", f"input={src}", f"out_dir={tmp_path / 'o'}", "cache=none"]
    )
    backend = ScriptedBackend(respond)
    stats = run(answers, cfg, backend=backend, progress=False)
    # greedy n=1 and sampled n=2: "Name a colour." has one distinct answer; "d" has no instruction.
    assert stats["dropped"] == {"too_few_answers": 1, "no_instruction": 1}
    out = [json.loads(line) for line in (tmp_path / "o" / "rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["a", "c"]
    assert out[0]["answers"] == [
        {"text": "Add 2 and 3. answer 0", "source": "greedy", "also_from": ["sampled_0"]},
        {"text": "Add 2 and 3. answer 1", "source": "sampled_1", "also_from": []},
    ]
    assert out[1]["prompt"] == [{"role": "user", "content": "no messages"}]
    tasks = json.loads((tmp_path / "o" / "tasks.json").read_text())
    assert tasks == label_studio.to_tasks(out)
    assert (tmp_path / "o" / "label_config.xml").read_text() == label_studio.LABEL_CONFIG
    # Nothing of the source reaches what the annotator sees.
    assert "greedy" not in json.dumps(tasks[0]["data"]) and "greedy" in json.dumps(tasks[0]["meta"])


def test_unfinished_answers_are_left_out_unless_kept(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"instruction": "Q"}) + "\n")
    common = ["recipes/data/answers.yaml", f"input={src}", f"out_dir={tmp_path / 'o'}", "cache=none"]
    _, cfg = load_recipe(common)
    stats = run(answers, cfg, backend=ScriptedBackend(respond, finished=False), progress=False)
    assert stats["dropped"] == {"too_few_answers": 1}
    _, cfg = load_recipe([*common, "keep_unfinished=true"])
    stats = run(answers, cfg, backend=ScriptedBackend(respond, finished=False), progress=False)
    assert stats["rows_out"] == 1


def test_sources_must_have_unique_names():
    with pytest.raises(ConfigError, match="unique"):
        load_recipe(["recipes/data/answers.yaml", "sources[1].name=greedy"])
