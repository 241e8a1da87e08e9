"""Held-out evaluation through the generation interface: what a stage bought and what it cost.

- ``math_accuracy``: greedy answers to held-out math prompts, checked by the ``math`` reward (0/1 each).
- ``ifeval_accuracy``: IFEval's two strict scores of answers to constraint prompts (reward/ifeval.py's checkers).
- ``code_pass_at_1``: the share of coding problems whose every unit test passes in the sandbox.
- ``win_rate``: how often a reward model prefers one model's answers to another's (``judged_scores`` scores
  them, ``win_outcomes`` gives the verdict per prompt).
- ``mean_reward``: fresh samples at the training temperature, scored by a composed reward (the online recipe's);
  ``alignment.report.held_out_change`` compares two evaluations of the same prompts, prompt by prompt, with a test of each move.
- ``kl_to_reference``: the mean of sum_t log pi(y_t) - log pi_ref(y_t) over sampled answers y ~ pi, a
  Monte-Carlo estimate of KL(pi || pi_ref) per answer.
- ``general_text_nll``: token-level NLL of held-out general English that ships with Python
  (``pydoc_data.topics``: the text of Python's help topics, PSF licence), the alignment tax on plain language.

Every function takes the sampler (``alignment.generation``), answers already sampled, or a log-prob function,
never a trainer. ``cached_values`` keeps a baseline model's greedy answers (and a judge's scores of them) on
disk under a ``cache_key`` of the weights, the prompts and the settings, so a chain of evaluations makes them once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
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


def greedy_answers(generator: Generator, tokenizer, examples, max_new_tokens: int) -> list[Completion]:
    """One greedy (temperature 0) answer per prompt."""
    greedy = SamplingConfig(0.0, max_new_tokens=max_new_tokens)
    return [a[0] for a in sample(generator, tokenizer, examples, 1, greedy)]


def math_accuracy(generator: Generator, tokenizer, examples, max_new_tokens: int) -> tuple[float, list[bool]]:
    """Greedy accuracy and each greedy answer's verdict (one per prompt)."""
    answers = greedy_answers(generator, tokenizer, examples, max_new_tokens)
    correct = math_correct([a.text for a in answers], examples)
    return sum(correct) / max(1, len(correct)), correct


def right_arithmetic_answers(
    generator: Generator, tokenizer, examples, texts: list[str], rounds: int, max_new_tokens: int
) -> list[str]:
    """The answers with their arithmetic slips fixed as they go: up to ``rounds`` times per answer, the number
    of its first wrong equation (``reward.arithmetic.first_wrong_step``) is replaced by the right one and the
    model continues greedily from there. Their math accuracy is what the model's own plans score with right
    arithmetic: a diagnosis of where its mistakes are, never a figure of the model itself."""
    from reward.arithmetic import first_wrong_step, write_like

    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    texts = list(texts)
    greedy = SamplingConfig(0.0, max_new_tokens=max_new_tokens)
    for _ in range(rounds):
        todo = []
        for i, text in enumerate(texts):
            step = first_wrong_step(text)
            if step is not None:
                todo.append((i, text[: step.start] + write_like(step.value, step.right)))
        if not todo:
            break
        ids = [prompts[i] + tokenizer(prefix, add_special_tokens=False).input_ids for i, prefix in todo]
        for (i, prefix), out in zip(todo, generator.generate(ids, 1, greedy)):
            texts[i] = prefix + out[0].text
    return texts


def math_correct(texts: list[str], examples) -> list[bool]:
    """Per answer: does the ``math`` reward judge its final answer equal to the row's gold ``answer``?"""
    from reward.math_reward import MathReward

    out = MathReward()(
        [ex.prompt for ex in examples], texts, answer=[ex.columns["answer"] for ex in examples]
    )
    return [s == 1.0 for s in out.scores]


def math_score(texts: list[str], examples) -> float:
    """The share of answers whose final answer the ``math`` reward judges equal to the row's gold ``answer``."""
    correct = math_correct(texts, examples)
    return sum(correct) / max(1, len(correct))


def accuracy_by_task(correct: list[bool], examples) -> dict[str, float]:
    """Accuracy per value of the rows' ``task`` column (rows without one count as "other"), sorted by task."""
    by_task: dict[str, list[bool]] = {}
    for ok, ex in zip(correct, examples):
        by_task.setdefault(str(ex.columns.get("task") or "other"), []).append(ok)
    return {task: sum(oks) / len(oks) for task, oks in sorted(by_task.items())}


