"""bench/bench_passkey.py: the prompt it builds, and one tiny run of every method (the real lengths stay out of CI)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("bench_passkey", REPO / "bench" / "bench_passkey.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_prompt_hides_the_key_at_its_depth(qwen_tokenizer):
    for depth in (0.0, 0.5, 1.0):
        ids = bench.passkey_prompt(qwen_tokenizer, 600, depth, 71432)
        assert 600 - bench.ANSWER_ROOM - 30 < len(ids) <= 600 - bench.ANSWER_ROOM
        text = qwen_tokenizer.decode(ids)
        assert text.startswith(bench.PREFIX) and text.endswith(bench.QUESTION)
        assert text.count("71432") == 2
        at = text.index("The pass key is 71432") / len(text)
        assert abs(at - depth) < 0.1, (depth, at)


def test_every_method_runs_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "passkey.json"
    bench.main(["--model", "tiny-qwen2", "--lengths", "160", "--depths", "0.5", "--max-new-tokens", "2",
                "--dca-chunk-size", "96", "--dca-local-size", "16", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == list(bench.METHODS)
    assert all(r["prompt_tokens"] <= 160 - bench.ANSWER_ROOM and r["cpu_s"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "| dca_yarn | " in table and "160 tokens" in table
