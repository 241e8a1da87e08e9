"""Datasets: load, validate, mix, tokenize, pack.

Formats (TRL's conversational ones):
- ``messages``: a list of ``{"role", "content"}`` turns (system / user / assistant);
- ``prompt`` + ``completion``: each a string or a list of turns;
- ``prompt`` + ``chosen`` + ``rejected`` (preference), also with the prompt implicit: ``chosen`` and
  ``rejected`` are whole conversations sharing their leading turns.

Bad input is reported by file, row and field (``DataError``), or skipped and counted where the recipe sets
``data.on_bad_row: skip``. Over-long examples are truncated or dropped by a named setting and counted.
Nothing disappears silently: every count is in ``DataReport`` and printed.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.config import DataConfig, DataSource

ROLES = ("system", "user", "assistant")
IGNORE = -100


class DataError(ValueError):
    """A row that does not fit the format. The message names the file, the row and the field."""


@dataclass
class DataReport:
    """Counts of everything that happened to the rows, printed after loading."""

    rows_read: Counter = field(default_factory=Counter)  # per source
    rows_used: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # per reason
    truncated: int = 0
    dropped_overlong: int = 0

    def lines(self) -> list[str]:
        out = [f"{src}: read {n} rows, used {self.rows_used[src]}" for src, n in self.rows_read.items()]
        out += [f"skipped {n} bad rows: {reason}" for reason, n in self.skipped.items()]
        if self.truncated:
            out.append(f"truncated {self.truncated} over-long examples")
        if self.dropped_overlong:
            out.append(f"dropped {self.dropped_overlong} over-long examples")
        return out


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


def read_rows(source: DataSource) -> Iterable[tuple[int, Any]]:
    """Yield (row number, row) from a file or a `datasets` name. Row numbers count from 1 (jsonl: the line)."""
    path = Path(source.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")
        return
    if path.suffix.lower() in (".jsonl", ".json", ".parquet") or source.path.startswith(("/", ".", "~")):
        raise DataError(f"{source.path}: file not found")
    yield from _read_hf_dataset(source)


def _read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, DataError(f"{path}: row {lineno}: not valid JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as JSON: {e}") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    yield from enumerate(data, 1)


def _read_parquet(path: Path) -> Iterable[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: cannot read as parquet: {e}") from None
    yield from enumerate(table.to_pylist(), 1)


def _read_hf_dataset(source: DataSource) -> Iterable[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as e:
        raise DataError(
            f"{source.path}: cannot load as a `datasets` dataset (split {source.split!r}): {e}"
        ) from None
    yield from enumerate(ds, 1)


# --------------------------------------------------------------------------------------------------------------
# Validating and normalising rows
# --------------------------------------------------------------------------------------------------------------

Messages = list[dict[str, str]]


def _check_messages(value: Any, where: str, fname: str) -> Messages:
    if isinstance(value, str):
        raise DataError(f"{where}: field '{fname}': expected a list of messages, got a string")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{fname}': expected a non-empty list of messages, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        f = f"{fname}[{i}]"
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: field '{f}': expected a {{role, content}} object, got {type(m).__name__}"
            )
        if "role" not in m:
            raise DataError(f"{where}: field '{f}.role': missing")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{f}.role': unknown role {m['role']!r}; expected one of {ROLES}")
        if "content" not in m:
            raise DataError(f"{where}: field '{f}.content': missing")
        if not isinstance(m["content"], str):
            raise DataError(
                f"{where}: field '{f}.content': expected a string, got {type(m['content']).__name__}"
            )
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: field '{f}.content': empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_turns(value: Any, where: str, fname: str, default_role: str) -> Messages:
    if isinstance(value, str):
        if default_role == "assistant" and not value.strip():
            raise DataError(f"{where}: field '{fname}': empty assistant turn")
        return [{"role": default_role, "content": value}]
    return _check_messages(value, where, fname)


def _require(row: Any, where: str, *fields: str) -> None:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with fields {', '.join(fields)}, got {type(row).__name__}"
        )


def normalize_sft_row(row: Any, where: str) -> Messages:
    """One SFT example as a list of turns with at least one assistant turn."""
    _require(row, where, "messages")
    if "messages" in row:
        messages = _check_messages(row["messages"], where, "messages")
    elif "prompt" in row and "completion" in row:
        messages = _as_turns(row["prompt"], where, "prompt", "user") + _as_turns(
            row["completion"], where, "completion", "assistant"
        )
    else:
        raise DataError(f"{where}: field 'messages': missing (or give both 'prompt' and 'completion')")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages': no assistant turn to learn from")
    return messages


@dataclass
class PreferenceExample:
    prompt: Messages
    chosen: Messages  # the answer turn(s) alone
    rejected: Messages


def normalize_preference_row(row: Any, where: str) -> PreferenceExample:
    """Explicit ``prompt`` + answers, or the prompt implicit as the shared leading turns of chosen/rejected."""
    _require(row, where, "chosen", "rejected")
    for f in ("chosen", "rejected"):
        if f not in row:
            raise DataError(f"{where}: field '{f}': missing")
    if "prompt" in row:
        prompt = _as_turns(row["prompt"], where, "prompt", "user")
        chosen = _as_turns(row["chosen"], where, "chosen", "assistant")
        rejected = _as_turns(row["rejected"], where, "rejected", "assistant")
    else:
        full_c = _check_messages(row["chosen"], where, "chosen")
        full_r = _check_messages(row["rejected"], where, "rejected")
        n = 0
        while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
            n += 1
        if n == 0:
            raise DataError(
                f"{where}: field 'chosen': no 'prompt' and no shared leading turns with 'rejected'"
            )
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
    for f, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{f}': the answer must start with an assistant turn")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt': must end with a user (or system) turn, not the assistant")
    return PreferenceExample(prompt, chosen, rejected)


@dataclass
class PromptExample:
    """A prompt for sampling (online DPO, evaluation): the conversation so far and the row's other columns."""

    prompt: Messages
    columns: dict[str, Any]
    source: str = ""  # "file: row N", for logs that point back at the row


