"""The whole post-training chain as one run: data -> SFT -> reward model -> offline DPO -> online DPO, an
evaluation after every stage (and of the start model), and a report at the end.

    python -m alignment.chain recipes/chain.yaml [key=value ...]        (or: make chain)
    python -m alignment.chain recipes/chain_adamw.yaml                  (or: make chain-adamw)
    python -m alignment.chain recipes/chain.yaml stages.dpo.extra_overrides=[loss.beta=0.2]

Tiny CPU smoke run (tiny-qwen2, two steps a stage, no evaluation; about a minute on 2 cores):

    python -m alignment.chain recipes/chain_smoke.yaml            (or: make chain-smoke)

The runner knows nothing about what a stage does. A stage is a command (a launcher and its arguments), the
stage's own recipe with the chain's overrides, the files it reads (``inputs``), the stages it builds on
(``needs``) and the files of its folder that stand for its result (``outputs``). Each stage owns the folder
``<run_dir>/<stage>``:

    stage.json     the record of what went in (command, resolved config, input file hashes, the fingerprints of
                   the stages it needs), whether it finished, its wall time and the hashes of its outputs
    config.yaml    the stage's recipe with the chain's overrides applied: the file its command reads
    log.txt        its stdout and stderr, also streamed to the console
    ...            what the stage itself writes (model, checkpoints, metrics.jsonl, summary.json, recipe.yaml)
    eval.json      the evaluation of the stage's model (eval.stage.json, eval.config.yaml, eval.log.txt beside it)

and ``<run_dir>`` itself holds ``chain.yaml`` (the resolved chain), ``start/`` (the start model's evaluation),
``report.md`` and ``plots/``.

A rerun skips a step whose record matches what would go in now and whose outputs still hash as recorded.
A stage whose inputs changed starts again in an emptied folder; the steps after it follow, since their
records hold its fingerprint. A stage that stopped without finishing (an error, kill -9) and left a checkpoint
resumes from it (``resume_overrides``: ``training.resume_from_checkpoint=latest``). A failing step stops the
chain with its exit code and last line; everything before it stays. ``<run_dir>/chain.lock`` keeps a second
chain (or a new one beside a stage that a killed chain left running) out of the folder.

Deliberate simplifications: stages run one after another in the recipe's order; a record compares the
resolved recipe as written (a default changed in code does not rerun a stage); evaluations wait until the
stages they need (the SFT reference, the reward model judge; the start model's only the judge, by
``start_eval_needs``) exist, so the start model is evaluated after the reward stage; a stage resumes only if
its own recipe saves checkpoints (``training.save_steps``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alignment.config import ConfigError, apply_override, build, describe, load_yaml, run_cli, to_dict
from alignment.fast_malloc import NO_TCMALLOC, preload_env

REPO = Path(__file__).resolve().parents[1]
START = "start"  # the folder of the start model's evaluation; no stage may take this name


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LaunchConfig:
    """``python <args>``, or ``accelerate launch [--config_file F] [--multi_gpu --num_processes N] <args>``."""

    launcher: Literal["python", "accelerate"] = "python"
    config_file: str | None = None
    # More than one process without a config file adds --multi_gpu (gloo on a CPU machine).
    num_processes: int | None = None


@dataclass
class StepConfig:
    """One command of the chain. In strings, ``${run}`` is the run folder, ``${stage_dir}`` the step's folder,
    ``${start_model}`` the chain's start model and (evaluations only) ``${model}`` the model evaluated."""

    # What follows the launcher: an entry script (alignment/sft.py) or ``-m module`` and its options.
    args: list[str]
    # The step's own recipe; the chain writes it with ``overrides`` applied to the step's config file and
    # appends that file's path to the command.
    recipe: str | None = None
    # ``key=value`` on the recipe. Nested lists are flattened, so a YAML anchor can share a list of overrides.
    overrides: list[str | list[str]] = field(default_factory=list)
    # Applied after ``overrides``: a few keys changed from the command line or an overlay without repeating the
    # list, e.g. ``stages.sft.extra_overrides=[training.max_steps=2]``.
    extra_overrides: list[str] = field(default_factory=list)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    enabled: bool = True
    # Stages whose results this step builds on: their fingerprints go into its record.
    needs: list[str] = field(default_factory=list)
    # Files whose content this step depends on (hashed into its record).
    inputs: list[str] = field(default_factory=list)
    # Files of the step's folder that stand for its result: hashed when it finishes, checked before a skip.
    outputs: list[str] = field(default_factory=list)
    # A stopped step that left a file matching ``checkpoint_glob`` in its folder reruns with these overrides.
    resume_overrides: list[str] = field(default_factory=lambda: ["training.resume_from_checkpoint=latest"])
    checkpoint_glob: str = "checkpoint-*/trainer_state.json"

    def __post_init__(self) -> None:
        flat: list[str] = []
        for item in self.overrides:
            flat += item if isinstance(item, list) else [item]
        self.overrides = flat


