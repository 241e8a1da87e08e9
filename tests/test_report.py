"""The chain's report (alignment/report.py) from hand-made run folders: the plots are valid PNG images, the
tables hold the numbers, and a metric a stage did not report reads as missing, never as 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from alignment.report import held_out_change, read_curves, write_report
from tests.conftest import REPO, write_jsonl

EVALS = {
    "start": {"eval/math_accuracy": 0.02, "eval/win_rate": 0.5, "eval/general_text_nll": 2.583},
    "sft": {"eval/math_accuracy": 0.125, "eval/win_rate": 0.61, "eval/general_text_nll": 2.7},
    # dpo's evaluation did not measure the NLL: missing in the table and the chart, not 0.
    "dpo": {"eval/math_accuracy": 0.15, "eval/win_rate": 0.66},
    "online_dpo": {"eval/math_accuracy": 0.2, "eval/win_rate": 0.7, "eval/general_text_nll": 2.75},
}


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "chain.yaml").parent.mkdir(parents=True)
    # The chain's order, not the alphabet's.
    (run / "chain.yaml").write_text("stages: {data: {}, sft: {}, reward: {}, dpo: {}, online_dpo: {}}\n")
    for stage, values in EVALS.items():
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "eval.json").write_text(json.dumps(values))
    write_jsonl(
        run / "sft" / "metrics.jsonl",
        [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-5} for s in (1, 2, 3)],
    )
    write_jsonl(
        run / "reward" / "metrics.jsonl",
        [
            {"step": 1, "loss": 0.7, "margin": 0.1},
            {"step": 2, "loss": 0.6, "margin": 0.4, "eval/accuracy": 0.8},
        ],
    )
    (run / "reward" / "summary.json").write_text(json.dumps({"steps": 2, "eval/accuracy": 0.8}))
    write_jsonl(
        run / "dpo" / "metrics.jsonl",
        [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.02 * s} for s in (1, 2)],
    )
    write_jsonl(
        run / "online_dpo" / "metrics.jsonl",
        [{"step": 0, "eval/math_accuracy": 0.15}]
        + [
            {"step": s, "loss": 0.69, "objective/scores": -1.0 + 0.1 * s, "online/pair_fraction": 1.0,
             "objective/kl": 0.05 * s}
            for s in (1, 2, 3)
        ],
    )  # fmt: skip
    (run / "sft" / "stage.json").write_text(json.dumps({"status": "done", "seconds": 750.0, "resumed": True}))
    (run / "sft" / "eval.stage.json").write_text(json.dumps({"status": "done", "seconds": 42.0}))
    return run


def table_row(text: str, metric: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {metric} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_the_report_has_a_table_of_every_eval_metric_per_stage(tmp_path):
    run = make_run(tmp_path)
    text = write_report(run).read_text()
    header = table_row(text, "metric")
    assert header == ["start", "sft", "dpo", "online_dpo"]  # the start model, then the chain's order
    assert table_row(text, "eval/math_accuracy") == ["0.02", "0.125", "0.15", "0.2"]
    assert table_row(text, "eval/win_rate") == ["0.5", "0.61", "0.66", "0.7"]
    assert table_row(text, "eval/general_text_nll") == ["2.583", "2.7", "missing", "2.75"]
    # What a stage measured itself: the reward model's held-out pair accuracy.
    assert table_row(text, "eval/accuracy") == ["0.8"]
    assert "| sft | done (resumed) | 12.5 min | done | 42 s |" in text
    assert "Answers generated in" not in text  # no eval.json says its engine's precision


def test_a_metric_the_start_model_skipped_stays_among_the_metrics_and_the_total_time_comes_last(tmp_path):
    run = tmp_path / "run"
    evals = {
        # The chain's start model has no KL to the SFT model: eval.py writes why instead of a number.
        "start": {"eval/math": 0.0, "eval/kl": "skipped: reference_model is null", "time/total": 9.0},
        "sft": {"eval/math": 0.2, "eval/kl": 0.0, "time/total": 8.0, "time/kl": 1.0},
    }
    for stage, values in evals.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "eval.json").write_text(json.dumps(values))
    text = write_report(run).read_text()
    rows = [
        line.split("|")[1].strip()
        for line in text.splitlines()
        if line.startswith("| eval/") or line.startswith("| time/")
    ]
    assert rows == ["eval/math", "eval/kl", "time/kl", "time/total"]
    assert table_row(text, "eval/kl") == ["missing", "0"]


def test_the_report_says_the_precision_the_answers_were_generated_in(tmp_path):
    run = make_run(tmp_path)
    for stage, dtype in (("start", "bfloat16"), ("sft", "bfloat16"), ("dpo", "float32")):
        values = json.loads((run / stage / "eval.json").read_text()) | {"generation_dtype": dtype}
        (run / stage / "eval.json").write_text(json.dumps(values))
    text = write_report(run).read_text()
    assert "Answers generated in bfloat16 / float32 (`generation_dtype`)." in text
    assert table_row(text, "metric") == ["start", "sft", "dpo", "online_dpo"]  # not a metric row


def test_the_plots_are_valid_images_linked_from_the_report(tmp_path):
    run = make_run(tmp_path)
    text = write_report(run).read_text()
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == ["dpo.png", "eval.png", "online_dpo.png", "reward.png", "sft.png"]
    for name in pngs:
        assert f"](plots/{name})" in text
        with Image.open(run / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
            image.verify()
    # A stage that logged no curve (start, data) gets no plot.
    assert "### start" not in text
    with open(run / "dpo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # cut short by a kill: left out, and said so
    assert "dpo/metrics.jsonl: 1 unreadable line(s) left out" in write_report(run).read_text()


def test_a_missing_metric_is_drawn_as_missing_not_as_a_zero_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignment.report import bar_panel

    fig, ax = plt.subplots()
    stages = ["start", "sft", "dpo", "online_dpo"]
    bar_panel(
        ax,
        "eval/general_text_nll",
        {"start": 2.5, "sft": None, "dpo": float("nan"), "online_dpo": 0.0},
        stages,
    )
    bars = [(round(b.get_x() + b.get_width() / 2), b.get_height()) for b in ax.patches]
    assert bars == [(0, 2.5), (3, 0.0)]  # a real 0 is a bar; missing and NaN are not
    words = sorted(
        (t.get_position()[0], t.get_text()) for t in ax.texts if t.get_text() in ("missing", "nan")
    )
    assert words == [(1, "missing"), (2, "nan")]
    assert {t.get_text() for t in ax.texts} >= {"2.5", "0"}  # the values on top of the bars
    assert ax.get_title() == "eval/general_text_nll"
    ax.clear()
    bar_panel(ax, "time/total", dict.fromkeys(stages, 100.0), stages)
    assert ax.get_title() == "time/total (s)"  # timings are seconds, and the panel says so
    plt.close(fig)


def test_curves_read_the_last_value_of_a_step_logged_twice_and_skip_a_cut_line(tmp_path):
    # A resumed run logs the steps after its checkpoint again; a kill can cut the last line.
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 2, "loss": 0.8}\n{"step": 3, "lo'
    )
    assert read_curves(path) == ({"loss": ([1, 2], [1.0, 0.8])}, 1)  # the values, and one line left out


def test_the_command_line_writes_the_report(tmp_path):
    run = make_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "alignment.report", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(run / "report.md") and (run / "plots" / "eval.png").is_file()


def test_a_run_folder_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        write_report(tmp_path / "nope")


def test_the_report_counts_the_math_answers_each_stage_turned_right_or_wrong(tmp_path):
    """Four held-out rows. start: right on row 0. sft: rows 0, 1, 2 (gains 1 and 2: sign test 2 x (1/2)^2 =
    0.5). dpo: rows 1, 3 (loses 0 and 2, gains 3: 2 x (1 + 3) / 2^3, capped at 1). The by-task table comes from
    math_by_task; a stage without an answers file is left out."""
    run = make_run(tmp_path)
    verdicts = {"start": [1, 0, 0, 0], "sft": [1, 1, 1, 0], "dpo": [0, 1, 0, 1]}
    for stage, correct in verdicts.items():
        rows = [{"set": "math", "row": i, "answer": "a", "correct": bool(c)} for i, c in enumerate(correct)]
        rows.append({"set": "ifeval", "row": 0, "answer": "b"})  # no verdict: not counted
        write_jsonl(run / stage / "eval.answers.jsonl", rows)
        result = json.loads((run / stage / "eval.json").read_text())
        result["math_by_task"] = {"ages": sum(correct[:2]) / 2, "travel": sum(correct[2:]) / 2}
        (run / stage / "eval.json").write_text(json.dumps(result))
    text = write_report(run).read_text()
    assert "| start | sft | 4 | 2 | 0 | 1 | +2 | 0.5 |" in text
    assert "| sft | dpo | 4 | 1 | 2 | 1 | -1 | 1 |" in text
    assert "online_dpo |" not in text.split("## Which math answers")[1].split("##")[0]
    assert table_row(text, "task") == ["start", "sft", "dpo", "online_dpo"]
    assert table_row(text, "ages") == ["0.5", "1", "0.5", "missing"]
    assert table_row(text, "travel") == ["0", "0.5", "0.5", "missing"]


def test_each_stage_is_counted_against_the_model_it_started_from(tmp_path):
    """online_dpo started from sft (its config.yaml says so), not from dpo, the stage evaluated before it: its
    row compares it with sft. dpo names no folder of the run (a hub name): the stage before it, sft."""
    run = make_run(tmp_path)
    verdicts = {"start": [0, 0, 0, 0], "sft": [1, 1, 0, 0], "dpo": [0, 0, 0, 0], "online_dpo": [1, 1, 1, 0]}
    for stage, correct in verdicts.items():
        rows = [{"set": "math", "row": i, "answer": "a", "correct": bool(c)} for i, c in enumerate(correct)]
        write_jsonl(run / stage / "eval.answers.jsonl", rows)
    (run / "online_dpo" / "config.yaml").write_text(f"model:\n  name_or_path: {run / 'sft'}\n")
    (run / "dpo" / "config.yaml").write_text("model:\n  name_or_path: some-org/some-model\n")
    text = write_report(run).read_text()
    assert "| sft | online_dpo | 4 | 1 | 0 | 2 | +1 | 1 |" in text
    assert "| sft | dpo | 4 | 0 | 2 | 0 | -2 | 0.5 |" in text


def test_the_report_counts_where_the_judges_verdict_rose_or_fell_with_a_sign_test(tmp_path):
    """The judge's verdicts against the start model (win: 1, 0.5, 0) on five prompts. start ties itself
    everywhere. sft: 1, 1, 1, 0, 0.5 -> up on 3 prompts, down on 1 (2 x (1 + 4) / 2^4 = 0.625). dpo: 1, 1, 1, 1,
    1 -> up where sft had 0 and 0.5, never down (2 x (1/2)^2 = 0.5); win rate 0.7 -> 1. online_dpo has no
    verdict on row 4 (null: not scored), so its row compares 4 prompts: 0, 1, 1, 0 against dpo's 1, 1, 1, 1.

    The judge's scores, after minus before (mean ± s / sqrt(n); p of the exact sign-flip test, a zero
    difference adding nothing either way): sft - start = 1, 1, 1, -1, 0: mean 0.4, s^2 = (3 x 0.36 + 1.96 +
    0.16) / 4 = 0.8, se = sqrt(0.8 / 5) = 0.4; the sum of +-1 four times reaches |2| in 10 of 16 patterns, p =
    0.625. dpo - sft = 0, 0, 0, 2, 1: mean 0.6, the same s^2, se 0.4; |+-2 +-1| >= 3 in 2 of 4, p = 0.5.
    online_dpo - dpo = -1, 0, 0, -1 on 4 prompts: mean -0.5, s^2 = 1/3, se = sqrt(1/12) = 0.289, p = 0.5."""
    run = make_run(tmp_path)
    wins = {"start": [0.5] * 5, "sft": [1, 1, 1, 0, 0.5], "dpo": [1] * 5, "online_dpo": [0, 1, 1, 0, None]}
    scores = {"start": [0] * 5, "sft": [1, 1, 1, -1, 0], "dpo": [1] * 5, "online_dpo": [0, 1, 1, 0, None]}
    for stage, verdicts in wins.items():
        rows = [
            {"set": "math", "row": i, "answer": "a", "correct": False, "win": w, "judge_score": x}
            for i, (w, x) in enumerate(zip(verdicts, scores[stage]))
        ]
        rows.append({"set": "ifeval", "row": 0, "answer": "b"})  # no verdict: not counted
        write_jsonl(run / stage / "eval.answers.jsonl", rows)
    text = write_report(run).read_text()
    section = text.split("## Which answers the judge prefers")[1].split("##")[0]
    assert "| start | sft | 5 | 3 | 1 | 0.5 | 0.7 | 0.62 | +0.400 ± 0.400 | 0.62 |" in section
    assert "| sft | dpo | 5 | 2 | 0 | 0.7 | 1 | 0.5 | +0.600 ± 0.400 | 0.5 |" in section
    assert "| dpo | online_dpo | 4 | 0 | 2 | 1 | 0.5 | 0.5 | -0.500 ± 0.289 | 0.5 |" in section


def test_verdicts_without_the_judges_scores_leave_the_score_cells_empty(tmp_path):
    """Answers files with verdicts but no ``judge_score`` (written before the evaluation recorded it): the
    verdict columns are read as usual, the score's two cells are "-". start ties itself on both prompts; sft
    wins one and loses one: 1 up, 1 down, p = 1, win rate 0.5 -> 0.5. dpo has scores on both prompts, sft has
    none, so dpo's row has no score either; with sft's score on row 0 alone, dpo's row reads that one prompt."""
    run = make_run(tmp_path)
    rows = {"start": [(0.5, 0.0), (0.5, 0.0)], "sft": [(1, None), (0, None)], "dpo": [(1, 2.0), (1, 3.0)]}
    for stage, verdicts in rows.items():
        write_jsonl(run / stage / "eval.answers.jsonl",
                    [{"set": "math", "row": i, "answer": "a", "correct": False, "win": w, "judge_score": x}
                     for i, (w, x) in enumerate(verdicts)])  # fmt: skip
    section = write_report(run).read_text().split("## Which answers the judge prefers")[1].split("##")[0]
    assert "| start | sft | 2 | 1 | 1 | 0.5 | 0.5 | 1 | - | - |" in section
    assert "| sft | dpo | 2 | 1 | 0 | 0.5 | 1 | 1 | - | - |" in section
    write_jsonl(run / "sft" / "eval.answers.jsonl",
                [{"set": "math", "row": 0, "answer": "a", "correct": False, "win": 1, "judge_score": 0.5},
                 {"set": "math", "row": 1, "answer": "a", "correct": False, "win": 0}])  # fmt: skip
    section = write_report(run).read_text().split("## Which answers the judge prefers")[1].split("##")[0]
    # dpo - sft on row 0 only: 2.0 - 0.5 = +1.5, one prompt: se 0 (no spread), exact p = 2 x 1/2 = 1.
    assert "| sft | dpo | 2 | 1 | 0 | 0.5 | 1 | 1 | +1.500 ± 0.000 | 1 |" in section