def normalize_prompt_row(row: Any, where: str) -> PromptExample:
    """``prompt`` (a string or turns ending with a user or system turn), or ``messages`` whose final assistant
    turn, if any, is dropped; every other field (answer, tests, constraints, ...) is kept for the rewards."""
    _require(row, where, "prompt")
    if "prompt" in row:
        prompt = _as_turns(row["prompt"], where, "prompt", "user")
        rest = {k: v for k, v in row.items() if k != "prompt"}
    elif "messages" in row:
        prompt = _check_messages(row["messages"], where, "messages")
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
        rest = {k: v for k, v in row.items() if k != "messages"}
    else:
        raise DataError(f"{where}: field 'prompt': missing (a prompt dataset needs 'prompt' or 'messages')")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt': must end with a user (or system) turn")
    if isinstance(row.get("prompt"), str) and not row["prompt"].strip():
        raise DataError(f"{where}: field 'prompt': empty")
    return PromptExample(prompt, rest, where)


def encode_prompt(tokenizer, prompt: Messages) -> list[int]:
    """Token ids of the prompt with the assistant's generation header, exactly as the chat template renders
    it: the engine gets ids, not text, so nothing adds a second BOS."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def load_examples(
    cfg: DataConfig, normalize: Callable[[Any, str], Any], report: DataReport, rank0: bool = True
) -> list[Any]:
    """Read every source, validate each row, apply the mixture weights, shuffle with the seed."""
    if not cfg.sources:
        raise DataError("data.sources is empty: name at least one file or dataset")
    rng = random.Random(cfg.seed)
    mixed: list[Any] = []
    for source in cfg.sources:
        rows = []
        for lineno, row in read_rows(source):
            where = f"{source.path}: row {lineno}"
            report.rows_read[source.path] += 1
            try:
                if isinstance(row, DataError):
                    raise row
                rows.append(normalize(row, where))
            except DataError as e:
                if cfg.on_bad_row == "error":
                    raise
                reason = str(e).split(": ", 2)[-1]
                report.skipped[reason] += 1
                if rank0 and sum(report.skipped.values()) <= 5:
                    print(f"[data] skipping {e}", flush=True)
        if not rows:
            raise DataError(f"{source.path}: no usable rows")
        taken = _take(rows, source.weight, rng)
        report.rows_used[source.path] += len(taken)
        mixed.extend(taken)
    rng.shuffle(mixed)
    return mixed


def _take(rows: list[Any], weight: float, rng: random.Random) -> list[Any]:
    whole, frac = int(weight), weight - int(weight)
    taken = rows * whole
    if frac > 0:
        taken += rng.sample(rows, max(1, round(frac * len(rows))))
    return taken


# --------------------------------------------------------------------------------------------------------------
# Tokenizing conversations: labels on assistant tokens only
# --------------------------------------------------------------------------------------------------------------


def assistant_char_spans(
    tokenizer, messages: Messages, where: str, learn_from: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the characters of each assistant turn.

    The span of turn i is what rendering turns [0..i] adds to rendering turns [0..i-1] followed by the
    generation prompt: the answer and its end-of-turn token, not the role header. Trailing whitespace after
    the end-of-turn token is left unlabelled (the model stops at the token).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < learn_from:
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as a prefix of the conversation, so "
                "assistant tokens cannot be located; use a template that renders turns in order"
            )
        end = len(upto.rstrip())
        spans.append((len(before), end))
    return text, spans


def tokenize_conversation(
    tokenizer, messages: Messages, where: str = "", learn_from: int = 0
) -> tuple[list[int], list[int]]:
    """input_ids and *shifted* labels: labels[t] is the token to predict at t, or -100 outside assistant turns."""
    text, spans = assistant_char_spans(tokenizer, messages, where, learn_from)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_answer = [any(s <= start and end <= e for s, e in spans) and end > start for start, end in offsets]
    labels = [ids[t + 1] if in_answer[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, labels


@dataclass
class Sequence:
    """One tokenized example: input_ids and shifted labels of equal length."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_labels(self) -> int:
        return sum(lab != IGNORE for lab in self.labels)