@dataclass
class StageConfig(StepConfig):
    # Run the chain's evaluation on this stage's folder as a model once the stage is done.
    evaluate: bool = True


@dataclass
class ChainConfig:
    run_dir: str = "outputs/chain"
    start_model: str = "smollm2-135m-instruct"
    # In order. The name is the stage's folder under run_dir.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    # The evaluation after every stage (and of the start model); null or enabled: false for none.
    eval: StepConfig | None = None
    # The start model's evaluation: these overrides after eval's, and these needs instead of eval's (null:
    # eval's). E.g. [reference_model=null] with needs [reward]: no KL to a stage the start model comes before.
    start_eval_overrides: list[str] = field(default_factory=list)
    start_eval_needs: list[str] | None = None
    # Write <run_dir>/report.md at the end (alignment/report.py).
    report: bool = True

    def __post_init__(self) -> None:
        names = list(self.stages)
        for i, (name, stage) in enumerate(self.stages.items()):
            if not re.fullmatch(r"[a-z0-9_]+", name) or name == START:
                raise ValueError(
                    f"stage name {name!r}: use lowercase letters, digits and _ (and not {START!r})"
                )
            for need in stage.needs:
                if need not in names[:i]:
                    raise ValueError(f"stages.{name}.needs: {need!r} is not a stage before {name}")
        for key, needs in (("eval.needs", self.eval.needs if self.eval else []),
                           ("start_eval_needs", self.start_eval_needs or [])):  # fmt: skip
            for need in needs:
                if need not in names:
                    raise ValueError(f"{key}: {need!r} is not a stage")


@dataclass
class ChainOverlayConfig:
    """A chain recipe written as another chain recipe plus overrides (recipes/chain_adamw.yaml)."""

    # The chain recipe this one changes, relative to this file.
    base: str
    overrides: list[str] = field(default_factory=list)


