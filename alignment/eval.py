"""Held-out evaluation of one model: what a stage bought (math, instruction following, code, the reward model's
verdict against the start model) and what it cost (KL to a reference, NLL on general English).

    python -m alignment.eval recipes/eval.yaml model=outputs/dpo [key=value ...]   (or: make eval MODEL=outputs/dpo)

Tiny CPU smoke run (no trained models needed; seconds):

    python -m alignment.eval recipes/eval.yaml model=tiny-qwen2 start_model=null reference_model=tiny-qwen2 \
        reward_model=null math.max_prompts=4 ifeval.max_prompts=4 code.max_prompts=2 max_new_tokens=16 \
        general_text_chunks=2 kl_prompts=2 generation.backend=transformers output=outputs/smoke-eval.json

Metrics, written flat to one JSON file (``output``, default ``<model>/eval.json``):

- ``eval/math_accuracy``: greedy answers to ``math.path``, checked by the ``math`` reward;
- ``eval/ifeval_strict`` (every constraint of a prompt holds) and ``eval/ifeval_constraint_accuracy`` (each
  constraint on its own): greedy answers to ``ifeval.path``, checked by reward/ifeval.py;
- ``eval/code_pass@1``: greedy answers to ``code.path`` (HumanEval), every test run in the sandbox;
- ``eval/win_rate``: the reward model's win rate of the model's greedy answers against ``start_model``'s on
  the ``prompt_set`` prompts (ties 0.5). The start model's answers are cached under a key of its weights,
  the prompts and the settings, so a chain evaluating every stage generates them once;
- ``eval/kl_to_reference``: the mean of log pi(y|x) - log pi_ref(y|x) over answers sampled from the model at
  temperature 1 (an unbiased estimate of KL(pi || pi_ref) per answer) on the first ``kl_prompts`` prompts;
- ``eval/general_text_nll``: token NLL on Python's ``pydoc_data.topics`` (see alignment/evaluation.py);
- ``time/greedy_answers`` (the greedy answers of every set: one engine request) and ``time/<metric>`` (its
  scoring; for the win rate and the KL all their work) in seconds, ``model``, ``generation_dtype`` (the
  engine's precision on this machine: ``generation.dtype: bf16_if_fast`` in the recipe), the resolved config, and
  ``missing``: each metric that was not measured with the reason (skipped by the config, or the sandbox refused
  to run on this machine): a metric that could not be measured is absent and named there, never a silent 0;
- ``math_by_task``: the math accuracy per ``task`` of the held-out rows, and ``answers``: the name of the file
  beside it (``eval.answers.jsonl``) that holds every greedy answer, one JSON row each, math answers with their
  verdict (``correct``), and the win rate's answers with the judge's score (``judge_score``) and verdict against
  the start model's answer (``win``: 1, 0.5 on a tie, 0; null where either was not scored): the report counts
  which answers a stage turned right or wrong, and which ones the judge now prefers or not.

Deliberate simplifications: one process, one model at a time; greedy decoding only for the scored answers;
the KL and the NLL run with transformers (the engine gives no log-probs of a second model).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from accelerate.utils import set_seed

from alignment.config import (
    ConfigError,
    DCAConfig,
    ModelConfig,
    RopeScalingConfig,
    parse_cli,
    run_cli,
    to_dict,
)
from alignment.data import DataError, encode_prompt
from alignment.evaluation import (
    accuracy_by_task,
    answer_sequences,
    cache_key,
    cached_values,
    code_pass_at_1,
    fingerprint_weights,
    general_text_nll,
    greedy_answers,
    ifeval_accuracy,
    judged_scores,
    kl_to_reference,
    load_prompts,
    math_correct,
    right_arithmetic_answers,
    sample,
    win_outcomes,
    win_rate,
)
from alignment.generation import (
    GenerationConfig,
    SamplingConfig,
    make_generator,
    resolve_engine_dtype,
    vllm_available,
)
from alignment.models import cache_dir, load_tokenizer, resolve_model
from alignment.report import answers_path

SETS = ("math", "ifeval", "code")
# Columns a row of each held-out set must have for its metric.
REQUIRED_COLUMNS = {"math": ("answer",), "ifeval": ("constraints",), "code": ("tests", "entry_point")}


@dataclass
class HeldOutSet:
    """A held-out prompt file (never trained on; null: skip its metric) and how many prompts from its top (0: all)."""

    path: str | None = None
    max_prompts: int = 0

    def __post_init__(self) -> None:
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0 (0: all), got {self.max_prompts}")


@dataclass
class EvalConfig:
    # The model to evaluate: a Hugging Face folder (outputs/dpo) or a built-in name (smollm2-135m-instruct).
    model: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Long inputs: Dual Chunk Attention and/or YaRN, ModelConfig's keys (alignment/dca.py). Every model of the
    # evaluation (the model, start_model, reference_model) loads with them, for its answers and its forwards;
    # the transformers backend only (generation.backend: transformers). Defaults: each model as it is.
    attn_implementation: Literal["auto", "dca"] = "auto"
    rope_scaling: RopeScalingConfig | None = None
    dca: DCAConfig | None = None
    # The win rate: reward_model judges the model's greedy answers against start_model's. Either null: skipped.
    start_model: str | None = None
    reward_model: str | None = None
    # KL(model || reference_model) over sampled answers (the SFT model in the chain). null: skipped.
    reference_model: str | None = None
    math: HeldOutSet = field(default_factory=lambda: HeldOutSet("data/eval/math.jsonl", 200))
    ifeval: HeldOutSet = field(default_factory=lambda: HeldOutSet("data/eval/ifeval.jsonl", 200))
    code: HeldOutSet = field(default_factory=lambda: HeldOutSet("data/eval/code.jsonl", 0))
    # The set whose prompts the win rate and the KL use.
    prompt_set: Literal["math", "ifeval", "code"] = "math"
    # KL over the sampled answers to the first N prompts of prompt_set (two full forwards per answer).
    kl_prompts: int = 48
    # Token NLL on general text: chunks x 256 tokens of pydoc topics (0: skipped).
    general_text_chunks: int = 16
    max_new_tokens: int = 256
    # A diagnosis, off by default: math accuracy if the model's arithmetic were right. Up to N times per greedy
    # math answer, the first wrong equation's number is replaced by the right one and the model continues from
    # there (eval/math_accuracy_right_arithmetic; alignment/evaluation.py: right_arithmetic_answers). 0: off.
    right_arithmetic_rounds: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Seeds torch and the engines (it replaces generation.seed): the KL's samples are the same every run.
    seed: int = 0
    # The code sandbox refuses to run without its network, PID and mount namespaces and its socket filter;
    # true runs it with what this machine has (a warning on every run). Otherwise code_pass@1 is missing.
    allow_weak_isolation: bool = False
    # Where the start model's answers are cached; null: $ALIGNMENT_CACHE/eval_answers.
    cache_dir: str | None = None
    # The JSON file; null: <model folder>/eval.json.
    output: str | None = None

    def __post_init__(self) -> None:
        # model_config builds a ModelConfig, which checks dca against attn_implementation.
        if self.model_config(self.model) is not None and self.generation.backend != "transformers":
            raise ValueError(
                f"attn_implementation {self.attn_implementation} / rope_scaling apply to the transformers backend "
                f"only, but generation.backend is {self.generation.backend}; set generation.backend: transformers"
            )
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if min(self.kl_prompts, self.general_text_chunks, self.right_arithmetic_rounds) < 0:
            raise ValueError(
                "kl_prompts, general_text_chunks and right_arithmetic_rounds must be >= 0 (0: off)"
            )
        needs = [k for k, on in (("the win rate", self.wins), ("the KL", self.kl)) if on]
        if needs and getattr(self, self.prompt_set).path is None:
            raise ValueError(
                f"{' and '.join(needs)} use the prompts of prompt_set ({self.prompt_set}), whose path is null; "
                f"set {self.prompt_set}.path or another prompt_set"
            )

    def model_config(self, name: str) -> ModelConfig | None:
        """How to load ``name`` for generation when the long-input settings are on; None: as it is."""
        if self.attn_implementation == "auto" and self.rope_scaling is None and self.dca is None:
            return None
        return ModelConfig(
            name, self.dtype, attn_implementation=self.attn_implementation, rope_scaling=self.rope_scaling,
            dca=self.dca,
        )  # fmt: skip

    @property
    def wins(self) -> bool:
        return self.start_model is not None and self.reward_model is not None

    @property
    def kl(self) -> bool:
        return self.reference_model is not None and self.kl_prompts > 0


class JudgeFailed(RuntimeError):
    """The reward model could not score the start model's answers (its reason): the win rate is missing."""