def fit_length(seq: Sequence, max_length: int, overlong: str, report: DataReport) -> Sequence | None:
    """Truncate (keep the start) or drop an over-long example; None when it has nothing left to learn."""
    if len(seq.input_ids) <= max_length:
        return seq
    if overlong == "drop":
        report.dropped_overlong += 1
        return None
    cut = Sequence(seq.input_ids[:max_length], seq.labels[:max_length])
    cut.labels[-1] = IGNORE  # its target was cut off
    if cut.num_labels == 0:
        report.dropped_overlong += 1  # the answer started after the cut
        return None
    report.truncated += 1
    return cut


# --------------------------------------------------------------------------------------------------------------
# Packing and padding-free batches
# --------------------------------------------------------------------------------------------------------------


def pack(sequences: list[Sequence], max_length: int) -> list[list[Sequence]]:
    """Best-fit-decreasing bin packing into packs of at most ``max_length`` tokens (deterministic)."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].input_ids), i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(sequences[i].input_ids)
        best = min((r - n, b) for b, r in enumerate(room) if r >= n) if any(r >= n for r in room) else None
        if best is None:
            packs.append([i])
            room.append(max_length - n)
        else:
            packs[best[1]].append(i)
            room[best[1]] -= n
    return [[sequences[i] for i in sorted(p)] for p in packs]


@dataclass
class Batch:
    """A padding-free micro-batch: every example of it concatenated into one row.

    input_ids, position_ids, labels: (1, T); seq_ids: (T,) index of the example each token belongs to.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    num_seqs: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.seq_ids.to(device),
            self.num_seqs,
        )


