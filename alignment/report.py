"""The chain's report: ``<run>/report.md`` with PNG plots of what each stage bought and what it cost.

    python -m alignment.report outputs/chain          (the chain writes it at its end)
    python -m alignment.report compare A/eval.json B/eval.json   (two evaluations, prompt by prompt)
    python -m alignment.report compare outputs/online_dpo/eval_start.json outputs/online_dpo/eval_end.json

It reads files only, from each folder of the run (the start model's evaluation is the folder ``start``):
``stage.json`` / ``eval.stage.json`` (status and wall time), ``metrics.jsonl`` (training curves: loss,
rewards/margins, the reward model's margin and held-out accuracy, online DPO's scores, pair fraction and KL),
``eval.json`` (the evaluation after the stage, with its math accuracy per task), ``eval.answers.jsonl`` (its
greedy answers: which math answers the stage turned right or wrong, and where the judge's verdict against the
start model rose or fell, each with a sign test, and how the judge's score of the answers moved, with the
sign-flip test) and ``summary.json`` (held-out numbers a
stage measured itself, such as the reward model's pair accuracy). A metric a stage did not report is shown as missing, never as 0.
Plots go to ``<run>/plots/`` (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from alignment.stats import paired_difference, sign_test

# Training curves, in this order, for every stage that logged them.
CURVES = (
    "loss",
    "rewards/margins",
    "margin",
    "eval/accuracy",
    "objective/scores",
    "online/pair_fraction",
    "objective/kl",
)
MISSING = "missing"
START = "start"

Table = dict[str, dict[str, float | None]]  # metric -> stage -> value (None: missing)


# --------------------------------------------------------------------------------------------------------------
# Reading the run
# --------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def stage_names(run: Path) -> list[str]:
    """The start model, then the chain's stages in its order (``<run>/chain.yaml``), then any other folder
    that holds a stage's files."""
    chain = read_yaml(run / "chain.yaml")
    listed = list((chain or {}).get("stages") or {})
    others = sorted(p.name for p in run.iterdir() if p.is_dir())
    names = dict.fromkeys([START, *listed, *others])
    marks = ("stage.json", "eval.json", "metrics.jsonl", "summary.json")
    return [n for n in names if any((run / n / m).is_file() for m in marks)]


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_curves(path: Path) -> tuple[dict[str, tuple[list[int], list[float]]], int]:
    """metric -> (steps, values) from a metrics.jsonl, and the number of unreadable lines left out (a kill
    can cut a line short). A resumed run logs the steps after its checkpoint again: the last value wins."""
    by_step: dict[str, dict[int, float]] = {}
    unreadable = 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                by_step.setdefault(key, {})[int(row["step"])] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_step.items()}, unreadable


def metric_table(run: Path, stages: list[str], file: str, prefix: str = "") -> Table:
    """metric -> stage -> value, over the numbers of ``<stage>/<file>`` whose names start with ``prefix``."""
    found = {s: read_json(run / s / file) or {} for s in stages}
    metrics = dict.fromkeys(
        k
        for values in found.values()
        for k, v in values.items()
        if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)
    )
    # Times after the metrics and the total last, whichever stage had a metric first (the start model's
    # evaluation may skip one).
    ordered = sorted(metrics, key=lambda m: (m.startswith("time/"), m == "time/total"))
    return {m: {s: _number(found[s].get(m)) for s in stages} for m in ordered}


def task_table(run: Path, stages: list[str]) -> Table:
    """task -> stage -> math accuracy, from each ``eval.json``'s ``math_by_task``."""
    found = {s: (read_json(run / s / "eval.json") or {}).get("math_by_task") or {} for s in stages}
    tasks = sorted(set().union(*found.values()))
    return {t: {s: _number(found[s].get(t)) for s in stages} for t in tasks}


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The rows of an answers file (``eval.answers.jsonl``); a cut-short line is left out, a missing file is []."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a cut-short line: that answer is left out of the counts
    return rows