def mean_reward(generator: Generator, tokenizer, examples, reward, sampling: SamplingConfig, n: int = 1):
    """Mean composed reward of n fresh samples per prompt (None scores left out), the samples, the mean of
    each component of the composed reward by its label (e.g. ``reward_model``, ``math``; None left out), and
    each prompt's own means, for comparing two models prompt by prompt (``held_out_change``): ``{"reward":
    [...], "reward/<label>": [...]}``, one value per prompt, None where none of its samples was scored."""
    answers = sample(generator, tokenizer, examples, n, sampling)
    prompts = [ex.prompt for ex, a in zip(examples, answers) for _ in a]
    columns = {
        k: [ex.columns.get(k) for ex, a in zip(examples, answers) for _ in a]
        for k in set().union(*(ex.columns for ex in examples))
    }
    out = reward(prompts, [c.text for a in answers for c in a], **columns)
    scores = [s for s in out.scores if s is not None]
    components, per_prompt = {}, {"reward": _per_prompt_means(out.scores, answers)}
    for label, values in reward_components(out).items():
        vs = [v for v in values if v is not None]
        if vs:
            components[label] = sum(vs) / len(vs)
            per_prompt[f"reward/{label}"] = _per_prompt_means(values, answers)
    return (sum(scores) / len(scores) if scores else float("nan")), answers, components, per_prompt


def _per_prompt_means(values: list, answers: list[list]) -> list[float | None]:
    """The mean of each prompt's values (flat, prompt by prompt as ``answers``), None where all are None."""
    out, i = [], 0
    for a in answers:
        mine = [v for v in values[i : i + len(a)] if v is not None]
        out.append(sum(mine) / len(mine) if mine else None)
        i += len(a)
    return out


def reward_components(scored) -> dict[str, list]:
    """Each component's score per item of a composed reward's output, by label (None where it did not judge)."""
    labels = {lab for d in scored.details for lab in d.get("components", {})}
    return {lab: [d.get("components", {}).get(lab) for d in scored.details] for lab in sorted(labels)}


def ifeval_accuracy(texts: list[str], examples) -> tuple[float, float]:
    """IFEval's strict scores of answers (one per example; constraints in the ``constraints`` column):

        prompt level (the strict pass rate):  (1/N) sum_i prod_k 1[answer i satisfies constraint k of row i]
        instruction level:                    sum_i sum_k 1[...] / sum_i K_i   (each constraint on its own)

    A row whose constraints are unusable raises ValueError naming the row (that is bad data, not a bad answer).
    """
    from reward.ifeval import check_constraint, parse_constraints

    results = []
    for i, (text, ex) in enumerate(zip(texts, examples)):
        try:
            constraints = parse_constraints(ex.columns.get("constraints"))
            if not constraints:
                raise ValueError("the row has no constraints")
            results.append([check_constraint(text, c, k) for k, c in enumerate(constraints)])
        except ValueError as e:
            raise ValueError(f"row {i + 1}: field 'constraints': {e}") from None
    flat = [ok for row in results for ok in row]
    return sum(all(r) for r in results) / max(1, len(results)), sum(flat) / max(1, len(flat))


def code_pass_at_1(texts: list[str], examples, reward) -> tuple[float, list[str]]:
    """pass@1 of one answer per problem: the share of problems whose every unit test passes, run in the
    sandbox by ``reward`` (a ``reward.code_reward.CodeReward``; the row's ``tests``, ``entry_point`` and
    ``code_prefix`` columns). A problem the sandbox could not run at all is left out, never counted as a fail:
    -> (rate over the problems judged, NaN when none was; the reason for each problem left out)."""
    columns = {
        k: [ex.columns.get(k) for ex in examples] for k in set().union(*(ex.columns for ex in examples))
    }
    out = reward([ex.prompt for ex in examples], list(texts), **columns)
    judged = [s for s in out.scores if s is not None]
    unjudged = [r or "no reason given" for s, r in zip(out.scores, out.reasons) if s is None]
    return (sum(s == 1.0 for s in judged) / len(judged) if judged else math.nan), unjudged


def win_outcomes(scores: list[float | None], baseline: list[float | None]) -> list[float | None]:
    """Per prompt, the answer's result against the baseline's answer to the same prompt: 1 when it scores higher,
    0.5 on a tie, 0 when it scores lower, None when either score is missing."""
    return [
        None if s is None or b is None else 1.0 if s > b else 0.5 if s == b else 0.0
        for s, b in zip(scores, baseline)
    ]


