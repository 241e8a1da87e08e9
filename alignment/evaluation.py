"""Held-out evaluation through the generation interface: what a stage bought and what it cost.

- ``math_accuracy``: greedy answers to held-out math prompts, checked by the ``math`` reward (0/1 each).
- ``mean_reward``: fresh samples at the training temperature, scored by a composed reward (the online recipe's).
- ``kl_to_reference``: the mean of sum_t log pi(y_t) - log pi_ref(y_t) over sampled answers y ~ pi, a
  Monte-Carlo estimate of KL(pi || pi_ref) per answer.
- ``general_text_nll``: token-level NLL of held-out general English that ships with Python
  (``pydoc_data.topics``: the text of Python's help topics, PSF licence), the alignment tax on plain language.

Every function takes the sampler (``alignment.generation``) or a log-prob function, never a trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignment.data import IGNORE, Sequence, collate, encode_prompt, normalize_prompt_row
from alignment.generation import Completion, Generator, SamplingConfig


def load_prompts(path: str | Path, limit: int = 0) -> list:
    """PromptExamples of a held-out .jsonl file (errors name the file and row)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rows.append(normalize_prompt_row(json.loads(line), f"{path}: row {lineno}"))
            if limit and len(rows) >= limit:
                break
    return rows


def sample(
    generator: Generator, tokenizer, examples, n: int, sampling: SamplingConfig
) -> list[list[Completion]]:
    return generator.generate([encode_prompt(tokenizer, ex.prompt) for ex in examples], n, sampling)


def math_accuracy(generator: Generator, tokenizer, examples, max_new_tokens: int) -> tuple[float, list]:
    """Greedy accuracy and the answers (one per prompt)."""
    from reward.math_reward import MathReward

    answers = [
        a[0]
        for a in sample(generator, tokenizer, examples, 1, SamplingConfig(0.0, max_new_tokens=max_new_tokens))
    ]
    out = MathReward()(
        [ex.prompt for ex in examples],
        [a.text for a in answers],
        answer=[ex.columns["answer"] for ex in examples],
    )
    correct = [s == 1.0 for s in out.scores]
    return sum(correct) / max(1, len(correct)), answers


def mean_reward(generator: Generator, tokenizer, examples, reward, sampling: SamplingConfig, n: int = 1):
    """Mean composed reward of n fresh samples per prompt (None scores left out), the samples, and the mean of
    each component of the composed reward by its label (e.g. ``reward_model``, ``math``; None left out)."""
    answers = sample(generator, tokenizer, examples, n, sampling)
    prompts = [ex.prompt for ex, a in zip(examples, answers) for _ in a]
    columns = {
        k: [ex.columns.get(k) for ex, a in zip(examples, answers) for _ in a]
        for k in set().union(*(ex.columns for ex in examples))
    }
    out = reward(prompts, [c.text for a in answers for c in a], **columns)
    scores = [s for s in out.scores if s is not None]
    parts: dict[str, list[float]] = {}
    for d in out.details:
        for label, v in (d.get("components") or {}).items():
            if v is not None:
                parts.setdefault(label, []).append(v)
    components = {k: sum(v) / len(v) for k, v in sorted(parts.items())}
    return (sum(scores) / len(scores) if scores else float("nan")), answers, components


def answer_sequences(tokenizer, examples, answers: list[list[Completion]]) -> list[Sequence]:
    """Prompt + sampled answer as training sequences: labels on the answer's tokens only."""
    seqs = []
    for ex, group in zip(examples, answers):
        p = encode_prompt(tokenizer, ex.prompt)
        seqs += [answer_sequence(p, c.token_ids) for c in group if c.token_ids]
    return seqs


def answer_sequence(prompt_ids: list[int], answer_ids: list[int]) -> Sequence:
    ids = list(prompt_ids) + list(answer_ids)
    labels = [IGNORE] * (len(prompt_ids) - 1) + list(answer_ids) + [IGNORE]
    return Sequence(ids, labels)


@torch.no_grad()
def sequence_logps(logprob_fn, seqs: list[Sequence], batch: int = 8) -> torch.Tensor:
    """Summed label log-probs per sequence: (S,)."""
    out = []
    device = next(logprob_fn.parameters()).device
    for s in range(0, len(seqs), batch):
        b = collate(seqs[s : s + batch]).to(device)
        lp = logprob_fn(b.input_ids, b.position_ids, b.labels)
        owner = b.seq_ids[b.labels[0] != IGNORE]
        out.append(torch.zeros(b.num_seqs, dtype=lp.dtype, device=device).index_add(0, owner, lp).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def kl_to_reference(policy_fn, reference_fn, seqs: list[Sequence]) -> float:
    """Mean over answers sampled from the policy of log pi(y|x) - log pi_ref(y|x)."""
    if not seqs:
        return float("nan")
    return float((sequence_logps(policy_fn, seqs) - sequence_logps(reference_fn, seqs)).mean())


def general_text(tokenizer, chunks: int, chunk_tokens: int) -> list[Sequence]:
    """Held-out English: the last ``chunks`` x ``chunk_tokens`` tokens of Python's pydoc topics, in order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    text = text[
        -chunks * chunk_tokens * 12 :
    ]  # plenty of characters for the tokens wanted (about 4 per token)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = ids[-chunks * chunk_tokens :]
    seqs = []
    for c in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        piece = ids[c : c + chunk_tokens]
        seqs.append(Sequence(piece, piece[1:] + [IGNORE]))
    return seqs


def general_text_nll(logprob_fn, tokenizer, chunks: int = 16, chunk_tokens: int = 256) -> float:
    """Mean token NLL (nats) on held-out general text."""
    seqs = general_text(tokenizer, chunks, chunk_tokens)
    total = sequence_logps(logprob_fn, seqs).sum()
    return float(-total / sum(s.num_labels for s in seqs))
