"""AutoIF: instruction-following data checked by model-written verification functions run in the sandbox.

    python -m data_synthesis recipes/data/autoif.yaml
    python -m data_synthesis recipes/data/autoif.yaml dry_run=3    # every step on 3 constraints, printed

Follows Dong et al. 2024, "Self-play with Execution Feedback: Improving Instruction-following Capabilities
of Large Language Models" (AutoIF), which the Qwen2 technical report uses for instruction following (section
4.2, "Execution Feedback"): for each instruction with a verifiable constraint (a length limit, say), the
model writes Python functions that check a response against it and test cases for those functions; the
functions that the cases confirm then judge sampled responses. Every model-written function runs in the
project's sandbox (``reward/sandbox.py``), through the harness of the ``verifier`` reward
(``reward/verifier.py``).

Input rows (``data_synthesis/autoif_constraints.jsonl``): ``instruction``, one verifiable constraint ("Do
not use any commas in your answer."). Queries (``queries``: ``data_synthesis/autoif_queries.jsonl``, rows
with ``query``) are general requests the constraints are attached to.

Steps and their exact rules (drop reasons in brackets; every drop is counted in ``stats.json``):
1. ``instruction``: a row without a constraint is dropped [no_instruction].
2. ``write_functions``: ``num_functions`` answers to FUNCTION_TEMPLATE; ``write_cases``: ``num_case_sets``
   answers to CASES_TEMPLATE (sampled apart from the functions, so a function is not judged by cases its
   own answer wrote).
3. ``parse``: a function's code is its fenced Python block that defines ``evaluate``; one that does not
   parse or has no top-level ``def evaluate`` [no_evaluate] or repeats an earlier one [duplicate_function]
   is dropped. Cases: the JSON list (or the ``cases`` key) of each case answer; an answer with none
   [cases_unparsable]; a case without a string ``response`` and a boolean ``expected`` ("true"/"false"
   strings are read as booleans; ``input``/``output`` are read as well) [case_malformed]; a repeat
   [duplicate_case]. A constraint left with no function [no_functions] or no case [no_cases] is dropped,
   and so is one with fewer than ``min_parsed_functions`` distinct functions [too_few_parsed_functions] or
   ``min_parsed_cases`` distinct cases [too_few_parsed_cases] (AutoIF's code: 3 and 10).
4. ``cross_validate``: every function runs on every case in the sandbox (one job per case, all functions in
   it, each under ``per_function_timeout_s``). A function *agrees* with a case when it returns exactly the
   case's ``expected`` (raising, timing out or returning a non-bool disagrees). With ``cross_validation:
   autoif`` (the default; AutoIF's released ``code/3_cross_validation.py``) a case that no function agrees
   with is dropped first [case_unconfirmed]; with ``all_cases`` every case stays. Functions that agree with
   fewer than ``min_case_accuracy`` of the cases left are dropped [function_inaccurate]; then cases that a
   strict majority of the kept functions disagree with [case_disputed]. A constraint keeps its functions
   when at least ``min_functions`` survive, else it is dropped [too_few_functions]. The minimum counts of
   step 3 are what keeps ``autoif`` from being empty: with one function, the cases it confirms are its own
   verdicts, and it agrees with all of them. Beyond AutoIF's code (``min_cases_per_label``, default 1; 0
   turns it off): the cases must hold at least that many of each label, before and after the disputes
   [one_sided_cases], and a function must also agree with at least that many cases of each label
   [function_one_sided]: cases that are all False confirm ``return False``, and so do 4 False cases and 1
   True one at the 0.8 threshold.
5. ``pair_queries``: each kept constraint is joined with ``queries_per_constraint`` queries (0: all), drawn
   by a shuffle seeded by ``seed`` and the constraint's id: one row per (query, constraint), with the id
   ``<constraint id>|<query id>``.
6. ``answer``: ``num_answers`` answers to ANSWER_TEMPLATE (the query, then the constraint).
7. ``judge``: each answer's score is the ``verifier`` reward with the kept functions: the share of functions
   that return True, among those that return a verdict. An answer no function could judge is dropped
   [unjudged]; an answer with score >= ``accept`` that was cut at ``sampling.max_new_tokens`` is dropped
   [unfinished]. Accepted: score >= ``accept``; rejected: score <= ``reject``. A row with no accepted answer
   is dropped [no_accepted_answer]. Demonstrations: up to ``demos_per_prompt`` accepted answers; pairs: up
   to ``pairs_per_prompt`` (accepted, rejected), each answer in one pair at most, seeded by ``seed`` and the
   row id; byte-identical answers count once and never pair.

Functions, cases and answers are dropped like rows: each lands in ``dropped.jsonl`` (its text in ``text``)
and is counted by reason beside the rows. Its id is ``<row id>#`` and: ``function_answer<i>``,
``case_answer<i>``, ``answer<i>`` (i: the sample), ``raw_case<j>`` (j: the case object, over all case
answers), ``function<j>`` or ``case<j>`` (j: its place in the row's ``functions`` or ``cases``).

Writes into ``out_dir``:
- ``sft.jsonl``: ``messages`` (query + constraint, then an accepted answer), ``source_id``,
  ``constraint_id``, ``query_id``, ``score``, ``provenance``;
- ``preference.jsonl``: ``prompt``, ``chosen``, ``rejected``, ``source_id``, ``constraint_id``,
  ``query_id``, ``chosen_score``, ``rejected_score``, ``provenance``;
- ``verifiers.jsonl``: each kept constraint: ``constraint_id``, ``instruction``, ``verifiers`` (the kept
  functions: the ``verifier`` reward's column), ``cases`` (the kept ones), ``function_accuracy``;
- ``audit.jsonl``: each constraint whose input row has a reference (``audit_column``, default
  ``constraints``: rule-based checkers in the ``ifeval`` reward's format, checked before any model loads):
  ``cases``, ``cases_labelled_right`` (the case's ``expected`` equals the reference's verdict on its
  response) and ``cases_following_reference`` (responses the reference accepts: cases that all break the
  constraint cannot tell a right function from ``return False``), ``functions`` (parsed),
  ``functions_run`` (cross-validated), ``functions_matching_reference`` (the reference's verdict on every
  case response the sandbox ran, counted only where the reference accepts one of those responses and refuses
  another: on responses that all break the constraint ``return False`` gives its verdict every time),
  ``functions_kept`` and ``kept_matching_reference``; and of what was written, ``demos`` and
  ``demos_following_reference`` (demonstrations the reference accepts), ``pairs`` and
  ``pairs_ordered_by_reference`` (pairs whose chosen answer it accepts and whose rejected one it refuses).
  It measures the model that wrote them (how often its cases are labelled right, how often its functions
  are right where the cases can tell, how often the data is); it never keeps or drops anything. 19 of the 31
  shipped constraints have a reference (the others have no ifeval checker that means the same).

Deliberate simplifications:
- AutoIF's other checks are left out: back-translating a function into an instruction and testing that it
  entails the original, and an LLM check that query and constraint do not conflict. The constraints shipped
  here are written to fit any query.
- Cases and functions come from the same model: a constraint it misreads the same way in both survives.
  Cases only validate the functions; the answers are judged by the functions alone.
- A 135M model (``smollm2-135m-instruct``) cannot write these functions, nor the cases that would confirm
  them: at the recipe's 4 function and 2 case answers no constraint reaches cross-validation (most answers
  define no ``evaluate``, most case objects repeat), and the audit says why sampling more does not help: the
  model labels its own cases no better than a coin, so the cases cannot tell a right function from a wrong
  one (README, "Data synthesis": at 12 and 8 answers, 12 of the 13 constraints AutoIF's rule keeps have
  only False cases and constant functions, which ``min_cases_per_label`` drops; none of the 43 functions run
  gives the reference's verdict on case responses it splits). The filters carry the quality, and they let
  next to nothing through here; point
  ``backend.model`` (or ``backend.kind: openai`` + ``backend.url``) at a larger model for real data, and read
  ``audit.jsonl`` to see how right its cases, functions and written rows are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.data import DataError
from alignment.generation import SamplingConfig
from data_synthesis.code_feedback import solution_code
from data_synthesis.engine import (
    Context,
    Generate,
    Instruction,
    Messages,
    Record,
    Result,
    Step,
    as_list,
    chat_row,
    check_templates,
    drop_item,
    parse_json_answer,
    pick,
    preference_row,
    read_rows,
    render,
    row_rng,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig
from reward.code_reward import read_reports
from reward.ifeval import check_constraint, parse_constraints
from reward.sandbox import Sandbox, SandboxConfig, SandboxJob, Status
from reward.verifier import VerifierReward, verdicts_program

# Paraphrases of AutoIF's prompts (Dong et al. 2024): its verification-function prompt asks for a function
# `evaluate(response)` returning True when the response follows the instruction, and for test cases with
# expected outputs. Here functions and cases are asked for apart. Override with the recipe's `templates:`.
FUNCTION_TEMPLATE: Messages = [
    {
        "role": "user",
        "content": "You write Python functions that check whether a response follows an instruction "
        "exactly.\n\nInstruction: {instruction}\n\nWrite a Python function "
        "`evaluate(response: str) -> bool` that returns True when the response follows the instruction and "
        "False when it does not. Use only the standard library. Reply with the function in one ```python "
        "code block.",
    }
]
CASES_TEMPLATE: Messages = [
    {
        "role": "user",
        "content": "Instruction: {instruction}\n\nWrite test cases for a checker of this instruction: short "
        "example responses, some that follow the instruction and some that do not. Reply with JSON only, in "
        'this form: {{"cases": [{{"response": "an example response", "expected": true}}, '
        '{{"response": "another example", "expected": false}}]}}. Give 6 cases.',
    }
]
ANSWER_TEMPLATE: Messages = [{"role": "user", "content": "{query}\n\n{instruction}"}]
TEMPLATES = {"function": FUNCTION_TEMPLATE, "cases": CASES_TEMPLATE, "answer": ANSWER_TEMPLATE}

# The shape CASES_TEMPLATE asks for; engines that can (vLLM, OpenAI-compatible servers) hold the answer to it.
CASES_SCHEMA = {
    "type": "object",
    "properties": {
        "cases": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"response": {"type": "string"}, "expected": {"type": "boolean"}},
                "required": ["response", "expected"],
            },
        }
    },
    "required": ["cases"],
}


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "autoif"
    input: str = "data_synthesis/autoif_constraints.jsonl"
    out_dir: str = "outputs/data/autoif"
    # General requests the constraints are attached to (rows with a `query` column).
    queries: str = "data_synthesis/autoif_queries.jsonl"
    queries_per_constraint: int = 4
    num_functions: int = 4
    num_case_sets: int = 2
    num_answers: int = 4
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=384)
    )
    # Ask the engine to hold case answers to CASES_SCHEMA (vLLM and endpoints do; transformers cannot).
    cases_json_schema: bool = True
    # Cross-validation. `autoif`: AutoIF's released rule (QwenLM/AutoIF, code/3_cross_validation.py): a
    # case that no function agrees with is dropped first, then a function is kept when it agrees with at
    # least `min_case_accuracy` of the cases left. `all_cases`: the share is taken over every case.
    cross_validation: str = "autoif"
    min_case_accuracy: float = 0.8
    # A constraint needs at least this many distinct parsed functions and cases to be cross-validated at all
    # (AutoIF's code: 3 and 10): with one function, "cases some function agrees with" are its own verdicts.
    min_parsed_functions: int = 3
    min_parsed_cases: int = 10
    # A constraint is kept when at least this many functions survive.
    min_functions: int = 1
    # Beyond AutoIF's code (0: its rule): the cases must hold at least this many of each label, True and
    # False, and a kept function must agree with at least this many of each. Cases of one label cannot tell a
    # right function from a constant, nor can a function that agrees with one label only be told from one: on
    # the 135M model at 12 function and 8 case answers, 12 of the 13 constraints AutoIF's rule kept had only
    # False cases, and functions that agreed with them by returning False (`response == "True"`).
    min_cases_per_label: int = 1
    # Answer scores (share of kept functions returning True): >= accept is accepted, <= reject is rejected.
    accept: float = 1.0
    reject: float = 0.0
    pairs_per_prompt: int = 1
    demos_per_prompt: int = 1
    # The sandbox: time per function call, memory, parallel jobs.
    per_function_timeout_s: float = 2.0
    memory_mb: int = 512
    sandbox_workers: int = 2
    # True runs model code even where the sandbox lacks a required isolation layer (a warning every run).
    allow_weak_isolation: bool = False
    # Prompt overrides by name (function, cases, answer): chat messages with {column} fields.
    templates: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    # An input column with rule-based checkers of the row's constraint, in the `ifeval` reward's format
    # ([{"type": "no_commas"}]). Used only to audit the model's cases and functions (audit.jsonl); it never
    # keeps or drops anything. Rows without it are not audited.
    audit_column: str = "constraints"

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.num_functions, self.num_case_sets, self.num_answers) < 1:
            raise ValueError("num_functions, num_case_sets and num_answers must be >= 1")
        if not 1 <= self.min_functions <= self.num_functions:
            raise ValueError(f"min_functions must be in [1, num_functions], got {self.min_functions}")
        if self.cross_validation not in ("autoif", "all_cases"):
            raise ValueError(
                f"cross_validation must be 'autoif' or 'all_cases', got {self.cross_validation!r}"
            )
        if not 1 <= self.min_parsed_functions <= self.num_functions:
            raise ValueError(
                f"min_parsed_functions must be in [1, num_functions], got {self.min_parsed_functions}"
            )
        if self.min_parsed_cases < 1:
            raise ValueError(f"min_parsed_cases must be >= 1, got {self.min_parsed_cases}")
        if self.min_cases_per_label < 0:
            raise ValueError(f"min_cases_per_label must be >= 0, got {self.min_cases_per_label}")
        if not 0.0 <= self.min_case_accuracy <= 1.0:
            raise ValueError(f"min_case_accuracy must be in [0, 1], got {self.min_case_accuracy}")
        if not 0.0 <= self.reject < self.accept <= 1.0:
            raise ValueError(
                f"need 0 <= reject < accept <= 1, got reject {self.reject}, accept {self.accept}"
            )
        if min(self.queries_per_constraint, self.pairs_per_prompt, self.demos_per_prompt) < 0:
            raise ValueError("queries_per_constraint, pairs_per_prompt and demos_per_prompt must be >= 0")
        if self.per_function_timeout_s <= 0:
            raise ValueError(f"per_function_timeout_s must be positive, got {self.per_function_timeout_s}")
        check_templates(self.templates, TEMPLATES)


def template(cfg: Config, name: str) -> Messages:
    return cfg.templates.get(name) or TEMPLATES[name]


def make_sandbox(cfg: Config) -> Sandbox:
    # Built when the pipeline is made: a sandbox that lacks an isolation layer fails before any model loads.
    return Sandbox(
        SandboxConfig(
            timeout_s=cfg.per_function_timeout_s * cfg.num_functions + 5.0,  # every function + start-up
            memory_mb=cfg.memory_mb,
            max_workers=cfg.sandbox_workers,
            allow_weak_isolation=cfg.allow_weak_isolation,
        )
    )


def read_input(cfg: Config) -> list[Record]:
    """The constraint rows; a row's audit column (when present) is checked here, before any model loads."""
    records = read_rows(cfg.input)
    for r in records:
        if r.data.get(cfg.audit_column) is None:
            continue
        try:
            reference = parse_constraints(r.data[cfg.audit_column])
            if not reference:
                raise ValueError("an empty list")
            for k, c in enumerate(reference):
                check_constraint("A response.", c, k)
        except ValueError as e:
            raise DataError(f"{cfg.input}: row {r.id}: field {cfg.audit_column!r}: {e}") from e
    return records