def win_rate(scores: list[float | None], baseline: list[float | None]) -> tuple[float, int]:
    """Share of prompts where the answer outscores the baseline's answer to the same prompt:

        win_rate = (1/N) sum_i ( 1[s_i > b_i] + 0.5 * 1[s_i == b_i] )

    over the N prompts where both scores exist (a None on either side leaves the prompt out).
    -> (win rate, N); NaN when N is 0."""
    judged = [o for o in win_outcomes(scores, baseline) if o is not None]
    return (sum(judged) / len(judged) if judged else math.nan), len(judged)


def judged_scores(
    scorer, prompts: list, texts: list[str], baseline: list[str], baseline_scores: list[float | None]
) -> list[float | None]:
    """``scorer``'s score (a reward with the common interface, e.g. ``reward.model.RewardModelScorer``) of each
    answer, given the baseline answers' scores (so a chain of evaluations scores the baseline once). An answer
    identical to the baseline's takes its score, an exact tie: a reward model's score of one text moves in its
    last bits with the texts batched with it."""
    todo = [i for i, (t, b) in enumerate(zip(texts, baseline)) if t != b]
    out = scorer([prompts[i] for i in todo], [texts[i] for i in todo])
    scores = list(baseline_scores)
    for i, s in zip(todo, out.scores):
        scores[i] = s
    return scores


# Files that make a model's outputs what they are: weights, config, tokenizer and chat template.
MODEL_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json", "adapter_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")  # fmt: skip
CACHE_VERSION = 1


def fingerprint_weights(model_path: str) -> str:
    """sha256 over a model folder's weight, config and tokenizer files (names, sizes, bytes; about 1 s per GB),
    without loading the model. A name that is not a local folder (a hub id) is fingerprinted by the name alone."""
    folder = Path(model_path)
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"name:{model_path}".encode())
        return h.hexdigest()
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def cache_key(*parts) -> str:
    """Key of cached outputs: a sha256 of everything that makes them (fingerprints, prompt ids, settings)."""
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:32]


def cached_values(path: Path, key: str, n: int, compute: Callable[[], list]) -> tuple[list, bool]:
    """The n values (answers, scores) stored in ``path`` under ``key``, else ``compute()``'s, stored there
    (written to a temporary name and renamed, so a crash leaves no half-written file).
    -> (values, whether the file was used). A damaged file, or one with another key or count, is reported and
    replaced, never trusted."""
    if path.is_file():
        try:
            blob = json.loads(path.read_text())
            if blob["key"] == key and len(blob["values"]) == n:
                return list(blob["values"]), True
            print(f"[eval] cache {path} does not match its key; computing again", flush=True)
        except (ValueError, KeyError, TypeError) as e:
            print(f"[eval] cache {path} is damaged ({type(e).__name__}); computing again", flush=True)
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "values": values}))
    os.replace(tmp, path)
    return values, False


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
    """Summed label log-probs per sequence: (S,). ``batch`` sequences are packed into one row per forward
    (1: each alone, positions 0..T-1, as Dual Chunk Attention needs)."""
    out = []
    device = next(logprob_fn.parameters()).device
    for s in range(0, len(seqs), batch):
        b = collate(seqs[s : s + batch]).to(device)
        lp = logprob_fn(b.input_ids, b.position_ids, b.labels)
        owner = b.seq_ids[b.labels[0] != IGNORE]
        out.append(torch.zeros(b.num_seqs, dtype=lp.dtype, device=device).index_add(0, owner, lp).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def kl_to_reference(policy_fn, reference_fn, seqs: list[Sequence], batch: int = 8) -> float:
    """Mean over answers sampled from the policy of log pi(y|x) - log pi_ref(y|x)."""
    if not seqs:
        return float("nan")
    return float((sequence_logps(policy_fn, seqs, batch) - sequence_logps(reference_fn, seqs, batch)).mean())


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


def general_text_nll(
    logprob_fn, tokenizer, chunks: int = 16, chunk_tokens: int = 256, batch: int = 8
) -> float:
    """Mean token NLL (nats) on held-out general text."""
    seqs = general_text(tokenizer, chunks, chunk_tokens)
    total = sequence_logps(logprob_fn, seqs, batch).sum()
    return float(-total / sum(s.num_labels for s in seqs))
