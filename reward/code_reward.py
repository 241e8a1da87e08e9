"""Code correctness: run the completion's code against the row's unit tests in the sandbox.

Reward, per completion (``CodeReward``, registered as ``"code"``):

    r = (tests that passed) / (tests in the row)
    r = None  when the sandbox could not run the program at all (status ``error``) or the row has no tests

A test that fails, raises, runs over its own time limit, or never runs because the program timed out,
crashed or exited early counts as not passed: a completion's failure is a 0, never "cannot judge".

Columns read (names configurable):
- ``tests``: either a list of test snippets, each usually one ``assert`` (``"assert add(1, 2) == 3"``) and
  each counted on its own, or a str: a HumanEval-style test program that defines ``check(candidate)``. It
  counts as one test, ``check(<entry_point>)``, and needs the ``entry_point`` column;
- ``entry_point`` (optional): the function under test;
- ``code_prefix`` (optional): code placed before the completion's code. For HumanEval it is the problem's
  prompt (imports, signature, docstring), so a completion that writes only the function body works, and
  so does one that writes the whole function (its ``def`` replaces the prompt's).

The code is the completion's fenced Python block (the last one that defines the entry point, else the last
Python block, else the last fenced block), or the whole completion when it has no fence.

How results come back: the harness runs the code, then each test with its own alarm, and prints one line
per passed or failed test, tagged with a random nonce, through a copy of the stdout descriptor it took
before the code ran. An early ``exit(0)`` or a printed "all tests passed" therefore earns nothing. It stops
accidents and cheap tricks, not a determined program: code that shares the tests' process can always find
the nonce by inspecting the interpreter (frames, gc), or return an object whose ``__eq__`` is always True.
Watch for such completions when training long on this reward.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from reward.base import Prompt, RewardOutput
from reward.compose import register_reward
from reward.sandbox import Sandbox, SandboxConfig, SandboxJob, SandboxResult, Status

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The Python code in a completion (see the module docstring for which block is picked)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    if entry_point:
        defining = [
            body
            for body in python or [b for _, b in blocks]
            if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", body)
        ]
        if defining:
            return defining[-1]
    return python[-1] if python else blocks[-1][1]


# The harness keeps its names in a function, not in the program's globals, so the code under test does not
# find the nonce by importing __main__.
_HARNESS = """\
def _harness():
    import json, os, signal

    channel = os.dup(1)  # taken before the code runs, so redirecting sys.stdout does not hide results
    nonce = {nonce!r}

    def report(**fields):
        os.write(channel, ("\\n" + nonce + " " + json.dumps(fields) + "\\n").encode())

    def on_alarm(signum, frame):
        raise TimeoutError("over the per-test time limit")

    signal.signal(signal.SIGALRM, on_alarm)
    namespace = {{"__name__": "solution"}}
    signal.setitimer(signal.ITIMER_REAL, {setup_timeout})
    try:
        exec(compile({code!r}, "solution.py", "exec"), namespace)
        exec(compile({setup!r}, "tests.py", "exec"), namespace)
    except BaseException as e:
        report(setup_error=(type(e).__name__ + ": " + str(e))[:500])
        raise SystemExit(1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    for i, test in enumerate({tests!r}):
        signal.setitimer(signal.ITIMER_REAL, {per_test})
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), namespace)
            report(test=i, ok=True)
        except BaseException as e:
            report(test=i, ok=False, error=(type(e).__name__ + ": " + str(e))[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


_harness()
"""


def build_test_program(
    code: str, tests: list[str], setup: str, nonce: str, per_test_s: float, setup_s: float
) -> str:
    return _HARNESS.format(
        nonce=nonce, code=code, setup=setup, tests=tests, per_test=per_test_s, setup_timeout=setup_s
    )


def read_reports(stdout: str, nonce: str) -> list[dict]:
    """The harness's result lines, in order; anything else on stdout is the program's own output."""
    reports = []
    for line in stdout.splitlines():
        if line.startswith(nonce + " "):
            try:
                reports.append(json.loads(line[len(nonce) + 1 :]))
            except ValueError:
                continue
    return reports


def _row_tests(tests: Any, entry_point: Any) -> tuple[list[str], str]:
    """(test snippets, setup code) for a row, or ValueError saying what the row lacks."""
    if isinstance(tests, str):
        if not isinstance(entry_point, str) or not entry_point.isidentifier():
            raise ValueError("a str of tests is a HumanEval check program and needs an entry_point column")
        return [f"check({entry_point})"], tests
    if isinstance(tests, Sequence) and tests and all(isinstance(t, str) for t in tests):
        return list(tests), ""
    raise ValueError(f"tests must be a non-empty list of str or a HumanEval check str, got {tests!r:.100}")


@register_reward("code")
class CodeReward:
    """Pass rate of the row's tests on the completion's code, run in the sandbox.

    Construction raises where the sandbox lacks a layer of ``reward.sandbox.REQUIRED_LAYERS``, naming it;
    ``allow_weak_isolation=True`` runs anyway, with a warning on every call.
    """

    name = "code"

    def __init__(
        self,
        tests_column: str = "tests",
        entry_point_column: str = "entry_point",
        prefix_column: str = "code_prefix",
        timeout_s: float = 10.0,
        per_test_timeout_s: float = 3.0,
        memory_mb: int = 1024,
        max_workers: int = 2,
        allow_weak_isolation: bool = False,
        sandbox: Sandbox | None = None,
    ) -> None:
        if per_test_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"CodeReward: time limits must be positive, got {timeout_s=}, {per_test_timeout_s=}"
            )
        self.tests_column, self.entry_point_column, self.prefix_column = (
            tests_column,
            entry_point_column,
            prefix_column,
        )
        self.per_test_timeout_s = per_test_timeout_s
        # The sandbox refuses to start without its network, PID and mount namespaces and its Unix-socket
        # filter unless allow_weak_isolation says so (then every run logs a warning).
        config = SandboxConfig(
            timeout_s=timeout_s,
            memory_mb=memory_mb,
            max_workers=max_workers,
            allow_weak_isolation=allow_weak_isolation,
        )
        self.sandbox = sandbox or Sandbox(config)

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        n = len(completions)
        if self.tests_column not in columns:
            reason = f"no column {self.tests_column!r} with the unit tests (columns: {sorted(columns)})"
            return RewardOutput([None] * n, [reason] * n)
        entry_points = columns.get(self.entry_point_column, [None] * n)
        prefixes = columns.get(self.prefix_column, [None] * n)
        jobs, plans, out = [], {}, [(None, "", {})] * n
        for i, (completion, tests, entry_point, prefix) in enumerate(
            zip(completions, columns[self.tests_column], entry_points, prefixes)
        ):
            try:
                snippets, setup = _row_tests(tests, entry_point)
            except ValueError as e:
                out[i] = (None, f"bad test data: {e}", {})
                continue
            nonce = secrets.token_hex(16)
            code = (prefix or "") + extract_code(completion or "", entry_point)
            program = build_test_program(
                code, snippets, setup, nonce, self.per_test_timeout_s, self.per_test_timeout_s
            )
            plans[i] = (nonce, len(snippets))
            jobs.append(SandboxJob(program))
        results = self.sandbox.run_many(jobs)
        for i, result in zip(plans, results):
            out[i] = self._score(result, *plans[i])
        return RewardOutput([s for s, _, _ in out], [r for _, r, _ in out], [d for _, _, d in out])

    def _score(self, result: SandboxResult, nonce: str, total: int) -> tuple[float | None, str | None, dict]:
        detail: dict[str, Any] = {"status": str(result.status), "total": total}
        if result.status is Status.ERROR:
            return None, f"the sandbox could not run the program: {result.reason}", detail
        reports = read_reports(result.stdout, nonce)
        passed = {r["test"] for r in reports if r.get("ok") is True and isinstance(r.get("test"), int)}
        detail["passed"] = len(passed)
        errors = [r.get("setup_error") or r.get("error") for r in reports if not r.get("ok")]
        if errors:
            detail["first_error"] = errors[0]
        if result.status is not Status.PASSED and result.reason:
            detail["reason"] = result.reason
        if result.stderr:
            detail["stderr_tail"] = result.stderr[-500:]
        return len(passed) / total, None, detail


_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)[^\n]*\n.*?```", re.DOTALL | re.IGNORECASE)


@register_reward("format_code_block")
class CodeBlockFormatReward:
    """r = 1.0 if the completion has a closed fenced Python block (```python ... ```), else 0.0."""

    name = "format_code_block"

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        return RewardOutput([float(bool(_CODE_BLOCK.search(c or ""))) for c in completions])
