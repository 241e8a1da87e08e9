"""Generated verifiers (AutoIF-style): model-written ``evaluate(response) -> bool`` functions, run in the sandbox.

AutoIF (used for Qwen2's instruction-following data) has a model write, per instruction, Python functions
that check whether a response follows it; the functions are cross-checked, then used to filter responses.
Nobody reviews that code, so it runs in the sandbox, never here.

Reward, per completion (``VerifierReward``, registered as ``"verifier"``), with V verifiers v_j:

    r = (verifiers returning True) / (verifiers that gave a verdict)
    r = None  when no verifier gave a verdict, or the sandbox could not run them

A verdict is ``True`` or ``False`` returned by ``evaluate``. A verifier that does not define ``evaluate``,
raises, returns a non-bool or runs over ``per_verifier_timeout_s`` gives no verdict: the verifier is
broken, which says nothing about the response, so it is left out rather than counted as a failure.

Columns read: ``verifiers`` (a list of Python sources, or one source str), configurable. The response
reaches ``evaluate`` through stdin, never pasted into code.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from reward.base import Prompt, RewardOutput
from reward.code_reward import read_reports
from reward.compose import register_reward
from reward.sandbox import Sandbox, SandboxConfig, SandboxJob, SandboxResult, Status

_HARNESS = """\
def _harness():
    import json, os, signal, sys

    channel = os.dup(1)
    nonce = {nonce!r}
    response = json.loads(sys.stdin.read())

    def report(**fields):
        os.write(channel, ("\\n" + nonce + " " + json.dumps(fields) + "\\n").encode())

    def on_alarm(signum, frame):
        raise TimeoutError("over the per-verifier time limit")

    signal.signal(signal.SIGALRM, on_alarm)
    for i, source in enumerate({verifiers!r}):
        signal.setitimer(signal.ITIMER_REAL, {per_verifier})
        try:
            namespace = {{"__name__": "verifier"}}
            exec(compile(source, "verifier_%d.py" % i, "exec"), namespace)
            if not callable(namespace.get("evaluate")):
                raise NameError("the verifier defines no evaluate(response)")
            verdict = namespace["evaluate"](response)
            if not isinstance(verdict, bool):
                raise TypeError("evaluate returned %s, not a bool" % type(verdict).__name__)
            report(verifier=i, verdict=verdict)
        except BaseException as e:
            report(verifier=i, error=(type(e).__name__ + ": " + str(e))[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


_harness()
"""


def verdicts_program(verifiers: Sequence[str], per_verifier_timeout_s: float) -> tuple[str, str]:
    """The sandbox program that runs each verifier's ``evaluate`` on the response read from stdin and reports
    one verdict (or error) per verifier, tagged with a fresh nonce (``read_reports(stdout, nonce)``).
    -> (program, nonce). AutoIF's cross-validation (data_synthesis/autoif.py) reads the verdicts one by one."""
    nonce = secrets.token_hex(16)
    program = _HARNESS.format(nonce=nonce, verifiers=list(verifiers), per_verifier=per_verifier_timeout_s)
    return program, nonce


def _row_verifiers(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise ValueError(f"verifiers must be a non-empty list of Python sources, got {value!r:.100}")
    return list(value)


@register_reward("verifier")
class VerifierReward:
    """Share of the row's generated verifiers that accept the completion; see the module docstring.

    Like ``CodeReward``, construction raises where the sandbox lacks a required layer, unless
    ``allow_weak_isolation=True``.
    """

    name = "verifier"

    def __init__(
        self,
        verifiers_column: str = "verifiers",
        timeout_s: float = 10.0,
        per_verifier_timeout_s: float = 2.0,
        memory_mb: int = 512,
        max_workers: int = 2,
        allow_weak_isolation: bool = False,
        sandbox: Sandbox | None = None,
    ) -> None:
        if per_verifier_timeout_s <= 0:
            raise ValueError(
                f"VerifierReward: per_verifier_timeout_s must be positive, got {per_verifier_timeout_s}"
            )
        self.verifiers_column = verifiers_column
        self.per_verifier_timeout_s = per_verifier_timeout_s
        # Refuses to start without the sandbox's required layers unless allow_weak_isolation (see CodeReward).
        self.sandbox = sandbox or Sandbox(
            SandboxConfig(
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                max_workers=max_workers,
                allow_weak_isolation=allow_weak_isolation,
            )
        )

    def __call__(
        self, prompts: Sequence[Prompt], completions: Sequence[str], **columns: Sequence[Any]
    ) -> RewardOutput:
        n = len(completions)
        if self.verifiers_column not in columns:
            reason = (
                f"no column {self.verifiers_column!r} with the verifier sources (columns: {sorted(columns)})"
            )
            return RewardOutput([None] * n, [reason] * n)
        out: list[tuple[float | None, str | None, dict]] = [(None, None, {})] * n
        jobs, plans = [], {}
        for i, (completion, value) in enumerate(zip(completions, columns[self.verifiers_column])):
            try:
                verifiers = _row_verifiers(value)
            except ValueError as e:
                out[i] = (None, f"bad verifier data: {e}", {})
                continue
            program, nonce = verdicts_program(verifiers, self.per_verifier_timeout_s)
            jobs.append(SandboxJob(program, stdin=json.dumps(completion or "")))
            plans[i] = (nonce, len(verifiers))
        for i, result in zip(plans, self.sandbox.run_many(jobs)):
            out[i] = self._score(result, *plans[i])
        return RewardOutput([s for s, _, _ in out], [r for _, r, _ in out], [d for _, _, d in out])

    def _score(self, result: SandboxResult, nonce: str, total: int) -> tuple[float | None, str | None, dict]:
        if result.status is Status.ERROR:
            return (
                None,
                f"the sandbox could not run the verifiers: {result.reason}",
                {"status": str(result.status)},
            )
        verdicts = {r["verifier"]: r["verdict"] for r in read_reports(result.stdout, nonce) if "verdict" in r}
        errors = [r["error"] for r in read_reports(result.stdout, nonce) if "error" in r]
        detail = {
            "status": str(result.status),
            "verdicts": len(verdicts),
            "total": total,
            "errors": errors[:3],
        }
        if not verdicts:
            why = errors[0] if errors else result.reason or "no verifier reported"
            return None, f"no verifier gave a verdict ({why})", detail
        return sum(verdicts.values()) / len(verdicts), None, detail
