"""Data: formats, validation errors naming file/row/field, skip-and-count, mixtures, labels, packing."""

from __future__ import annotations

import json

import pytest

from alignment.config import DataSource
from alignment.data import (
    IGNORE,
    DataError,
    DataReport,
    Sequence,
    collate,
    fit_length,
    load_examples,
    normalize_preference_row,
    normalize_sft_row,
    pack,
    tokenize_conversation,
)
from alignment.sft import SFTDataConfig
from tests.conftest import write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def cfg_for(*paths, **kw) -> SFTDataConfig:
    return SFTDataConfig(sources=[DataSource(path=str(p)) for p in paths], **kw)


@pytest.mark.parametrize(
    "row, field",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]},
            r"messages\[1\]\.role': missing",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            r"messages\[1\]\.role': unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            r"messages\[1\]\.content': empty assistant turn",
        ),
        (
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
            r"messages\[0\]\.content': expected a string, got int",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"messages': no assistant turn"),
        ({"text": "hi"}, r"messages': missing"),
        ({"prompt": "hi", "completion": ""}, r"completion': empty assistant turn"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError, match=rf"d\.jsonl: row 3: field '{field}"):
        load_examples(cfg_for(path), normalize_sft_row, DataReport())


def test_invalid_json_and_unreadable_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl: row 2: not valid JSON"):
        load_examples(cfg_for(path), normalize_sft_row, DataReport())
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_examples(cfg_for(tmp_path / "missing.jsonl"), normalize_sft_row, DataReport())
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        load_examples(cfg_for(tmp_path / "bad.parquet"), normalize_sft_row, DataReport())


def test_skip_option_counts_every_bad_row(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, "{oops", GOOD, bad])
    report = DataReport()
    rows = load_examples(cfg_for(path, on_bad_row="skip"), normalize_sft_row, report)
    assert len(rows) == 2
    assert sum(report.skipped.values()) == 3 and report.rows_read[str(path)] == 5
    assert any("empty assistant turn" in line for line in report.lines())


def test_formats_json_parquet_and_prompt_completion(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([GOOD]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "completion": "4"}]), tmp_path / "b.parquet")
    rows = load_examples(
        cfg_for(tmp_path / "a.json", tmp_path / "b.parquet"), normalize_sft_row, DataReport()
    )
    assert sorted(r[-1]["content"] for r in rows) == ["4", "hello"]
    assert [m["role"] for m in normalize_sft_row({"prompt": "q", "completion": "a"}, "x")] == [
        "user",
        "assistant",
    ]


def test_mixture_weights_and_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "x"} for i in range(10)])
    cfg = SFTDataConfig(
        sources=[DataSource(path=str(a), weight=0.5), DataSource(path=str(b), weight=2.0)], seed=3
    )
    rows = load_examples(cfg, normalize_sft_row, DataReport())
    firsts = [r[0]["content"][0] for r in rows]
    assert firsts.count("a") == 5 and firsts.count("b") == 20
    assert rows == load_examples(cfg, normalize_sft_row, DataReport())  # same seed, same mixture and order
    cfg.seed = 4
    assert rows != load_examples(cfg, normalize_sft_row, DataReport())


def test_preference_formats_explicit_and_implicit_prompt():
    explicit = normalize_preference_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "x")
    user = {"role": "user", "content": "2+2?"}
    implicit = normalize_preference_row(
        {
            "chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}],
        },
        "x",
    )
    assert explicit == implicit
    assert implicit.prompt == [user] and implicit.chosen[0]["content"] == "4"
    with pytest.raises(DataError, match="row 1: field 'rejected': missing"):
        normalize_preference_row({"prompt": "q", "chosen": "a"}, "f.jsonl: row 1")


def test_labels_cover_assistant_tokens_only(qwen_tokenizer):
    tok = qwen_tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    ids, labels = tokenize_conversation(tok, msgs)
    assert len(ids) == len(labels)
    learned = [lab for lab in labels if lab != IGNORE]
    # Exactly the answers and their end-of-turn tokens, in order.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = (
        tok("4", add_special_tokens=False).input_ids
        + [im_end]
        + tok("It is 6.", add_special_tokens=False).input_ids
        + [im_end]
    )
    assert learned == expected
    # Labels are shifted: a label at t is the token at t + 1.
    for t, lab in enumerate(labels[:-1]):
        if lab != IGNORE:
            assert lab == ids[t + 1]
    assert "user" not in tok.decode(learned) and "system" not in tok.decode(learned)


def test_overlong_truncate_drop_and_counts():
    seq = Sequence(list(range(10)), [IGNORE] * 3 + list(range(4, 10)) + [IGNORE])
    report = DataReport()
    cut = fit_length(seq, 6, "truncate", report)
    assert cut.input_ids == [0, 1, 2, 3, 4, 5] and cut.labels[-1] == IGNORE and report.truncated == 1
    assert fit_length(seq, 6, "drop", report) is None and report.dropped_overlong == 1
    assert fit_length(Sequence([1, 2, 3, 4], [IGNORE, IGNORE, IGNORE, IGNORE]), 2, "truncate", report) is None
    assert report.dropped_overlong == 2