def answers_path(result_path: Path) -> Path:
    """Where an evaluation writes its answers beside its JSON: eval.json -> eval.answers.jsonl."""
    return result_path.with_name(result_path.stem + ".answers.jsonl")


def answers_beside(result_path: Path) -> Path:
    """The answers file an evaluation's JSON names (``answers``), beside it; an answers file is itself."""
    if result_path.suffix == ".jsonl":
        return result_path
    named = (read_json(result_path) or {}).get("answers")
    return result_path.parent / str(named) if named else answers_path(result_path)


def math_verdicts(rows: list[dict[str, Any]]) -> dict[int, bool]:
    """Row of the held-out math set -> was the greedy answer right."""
    return {
        int(row["row"]): row["correct"]
        for row in rows
        if row.get("set") == "math" and isinstance(row.get("correct"), bool)
    }


def judge_verdicts(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(set, row) -> the judge's verdict on the answer against the start model's (``win``: 1, 0.5, 0), where the
    evaluation recorded one."""
    return {
        (row["set"], int(row["row"])): float(row["win"])
        for row in rows
        if isinstance(row.get("win"), int | float) and not isinstance(row.get("win"), bool)
    }


def judge_readings(rows: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[float, float | None]]:
    """(set, row) -> the judge's verdict against the start model's answer (``judge_verdicts``) and its score of
    the answer (``judge_score``; None in answers files written before the evaluation recorded it)."""
    scores = {(row["set"], int(row["row"])): _number(row.get("judge_score")) for row in rows if "set" in row}
    return {key: (win, scores.get(key)) for key, win in judge_verdicts(rows).items()}


def math_moves(before: dict[int, bool], after: dict[int, bool]) -> dict[str, Any]:
    """Answers turned right (``gained``) and wrong (``lost``) on the prompts both were read on, and the sign
    test of the two."""
    rows = sorted(set(before) & set(after))
    gained = sum(not before[r] and after[r] for r in rows)
    lost = sum(before[r] and not after[r] for r in rows)
    kept = sum(before[r] and after[r] for r in rows)
    return {"prompts": len(rows), "gained": gained, "lost": lost, "kept": kept, "p": sign_test(gained, lost)}


def verdict_moves(before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    """Prompts whose judge's verdict rose (a loss became a tie or a win, a tie a win) or fell, the two win rates
    on the prompts both have a verdict for, and the sign test of up against down."""
    keys = sorted(set(before) & set(after))
    up = sum(after[k] > before[k] for k in keys)
    down = sum(after[k] < before[k] for k in keys)
    rate = [sum(v[k] for k in keys) / len(keys) if keys else None for v in (before, after)]
    return {"prompts": len(keys), "up": up, "down": down, "before": rate[0], "after": rate[1],
            "p": sign_test(up, down)}  # fmt: skip


def judge_moves(before: dict[Any, tuple], after: dict[Any, tuple]) -> dict[str, Any]:
    """``verdict_moves`` of the verdicts, plus ``score``: the judge's score of each answer after minus before,
    on the prompts both have a score for, with the sign-flip test (``alignment.stats.paired_difference``); None
    where no prompt has a score in both. The verdicts only say whether an answer beats the start model's; the
    scores keep by how much the judge prefers it, so the same preference can read more surely (an answer the
    stage left unchanged scores the same and adds 0)."""
    moves = verdict_moves({k: v[0] for k, v in before.items()}, {k: v[0] for k, v in after.items()})
    keys = sorted(k for k in set(before) & set(after) if before[k][1] is not None and after[k][1] is not None)
    moves["score"] = paired_difference([after[k][1] - before[k][1] for k in keys]) if keys else None
    return moves


def score_cells(score) -> list[str]:
    if score is None:
        return ["-", "-"]
    return [f"{score.mean:+.3f} ± {score.se:.3f}", f"{score.p:.2g}"]


def source_stage(run: Path, stage: str, earlier: list[str]) -> str:
    """The stage whose model ``stage`` started from: its ``config.yaml``'s ``model.name_or_path`` when that is
    an earlier stage's folder of this run (dpo_rs -> sft, online_dpo_adamw -> dpo), else the stage evaluated
    just before it (sft -> start, whose model is the start model, not a folder of the run)."""
    config = read_yaml(run / stage / "config.yaml")
    source = ((config or {}).get("model") or {}).get("name_or_path")
    if isinstance(source, str):
        folder = Path(source).resolve()
        for name in reversed(earlier):
            if folder == (run / name).resolve():
                return name
    return earlier[-1]


def moves_table(
    run: Path, stages: list[str], verdicts: dict, moves, head: list[str], columns: list[str], cells
):
    """One row per stage evaluated after another, against the stage whose model it started from
    (``source_stage``): ``cells(moves(verdicts[before], verdicts[after]))`` under ``columns``; [] with fewer than
    two stages that have verdicts."""
    stages = [s for s in stages if verdicts[s]]
    if len(stages) < 2:
        return []
    lines = [
        *head,
        "",
        "| from | to | " + " | ".join(columns) + " |",
        "| --- | --- |" + " ---: |" * len(columns),
    ]
    for i, after in enumerate(stages[1:], start=1):
        before = source_stage(run, after, stages[:i])
        row = cells(moves(verdicts[before], verdicts[after]))
        lines.append(f"| {before} | {after} | " + " | ".join(row) + " |")
    return lines + [""]


def flips_section(run: Path, stages: list[str]) -> list[str]:
    """How many held-out math answers each stage turned right or wrong against the stage whose model it
    started from, and how many the judge now prefers more or less: a change of a few points is many answers
    moving both ways, or few moving one way. The sign test's p says how often a coin would split the changed
    answers at least that unevenly."""
    rows = {s: read_answers(answers_beside(run / s / "eval.json")) for s in stages}
    math_head = [
        "## Which math answers each stage changed",
        "",
        "Greedy answers to the held-out math prompts, against the model the stage started from "
        "(`eval.answers.jsonl`); p: the two-sided sign test of wrong -> right against right -> wrong.",
    ]
    math_columns = ["prompts", "wrong -> right", "right -> wrong", "right in both", "net", "p (sign test)"]
    judge_head = [
        "## Which answers the judge prefers after each stage",
        "",
        "The reward model's verdict on each stage's answer against the start model's answer to the same "
        "prompt (`win` in `eval.answers.jsonl`: win 1, tie 0.5, loss 0), against the model the stage started "
        "from: prompts whose verdict rose (a loss became a tie or a win, a tie a win) or fell; p: the "
        "two-sided sign test of the two. The judge's score of each answer (`judge_score`), after minus before: "
        "its mean a prompt ± its standard error, and p of the sign-flip permutation test "
        "(`alignment.stats.paired_difference`); the scores keep how much the judge prefers an answer, which the "
        "verdicts drop.",
    ]
    judge_columns = [
        "prompts",
        "verdict up",
        "verdict down",
        "win rate before",
        "win rate after",
        "p (sign test)",
        "judge's score change",
        "p (sign flips)",
    ]
    return moves_table(
        run, stages, {s: math_verdicts(rows[s]) for s in stages}, math_moves, math_head, math_columns,
        lambda m: [str(m["prompts"]), str(m["gained"]), str(m["lost"]), str(m["kept"]),
                   f"{m['gained'] - m['lost']:+d}", f"{m['p']:.2g}"],
    ) + moves_table(
        run, stages, {s: judge_readings(rows[s]) for s in stages}, judge_moves, judge_head, judge_columns,
        lambda v: [str(v["prompts"]), str(v["up"]), str(v["down"]), fmt(v["before"]), fmt(v["after"]),
                   f"{v['p']:.2g}", *score_cells(v["score"])],
    )  # fmt: skip


def compare(before: str | Path, after: str | Path) -> list[str]:
    """Two evaluations of the same prompts, prompt by prompt. Each is an ``eval.json`` or its answers file: the
    math answers turned right and wrong, and the judge's verdicts risen and fallen, each with its sign test. Or
    each is online DPO's ``eval_start.json`` / ``eval_end.json``: ``held_out_change`` of their rows, as the run
    printed it at its end."""
    saved = [read_json(Path(p)) if Path(p).suffix == ".json" else None for p in (before, after)]
    if all(isinstance(x, dict) and "rows" in x for x in saved):
        change = logged_change(saved[0]["rows"], saved[1]["rows"])
        text = describe_change(saved[0].get("figures", {}), saved[1].get("figures", {}), change, prefix="")
        return text.splitlines() or ["no prompt was judged in both"]
    rows = [read_answers(answers_beside(Path(p))) for p in (before, after)]
    for p, r in zip((before, after), rows):
        if not r:
            raise FileNotFoundError(f"{p}: no answers (an eval.json with its eval.answers.jsonl beside it)")
    lines = []
    m = math_moves(math_verdicts(rows[0]), math_verdicts(rows[1]))
    if m["prompts"]:
        lines.append(
            f"math ({m['prompts']} prompts): {m['gained']} wrong -> right, {m['lost']} right -> wrong, "
            f"net {m['gained'] - m['lost']:+d}, sign test p = {m['p']:.2g}"
        )
    v = judge_moves(judge_readings(rows[0]), judge_readings(rows[1]))
    if v["prompts"]:
        lines.append(
            f"judge's verdict against the start model ({v['prompts']} prompts): {v['up']} up, {v['down']} down, "
            f"win rate {fmt(v['before'])} -> {fmt(v['after'])}, sign test p = {v['p']:.2g}"
        )
    if v["score"] is not None:
        d = v["score"]
        lines.append(
            f"judge's score ({d.n} prompts): {d.mean:+.3f} ± {d.se:.3f} a prompt ({d.up} up, {d.down} down), "
            f"sign-flip test p = {d.p:.2g}"
        )
    return lines or ["no prompt has a verdict in both (math `correct` or the judge's `win`)"]


def held_out_change(before: list[dict], after: list[dict]) -> dict[str, float]:
    """Two evaluations of the same held-out prompts, prompt by prompt (rows ``{"prompt", "greedy_right",
    "reward"}`` in the same order; None where a prompt was not judged):

    - greedy math: answers turned right and turned wrong, with the exact sign test of the two counts;
    - fresh samples: each prompt's mean reward after minus before, their mean with its standard error, the
      prompts whose mean rose and fell, and the sign-flip permutation test of the mean change
      (``alignment.stats.paired_difference``): ``mean_reward_*`` for the composed reward (``reward``), and
      ``reward/<label>_*`` for each component the rows carry (``reward/<label>``).

    Rows whose prompts differ are refused (ValueError naming the first): the comparison would be meaningless."""
    if len(before) != len(after):
        raise ValueError(f"held_out_change: {len(before)} prompts before, {len(after)} after")
    for i, (b, a) in enumerate(zip(before, after)):
        if b["prompt"] != a["prompt"]:
            raise ValueError(f"held_out_change: prompt {i + 1} differs between the two evaluations")
    out: dict[str, float] = {}
    moved = [
        (b["greedy_right"], a["greedy_right"])
        for b, a in zip(before, after)
        if b.get("greedy_right") is not None and a.get("greedy_right") is not None
    ]
    if moved:
        up = sum(1 for b, a in moved if a and not b)
        down = sum(1 for b, a in moved if b and not a)
        out |= {"math_turned_right": up, "math_turned_wrong": down, "math_p": sign_test(up, down)}
    keys = [k for k in before[0] if k == "reward" or k.startswith("reward/")] if before else []
    for key in keys:
        diffs = [
            a[key] - b[key]
            for b, a in zip(before, after)
            if b.get(key) is not None and a.get(key) is not None
        ]
        if diffs:
            d = paired_difference(diffs)
            name = "mean_reward" if key == "reward" else key
            out |= {f"{name}_change": d.mean, f"{name}_change_se": d.se, f"{name}_p": d.p,
                    f"{name}_prompts_up": d.up, f"{name}_prompts_down": d.down}  # fmt: skip
    return out


def logged_change(before: list[dict], after: list[dict]) -> dict[str, float]:
    """``held_out_change`` under the names online DPO logs, ``eval/change/<key>``, which ``describe_change`` reads."""
    return {f"eval/change/{k}": v for k, v in held_out_change(before, after).items()}


def describe_change(
    start: dict[str, float],
    end: dict[str, float],
    change: dict[str, float],
    prefix: str = "[eval] start -> end: ",
) -> str:
    """What a reader can judge of ``held_out_change`` (its keys under ``eval/change/``), one line per figure:
    before and after (the figures ``eval/math_accuracy``, ``eval/mean_reward``, ``eval/reward/<label>``), the
    move and the test of it."""
    nan = float("nan")
    lines = []
    if "eval/change/math_turned_right" in change:
        lines.append(
            f"greedy math {start.get('eval/math_accuracy', nan):.3f} -> {end.get('eval/math_accuracy', nan):.3f}: "
            f"{change['eval/change/math_turned_right']:.0f} answers turned right, "
            f"{change['eval/change/math_turned_wrong']:.0f} wrong (sign test p = {change['eval/change/math_p']:.2g})"
        )
    names = ["mean_reward"] + [
        k.removeprefix("eval/change/").removesuffix("_change")
        for k in change
        if k.startswith("eval/change/reward/") and k.endswith("_change")
    ]
    for name in names:
        c = {
            part: change.get(f"eval/change/{name}_{part}")
            for part in ("change", "change_se", "p", "prompts_up", "prompts_down")
        }
        if c["change"] is None:
            continue
        figure = "eval/mean_reward" if name == "mean_reward" else f"eval/{name}"
        label = "fresh-sample reward" if name == "mean_reward" else f"  of it, {name.removeprefix('reward/')}"
        lines.append(
            f"{label} {start.get(figure, nan):.3f} -> {end.get(figure, nan):.3f}: per prompt {c['change']:+.3f} "
            f"+- {c['change_se']:.3f}, {c['prompts_up']:.0f} prompts up, {c['prompts_down']:.0f} down "
            f"(permutation test p = {c['p']:.2g})"
        )
    return "\n".join(f"{prefix}{line}" for line in lines)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _figure(n: int, ncols: int):
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    ncols = min(n, ncols)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_curves(stage: str, curves: dict[str, tuple[list[int], list[float]]], out: Path) -> list[str]:
    """One panel per metric of CURVES that the stage logged; the metrics drawn (none: no file)."""
    keys = [k for k in CURVES if k in curves]
    if not keys:
        return []
    plt, fig, axes = _figure(len(keys), ncols=4)
    for ax, key in zip(axes, keys):
        steps, values = curves[key]
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(stage)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return keys


def plot_table(table: Table, stages: list[str], out: Path, title: str) -> None:
    """One bar chart per metric, a bar per stage."""
    plt, fig, axes = _figure(len(table), ncols=3)
    for ax, (metric, values) in zip(axes, table.items()):
        bar_panel(ax, metric, values, stages)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title above the first row's titles
    fig.savefig(out, dpi=90)
    plt.close(fig)


def bar_panel(ax, metric: str, values: dict[str, float | None], stages: list[str]) -> None:
    """A bar per stage with its value on top; a missing (or NaN) value is the word, where its bar would be."""
    for x, stage in enumerate(stages):
        value = values[stage]
        if value is None or math.isnan(value):
            ax.text(x, 0, fmt(value), ha="center", va="bottom", rotation=90, fontsize=8, color="grey")
            continue
        bars = ax.bar(x, value, color=f"C{x % 10}")
        ax.bar_label(bars, [fmt(value)], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlim(-0.6, len(stages) - 0.4)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{metric} (s)" if metric.startswith("time/") else metric, fontsize=10)


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4g}"


def fmt_seconds(record: dict[str, Any] | None) -> str:
    if record is None or "seconds" not in record:
        return MISSING
    s = record["seconds"]
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def markdown_table(table: Table, stages: list[str], first: str = "metric") -> list[str]:
    lines = [f"| {first} | " + " | ".join(stages) + " |", "| --- |" + " ---: |" * len(stages)]
    lines += [f"| {m} | " + " | ".join(fmt(values[s]) for s in stages) + " |" for m, values in table.items()]
    return lines


def stages_section(run: Path, stages: list[str]) -> list[str]:
    lines = ["## Stages", "", "| stage | status | run time | evaluation | evaluation time |"]
    lines.append("| --- | --- | ---: | --- | ---: |")
    for s in stages:
        rec, ev = read_json(run / s / "stage.json"), read_json(run / s / "eval.stage.json")
        status = rec["status"] + (" (resumed)" if rec.get("resumed") else "") if rec else "-"
        lines.append(
            f"| {s} | {status} | {fmt_seconds(rec) if rec else '-'} | {ev['status'] if ev else '-'} | "
            f"{fmt_seconds(ev) if ev else '-'} |"
        )
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` and its plots under ``<run_dir>/plots``; the report's path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    stages = stage_names(run)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# Chain report: {run}", "", f"Written by `python -m alignment.report {run}`.", ""]
    lines += stages_section(run, stages) + [""]

    evaluated = [s for s in stages if (run / s / "eval.json").is_file()]
    table = metric_table(run, evaluated, "eval.json")
    lines += ["## Evaluation", ""]
    if table:
        # The chart shows what each stage bought and cost, and the whole evaluation's time; the table has every
        # part's time.
        shown = {m: v for m, v in table.items() if not m.startswith("time/") or m == "time/total"}
        plot_table(shown, evaluated, plots / "eval.png", "evaluation after each stage")
        said = sorted(
            {(read_json(run / s / "eval.json") or {}).get("generation_dtype") for s in evaluated} - {None}
        )
        engine = f" Answers generated in {' / '.join(said)} (`generation_dtype`)." if said else ""
        lines += [f"Each stage's `eval.json` (`start`: the start model).{engine}", ""]
        lines += markdown_table(table, evaluated) + ["", "![evaluation](plots/eval.png)", ""]
    else:
        lines += ["No stage has an eval.json.", ""]

    tasks = task_table(run, evaluated)
    if tasks:
        lines += ["## Math accuracy by task", "", "`math_by_task` of each `eval.json`.", ""]
        lines += markdown_table(tasks, evaluated, first="task") + [""]
    lines += flips_section(run, evaluated)

    own = metric_table(run, stages, "summary.json", prefix="eval/")
    measured = [s for s in stages if any(v[s] is not None for v in own.values())]
    if own:
        lines += ["## Held-out numbers the stages measured themselves", "", "From each `summary.json`.", ""]
        lines += markdown_table({m: {s: v[s] for s in measured} for m, v in own.items()}, measured) + [""]

    lines += ["## Training curves", ""]
    for s in stages:
        curves, unreadable = read_curves(run / s / "metrics.jsonl")
        if plot_curves(s, curves, plots / f"{s}.png"):
            lines += [f"### {s}", "", f"![{s}](plots/{s}.png)", ""]
        if unreadable:
            lines += [
                f"{s}/metrics.jsonl: {unreadable} unreadable line(s) left out (cut short by a kill?)",
                "",
            ]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


USAGE = """usage: python -m alignment.report <run folder>                  (e.g. outputs/chain)
       python -m alignment.report compare <before> <after>   (two eval.json of the same prompts, or online
                                                              DPO's eval_start.json and eval_end.json)"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "compare":
        try:
            print("\n".join(compare(argv[1], argv[2])))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    elif len(argv) == 1 and argv[0] not in ("-h", "--help"):
        print(write_report(argv[0]))
    else:
        raise SystemExit(USAGE)


if __name__ == "__main__":
    main()