def test_answers_without_the_judges_verdicts_give_no_verdict_table(tmp_path):
    """Answers files written before the evaluation recorded verdicts: the math table only."""
    run = make_run(tmp_path)
    for stage in ("start", "sft"):
        write_jsonl(
            run / stage / "eval.answers.jsonl", [{"set": "math", "row": 0, "answer": "a", "correct": True}]
        )
    text = write_report(run).read_text()
    assert "## Which math answers each stage changed" in text
    assert "## Which answers the judge prefers" not in text


def test_compare_two_evaluations_prompt_by_prompt_from_the_command_line(tmp_path):
    """Two evaluations of three math prompts: a is right on 0, b on 1 and 2 (2 up, 1 down: p = 2 x 4 / 8,
    capped at 1); the judge's verdicts 0, 0.5, 1 against 1, 1, 1 (2 up, none down: p = 2 x (1/2)^2 = 0.5; win
    rate 0.5 -> 1); the judge's scores 0, 1, 2 against 1, 1, 3: differences 1, 0, 1, mean 2/3, s^2 = (1/9 +
    4/9 + 1/9) / 2 = 1/3, se = sqrt(1/9) = 1/3; the sign flips of 1 and 1 reach |2| in 2 of 4 patterns, p = 0.5.
    b is named by its answers file, a by its eval.json; a missing one is a one-line error."""
    data = (("a", [1, 0, 0], [0, 0.5, 1], [0, 1, 2]), ("b", [0, 1, 1], [1, 1, 1], [1, 1, 3]))
    for name, correct, wins, scores in data:
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"answers": "eval.answers.jsonl"}))
        rows = [
            {"set": "math", "row": i, "correct": bool(c), "win": w, "judge_score": x}
            for i, (c, w, x) in enumerate(zip(correct, wins, scores))
        ]
        write_jsonl(tmp_path / name / "eval.answers.jsonl", rows)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "alignment.report", "compare", *map(str, args)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip

    proc = run(tmp_path / "a" / "eval.json", tmp_path / "b" / "eval.answers.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "math (3 prompts): 2 wrong -> right, 1 right -> wrong, net +1, sign test p = 1",
        "judge's verdict against the start model (3 prompts): 2 up, 0 down, win rate 0.5 -> 1, sign test p = 0.5",
        "judge's score (3 prompts): +0.667 ± 0.333 a prompt (2 up, 0 down), sign-flip test p = 0.5",
    ]
    proc = run(tmp_path / "a" / "eval.json", tmp_path / "nope.json")
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"error: {tmp_path / 'nope.json'}: no answers"
    )