def collate(sequences: list[Sequence]) -> Batch:
    ids, pos, labels, seq_ids = [], [], [], []
    for k, s in enumerate(sequences):
        ids += s.input_ids
        labels += s.labels
        pos += range(len(s.input_ids))
        seq_ids += [k] * len(s.input_ids)
    return Batch(
        torch.tensor([ids]),
        torch.tensor([pos]),
        torch.tensor([labels]),
        torch.tensor(seq_ids),
        len(sequences),
    )


def shared_prefix_len(trunk: list[int], seq: list[int], keep_from: int) -> int:
    """How many leading tokens ``seq`` can take from ``trunk``: their common prefix, cut at ``keep_from``."""
    n = 0
    for a, b in zip(trunk, seq[:keep_from]):
        if a != b:
            break
        n += 1
    return n


def collate_shared(groups: list[list[Sequence]]) -> tuple[Batch, torch.Tensor]:
    """One padding-free row where the sequences of a group write their common prompt once.

    The first sequence of a group is written whole; each later one only from where it leaves the first (its
    position_ids continue from there: the attention of alignment/attention.py reads that as a branch sharing
    the first one's tokens; see ``segment_plan``). A branch keeps every position that carries a label and its
    last token, so the log-probs and the score at the last token are those of the sequence alone. Returns the
    batch (``seq_ids`` in the order of the sequences) and each sequence's last position in the row.
    """
    ids, pos, labels, seq_ids, last = [], [], [], [], []
    k = 0
    for group in groups:
        trunk = group[0].input_ids
        prev_end = None  # position after the previous segment of the group: a branch must not continue it
        for j, s in enumerate(group):
            first_label = next((t for t, lab in enumerate(s.labels) if lab != IGNORE), len(s.input_ids) - 1)
            keep_from = min(first_label, len(s.input_ids) - 1)
            shared = 0 if j == 0 else shared_prefix_len(trunk, s.input_ids, keep_from)
            if shared and shared == prev_end:  # would read as the previous branch's continuation
                shared -= 1
            if shared == 0:  # nothing shared: a new example, which later ones share with
                trunk = s.input_ids
            ids += s.input_ids[shared:]
            labels += s.labels[shared:]
            pos += range(shared, len(s.input_ids))
            seq_ids += [k] * (len(s.input_ids) - shared)
            last.append(len(ids) - 1)
            prev_end = len(s.input_ids)
            k += 1
    batch = Batch(torch.tensor([ids]), torch.tensor([pos]), torch.tensor([labels]), torch.tensor(seq_ids), k)
    return batch, torch.tensor(last)


def collate_pairs(pairs: list[PairSequences], share_prompt: bool) -> tuple[Batch, torch.Tensor]:
    """``collate_shared`` of the pairs, ordered chosen_0, rejected_0, chosen_1, ...: each rejected answer reads
    its chosen's prompt when ``share_prompt``, else every sequence is written whole (``collate``'s row)."""
    groups = (
        [[p.chosen, p.rejected] for p in pairs]
        if share_prompt
        else [[s] for p in pairs for s in (p.chosen, p.rejected)]
    )
    return collate_shared(groups)


# --------------------------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PairSequences:
    chosen: Sequence
    rejected: Sequence
    # Whether the loss's NLL term (``loss.nll_weight``) covers the chosen answer: online DPO clears it for a
    # pair whose chosen answer no verifier vouched for (``pairs.unverified: judge``).
    nll: bool = True


def _prompt_len(labels: list[int]) -> int:
    """Tokens before the first learned one: the prompt (labels are shifted, so the answer starts one later)."""
    return next(t for t, lab in enumerate(labels) if lab != IGNORE) + 1