def load_chain_data(path: str | Path) -> dict[str, Any]:
    """A chain recipe as plain data; an overlay (``base:`` + ``overrides:``) is its base with the overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    data = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    if "base" not in data:
        return data
    overlay = build(ChainOverlayConfig, data, str(path))
    base = load_chain_data(path.parent / overlay.base)
    for ov in overlay.overrides:
        apply_override(base, ov, f"{path} (override {ov.split('=', 1)[0]})")
    return base


def load_chain(path: str | Path, overrides: list[str] = ()) -> ChainConfig:
    data = load_chain_data(path)
    for ov in overrides:
        apply_override(data, ov, f"command line (override {ov.split('=', 1)[0]})")
    return build(ChainConfig, data, str(path))


# --------------------------------------------------------------------------------------------------------------
# Steps: what runs, with every path and variable resolved
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """A stage, or the evaluation of one (``<stage>.eval``). Its files in ``dir`` start with ``prefix``."""

    name: str
    dir: Path
    prefix: str  # "" for a stage, "eval." for an evaluation
    spec: StepConfig
    variables: dict[str, str]
    needs: list[str]

    def file(self, name: str) -> Path:
        return self.dir / f"{self.prefix}{name}"

    def sub(self, text: str) -> str:
        try:
            return string.Template(text).substitute(self.variables)
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"chain step {self.name}: {text!r}: unknown or malformed variable {e}"
            ) from None

    def resolved_config(self) -> dict[str, Any] | None:
        """The step's recipe with the chain's overrides applied, or None for a step without a recipe."""
        if self.spec.recipe is None:
            return None
        recipe = Path(self.spec.recipe)
        if not recipe.is_file():
            raise ConfigError(f"chain step {self.name}: recipe {recipe} not found")
        data = load_yaml(recipe.read_text(), str(recipe)) or {}
        for ov in [*self.spec.overrides, *self.spec.extra_overrides]:
            apply_override(data, self.sub(ov), f"chain step {self.name} (override {ov.split('=', 1)[0]})")
        return data

    def command(self, extra: list[str] = ()) -> list[str]:
        """The command as a user would type it (``python``, ``accelerate launch``)."""
        launch = self.spec.launch
        words = ["python"]
        if launch.launcher == "accelerate":
            words = ["accelerate", "launch"]
            if launch.config_file:
                words += ["--config_file", launch.config_file]
            if launch.num_processes:
                words += ([] if launch.config_file or launch.num_processes == 1 else ["--multi_gpu"]) + [
                    "--num_processes",
                    str(launch.num_processes),
                ]
        words += [self.sub(a) for a in self.spec.args]
        if self.spec.recipe is not None:
            words.append(str(self.file("config.yaml")))
        return words + list(extra)


def plan(cfg: ChainConfig) -> list[Step]:
    """Every stage (a disabled one lends its finished record), then the evaluations: the start model's and one
    per enabled stage with ``evaluate``."""
    run = Path(cfg.run_dir)
    common = {"run": str(run), "start_model": cfg.start_model}
    steps = [
        Step(name, run / name, "", stage, {**common, "stage_dir": str(run / name)}, list(stage.needs))
        for name, stage in cfg.stages.items()
    ]
    if cfg.eval is None or not cfg.eval.enabled:
        return steps
    evaluated = [(START, cfg.start_model)] + [
        (s.name, str(s.dir)) for s in steps if s.spec.enabled and s.spec.evaluate
    ]
    for name, model in evaluated:
        variables = {**common, "stage_dir": str(run / name), "model": model}
        spec, needs = cfg.eval, list(dict.fromkeys([*cfg.eval.needs, name]))
        if name == START:  # its own overrides after eval's, and its own needs
            spec = dataclasses.replace(
                spec, extra_overrides=[*spec.extra_overrides, *cfg.start_eval_overrides]
            )
            needs = list(cfg.eval.needs if cfg.start_eval_needs is None else cfg.start_eval_needs)
        steps.append(Step(f"{name}.eval", run / name, "eval.", spec, variables, needs))
    return steps


def check_configs(steps: list[Step]) -> None:
    """Check each resolved recipe with its entry point's schema before anything runs (a typo in the last
    stage's override fails now, not after the first stages' hours)."""
    from alignment.recipes import SCHEMAS, schema_for

    recipes = REPO / "recipes"
    for step in steps:
        if not step.spec.enabled:
            continue
        data = step.resolved_config()
        if data is None:
            continue
        path = Path(step.spec.recipe).resolve()
        if path.is_relative_to(recipes) and path.relative_to(recipes).as_posix() in SCHEMAS:
            build(schema_for(path), data, f"chain step {step.name} ({step.spec.recipe} + overrides)")


# --------------------------------------------------------------------------------------------------------------
# Records: what went into a step, and whether it finished
# --------------------------------------------------------------------------------------------------------------


class StepFailed(Exception):
    def __init__(self, step: Step, code: int, message: str):
        super().__init__(f"{step.name}: {message}")
        self.step, self.code, self.message = step, code, message


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def inputs_of(step: Step, fingerprints: dict[str, str | None]) -> dict[str, Any]:
    """What goes into a step. Its record keeps these; a change in any of them runs the step again."""
    missing = [n for n in step.needs if fingerprints.get(n) is None]
    if missing:
        raise StepFailed(step, 2, f"needs {', '.join(missing)}, which has no finished record in this run")
    files = {}
    for name in step.spec.inputs:
        path = Path(step.sub(name))
        if not path.is_file():
            raise StepFailed(step, 2, f"input {path} is missing")
        files[str(path)] = sha256_file(path)
    return {
        "command": step.command(),
        "config": step.resolved_config(),
        "files": files,
        "upstream": {n: fingerprints[n] for n in step.needs},
    }


def outputs_of(step: Step) -> dict[str, str] | None:
    """The hashes of the step's declared outputs, or None while one is missing."""
    hashes = {}
    for name in step.spec.outputs:
        path = step.dir / step.sub(name)
        if not path.is_file():
            return None
        hashes[name] = sha256_file(path)
    return hashes