@dataclass
class Report:
    """What the run measured, what it could not (and why), and how long each metric took."""

    metrics: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    # Math accuracy per task of the held-out rows, and every greedy answer (one row each, with its set's
    # verdict where it has one per row): what the report reads to say which answers a stage changed.
    math_by_task: dict[str, float] = field(default_factory=dict)
    answers: list[dict] = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - t0

    def add(self, metric: str, value: float, note: str = "") -> None:
        self.metrics[metric] = value
        print(f"[eval] {metric} = {value:.4f} {note}".rstrip(), flush=True)

    def miss(self, metric: str, reason: str) -> None:
        self.missing[metric] = reason
        print(f"[eval] {metric}: MISSING: {reason}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Checks that run before any model loads
# --------------------------------------------------------------------------------------------------------------


def load_sets(cfg: EvalConfig, where: str) -> dict[str, list]:
    """The held-out prompts of each set whose path is set; a bad row fails now, naming the file and row."""
    sets = {}
    for name in SETS:
        held = getattr(cfg, name)
        if held.path is None:
            continue
        if not Path(held.path).is_file():
            raise ConfigError(
                f"{where}: {name}.path: {held.path}: no such file (null skips the {name} metric)"
            )
        examples = load_prompts(held.path, held.max_prompts)
        for i, ex in enumerate(examples):
            for col in REQUIRED_COLUMNS[name]:
                if ex.columns.get(col) is None:
                    raise DataError(
                        f"{held.path}: row {i + 1}: field {col!r}: missing (the {name} metric needs it)"
                    )
        if name == "ifeval":
            try:  # unusable constraints fail now, not after generating
                ifeval_accuracy([""] * len(examples), examples)
            except ValueError as e:
                raise DataError(f"{held.path}: {e}") from None
        sets[name] = examples
        print(f"[eval] {name}: {len(examples)} prompts from {held.path}", flush=True)
    return sets


def resolve(name: str | None, key: str, hint: str, where: str) -> str | None:
    """A model's local folder (built-in names are built), or a hub id whose tokenizer loads now: a missing
    folder like outputs/reward looks like a hub id and would otherwise fail after minutes of generation."""
    if name is None:
        return None
    try:
        path = resolve_model(name)
        if not Path(path).is_dir():
            load_tokenizer(path)
        return path
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError
        reason = str(e).strip().splitlines()[0][:200]
        raise ConfigError(
            f"{where}: {key}: {name}: no such model folder, nor a hub model ({reason}); {hint}"
        ) from None


def code_reward(cfg: EvalConfig, report: Report):
    """The sandboxed code reward, or None (code_pass@1 reported missing) when this machine cannot run it."""
    from reward.code_reward import CodeReward

    try:
        return CodeReward(allow_weak_isolation=cfg.allow_weak_isolation)
    except RuntimeError as e:  # the sandbox names the isolation layer it lacks
        report.miss("eval/code_pass@1", f"the sandbox cannot run here: {e}")
        return None


def report_skips(cfg: EvalConfig, sets: dict, report: Report) -> None:
    """Every metric the config turns off, named in the output with why."""
    metrics = {"math": ["eval/math_accuracy"], "code": ["eval/code_pass@1"],
               "ifeval": ["eval/ifeval_strict", "eval/ifeval_constraint_accuracy"]}  # fmt: skip
    for name in [n for n in SETS if n not in sets]:
        for metric in metrics[name]:
            report.miss(metric, f"skipped: {name}.path is null")
    if not cfg.wins:
        report.miss("eval/win_rate", "skipped: start_model or reward_model is null")
    if not cfg.kl:
        report.miss("eval/kl_to_reference", "skipped: reference_model is null or kl_prompts is 0")
    if not cfg.general_text_chunks:
        report.miss("eval/general_text_nll", "skipped: general_text_chunks is 0")


# --------------------------------------------------------------------------------------------------------------
# The three phases: each loads one model and lets it go before the next loads
# --------------------------------------------------------------------------------------------------------------


def model_answers(cfg: EvalConfig, path: str, tokenizer, sets, code, report: Report):
    """Greedy answers to every set, scored, and the KL's sampled answers. Each set is its own request to the
    engine, the win rate's set (``prompt_set``) first: in bf16 a greedy answer can change with what else is in
    the batch, so one request for all sets (9-17 s less a chain stage) made a set's answers depend on which other
    sets were evaluated, and the start model's answers cached by one evaluation (all sets) differ from those a
    later one makes alone (19 of its 200 math answers did). A set's answers are those of that set alone.
    The KL's answers are sampled in ``dtype``, the precision its log-probs are computed in, so that they are
    samples of the model the estimate is about: from the same engine when it runs in ``dtype``, else from a
    second one, started after the first is closed."""

    def engine(dtype: str):
        gen_cfg = replace(cfg.generation, seed=cfg.seed, dtype=dtype)
        return make_generator(gen_cfg, path, tokenizer, cfg.dtype, model_cfg=cfg.model_config(path))

    gen = engine(engine_dtype(cfg))
    print(f"[eval] generating with {path} (backend {gen.name}, {engine_dtype(cfg)})", flush=True)
    # Code answers only when the sandbox can run them, or when the win rate or the KL needs them.
    wanted = [n for n in SETS if n in sets and (n != "code" or code is not None or cfg.prompt_set == "code")]
    answers, kl_answers, fixed = {}, [], None
    try:
        with report.timed("greedy_answers"):
            got = {n: greedy_answers(gen, tokenizer, sets[n], cfg.max_new_tokens)
                   for n in sorted(wanted, key=lambda n: n != cfg.prompt_set)}  # fmt: skip
        answers = {n: got[n] for n in wanted}
        print(f"[eval] {sum(map(len, answers.values()))} greedy answers ({', '.join(wanted)})", flush=True)
        if cfg.right_arithmetic_rounds and "math" in answers:
            with report.timed("right_arithmetic"):
                fixed = right_arithmetic_answers(gen, tokenizer, sets["math"], [a.text for a in answers["math"]],
                                                 cfg.right_arithmetic_rounds, cfg.max_new_tokens)  # fmt: skip
        if cfg.kl:
            with report.timed("kl_to_reference"):  # samples from the model itself: temperature 1, no top-k/p
                if engine_dtype(cfg) != cfg.dtype:
                    gen.close()
                    gen = engine(cfg.dtype)
                    print(f"[eval] sampling the KL's answers in {cfg.dtype}", flush=True)
                kl_answers = sample(gen, tokenizer, sets[cfg.prompt_set][: cfg.kl_prompts], 1,
                                    SamplingConfig(1.0, max_new_tokens=cfg.max_new_tokens))  # fmt: skip
    finally:
        gen.close()
    verdicts: dict[str, list[bool]] = {}
    if "math" in answers:
        with report.timed("math_accuracy"):
            verdicts["math"] = math_correct([a.text for a in answers["math"]], sets["math"])
        acc = sum(verdicts["math"]) / max(1, len(verdicts["math"]))
        report.add("eval/math_accuracy", acc, f"({len(sets['math'])} prompts)")
        report.math_by_task = accuracy_by_task(verdicts["math"], sets["math"])
    if fixed is not None:
        right = math_correct(fixed, sets["math"])
        report.add("eval/math_accuracy_right_arithmetic", sum(right) / max(1, len(right)),
                   f"(a diagnosis: every arithmetic slip fixed, up to {cfg.right_arithmetic_rounds} per answer)")  # fmt: skip
    if "ifeval" in answers:
        with report.timed("ifeval"):
            strict, each = ifeval_accuracy([a.text for a in answers["ifeval"]], sets["ifeval"])
        report.add("eval/ifeval_strict", strict, f"({len(sets['ifeval'])} prompts)")
        report.add("eval/ifeval_constraint_accuracy", each)
    if "code" in answers and code is not None:
        with report.timed("code_pass@1"):
            score_code([a.text for a in answers["code"]], sets["code"], code, report)
    for name, texts in answers.items():
        for i, (answer, ex) in enumerate(zip(texts, sets[name])):
            row = {"set": name, "row": i, "id": ex.columns.get("id"), "task": ex.columns.get("task")}
            row |= {"answer": answer.text} | ({"correct": verdicts[name][i]} if name in verdicts else {})
            report.answers.append(row)
    return answers, kl_answers


def score_code(texts: list[str], examples, code, report: Report) -> None:
    rate, unjudged = code_pass_at_1(texts, examples, code)
    if unjudged:
        print(f"[eval] code: the sandbox could not run {len(unjudged)} problems, left out: {unjudged[0]}")
    if math.isnan(rate):
        report.miss("eval/code_pass@1", f"the sandbox ran no program: {unjudged[0]}")
    else:
        report.add("eval/code_pass@1", rate, f"({len(examples) - len(unjudged)} problems)")


def start_model_answers(cfg: EvalConfig, start: str, examples, model_path: str, model_ids, model_texts):
    """The start model's greedy answers from the cache, else generated and cached, and their cache key. When the
    start model is the evaluated model (same weights, same prompt ids), its answers are the evaluated model's."""
    tokenizer = load_tokenizer(start)
    prompt_ids = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    backend = cfg.generation.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    settings = {"max_new_tokens": cfg.max_new_tokens, "backend": backend, "dtype": cfg.dtype,
                "engine_dtype": engine_dtype(cfg)}  # fmt: skip
    start_cfg = cfg.model_config(start)
    if start_cfg is not None:  # the long-input settings change the answers: part of the key
        settings |= {"model": to_dict(start_cfg) | {"name_or_path": None}}
    fingerprint = fingerprint_weights(start)
    key = cache_key("answers", fingerprint, prompt_ids, settings)

    def generate() -> list[str]:
        if prompt_ids == model_ids and fingerprint == fingerprint_weights(model_path):
            print("[eval] the start model is the evaluated model: its answers are the baseline", flush=True)
            return model_texts
        gen = make_generator(
            replace(cfg.generation, seed=cfg.seed),
            start,
            tokenizer,
            cfg.dtype,
            model_cfg=start_cfg,
        )
        print(f"[eval] generating the start model's answers with {start} (backend {gen.name})", flush=True)
        try:
            return [a.text for a in greedy_answers(gen, tokenizer, examples, cfg.max_new_tokens)]
        finally:
            gen.close()

    texts, hit = cached_values(answers_cache(cfg) / f"{key}.json", key, len(examples), generate)
    print(f"[eval] start model answers: cache {'hit' if hit else 'miss'} ({key})", flush=True)
    return texts, key


def engine_dtype(cfg: EvalConfig) -> str:
    """The precision the greedy answers are generated in (``generation.dtype`` on this machine); the KL's answers
    are sampled, and the KL's and the NLL's forwards and the judge run, in ``dtype``."""
    return resolve_engine_dtype(cfg.generation.dtype, cfg.dtype)


def answers_cache(cfg: EvalConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "eval_answers"


def judge_against_start(
    cfg: EvalConfig, path: str, start: str, judge: str, tokenizer, examples, answers, report
):
    """The reward model's win rate of the model's greedy answers against the start model's. The judge's scores
    of the start model's answers are cached too (scoring 200 answers takes over a minute on 2 cores)."""
    from reward.model import RewardModelScorer

    texts, prompts = [a.text for a in answers], [ex.prompt for ex in examples]
    with report.timed("win_rate"):
        model_ids = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
        baseline, answers_key = start_model_answers(cfg, start, examples, path, model_ids, texts)
        scorer = RewardModelScorer(judge, max_length=cfg.generation.max_model_len, dtype=cfg.dtype)
        key = cache_key(
            "scores", fingerprint_weights(judge), answers_key, cfg.generation.max_model_len, cfg.dtype
        )

        def score_start() -> list[float]:
            out = scorer(prompts, baseline)
            if None in out.scores:  # a failing judge is reported, never cached
                raise JudgeFailed(next(r for s, r in zip(out.scores, out.reasons) if s is None))
            return out.scores

        try:
            baseline_scores, hit = cached_values(
                answers_cache(cfg) / f"{key}.json", key, len(examples), score_start
            )
        except JudgeFailed as e:
            report.miss("eval/win_rate", f"the reward model could not score the start model's answers: {e}")
            return
        print(
            f"[eval] the judge's scores of the start model's answers: cache {'hit' if hit else 'miss'} ({key})"
        )
        scores = judged_scores(scorer, prompts, texts, baseline, baseline_scores)
        rate, n = win_rate(scores, baseline_scores)
    # Each prompt's verdict goes beside its answer, so that two evaluations can be compared prompt by prompt.
    verdicts = dict(enumerate(zip(scores, win_outcomes(scores, baseline_scores))))
    for row in report.answers:
        if row["set"] == cfg.prompt_set and row["row"] in verdicts:
            row["judge_score"], row["win"] = verdicts[row["row"]]
    if n < len(examples):
        print(f"[eval] win rate: the reward model could not score the answers to {len(examples) - n} prompts")
    if n:
        report.add("eval/win_rate", rate, f"(against {cfg.start_model}, {n} {cfg.prompt_set} prompts)")
    else:
        report.miss("eval/win_rate", "the reward model scored no answer (see the log)")


def logprob_metrics(cfg: EvalConfig, path: str, reference: str | None, tokenizer, kl_seqs, report: Report):
    """KL to the reference over the sampled answers, and NLL on general text: transformers forwards."""
    from alignment.logprobs import TokenLogProbs
    from alignment.models import load_causal_lm

    def load(name: str):
        return TokenLogProbs(
            load_causal_lm(
                cfg.model_config(name) or ModelConfig(name, cfg.dtype),
                cfg.generation.max_model_len,
                trainable=False,
            )
        )

    # Sequences packed 8 to a forward; one at a time under Dual Chunk Attention, which needs positions 0..T-1.
    batch = 1 if cfg.attn_implementation == "dca" else 8
    policy = load(path)
    if reference is not None and cfg.kl:
        with report.timed("kl_to_reference"):
            ref = load(reference)
            kl = kl_to_reference(policy, ref, kl_seqs, batch)
            del ref
        report.add("eval/kl_to_reference", kl, f"({len(kl_seqs)} sampled answers)")
    if cfg.general_text_chunks:
        with report.timed("general_text_nll"):
            nll = general_text_nll(policy, tokenizer, cfg.general_text_chunks, batch=batch)
        report.add("eval/general_text_nll", nll, f"({cfg.general_text_chunks} x 256 tokens of pydoc topics)")


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    cfg: EvalConfig = parse_cli(EvalConfig, args)
    where = args[0] if args and "=" not in args[0] else "command line"
    t_start = time.perf_counter()
    set_seed(cfg.seed)
    report = Report()

    # Set-up order: everything that needs no model first (model names, data, the sandbox), so a missing folder
    # or a bad row fails in seconds, not after minutes of generation.
    path = resolve(cfg.model, "model", "a model folder or a built-in name", where)
    start = resolve(cfg.start_model, "start_model", "null skips the win rate", where)
    judge = resolve(
        cfg.reward_model, "reward_model", "train one (make reward) or null skips the win rate", where
    )
    reference = resolve(cfg.reference_model, "reference_model", "null skips the KL", where)
    output = Path(cfg.output) if cfg.output else Path(path) / "eval.json"
    if cfg.output is None and not Path(path).is_dir():
        raise ConfigError(f"{where}: output: {cfg.model} is not a local folder; set output=<file>.json")
    tokenizer = load_tokenizer(path)
    if reference is not None and load_tokenizer(reference).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{where}: reference_model: {cfg.reference_model} has another vocabulary than {cfg.model}"
        )
    sets = load_sets(cfg, where)
    code = code_reward(cfg, report) if "code" in sets else None
    report_skips(cfg, sets, report)

    # 1. The model's answers, scored: one engine, closed before any other model loads (two vLLM engines at
    #    once are far too slow on a small CPU).
    answers, kl_answers = model_answers(cfg, path, tokenizer, sets, code, report)

    # 2. The reward model's verdict on the same prompts: the start model's answers (cached), then the judge.
    if cfg.wins:
        examples = sets[cfg.prompt_set]
        judge_against_start(cfg, path, start, judge, tokenizer, examples, answers[cfg.prompt_set], report)

    # 3. What it cost: KL to the reference over the sampled answers, NLL on general text.
    kl_seqs = (
        answer_sequences(tokenizer, sets[cfg.prompt_set][: cfg.kl_prompts], kl_answers) if cfg.kl else []
    )
    if cfg.kl or cfg.general_text_chunks:
        logprob_metrics(cfg, path, reference, tokenizer, kl_seqs, report)

    report.times["time/total"] = time.perf_counter() - t_start
    result = {"model": path, **report.metrics, **report.times, "missing": report.missing,
              "prompts": {k: len(v) for k, v in sets.items()}, "generation_dtype": engine_dtype(cfg),
              "config": to_dict(cfg)}  # fmt: skip
    if report.math_by_task:
        result["math_by_task"] = report.math_by_task
    output.parent.mkdir(parents=True, exist_ok=True)
    answers_file = answers_path(output)
    answers_file.write_text("".join(json.dumps(row) + "\n" for row in report.answers))
    result["answers"] = answers_file.name
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[eval] wrote {output} ({report.times['time/total']:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
