"""Execution feedback for code: the model writes solutions and unit tests for each coding problem; running
every solution against every test in the sandbox decides which solutions become demonstrations and which
(passing, failing) pairs become preferences.

    python -m data_synthesis recipes/data/code_feedback.yaml
    python -m data_synthesis recipes/data/code_feedback.yaml dry_run=3    # every step on 3 problems, printed

The Qwen2 technical report's automated synthesis (section 4.2, "Execution Feedback"), paraphrased: for coding
tasks an LLM writes solutions and test cases; compiling and running the solutions against the tests judges
them, which gives demonstration and preference data. Model-written code only ever runs in the project's
sandbox (``reward/sandbox.py``), through the test harness of the ``code`` reward (``reward/code_reward.py``).

Input rows (``data_synthesis/code_problems.jsonl``): ``prompt`` (the task in words), ``entry_point`` (the
function's name) and optionally ``signature`` (``def name(args) -> type:``; default ``def name(...):``).

Steps and their exact rules (drop reasons in brackets; every drop is counted in ``stats.json``):
1. ``instruction``, ``problem``: a row without a task [no_instruction] or whose ``entry_point`` is not a
   Python name [no_entry_point] is dropped.
2. ``solve``: ``num_solutions`` answers to SOLUTION_TEMPLATE; ``write_tests``: ``num_test_sets`` answers to
   TESTS_TEMPLATE (sampled apart: the tests are not written to fit a solution).
3. ``parse``: a solution's code is its fenced Python block that defines the entry point (``extract_code``);
   a solution whose code does not parse or has no top-level ``def <entry_point>`` is dropped [no_function].
   Tests: the strings of a JSON list (or of a ``tests`` key) in a test answer, else its fenced blocks, else
   its text; every line that starts with ``assert`` is one test (joined with the lines after it while it does
   not compile: an assert split over lines). A test that is not one assert statement [test_unparsable], that
   never calls the entry point [test_no_call: ``assert True`` tests nothing] or repeats an earlier one
   [duplicate_test] is dropped. A problem left with no solution [no_valid_solution] or no test [no_tests] is
   dropped.
4. ``execute``: one sandbox job per solution runs all the problem's tests, each under its own time limit
   (``per_test_timeout_s``), and reports each test: the pass matrix (solutions x tests). A solution the
   sandbox could not run at all is dropped [sandbox_error], and so is a problem with none left.
5. ``select``: tests no solution passes are dropped [test_passed_by_none]; then solutions that pass none of
   the kept tests [solution_passes_none]. A solution *passes* when it passes >= ``min_pass_fraction`` of the
   kept tests, else it *fails*. A passing solution that was cut at ``sampling.max_new_tokens`` is dropped
   [unfinished]: never a demonstration or a chosen answer. A problem with no kept test [no_kept_test] or no
   passing solution [no_passing_solution] is dropped. Demonstrations: up to ``demos_per_problem`` passing
   solutions; pairs: up to ``pairs_per_problem`` (passing, failing), each solution in one pair at most, drawn
   by a shuffle seeded by ``seed`` and the row id. Byte-identical texts count once, and a text found on both
   sides never pairs.

Solutions and tests are dropped like rows: each lands in ``dropped.jsonl`` (its text in ``text``) with the
id ``<row id>#solution<i>`` (i: the sample), ``#raw_test<j>`` (j: the assert line, counted over all test
answers) or ``#test<j>`` (j: its place in the row's ``tests``), so ``stats.json`` counts them by reason
beside the problems.

Writes into ``out_dir``:
- ``sft.jsonl``: ``messages`` (the SOLUTION_TEMPLATE conversation + a passing solution), ``source_id``,
  ``entry_point``, ``pass_rate``, ``provenance``;
- ``preference.jsonl``: ``prompt``, ``chosen``, ``rejected``, ``source_id``, ``entry_point``,
  ``chosen_pass_rate``, ``rejected_pass_rate``, ``provenance``;
- ``problems.jsonl``: each kept problem's ``prompt`` with its kept ``tests`` and ``entry_point``: the columns
  of the ``code`` reward, for online training on these problems.

Deliberate simplifications:
- Tests are judged only by agreement with the model's own solutions: a wrong test that some wrong solution
  passes survives, a right test that every solution fails is lost. No reference solution exists.
- Tests are assert statements on the function's return value (no stdin/stdout problems, no fixtures).
- ``output: code`` (default) writes the verified code alone in a fenced block, not the answer's prose, which
  nothing verified; ``output: answer`` keeps the whole answer.
- A 135M model (``smollm2-135m-instruct``) writes mostly wrong code and wrong tests (asserts inside a copy of
  the function, expected values off): with it most problems are dropped, and what survives is what the
  sandbox confirmed (dry run on 5 problems: 1 kept, one demonstration, no pair). The filters carry the
  quality, not the model; point ``backend.model`` (or ``backend.kind: openai`` + ``backend.url``) at a larger
  model for real data.
"""

