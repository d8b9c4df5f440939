"""python -m nanoalign.report: figures and report.md from run directories (tests/fixtures/report_run: an SFT-like
run, a PPO-like run, an experiment with two arms x two seeds), with and without matplotlib; the tables by hand."""
import json
import math
import re
import shutil
import statistics
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import reference
from nanoalign import report
from nanoalign.cli import InputError, run

FIXTURE = Path(__file__).parent / "fixtures" / "report_run"
RUNS = [FIXTURE / "sft", FIXTURE / "ppo", FIXTURE / "exp"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def last_values(run_dir: Path) -> dict:
    """{metric: (step, value)} of the last record holding each metric, read here independently of the module."""
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            last.update({k: (record["step"], v) for k, v in record.items() if k not in ("step", "phase")})
    return last


def section(text: str, heading: str) -> str:
    """The part of report.md under `## heading`, up to the next `## `."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def check_tables(text: str) -> None:
    for name in ("sft", "ppo"):
        part = section(text, name)
        last = last_values(FIXTURE / name)
        assert len(last) >= 6
        for metric, (step, value) in last.items():
            assert f"| {metric} | {step} | {value if isinstance(value, int) else format(value, '.6g')} |" in part
        for key, value in json.loads((FIXTURE / name / "eval.json").read_text()).items():
            assert f"| {key} | {value} |" in part
    # the fixture's last values, written out: the final row, not the best or the first
    assert "| loss | 20 | 0.8125 |" in section(text, "sft") and "| eval_loss | 20 | 0.9375 |" in section(text, "sft")
    assert "| eval/win_rate | 30 | 0.6875 |" in section(text, "ppo") and "| tokens | 20 | 4032 |" in text
    # results.json by hand: two_stage win rate [0.6, 0.7] -> 0.65 ± sqrt(0.005) = 0.0707 (ddof=1; ddof=0: 0.05),
    # closed accuracy [0.5, 0.8] -> 0.65 ± 0.212; joint [0.55, 0.5] -> 0.525 ± 0.0354, [0.75, 0.75] -> 0.75 ± 0
    exp = section(text, "Toy experiment: two stages vs joint")
    assert "Seeds: 0, 1." in exp and "| arm | seeds | eval/win_rate | closed_accuracy |" in exp
    assert "| two_stage | 2 | 0.650 ± 0.071 | 0.65 ± 0.21 |" in exp
    assert "| joint | 2 | 0.525 ± 0.035 | 0.75 ± 0 |" in exp


def test_report_draws_every_run_and_embeds_the_figures(tmp_path):
    reference("matplotlib")  # optional extra: skipped without it, but required in CI (NANOALIGN_REQUIRE_REFERENCE=1)
    from PIL import Image  # a dependency of matplotlib

    md = report.build_report(RUNS, tmp_path / "out", smooth=0.6)
    text = md.read_text()
    check_tables(text)
    assert report.PLOT_HINT not in text
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert {p.relative_to(md.parent).as_posix() for p in pngs} == set(embedded)
    names = {p.name for p in pngs}
    assert {"sft.png", "ppo.png", "exp_loss.png", "exp_reward.png", "exp_preference_accuracy.png"} <= names
    assert not any("KL" in n or "win_rate" in n for n in names)  # the experiment logged neither: no empty panel
    for path in embedded:
        png = md.parent / path  # relative to report.md
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width >= 400 and height >= 300
        with Image.open(png) as im:
            im.load()  # decodes the whole image
            assert np.asarray(im).std() > 0  # something is drawn


def test_report_without_matplotlib_writes_the_tables_and_how_to_get_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    md = report.build_report(RUNS, tmp_path / "out")
    text = md.read_text()
    check_tables(text)
    hint = [line for line in text.splitlines() if "pip install" in line]
    assert len(hint) == 1 and "pip install matplotlib" in hint[0] and "pip install -e .[plot]" in hint[0]
    assert "![" not in text and not list((tmp_path / "out").rglob("*.png"))
    assert report.PLOT_HINT in capsys.readouterr().out


def test_summary_table_mean_and_sample_std_by_hand():
    results = {"metrics": ["win", "acc"],
               "arms": {"a": {"win": [0.4, 0.5, 0.6], "acc": [1.0]}, "b": {"win": [0.2, 0.3]}}}
    # a: mean 0.5, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1 (the population std would be 0.0816);
    # b: mean 0.25, sqrt(2 * 0.05^2 / 1) = 0.0707; one seed: the value alone; a missing metric: -
    assert report.summary_table(results) == ("| arm | seeds | win | acc |\n"
                                             "|---|---|---|---|\n"
                                             "| a | 1–3 | 0.50 ± 0.10 | 1 |\n"
                                             "| b | 2 | 0.250 ± 0.071 | - |\n")
    # std to two significant digits, the mean to as many decimals
    assert report.mean_std([100, 130]) == "115 ± 21"
    assert report.mean_std([1.0, 1.0]) == "1 ± 0"
    # equal values whose float mean is off by rounding (std ~1e-17) show no spread, not 8 decimals of zeros
    assert report.mean_std([0.4777432, 0.4777432, 0.4777432]) == "0.4777 ± 0"
    # a seed that diverged (NaN) shows as such rather than breaking the table; no value at all: -
    assert report.mean_std([0.5, math.nan]) == "nan ± nan" and report.mean_std([]) == "-"
    # "metrics" picks the columns and their order
    assert report.summary_table({**results, "metrics": ["acc"]}).splitlines()[:3] == [
        "| arm | seeds | acc |", "|---|---|---|", "| a | 1 | 1 |"]
    # no "metrics": every metric, first seen first
    assert report.summary_table({"arms": {"x": {"m": [1.0, 2.0]}, "y": {"n": [3.0]}}}).splitlines()[0] == \
        "| arm | seeds | m | n |"


@pytest.mark.parametrize("results, culprit", [
    ({"arms": {"a": {"win": [0.1, "x"]}}}, "arms.a.win"),
    ({"arms": {"a": [0.1]}}, "arms.a"),
    ({"arms": {}}, '{"arms"'),
    ({"arms": {"a": {"win": [0.1]}}, "metrics": "win"}, "metrics"),
    ({"arms": {"a": {"win": [0.1]}}, "seeds": 3}, "seeds"),
])
def test_summary_table_rejects_malformed_results(results, culprit):
    with pytest.raises(InputError, match=re.escape(culprit)):
        report.summary_table(results)


def test_malformed_results_json_names_the_file(tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURE / "exp", exp)
    (exp / "results.json").write_text('{"arms": {"a": {"win": [0.5, null]}}}')
    with pytest.raises(InputError, match=re.escape(f"{exp / 'results.json'}: arms.a.win")):
        report.build_report([exp], tmp_path / "out")


def test_load_metrics_skips_blank_lines_and_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1, "loss": 2.0}\n\n   \n{"step": 2, "loss": 1.5}\n')
    assert report.load_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5\n')
    with pytest.raises(InputError, match=re.escape(f"{path}:3: not valid JSON at column 24 (Expecting ',' delimiter)")):
        report.load_metrics(path)  # where the line ends, not "column 1" of a next line
    path.write_bytes(b'{"step": 1}\n{"step": 2, "note": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(InputError, match=re.escape(f"{path}:2: not UTF-8")):
        report.load_metrics(path)
    path.write_text('{"step": 1}\n["not", "a record"]\n')
    with pytest.raises(InputError, match=re.escape(f"{path}:2: expected a JSON object")):
        report.load_metrics(path)
    path.write_text('{"step": 1}\n{"step": NaN, "loss": 1.0}\n')  # Python's json reads NaN: it would sort nowhere
    with pytest.raises(InputError, match=re.escape(f"{path}:2: expected a JSON object with a finite numeric")):
        report.load_metrics(path)
    # the command line: one line naming file:line, no traceback
    with pytest.raises(SystemExit) as e:
        run(report.main, [str(path.parent), f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}:2:")


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "not a run directory (no metrics.jsonl)"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("\n")), "metrics.jsonl: no records"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n'),
                (d / "eval.json").write_text('{"win_rate": 0.5,')), "eval.json:1: not valid JSON"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n'),
                (d / "eval.json").write_text("[0.5]")), "eval.json: expected a JSON object of final numbers"),
])
def test_missing_or_empty_run_dir_is_a_one_line_error(tmp_path, capsys, make, message):
    run_dir = tmp_path / "run"
    make(run_dir)
    with pytest.raises(SystemExit) as e:
        run(report.main, [str(FIXTURE / "sft"), str(run_dir), f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and str(run_dir) in err and message in err
    assert not (tmp_path / "out" / "report.md").exists()  # inputs are checked before anything is written


def test_bad_smooth_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(report.main, [str(FIXTURE / "sft"), "--smooth=1", f"--out={tmp_path}"])
    assert capsys.readouterr().err == "error: --smooth=1.0: must be in [0, 1)\n"


def test_series_keeps_a_repeated_steps_last_value_and_splits_phases():
    records = [{"step": 1, "loss": 3.0, "phase": "pretrain"}, {"step": 2, "loss": 2.0, "phase": "pretrain"},
               {"step": 2, "loss": 2.5, "phase": "pretrain"}, {"step": 1, "loss": 1.0, "phase": "sft", "ok": True}]
    got = report.series(records)
    assert list(got) == ["loss [pretrain]", "loss [sft]"]  # a bool is not a metric
    assert got["loss [pretrain]"][0].tolist() == [1, 2] and got["loss [pretrain]"][1].tolist() == [3.0, 2.5]
    assert report.series(records[:3])["loss"][1].tolist() == [3.0, 2.5]  # one phase: plain names
    # Hbat: SFT stages carry a phase, the preference stages none: their metrics keep plain names
    hbat = [{"step": 1, "loss": 1.0, "phase": "sft"}, {"step": 2, "loss": 0.7, "ppo/kl": 0.1}]
    assert list(report.series(hbat)) == ["loss [sft]", "loss", "ppo/kl"]
    # sorted by step whatever the order logged: the final value is the last step's
    records = [{"step": 3, "loss": 0.5}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    steps, values = report.series(records)["loss"]
    assert steps.tolist() == [1, 2, 3] and values.tolist() == [2.0, 1.0, 0.5]


def test_final_values_and_eval_tables_by_hand():
    # counts logged as floats read as integers, at any size; steps likewise; other numbers to 6 digits
    run = {"series": {"tokens": (np.array([1_000_000, 2_000_000]), np.array([5.0, 12_345_678.0])),
                      "loss": (np.array([2.5]), np.array([0.123456789]))}}
    assert report.final_values_table(run) == ("| metric | step | last value |\n|---|---|---|\n"
                                              "| tokens | 2000000 | 12345678 |\n| loss | 2.5 | 0.123457 |\n")
    assert report.eval_table({"n": 12_345_678, "win_rate": 0.123456789, "model": "out/dpo", "ok": True}) == (
        "| metric | value |\n|---|---|\n| n | 12345678 |\n| win_rate | 0.123457 |\n| model | out/dpo |\n"
        "| ok | true |\n")


def test_ema_by_hand():
    # s0 = x0; s_t = 0.5 s_(t-1) + 0.5 x_t; a NaN is kept and skipped
    got = report.ema(np.array([1.0, 3.0, math.nan, 5.0]), 0.5)
    assert got[:2].tolist() == [1.0, 2.0] and math.isnan(got[2]) and got[3] == 3.5
    # weight is the previous average's share: 0.75 * 1 + 0.25 * 3 = 1.5, then 0.75 * 1.5 + 0.25 * 5 = 2.375
    assert report.ema(np.array([1.0, 3.0, 5.0]), 0.75).tolist() == [1.0, 1.5, 2.375]


def test_each_metric_goes_to_its_panel():
    names = ["loss", "eval_loss", "ppo/value_loss", "rm/accuracy", "rewards/accuracies", "eval/rewards/accuracies",
             "rewards/margins", "objective/scores", "objective/kl", "objective/kl_coef", "ppo/approx_kl",
             "eval/win_rate", "eval/mean_quality", "eval/closed_accuracy", "ppo/clipfrac", "ppo/ratio",
             "ppo/response_length", "ppo/advantages_mean", "grad_norm", "lr",
             "logps/chosen", "tok_per_s", "loss [sft]", "lr [sft]", "grad_norm [pretrain]"]
    assert {title: members for title, _, members in report.groups_of(names)} == {
        "loss": ["loss", "eval_loss", "ppo/value_loss", "loss [sft]"],
        "preference accuracy": ["rm/accuracy", "rewards/accuracies", "eval/rewards/accuracies"],
        "reward": ["rewards/margins", "objective/scores"],
        "KL": ["objective/kl", "objective/kl_coef", "ppo/approx_kl"],
        "win rate / quality": ["eval/win_rate", "eval/mean_quality", "eval/closed_accuracy"],
        "PPO diagnostics": ["ppo/clipfrac", "ppo/ratio"],
        "response length": ["ppo/response_length"],
        "gradient norm": ["grad_norm", "grad_norm [pretrain]"],
        "learning rate": ["lr", "lr [sft]"],
    }


def test_seeds_are_averaged_at_their_common_steps():
    def fake(steps, values):
        return {"series": {"m": (np.array(steps), np.array(values, dtype=float)),
                           "lr": (np.array(steps), np.full(len(steps), 0.1))}}
    a = fake(range(1, 13), [1.0] * 12)
    b = fake(range(2, 14), [3.0, 5.0] * 6)  # starts and ends one step later
    steps, mean, low, high, raw, style = report.across_seeds([a, b], "m", 0.0)
    assert steps.tolist() == list(range(2, 13)) and style == "line"
    assert mean.tolist() == [2.0, 3.0] * 5 + [2.0] and low.tolist() == [1.0] * 11
    assert high.tolist() == [3.0, 5.0] * 5 + [3.0]
    # smoothed: each seed's EMA from its own first step, then the band; the raw mean stays raw
    steps, mean, low, high, raw, style = report.across_seeds([a, b], "m", 0.5)
    assert style == "smoothed" and raw.tolist() == [2.0, 3.0] * 5 + [2.0]
    assert high[:3].tolist() == [3.0, 4.0, 3.5] and low.tolist() == [1.0] * 11
    assert report.across_seeds([a, b], "lr", 0.5)[-1] == "line"  # a schedule is never smoothed
    sparse = {"series": {"m": (np.arange(1, 21), np.ones(20)), "eval/m": (np.array([10, 20]), np.ones(2)),
                         "most": (np.arange(1, 16), np.ones(15)), "lr [sft]": (np.arange(1, 21), np.ones(20))}}
    assert report.across_seeds([sparse], "eval/m", 0.5)[-1] == "points"
    assert report.across_seeds([sparse], "most", 0.5)[-1] == "smoothed"  # logged at most steps (15 of 20)
    assert report.across_seeds([sparse], "lr [sft]", 0.5)[-1] == "line"  # a phase's schedule neither
    assert report.across_seeds([a, fake(range(20, 32), [1.0] * 12)], "m", 0.0) is None  # no step in common


def test_experiment_without_results_json_tabulates_each_seeds_last_eval_values(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # tables only, fast
    exp = tmp_path / "exp"
    shutil.copytree(FIXTURE / "exp", exp)
    (exp / "results.json").unlink()
    text = report.build_report([exp], tmp_path / "out").read_text()
    assert "Results (no results.json" in text and "Arms: joint (seed0, seed1); two_stage (seed0, seed1)." in text
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["arm"] == ["arm", "seeds", "eval/loss", "eval/rewards/accuracies"]
    for arm in ("joint", "two_stage"):
        for column, metric in enumerate(rows["arm"][2:], 2):
            per_seed = [last_values(exp / arm / s)[metric][1] for s in ("seed0", "seed1")]
            mean, std = statistics.mean(per_seed), statistics.stdev(per_seed)  # stdev: the sample std
            shown_mean, shown_std = map(float, rows[arm][column].split(" ± "))
            assert abs(shown_mean - mean) <= 0.5e-3 and abs(shown_std - std) <= 0.5e-3 and shown_std > 0


def test_fallback_results_prefer_eval_json_and_keep_numbers_only():
    def seed(last_eval_loss, eval_json):
        return {"series": {"loss": (np.array([1, 2]), np.array([3.0, 2.0])),
                           "eval/loss": (np.array([1, 2]), np.array([2.5, last_eval_loss]))}, "eval": eval_json}
    arms = {"a": [seed(2.25, {"eval/loss": 2.0, "win_rate": 0.5, "model": "out/dpo", "ok": True}),
                  seed(1.75, {"win_rate": 0.75})],
            "b": [seed(1.5, {})], "none": []}
    # eval.json's final number wins over the last logged eval* value; strings and booleans are not metrics
    assert report.fallback_results(arms) == {"arms": {"a": {"eval/loss": [2.0, 1.75], "win_rate": [0.5, 0.75]},
                                                      "b": {"eval/loss": [1.5]}}}
    assert report.fallback_results({"none": []}) is None


def test_runs_of_the_same_name_get_distinct_figures():
    taken = set()
    assert [report._slug(Path(p), taken) for p in ("a/sft", "b/sft", "b/sft", "ppo")] == ["sft", "b_sft", "sft-2",
                                                                                          "ppo"]


def test_arms_named_by_a_path_are_found_in_their_nested_directories(tmp_path, monkeypatch):
    """experiments/hbat.py and real.py name arms "dpo/hbat", "multi/easy": the runs are exp/dpo/hbat/seed0/."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    exp = tmp_path / "exp"
    for arm in ("joint", "two_stage"):
        shutil.copytree(FIXTURE / "exp" / arm, exp / "dpo" / arm)
    results = json.loads((FIXTURE / "exp" / "results.json").read_text())
    results["arms"] = {f"dpo/{arm}": values for arm, values in results["arms"].items()}
    (exp / "results.json").write_text(json.dumps(results))
    loaded = report.load_experiment(exp)
    assert {arm: [r["path"] for r in runs] for arm, runs in loaded["arms"].items()} == {
        arm: [exp / arm / "seed0", exp / arm / "seed1"] for arm in results["arms"]}
    assert "dpo/joint (seed0, seed1)" in report.build_report([exp], tmp_path / "out").read_text()


def test_arms_and_seeds_in_natural_order_and_an_arm_that_is_one_run(tmp_path, monkeypatch):
    """seed2 before seed10 (and arm n2 before n10), and an arm whose directory is its single run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # tables only, fast
    exp = tmp_path / "exp"
    for run_dir in (exp / "n10" / "seed10", exp / "n10" / "seed2", exp / "n2"):
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "eval/loss": 1.0}\n')
    assert [p.name for p in report.seed_dirs(exp / "n10")] == ["seed2", "seed10"]
    assert report.seed_dirs(exp / "n2") == [exp / "n2"]
    text = report.build_report([exp], tmp_path / "out").read_text()
    assert "Experiment `" in text and "Arms: n2 (n2); n10 (seed2, seed10)." in text
    # a run directory with another run below it is still a run (results.json makes an experiment)
    (exp / "n2" / "sub").mkdir()
    (exp / "n2" / "sub" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    text = report.build_report([exp / "n2"], tmp_path / "out").read_text()
    assert f"Run `{exp / 'n2'}`." in text and "Experiment" not in text


def test_curve_colours_stay_distinct_past_ten_arms():
    reference("matplotlib")  # CI installs it: a missing matplotlib fails there instead of skipping
    assert [report._color(i, 10) for i in range(10)] == [f"C{i}" for i in range(10)]
    assert len({report._color(i, 11) for i in range(11)}) == 11  # REAL's eleven arms on one panel
    assert len({report._color(i, 20) for i in range(20)}) == 20


def test_an_experiments_unfinished_seeds_are_left_out_and_named(tmp_path, capsys, monkeypatch):
    """Seeds an experiment made (some hold its done marker): one that crashed or still runs is left out, so it
    neither pulls the arm's mean towards its unfinished numbers nor cuts the curves to its last step."""
    arm = tmp_path / "arm"
    for seed, finished in (("seed0", True), ("seed1", True), ("seed2", False)):
        (arm / seed).mkdir(parents=True)
        (arm / seed / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        if finished:
            (arm / seed / report.DONE).write_text("{}")
    assert [p.name for p in report.seed_dirs(arm)] == ["seed0", "seed1"]
    assert "left out 1 unfinished run(s) (seed2)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # tables only, fast
    text = report.build_report([tmp_path], tmp_path / "out").read_text()
    assert "arm (seed0, seed1)" in text and capsys.readouterr().err.count("left out") == 1  # said once
    for seed in ("seed0", "seed1"):
        (arm / seed / report.DONE).unlink()  # runs no experiment made: every one counts
    assert [p.name for p in report.seed_dirs(arm)] == ["seed0", "seed1", "seed2"]