def test_held_out_change_counts_answers_turned_each_way_and_tests_the_reward_change():
    before = [{"prompt": f"p{i}", "greedy_right": r, "reward": w}
              for i, (r, w) in enumerate([(False, 1.0), (True, 2.0), (True, 0.0), (None, 5.0), (False, None)])]  # fmt: skip
    after = [{"prompt": f"p{i}", "greedy_right": r, "reward": w}
             for i, (r, w) in enumerate([(True, 2.0), (False, 4.0), (True, 3.0), (True, 5.0), (True, 9.0)])]  # fmt: skip
    out = held_out_change(before, after)
    # Greedy math over the 4 prompts judged both times: p0 and p4 turned right, p1 wrong, p2 stayed right, p3 was
    # not judged before. Sign test of 2 against 1: 2 x (C(3,0) + C(3,1)) / 8 = 1.
    assert (out["math_turned_right"], out["math_turned_wrong"], out["math_p"]) == (2, 1, 1.0)
    # Reward over the 4 prompts scored both times: differences 1, 2, 3, 0; mean 1.5; s^2 = (0.25 + 0.25 + 2.25 +
    # 2.25) / 3 = 5/3, se = sqrt(5/3 / 4). Of the 16 sign patterns of (1, 2, 3, 0), |sum| >= 6 only for the 4 with
    # 1, 2, 3 of one sign (the 0's sign is free): p = 4/16.
    assert out["mean_reward_change"] == 1.5
    assert out["mean_reward_change_se"] == pytest.approx((5 / 3 / 4) ** 0.5)
    assert out["mean_reward_p"] == 0.25
    assert (out["mean_reward_prompts_up"], out["mean_reward_prompts_down"]) == (3, 0)
    # A component the rows carry is compared the same way: differences -1 and +1, mean 0, p = 1.
    for b, a, (x, y) in zip(before[:2], after[:2], [(1.0, 0.0), (0.0, 1.0)]):
        b["reward/math"], a["reward/math"] = x, y
    out = held_out_change(before, after)
    assert (out["reward/math_change"], out["reward/math_p"], out["reward/math_prompts_up"]) == (0.0, 1.0, 1)