def read_record(step: Step) -> dict[str, Any] | None:
    path = step.file("stage.json")
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(step: Step, record: dict[str, Any]) -> None:
    path = step.file("stage.json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)  # a kill between the two leaves the old record whole


def finished_fingerprint(step: Step) -> str | None:
    """A disabled stage's result: its record's fingerprint while the record says done and its outputs hash
    as recorded."""
    record = read_record(step)
    if record and record["status"] == "done" and outputs_of(step) == record["outputs"]:
        return record["fingerprint"]
    return None


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[chain] {text}", flush=True)


def executable(command: list[str]) -> list[str]:
    """``python`` is this interpreter and ``accelerate launch`` its accelerate, whatever PATH holds."""
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *command[2:]]
    return command


def lock_run_dir(run_dir: Path) -> int:
    """Hold ``<run_dir>/chain.lock`` (a file descriptor, released when it closes). Every stage process holds it
    too, so a chain killed with -9 keeps its folder locked until the stage it left running ends."""
    import fcntl

    fd = os.open(run_dir / "chain.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(
            f"error: {run_dir} is in use by another chain, or by a stage a killed chain left running; "
            "wait for it or stop it first"
        ) from None
    return fd


def execute(command: list[str], log_path: Path, append: bool, lock: int) -> tuple[int, str]:
    """Run ``command`` with its output streamed to the console and to ``log_path``; (exit code, last line)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail: deque[str] = deque(maxlen=64)  # the last chunks, for the failure message
    with open(log_path, "ab" if append else "wb") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        try:
            proc = subprocess.Popen(
                executable(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Every stage on tcmalloc where there is one (alignment/fast_malloc.py): same results, faster.
                env=preload_env({**os.environ, "PYTHONUNBUFFERED": "1"}),
                pass_fds=(lock,),
            )
        except OSError as e:
            return 127, f"cannot start {command[0]}: {e}"
        # read1: whatever is there, so progress bars (\r without \n) still stream.
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log.write(chunk)
            log.flush()
            text = decoder.decode(chunk)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail.append(text)
        code = proc.wait()
    if tail and not tail[-1].endswith("\n"):
        print(flush=True)  # our next line starts on its own
    lines = [line.strip() for line in re.split(r"[\r\n]", "".join(tail)) if line.strip()]
    # A signal (kill -9) reads as the shell's 128 + signal number.
    return (128 - code if code < 0 else code), (lines[-1] if lines else "")


def fresh_start(step: Step, record: dict[str, Any] | None) -> None:
    """A stage starts in an emptied folder (no stale checkpoints or metrics); an evaluation loses its output."""
    if step.prefix:
        for name in step.spec.outputs:
            (step.dir / step.sub(name)).unlink(missing_ok=True)
        return
    if step.dir.exists() and any(step.dir.iterdir()):
        if record is None:
            raise StepFailed(
                step, 2, f"{step.dir} holds files the chain did not make (no stage.json); move them away"
            )
        shutil.rmtree(step.dir)


def run_step(step: Step, fingerprints: dict[str, str | None], lock: int) -> str:
    """Skip, resume or run one step; its fingerprint (the hash of its inputs and outputs)."""
    inputs = inputs_of(step, fingerprints)
    key = sha256_json(inputs)
    record = read_record(step)
    same = record is not None and record["key"] == key
    if same and record["status"] == "done" and outputs_of(step) == record["outputs"]:
        say(f"{step.name}: up to date, skipped (record: {step.file('stage.json')})")
        return record["fingerprint"]
    resume = same and record["status"] != "done" and any(step.dir.glob(step.spec.checkpoint_glob))
    if not resume:
        fresh_start(step, record)
    step.dir.mkdir(parents=True, exist_ok=True)
    if inputs["config"] is not None:
        step.file("config.yaml").write_text(yaml.safe_dump(inputs["config"], sort_keys=False))
    command = step.command(step.spec.resume_overrides if resume else [])
    before = record.get("seconds", 0.0) if resume else 0.0  # a resumed step's cost includes the stopped run's
    record = {"name": step.name, "key": key, "status": "running", "resumed": resume, "command": command}
    record |= {"started": datetime.datetime.now().isoformat(timespec="seconds"), "inputs": inputs}
    write_record(step, record)
    say(f"{step.name}: {'resuming from its checkpoint' if resume else 'running'}: {' '.join(command)}")
    start = time.time()
    code, last_line = execute(command, step.file("log.txt"), resume, lock)
    record |= {"seconds": before + time.time() - start, "exit_code": code}
    outputs = outputs_of(step) if code == 0 else None
    if code == 0 and outputs is None:
        code, last_line = 1, f"exited 0 but did not write all of {step.spec.outputs} in {step.dir}"
    if code != 0:
        write_record(step, record | {"status": "failed", "message": last_line})
        raise StepFailed(step, code, last_line)
    fingerprint = sha256_json({"key": key, "outputs": outputs})
    write_record(step, record | {"status": "done", "outputs": outputs, "fingerprint": fingerprint})
    say(f"{step.name}: done in {record['seconds']:.0f} s")
    return fingerprint


def run(cfg: ChainConfig) -> int:
    """Run the chain; 0, or the exit code of the step that failed."""
    steps = plan(cfg)
    check_configs(steps)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir)
    try:
        return run_steps(cfg, steps, lock)
    finally:
        os.close(lock)


def run_steps(cfg: ChainConfig, steps: list[Step], lock: int) -> int:
    run_dir = Path(cfg.run_dir)
    (run_dir / "chain.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    preloaded = [p for p in preload_env().get("LD_PRELOAD", "").split(":") if "tcmalloc" in p]
    say(
        f"stages run on tcmalloc ({preloaded[0]})"
        if preloaded
        else f"stages run on glibc's malloc ({NO_TCMALLOC})"
    )
    stages = [s for s in steps if not s.prefix]
    evaluations = [s for s in steps if s.prefix]
    fingerprints = {s.name: finished_fingerprint(s) for s in stages if not s.spec.enabled}
    try:
        for stage in [None, *[s for s in stages if s.spec.enabled]]:
            if stage is not None:
                fingerprints[stage.name] = run_step(stage, fingerprints, lock)
            # Evaluations run as soon as what they need exists (the start model's waits for the judge).
            for ev in [e for e in evaluations if all(fingerprints.get(n) for n in e.needs)]:
                run_step(ev, fingerprints, lock)
                evaluations.remove(ev)
    except StepFailed as e:
        print(f"error: chain stopped at {e.step.name} (exit {e.code}): {e.message}", file=sys.stderr)
        if e.step.file("log.txt").is_file():
            print(f"  log: {e.step.file('log.txt')}; what finished before it is kept", file=sys.stderr)
        return e.code
    for ev in evaluations:
        say(f"{ev.name}: not run; it needs {', '.join(ev.needs)}, not all of which finished")
    if cfg.report:
        from alignment.report import write_report

        say(f"report: {write_report(run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(
            "usage: python -m alignment.chain recipes/chain.yaml [key=value ...]\n"
            f"schema: ChainConfig\n{describe(ChainConfig)}"
        )
    code = run(load_chain(argv[0], argv[1:]))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    run_cli(main)