from __future__ import annotations

import ast
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.generation import SamplingConfig
from data_synthesis.engine import (
    Context,
    Generate,
    Instruction,
    Map,
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
    render,
    row_rng,
    write_jsonl,
)
from data_synthesis.runner import SynthesisConfig
from reward.code_reward import build_test_program, extract_code, read_reports
from reward.sandbox import Sandbox, SandboxConfig, SandboxJob, Status

# The prompts paraphrase the report's execution-feedback step: one asks for a solution, the other, separately,
# for tests (so the tests are not written to fit one solution). Override them with the recipe's `templates:`.
SOLUTION_TEMPLATE: Messages = [
    {
        "role": "user",
        "content": "Write a Python function for this task.\n\n{instruction}\n\nUse this signature:\n"
        "```python\n{signature}\n```\n\nReply with the complete function in one ```python code block.",
    }
]
TESTS_TEMPLATE: Messages = [
    {
        "role": "user",
        "content": "Write unit tests for a Python function.\n\nTask: {instruction}\n"
        "Signature: {signature}\n\n"
        "Write 5 test cases as assert statements, one per line, each calling {entry_point} and checking "
        "its result, like `assert {entry_point}(...) == ...`. Reply with one ```python code block that "
        "holds only the assert lines.",
    }
]
TEMPLATES = {"solution": SOLUTION_TEMPLATE, "tests": TESTS_TEMPLATE}


@dataclass
class Config(SynthesisConfig):
    pipeline: str = "code_feedback"
    input: str = "data_synthesis/code_problems.jsonl"
    out_dir: str = "outputs/data/code_feedback"
    num_solutions: int = 4
    num_test_sets: int = 2
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.8, max_new_tokens=384)
    )
    # A solution passes when it passes at least this share of the kept tests (1.0: all of them).
    min_pass_fraction: float = 1.0
    pairs_per_problem: int = 2
    demos_per_problem: int = 1
    # code: the verified code alone in a ```python block; answer: the model's whole answer.
    output: Literal["code", "answer"] = "code"
    # The sandbox: time per test (the set-up of a solution gets as long), memory, parallel jobs.
    per_test_timeout_s: float = 2.0
    memory_mb: int = 512
    sandbox_workers: int = 2
    # True runs model code even where the sandbox lacks a required isolation layer (a warning every run).
    allow_weak_isolation: bool = False
    # Prompt overrides by name (solution, tests): chat messages with {column} fields.
    templates: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_solutions < 1 or self.num_test_sets < 1:
            raise ValueError("num_solutions and num_test_sets must be >= 1")
        if not 0.0 < self.min_pass_fraction <= 1.0:
            raise ValueError(f"min_pass_fraction must be in (0, 1], got {self.min_pass_fraction}")
        if self.pairs_per_problem < 0 or self.demos_per_problem < 0:
            raise ValueError("pairs_per_problem and demos_per_problem must be >= 0")
        if self.per_test_timeout_s <= 0:
            raise ValueError(f"per_test_timeout_s must be positive, got {self.per_test_timeout_s}")
        check_templates(self.templates, TEMPLATES)


def template(cfg: Config, name: str) -> Messages:
    return cfg.templates.get(name) or TEMPLATES[name]


# --------------------------------------------------------------------------------------------------------------
# Helpers the AutoIF pipeline shares
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Parsing solutions and tests
# --------------------------------------------------------------------------------------------------------------


def solution_code(answer: str, entry_point: str) -> tuple[str, str | None]:
    """(code, None) when the answer's code parses and defines ``entry_point`` at top level, else (code, why
    not)."""
    code = extract_code(answer, entry_point)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        return code, f"does not parse ({type(e).__name__}: {e})"
    if not any(isinstance(n, ast.FunctionDef) and n.name == entry_point for n in tree.body):
        return code, f"defines no top-level def {entry_point}"
    return code, None


_FENCED = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def parse_tests(answer: str) -> list[str]:
    """The candidate assert tests of a test answer (see the module docstring)."""
    try:
        value = parse_json_answer(answer)
    except ValueError:
        value = None
    if isinstance(value, dict):
        value = value.get("tests")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        text = "\n".join(value)
    else:
        blocks = _FENCED.findall(answer)
        text = "\n".join(blocks) if blocks else answer
    lines = text.splitlines()
    tests = []
    for i, line in enumerate(lines):
        if not line.strip().startswith("assert"):
            continue
        test = line.strip()
        # An assert split over lines: join what follows while it does not compile (at most 8 lines).
        for more in lines[i + 1 : i + 8]:
            if _compiles(test) or more.strip().startswith("assert"):
                break
            test += "\n" + more
        tests.append(test)
    return tests