def tokenize_pair(
    tokenizer, ex: PreferenceExample, max_length: int, overlong: str, report: DataReport, where: str = ""
) -> PairSequences | None:
    """Both answers after the same prompt, labels on the answer only, fitted to ``max_length`` together.

    truncate_prompt: drop prompt tokens from the left (both sequences keep the same prompt);
    truncate_completion: keep the prompt, cut the end of the longer answer(s); drop: leave the pair out.
    """
    n = len(ex.prompt)
    seqs = [
        Sequence(*tokenize_conversation(tokenizer, ex.prompt + ans, where, learn_from=n))
        for ans in (ex.chosen, ex.rejected)
    ]
    if max(len(s.input_ids) for s in seqs) <= max_length:
        return PairSequences(*seqs)
    p = _prompt_len(seqs[0].labels)
    answer = max(len(s.input_ids) - p for s in seqs)
    if overlong == "truncate_prompt" and answer < max_length:
        cut = p - (max_length - answer)  # prompt tokens removed from the left
        seqs = [Sequence(s.input_ids[cut:], s.labels[cut:]) for s in seqs]
    elif overlong == "truncate_completion" and p < max_length:
        seqs = [Sequence(s.input_ids[:max_length], s.labels[:max_length]) for s in seqs]
        for s in seqs:
            s.labels[-1] = IGNORE  # its target was cut off
    else:
        report.dropped_overlong += 1
        return None
    if min(s.num_labels for s in seqs) == 0:
        report.dropped_overlong += 1
        return None
    report.truncated += 1
    return PairSequences(*seqs)


_STEP_END = re.compile(r"[.!?;](?=\s|$)|\n")


def first_differing_step(tokenizer, pair: PairSequences) -> PairSequences:
    """Both answers cut after the first step where they differ: Step-DPO's pair (Lai et al. 2024).

    A step ends at a sentence end (``.``, ``!``, ``?`` or ``;`` before whitespace) or a line break. The tokens
    both answers share before their first different token are kept; in the DPO margin they cancel, since policy
    and reference give them the same log-probs in both. What follows the differing step is not scored: pushing
    down "The answer is 160." after "748 - 488 = 160." would teach the model to contradict what it has written,
    not to avoid the slip. An answer whose first differing step runs to its end is kept whole.
    """
    c, r = pair.chosen, pair.rejected
    start = _prompt_len(c.labels)  # index of the first answer token
    n = min(len(c.input_ids), len(r.input_ids))
    d = next((t for t in range(start, n) if c.input_ids[t] != r.input_ids[t]), n)
    return PairSequences(_cut_after_step(tokenizer, c, d), _cut_after_step(tokenizer, r, d))


def _cut_after_step(tokenizer, seq: Sequence, d: int) -> Sequence:
    """``seq`` up to the token that ends the step holding token ``d``; that token is the last one scored."""
    last = max(t + 1 for t, lab in enumerate(seq.labels) if lab != IGNORE)  # the last scored token
    if d >= last:
        return seq
    start = _prompt_len(seq.labels)
    text, ends = "", []
    for t in range(start, last + 1):  # the answer's text and where each token's text ends in it
        text = tokenizer.decode(seq.input_ids[start : t + 1])
        ends.append(len(text))
    d_at = ends[d - start - 1] if d > start else 0  # where token d's text starts
    m = _STEP_END.search(text, d_at)
    if m is None:
        return seq
    e = start + next(i for i, end in enumerate(ends) if end >= m.end())  # the token holding the step's end
    if e >= last:
        return seq
    cut = Sequence(seq.input_ids[: e + 1], seq.labels[: e + 1])
    cut.labels[-1] = IGNORE  # token e is the last target; nothing after it is scored
    return cut


def tokenize_pairs(
    tokenizer, examples: list[PreferenceExample], cfg: DataConfig, overlong: str, report: DataReport
):
    """Every pair tokenized and fitted; the over-long ones that cannot be kept are counted in ``report``."""
    pairs = [
        tokenize_pair(tokenizer, ex, cfg.max_length, overlong, report, f"pair {i}")
        for i, ex in enumerate(examples)
    ]
    return [p for p in pairs if p is not None]