def test_packing_fits_and_keeps_everything():
    seqs = [Sequence([i] * n, [i] * n) for i, n in enumerate([5, 3, 8, 2, 7, 1])]
    packs = pack(seqs, 10)
    assert all(sum(len(s.input_ids) for s in p) <= 10 for p in packs)
    assert sorted(s.input_ids[0] for p in packs for s in p) == list(range(6))
    assert len(packs) == 3  # 26 tokens in bins of 10
    batch = collate(packs[0])
    assert batch.position_ids[0].tolist().count(0) == len(packs[0])
    assert batch.seq_ids.max().item() == len(packs[0]) - 1


def test_pair_truncation_modes_are_explicit_and_counted(qwen_tokenizer):
    from alignment.data import PreferenceExample, tokenize_pair

    ex = PreferenceExample(
        prompt=[{"role": "user", "content": "word " * 40}],
        chosen=[{"role": "assistant", "content": "The answer is yes, certainly."}],
        rejected=[{"role": "assistant", "content": "No."}],
    )
    full = tokenize_pair(qwen_tokenizer, ex, 10_000, "drop", DataReport())
    n_prompt = next(t for t, lab in enumerate(full.chosen.labels) if lab != IGNORE) + 1

    report = DataReport()
    left = tokenize_pair(qwen_tokenizer, ex, 40, "truncate_prompt", report)
    assert report.truncated == 1 and max(len(left.chosen.input_ids), len(left.rejected.input_ids)) == 40
    # The answers are whole; both keep the same (left-cut) prompt.
    assert (
        left.chosen.num_labels == full.chosen.num_labels
        and left.rejected.num_labels == full.rejected.num_labels
    )
    cut = len(full.chosen.input_ids) - len(left.chosen.input_ids)
    assert left.chosen.input_ids == full.chosen.input_ids[cut:]
    assert left.rejected.input_ids == full.rejected.input_ids[cut:]

    report = DataReport()
    right = tokenize_pair(qwen_tokenizer, ex, n_prompt + 3, "truncate_completion", report)
    assert (
        right.chosen.input_ids == full.chosen.input_ids[: n_prompt + 3] and right.chosen.labels[-1] == IGNORE
    )
    assert report.truncated == 1

    report = DataReport()
    assert tokenize_pair(qwen_tokenizer, ex, 40, "drop", report) is None and report.dropped_overlong == 1
    # A prompt longer than the limit cannot keep its answer whole by cutting the answer: dropped and counted.
    assert tokenize_pair(qwen_tokenizer, ex, n_prompt - 5, "truncate_completion", report) is None
    assert report.dropped_overlong == 2


def test_first_differing_step_scores_both_answers_up_to_the_end_of_the_step_where_they_differ(qwen_tokenizer):
    from alignment.data import PreferenceExample, first_differing_step, tokenize_pair

    def pair(chosen, rejected):
        ex = PreferenceExample(
            prompt=[{"role": "user", "content": "What is 748 minus 488?"}],
            chosen=[{"role": "assistant", "content": chosen}],
            rejected=[{"role": "assistant", "content": rejected}],
        )
        return tokenize_pair(qwen_tokenizer, ex, 10_000, "drop", DataReport())

    def scored(seq):
        return qwen_tokenizer.decode([lab for lab in seq.labels if lab != IGNORE])

    # A shared first step, then a slip in the second: the shared step and the slipped one are scored, the
    # conclusion that repeats the slip is not.
    full = pair(
        "First, 748 - 400 = 348. Then 348 - 88 = 260. The answer is 260.",
        "First, 748 - 400 = 348. Then 348 - 88 = 250. The answer is 250.",
    )
    cut = first_differing_step(qwen_tokenizer, full)
    assert scored(cut.chosen) == "First, 748 - 400 = 348. Then 348 - 88 = 260."
    assert scored(cut.rejected) == "First, 748 - 400 = 348. Then 348 - 88 = 250."
    # The cut keeps the prefix of each sequence, token for token, and scores nothing after its last token.
    for before, after in ((full.chosen, cut.chosen), (full.rejected, cut.rejected)):
        n = len(after.input_ids)
        assert after.input_ids == before.input_ids[:n] and after.labels[:-1] == before.labels[: n - 1]
        assert after.labels[-1] == IGNORE
    # A decimal point is not a step's end; a line break is (the tokenizer writes ".\n" as one token).
    cut = first_differing_step(qwen_tokenizer, pair("It is 2.5 km.\nSo 5.", "It is 2.4 km.\nSo 4."))
    assert (scored(cut.chosen), scored(cut.rejected)) == ("It is 2.5 km.\n", "It is 2.4 km.\n")
    cut = first_differing_step(qwen_tokenizer, pair("x = 3\nThe answer is 3.", "x = 4\nThe answer is 4."))
    assert (scored(cut.chosen), scored(cut.rejected)) == ("x = 3\n", "x = 4\n")
    # A one-step answer, or a difference in the last step, keeps the answer whole (its end-of-turn included).
    whole = pair("The answer is 260.", "The answer is 160.")
    assert first_differing_step(qwen_tokenizer, whole) == whole