def test_held_out_change_refuses_evaluations_of_other_prompts():
    row = {"greedy_right": True, "reward": 1.0}
    with pytest.raises(ValueError, match="prompt 2 differs"):
        held_out_change(
            [{"prompt": "a", **row}, {"prompt": "b", **row}], [{"prompt": "a", **row}, {"prompt": "c", **row}]
        )
    with pytest.raises(ValueError, match="2 prompts before, 1 after"):
        held_out_change([{"prompt": "a", **row}] * 2, [{"prompt": "a", **row}])


def test_compare_reads_online_dpos_start_and_end_evaluations(tmp_path):
    """online DPO's eval_start.json / eval_end.json (figures + per-prompt rows): the command prints what the run
    printed at its end. Three prompts: greedy p0 turned right (1 up, 0 down: p = 1); rewards 1, 2, 0 -> 2, 4, 0:
    differences 1, 2, 0, mean 1, s^2 = (0 + 1 + 1) / 2 = 1, se = 1/sqrt(3) = 0.577; |sum| >= 3 for the 4 of 8 sign
    patterns with 1 and 2 of one sign: p = 0.5. Evaluations of other prompts are a one-line error."""
    rows = [{"prompt": f"p{i}", "greedy_right": r, "reward": w} for i, (r, w) in enumerate([(False, 1.0), (True, 2.0), (False, 0.0)])]  # fmt: skip
    end = [dict(r, reward=w) for r, w in zip(rows, [2.0, 4.0, 0.0])]
    end[0]["greedy_right"] = True
    start_figures = {"eval/math_accuracy": 1 / 3, "eval/mean_reward": 1.0}
    (tmp_path / "eval_start.json").write_text(json.dumps({"figures": start_figures, "rows": rows}))
    end_figures = {"eval/math_accuracy": 2 / 3, "eval/mean_reward": 2.0}
    (tmp_path / "eval_end.json").write_text(json.dumps({"figures": end_figures, "rows": end}))
    proc = subprocess.run([sys.executable, "-m", "alignment.report", "compare", tmp_path / "eval_start.json",
                           tmp_path / "eval_end.json"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "greedy math 0.333 -> 0.667: 1 answers turned right, 0 wrong (sign test p = 1)",
        "fresh-sample reward 1.000 -> 2.000: per prompt +1.000 +- 0.577, 2 prompts up, 0 down (permutation test p = 0.5)",
    ]
    end[2]["prompt"] = "other"
    (tmp_path / "eval_end.json").write_text(json.dumps({"figures": end_figures, "rows": end}))
    proc = subprocess.run([sys.executable, "-m", "alignment.report", "compare", tmp_path / "eval_start.json",
                           tmp_path / "eval_end.json"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: held_out_change: prompt 3 differs between the two evaluations"
    )