def reference_verdict(reference: list[dict[str, Any]], response: str) -> bool:
    """The audit's label of a response: it satisfies every rule-based checker of the row's reference."""
    return all(check_constraint(response, c, k) for k, c in enumerate(reference))


# --------------------------------------------------------------------------------------------------------------
# Parsing functions and cases
# --------------------------------------------------------------------------------------------------------------


def _boolean(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def parse_cases(answer: str) -> list[Any] | None:
    """The case objects in an answer (a JSON list, or the ``cases`` key of an object); None if none."""
    try:
        value = parse_json_answer(answer)
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("cases")
    return value if isinstance(value, list) else None


def read_case(item: Any) -> dict[str, Any] | None:
    """``{"response": str, "expected": bool}`` from a case object, or None when it is not one."""
    if not isinstance(item, dict):
        return None
    response = item.get("response", item.get("input"))
    expected = _boolean(item.get("expected", item.get("output")))
    if not isinstance(response, str) or expected is None:
        return None
    return {"response": response, "expected": expected}


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


class Parse(Step):
    """Function answers -> ``functions`` (distinct sources defining evaluate); case answers -> ``cases``."""

    name = "parse"
    needs = ("function_answers", "case_answers")
    makes = ("functions", "cases", "audit")

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, records, ctx):
        kept = []
        for r in records:
            functions: list[str] = []
            for i, answer in enumerate(as_list(r.data["function_answers"])):
                code, why = solution_code(answer, "evaluate")
                if why:
                    drop_item(ctx, r, "function_answer", i, answer, "no_evaluate", why)
                elif code in functions:
                    drop_item(ctx, r, "function_answer", i, answer, "duplicate_function", "")
                else:
                    functions.append(code)
            cases: list[dict[str, Any]] = []
            j = 0  # counts case objects over all answers
            for i, answer in enumerate(as_list(r.data["case_answers"])):
                items = parse_cases(answer)
                if items is None:
                    drop_item(ctx, r, "case_answer", i, answer, "cases_unparsable", "no JSON list of cases")
                    continue
                for item in items:
                    case = read_case(item)
                    if case is None:
                        drop_item(
                            ctx,
                            r,
                            "raw_case",
                            j,
                            item,
                            "case_malformed",
                            "needs response: str, expected: bool",
                        )
                    elif case in cases:
                        drop_item(ctx, r, "raw_case", j, item, "duplicate_case", "")
                    else:
                        cases.append(case)
                    j += 1
            r.set("functions", functions, self.name)
            r.set("cases", cases, self.name)
            r.set("audit", self._audit(r, functions, cases), self.name, reference=self.cfg.audit_column)
            if not functions:
                ctx.drop(r, "no_functions", "no answer defines evaluate")
            elif not cases:
                ctx.drop(r, "no_cases", "no usable test case")
            elif len(functions) < self.cfg.min_parsed_functions:
                ctx.drop(r, "too_few_parsed_functions",
                         f"{len(functions)} distinct function(s), min_parsed_functions {self.cfg.min_parsed_functions}")  # fmt: skip
            elif len(cases) < self.cfg.min_parsed_cases:
                ctx.drop(r, "too_few_parsed_cases",
                         f"{len(cases)} distinct case(s), min_parsed_cases {self.cfg.min_parsed_cases}")  # fmt: skip
            else:
                kept.append(r)
        return kept

    def _audit(self, r: Record, functions: list[str], cases: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The cases' labels checked against the row's reference (None: the row has none)."""
        if r.data.get(self.cfg.audit_column) is None:
            return None
        reference = parse_constraints(r.data[self.cfg.audit_column])
        labels = [reference_verdict(reference, c["response"]) for c in cases]
        right = sum(label is c["expected"] for label, c in zip(labels, cases, strict=True))
        return {"reference": reference, "cases": len(cases), "cases_labelled_right": right,
                "cases_following_reference": sum(labels),
                "functions": len(functions), "functions_run": 0, "functions_matching_reference": 0,
                "functions_kept": 0, "kept_matching_reference": 0}  # fmt: skip


class CrossValidate(Step):
    """Every function on every case in the sandbox -> the kept ``verifiers``, ``kept_cases`` and each kept
    function's ``function_accuracy``."""

    name = "cross_validate"
    needs = ("functions", "cases", "audit")
    makes = ("verifiers", "kept_cases", "function_accuracy")

    def __init__(self, cfg: Config, sandbox: Sandbox):
        self.cfg, self.sandbox = cfg, sandbox

    def run(self, records, ctx):
        # One job per case runs all of the constraint's functions on it (the verifier reward's harness).
        jobs, plans = [], []
        for r in records:
            for j, case in enumerate(r.data["cases"]):
                program, nonce = verdicts_program(r.data["functions"], self.cfg.per_function_timeout_s)
                jobs.append(SandboxJob(program, stdin=json.dumps(case["response"])))
                plans.append((r, j, nonce))
        # verdicts[row id][function][case]: True / False, or None (raised, timed out, not a bool, not run).
        verdicts = {r.id: [[None] * len(r.data["cases"]) for _ in r.data["functions"]] for r in records}
        failed: dict[str, set[int]] = {r.id: set() for r in records}
        for (r, j, nonce), result in zip(plans, self.sandbox.run_many(jobs), strict=True):
            if result.status is Status.ERROR:
                failed[r.id].add(j)
                drop_item(ctx, r, "case", j, r.data["cases"][j], "sandbox_error", result.reason or "")
                continue
            for report in read_reports(result.stdout, nonce):
                if isinstance(report.get("verdict"), bool) and isinstance(report.get("verifier"), int):
                    verdicts[r.id][report["verifier"]][j] = report["verdict"]
        return [r for r in records if self._decide(r, verdicts[r.id], failed[r.id], ctx)]

    def _decide(self, r: Record, verdicts: list[list[bool | None]], failed: set[int], ctx: Context) -> bool:
        cfg = self.cfg
        cases, functions = r.data["cases"], r.data["functions"]
        usable = [j for j in range(len(cases)) if j not in failed]
        if not usable:
            ctx.drop(r, "sandbox_error", "the sandbox could run none of the cases")
            return False
        agree = [
            [verdicts[i][j] is cases[j]["expected"] for j in range(len(cases))] for i in range(len(functions))
        ]
        scored = usable
        if cfg.cross_validation == "autoif":  # cases no function agrees with go first
            scored = [j for j in usable if any(agree[i][j] for i in range(len(functions)))]
            for j in sorted(set(usable) - set(scored)):
                drop_item(ctx, r, "case", j, cases[j], "case_unconfirmed", "no function agrees with it")
        accuracy = [sum(agree[i][j] for j in scored) / max(len(scored), 1) for i in range(len(functions))]
        # confirmed[i]: the cases of each label (True, False) function i agrees with.
        confirmed = [
            [sum(agree[i][j] for j in scored if cases[j]["expected"] is label) for label in (True, False)]
            for i in range(len(functions))
        ]
        accurate = [i for i in range(len(functions)) if accuracy[i] >= cfg.min_case_accuracy]
        kept = [i for i in accurate if min(confirmed[i]) >= cfg.min_cases_per_label]
        if r.data["audit"] is not None:  # measures only: nothing below reads it
            reference = r.data["audit"]["reference"]
            labels = {j: reference_verdict(reference, cases[j]["response"]) for j in usable}
            # Only case responses the reference splits can tell a right function from a constant one.
            matching = []
            if {labels[j] for j in usable} == {True, False}:
                matching = [
                    i for i in range(len(functions)) if all(verdicts[i][j] is labels[j] for j in usable)
                ]
            r.set("audit", {**r.data["audit"], "functions_run": len(functions),
                            "functions_matching_reference": len(matching), "functions_kept": len(kept),
                            "kept_matching_reference": len(set(matching) & set(kept))}, self.name)  # fmt: skip
        if detail := one_sided([cases[j] for j in scored], cfg.min_cases_per_label):
            ctx.drop(r, "one_sided_cases", detail)
            return False
        for i in range(len(functions)):
            if i not in accurate:
                detail = f"agrees with {accuracy[i]:.2f} of {len(scored)} cases"
                drop_item(ctx, r, "function", i, functions[i], "function_inaccurate", detail)
            elif i not in kept:
                detail = f"agrees with {confirmed[i][0]} True and {confirmed[i][1]} False cases"
                drop_item(ctx, r, "function", i, functions[i], "function_one_sided", detail)
        if len(kept) < cfg.min_functions:
            ctx.drop(
                r, "too_few_functions", f"{len(kept)} function(s) kept, min_functions {cfg.min_functions}"
            )
            return False
        kept_cases = []
        for j in scored:
            against = sum(not agree[i][j] for i in kept)
            if 2 * against > len(kept):
                drop_item(
                    ctx,
                    r,
                    "case",
                    j,
                    cases[j],
                    "case_disputed",
                    f"{against} of {len(kept)} functions disagree",
                )
            else:
                kept_cases.append(cases[j])
        if detail := one_sided(kept_cases, cfg.min_cases_per_label):  # disputes took a label's last cases
            ctx.drop(r, "one_sided_cases", detail)
            return False
        made_by = {"cross_validation": cfg.cross_validation, "min_case_accuracy": cfg.min_case_accuracy,
                   "min_functions": cfg.min_functions, "min_cases_per_label": cfg.min_cases_per_label}  # fmt: skip
        r.set("verifiers", [functions[i] for i in kept], self.name, **made_by)
        r.set("kept_cases", kept_cases, self.name, **made_by)
        r.set("function_accuracy", [accuracy[i] for i in kept], self.name, **made_by)
        return True


def one_sided(cases: list[dict[str, Any]], minimum: int) -> str | None:
    """Why ``cases`` hold fewer than ``minimum`` cases of a label (True or False); None when they do not."""
    true = sum(c["expected"] is True for c in cases)
    if min(true, len(cases) - true) >= minimum:
        return None
    return f"cases: {true} True, {len(cases) - true} False; min_cases_per_label {minimum}"


def load_queries(path: str) -> list[tuple[str, str]]:
    """(id, query) of every row of the queries file; a row without a query is an error naming it."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no queries")
    out = []
    for row in rows:
        query = row.data.get("query")
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{path}: row {row.id}: field 'query': missing or empty")
        out.append((row.id, query.strip()))
    return out


class PairQueries(Step):
    """Each kept constraint -> one row per drawn query (a new row id ``<constraint id>|<query id>``)."""

    name = "pair_queries"
    needs = ("instruction", "verifiers", "kept_cases", "function_accuracy", "audit")
    makes = ("query", "query_id", "constraint_id")
    merges = True  # rows are split, not merged: the per-row accounting of the engine does not apply

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.queries = load_queries(cfg.queries)  # read when the pipeline is made: a bad file fails first

    def run(self, records, ctx):
        out = []
        k = self.cfg.queries_per_constraint
        k = k if 0 < k < len(self.queries) else len(self.queries)
        keep = ("instruction", "verifiers", "kept_cases", "function_accuracy", "audit")
        for r in records:
            for qid, query in row_rng(self.cfg, r).sample(self.queries, k):
                # The constraint's provenance comes along whole: which model and prompts made its functions.
                row = Record(f"{r.id}|{qid}", {c: r.data[c] for c in keep}, dict(r.provenance))
                row.set("query", query, self.name, file=self.cfg.queries, seed=self.cfg.seed)
                row.set("query_id", qid, self.name)
                row.set("constraint_id", r.id, self.name)
                out.append(row)
        return out


class Judge(Step):
    """Scores every answer with the kept functions (the ``verifier`` reward) -> ``scores``, ``demos``,
    ``pairs``."""

    name = "judge"
    needs = ("answers", "answers_finished", "verifiers")
    makes = ("scores", "demos", "pairs")

    def __init__(self, cfg: Config, sandbox: Sandbox):
        self.cfg = cfg
        self.reward = VerifierReward(per_verifier_timeout_s=cfg.per_function_timeout_s, sandbox=sandbox)

    def run(self, records, ctx):
        flat = [(r, a) for r in records for a in as_list(r.data["answers"])]
        out = self.reward(
            [r.data["query"] for r, _ in flat],
            [a for _, a in flat],
            verifiers=[r.data["verifiers"] for r, _ in flat],
        )
        kept, start = [], 0
        for r in records:
            n = len(as_list(r.data["answers"]))
            if self._select(r, out.scores[start : start + n], out.reasons[start : start + n], ctx):
                kept.append(r)
            start += n
        return kept

    def _select(self, r: Record, scores: list[float | None], reasons: list[str | None], ctx: Context) -> bool:
        cfg = self.cfg
        answers, finished = as_list(r.data["answers"]), as_list(r.data["answers_finished"])
        good, bad = [], []
        for k, (answer, score) in enumerate(zip(answers, scores, strict=True)):
            if score is None:
                drop_item(ctx, r, "answer", k, answer, "unjudged", reasons[k] or "")
            elif score >= cfg.accept:
                if finished[k]:
                    good.append(k)
                else:
                    drop_item(ctx, r, "answer", k, answer, "unfinished", "cut at max_new_tokens")
            elif score <= cfg.reject:
                bad.append(k)
        made_by = {"accept": cfg.accept, "reject": cfg.reject, "seed": cfg.seed}
        r.set("scores", scores, self.name, reward="verifier")
        if not good:
            ctx.drop(r, "no_accepted_answer", f"no answer scores >= {cfg.accept} (scores {scores})")
            return False
        score_of = {answers[k]: scores[k] for k in reversed(good + bad)}  # the first sample's score per text
        pairs, demos = pick(
            [answers[k] for k in good],
            [answers[k] for k in bad],
            row_rng(cfg, r),
            cfg.pairs_per_prompt,
            cfg.demos_per_prompt,
        )
        r.set("demos", [{"text": t, "score": score_of[t]} for t in demos], self.name, **made_by)
        r.set(
            "pairs",
            [
                {"chosen": c, "rejected": x, "chosen_score": score_of[c], "rejected_score": score_of[x]}
                for c, x in pairs
            ],
            self.name,
            **made_by,
        )
        return True


def steps(cfg: Config) -> list[Step]:
    sandbox = make_sandbox(cfg)
    return [
        Instruction(),
        Generate(
            "write_functions",
            template(cfg, "function"),
            "function_answers",
            cfg.num_functions,
            cfg.sampling,
            template_name="autoif.function",
        ),
        Generate(
            "write_cases",
            template(cfg, "cases"),
            "case_answers",
            cfg.num_case_sets,
            cfg.sampling,
            json_schema=CASES_SCHEMA if cfg.cases_json_schema else None,
            template_name="autoif.cases",
        ),
        Parse(cfg),
        CrossValidate(cfg, sandbox),
        PairQueries(cfg),
        Generate(
            "answer",
            template(cfg, "answer"),
            "answers",
            cfg.num_answers,
            cfg.sampling,
            template_name="autoif.answer",
        ),
        Judge(cfg, sandbox),
    ]


def kept_constraints(result: Result) -> list[dict[str, Any]]:
    """One row per constraint that passed cross-validation, read off its (query, constraint) rows, kept or
    dropped."""
    seen: dict[str, dict[str, Any]] = {}
    for r in [*result.records, *(d.record for d in result.dropped)]:
        cid = r.data.get("constraint_id")
        if cid is None or "verifiers" not in r.data or cid in seen:
            continue
        seen[cid] = {
            "constraint_id": cid,
            "instruction": r.data["instruction"],
            "verifiers": r.data["verifiers"],
            "cases": r.data["kept_cases"],
            "function_accuracy": r.data["function_accuracy"],
        }
    return sorted(seen.values(), key=lambda row: row["constraint_id"])


# What the written rows are audited for; AUDIT_COUNTS is every count of an audit row, in its order.
WRITTEN_COUNTS = ("demos", "demos_following_reference", "pairs", "pairs_ordered_by_reference")
AUDIT_COUNTS = ("cases", "cases_labelled_right", "cases_following_reference", "functions", "functions_run",
                "functions_matching_reference", "functions_kept", "kept_matching_reference",
                *WRITTEN_COUNTS)  # fmt: skip


def audit_rows(result: Result) -> list[dict[str, Any]]:
    """One row per audited constraint (its input row had a reference), from wherever it ended, kept or
    dropped: how many of the model's cases the reference labels the same way, how many functions give the
    reference's verdict on every case response the sandbox ran (of all, and of those cross-validation kept),
    and of what was written (``demos``, ``pairs``) how much the reference agrees with: demonstrations it
    accepts, pairs whose chosen answer it accepts and whose rejected answer it refuses."""
    seen: dict[str, dict[str, Any]] = {}
    for r in [*result.records, *(d.record for d in result.dropped if not d.item)]:
        audit = r.data.get("audit")
        cid = r.data.get("constraint_id", r.id)
        if audit is None or cid in seen:
            continue
        seen[cid] = {"constraint_id": cid, "instruction": r.data["instruction"], **audit}
        seen[cid].update(dict.fromkeys(WRITTEN_COUNTS, 0))
    for r in result.records:  # the written rows: one per (query, constraint) kept
        if r.data.get("audit") is None:
            continue
        reference, row = r.data["audit"]["reference"], seen[r.data["constraint_id"]]
        for d in r.data["demos"]:
            row["demos"] += 1
            row["demos_following_reference"] += reference_verdict(reference, d["text"])
        for p in r.data["pairs"]:
            row["pairs"] += 1
            ordered = reference_verdict(reference, p["chosen"]) and not reference_verdict(
                reference, p["rejected"]
            )
            row["pairs_ordered_by_reference"] += ordered
    return sorted(seen.values(), key=lambda row: row["constraint_id"])


def audit_summary(rows: list[dict[str, Any]]) -> str:
    t = {k: sum(row[k] for row in rows) for k in AUDIT_COUNTS}
    return (f"[autoif] audit of {len(rows)} constraints against their reference checkers (never used to keep or "
            f"drop): cases labelled as the reference labels them {t['cases_labelled_right']} of {t['cases']} "
            f"({t['cases_following_reference']} of the case responses follow the reference); "
            f"functions giving the reference's verdict on every case response, where it accepts one and refuses "
            f"another, {t['functions_matching_reference']}"
            f" of {t['functions_run']} run ({t['functions']} parsed); of those cross-validation kept "
            f"{t['kept_matching_reference']} of {t['functions_kept']}; of what was written, the reference "
            f"accepts {t['demos_following_reference']} of {t['demos']} demonstrations and orders "
            f"{t['pairs_ordered_by_reference']} of {t['pairs']} pairs the same way")  # fmt: skip


def write(result: Result, cfg: Config, out_dir: Path) -> dict[str, int]:
    audit = audit_rows(result)
    if audit:
        print(audit_summary(audit), flush=True)
    sft, pref = [], []
    for r in result.records:
        prompt = render(template(cfg, "answer"), r.data)
        common = {"source_id": r.id, "constraint_id": r.data["constraint_id"], "query_id": r.data["query_id"]}
        for d in r.data["demos"]:
            sft.append(chat_row(prompt, d["text"], **common, score=d["score"], provenance=r.provenance))
        for p in r.data["pairs"]:
            pref.append(
                preference_row(
                    prompt,
                    p["chosen"],
                    p["rejected"],
                    **common,
                    chosen_score=p["chosen_score"],
                    rejected_score=p["rejected_score"],
                    provenance=r.provenance,
                )
            )
    return {
        "sft.jsonl": write_jsonl(out_dir / "sft.jsonl", sft),
        "preference.jsonl": write_jsonl(out_dir / "preference.jsonl", pref),
        "verifiers.jsonl": write_jsonl(out_dir / "verifiers.jsonl", kept_constraints(result)),
        "audit.jsonl": write_jsonl(out_dir / "audit.jsonl", audit),
    }