def _compiles(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def bad_test(test: str, entry_point: str) -> tuple[str, str] | None:
    """None for a usable test, else (reason, detail)."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as e:
        return "test_unparsable", f"{type(e).__name__}: {e}"
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return "test_unparsable", "not one assert statement"
    calls = (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name))
    if not any(n.func.id == entry_point for n in calls):
        return "test_no_call", f"never calls {entry_point}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def _problem(r: Record) -> str | None:
    entry = r.data.get("entry_point")
    if not isinstance(entry, str) or not entry.strip().isidentifier():
        return f"no_entry_point: entry_point {entry!r} is not a Python name"
    entry = entry.strip()
    signature = r.data.get("signature")
    if not isinstance(signature, str) or not signature.strip():
        signature = f"def {entry}(...):"
    r.set("entry_point", entry, "problem")
    r.set("signature", signature.strip(), "problem")
    return None


class Parse(Step):
    """Solutions -> ``codes`` (None where dropped); test answers -> ``tests`` (the distinct usable
    asserts)."""

    name = "parse"
    needs = ("entry_point", "solutions", "test_answers")
    makes = ("codes", "tests")

    def run(self, records, ctx):
        kept = []
        for r in records:
            entry = r.data["entry_point"]
            codes = []
            for i, answer in enumerate(as_list(r.data["solutions"])):
                code, why = solution_code(answer, entry)
                if why:
                    drop_item(ctx, r, "solution", i, answer, "no_function", why)
                codes.append(None if why else code)
            tests: list[str] = []
            j = 0
            for answer in as_list(r.data["test_answers"]):
                for test in parse_tests(answer):
                    problem = bad_test(test, entry)
                    if problem is None and test in tests:
                        problem = ("duplicate_test", "")
                    if problem:
                        drop_item(ctx, r, "raw_test", j, test, *problem)
                    else:
                        tests.append(test)
                    j += 1
            r.set("codes", codes, self.name)
            r.set("tests", tests, self.name)
            if not any(c is not None for c in codes):
                ctx.drop(r, "no_valid_solution", "no solution parses and defines the function")
            elif not tests:
                ctx.drop(r, "no_tests", "no usable assert in the test answers")
            else:
                kept.append(r)
        return kept


class Execute(Step):
    """Every solution against every test, one sandbox job per solution -> ``passes`` (per solution: which
    tests it passed, as booleans; None for a dropped solution)."""

    name = "execute"
    needs = ("codes", "tests")
    makes = ("passes",)

    def __init__(self, cfg: Config):
        self.per_test_s = cfg.per_test_timeout_s
        # Built here, when the pipeline is made: a sandbox that lacks an isolation layer fails before any
        # model loads. Each job gets its own wall clock below (it grows with the number of tests); the
        # config's 60 s only sets the CPU-seconds backstop (RLIMIT_CPU).
        self.sandbox = Sandbox(
            SandboxConfig(
                timeout_s=60.0,
                memory_mb=cfg.memory_mb,
                max_workers=cfg.sandbox_workers,
                allow_weak_isolation=cfg.allow_weak_isolation,
            )
        )

    def run(self, records, ctx):
        jobs, plans = [], []  # plans[k] = (record, solution index, nonce)
        for r in records:
            tests = r.data["tests"]
            budget = self.per_test_s * (len(tests) + 1) + 5.0  # set-up + every test + interpreter start
            for i, code in enumerate(r.data["codes"]):
                if code is None:
                    continue
                nonce = secrets.token_hex(16)
                program = build_test_program(code, tests, "", nonce, self.per_test_s, self.per_test_s)
                jobs.append(SandboxJob(program, timeout_s=budget))
                plans.append((r, i, nonce))
        results = self.sandbox.run_many(jobs)
        passes: dict[str, list] = {r.id: [None] * len(r.data["codes"]) for r in records}
        for (r, i, nonce), result in zip(plans, results, strict=True):
            if result.status is Status.ERROR:
                drop_item(ctx, r, "solution", i, r.data["codes"][i], "sandbox_error", result.reason or "")
                continue
            ok = {x["test"] for x in read_reports(result.stdout, nonce) if x.get("ok") is True}
            passes[r.id][i] = [j in ok for j in range(len(r.data["tests"]))]
        kept = []
        for r in records:
            r.set("passes", passes[r.id], self.name, per_test_timeout_s=self.per_test_s)
            if all(p is None for p in passes[r.id]):
                ctx.drop(r, "sandbox_error", "the sandbox could run none of the solutions")
            else:
                kept.append(r)
        return kept


class Select(Step):
    """The pass matrix -> kept tests, passing and failing solutions, demonstrations and pairs."""

    name = "select"
    needs = ("solutions", "solutions_finished", "codes", "tests", "passes")
    makes = ("kept_tests", "pass_rates", "demos", "pairs")

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, records, ctx):
        kept = []
        for r in records:
            if self._select(r, ctx):
                kept.append(r)
        return kept

    def _select(self, r: Record, ctx: Context) -> bool:
        cfg = self.cfg
        tests, passes = r.data["tests"], r.data["passes"]
        ran = [i for i, p in enumerate(passes) if p is not None]
        keep_tests = [j for j in range(len(tests)) if any(passes[i][j] for i in ran)]
        for j in range(len(tests)):
            if j not in keep_tests:
                drop_item(ctx, r, "test", j, tests[j], "test_passed_by_none", f"{len(ran)} solution(s) ran")
        rates: list[float | None] = [None] * len(passes)
        for i in ran:
            rates[i] = sum(passes[i][j] for j in keep_tests) / len(keep_tests) if keep_tests else 0.0
        texts = [self._text(r, i) for i in range(len(passes))]
        finished = as_list(r.data["solutions_finished"])
        good, bad = [], []
        for i in ran:
            if rates[i] == 0.0:
                if keep_tests:  # with no kept test the problem is dropped whole, below
                    drop_item(ctx, r, "solution", i, texts[i], "solution_passes_none", "")
            elif rates[i] >= cfg.min_pass_fraction:
                if finished[i]:
                    good.append(i)
                else:
                    drop_item(ctx, r, "solution", i, texts[i], "unfinished", "cut at max_new_tokens")
            else:
                bad.append(i)
        r.set("kept_tests", [tests[j] for j in keep_tests], self.name)
        r.set("pass_rates", rates, self.name, min_pass_fraction=cfg.min_pass_fraction)
        if not keep_tests:
            ctx.drop(r, "no_kept_test", f"no solution passes any of {len(tests)} test(s)")
            return False
        if not good:
            ctx.drop(
                r, "no_passing_solution", f"no solution passes >= {cfg.min_pass_fraction} of the kept tests"
            )
            return False
        rate_of = {texts[i]: rates[i] for i in good + bad}
        pairs, demos = pick(
            [texts[i] for i in good],
            [texts[i] for i in bad],
            row_rng(cfg, r),
            cfg.pairs_per_problem,
            cfg.demos_per_problem,
        )
        r.set("demos", [{"text": t, "pass_rate": rate_of[t]} for t in demos], self.name, seed=cfg.seed)
        r.set(
            "pairs",
            [
                {"chosen": c, "rejected": x, "chosen_pass_rate": rate_of[c], "rejected_pass_rate": rate_of[x]}
                for c, x in pairs
            ],
            self.name,
            seed=cfg.seed,
        )
        return True

    def _text(self, r: Record, i: int) -> str:
        if self.cfg.output == "answer" or r.data["codes"][i] is None:
            return as_list(r.data["solutions"])[i]
        return "```python\n" + r.data["codes"][i].strip() + "\n```"


def steps(cfg: Config) -> list[Step]:
    return [
        Instruction(),
        Map("problem", _problem, makes=("entry_point", "signature")),
        Generate(
            "solve",
            template(cfg, "solution"),
            "solutions",
            cfg.num_solutions,
            cfg.sampling,
            template_name="code_feedback.solution",
        ),
        Generate(
            "write_tests",
            template(cfg, "tests"),
            "test_answers",
            cfg.num_test_sets,
            cfg.sampling,
            template_name="code_feedback.tests",
        ),
        Parse(),
        Execute(cfg),
        Select(cfg),
    ]


def write(result: Result, cfg: Config, out_dir: Path) -> dict[str, int]:
    sft, pref, problems = [], [], []
    for r in result.records:
        prompt = render(template(cfg, "solution"), r.data)
        common = {"source_id": r.id, "entry_point": r.data["entry_point"]}
        for d in r.data["demos"]:
            sft.append(
                chat_row(prompt, d["text"], **common, pass_rate=d["pass_rate"], provenance=r.provenance)
            )
        for p in r.data["pairs"]:
            pref.append(
                preference_row(
                    prompt,
                    p["chosen"],
                    p["rejected"],
                    **common,
                    chosen_pass_rate=p["chosen_pass_rate"],
                    rejected_pass_rate=p["rejected_pass_rate"],
                    provenance=r.provenance,
                )
            )
        problems.append({"prompt": prompt, "tests": r.data["kept_tests"], **common})
    return {
        "sft.jsonl": write_jsonl(out_dir / "sft.jsonl", sft),
        "preference.jsonl": write_jsonl(out_dir / "preference.jsonl", pref),
        "problems.jsonl": write_jsonl(out_dir / "problems.jsonl", problems),
    }
