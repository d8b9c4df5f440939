"""experiments/real.py and experiments/hbat.py in --quick mode, end to end on tiny random models and a few
records: every arm and metric lands in results.json and results.md, the numbers are the runs' own, and a second
run skips the finished runs; bad flags stop them before any run."""
import json
import math
import re
from pathlib import Path

import pytest

from experiments import hbat, real
from nanoalign import world
from nanoalign.cli import InputError
from nanoalign.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def head(src: str, dst: Path, n: int, skip: int = 0) -> str:
    dst.write_text("".join((ROOT / "data" / src).read_text().splitlines(True)[skip:skip + n]))
    return str(dst)


def assert_complete(results: dict, arms, metrics):
    assert list(results["arms"]) == list(arms)
    for arm in arms:
        for m in metrics:
            assert len(results["arms"][arm][m]) == 1 and math.isfinite(results["arms"][arm][m][0]), (arm, m)


@pytest.mark.slow  # ~2 minutes: 33 subprocesses
def test_real_quick_runs_every_arm_and_reports_the_runs_numbers(tmp_path, monkeypatch, tiny_init, capsys):
    monkeypatch.chdir(ROOT)  # the evaluation's default held-out prompts are data/prompts_test.jsonl
    out = tmp_path / "real"
    flags = [f"--out={out}", f"--sft={tiny_init}", "--quick",
             f"--multi_data={head('multi_train.jsonl', tmp_path / 'multi.jsonl', 10)}",
             f"--pairs_data={head('prefs_train.jsonl', tmp_path / 'pairs.jsonl', 16)}",
             f"--val_pairs={head('prefs_val.jsonl', tmp_path / 'val.jsonl', 4)}"]
    results = real.main(flags)
    assert_complete(results, real.ARMS, real.METRICS)
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"] == results["arms"]
    table = (out / "results.md").read_text()
    assert all(f"| {arm} | 1 |" in table for arm in real.ARMS)
    # the label-error rate is the oracle's verdict on the pairs the run wrote
    pairs = read_jsonl(out / "multi" / "hard" / "seed0" / "pairs.jsonl")
    errors = sum(world.quality(p["prompt"], p["chosen"]) < world.quality(p["prompt"], p["rejected"]) for p in pairs)
    assert results["arms"]["multi/hard"]["label_error"] == [errors / len(pairs)]
    assert results["arms"]["pairs/easy"]["pairs"] == [8]  # 50% of 16 pairs
    vs_sft = json.loads((out / "pairs" / "random" / "seed0" / "vs_sft.json").read_text())
    assert results["arms"]["pairs/random"]["win_rate"] == [vs_sft["comparison"]["win_rate"]]
    assert results["arms"]["pairs/random"]["padded"] == [sum(map(world.is_padded, vs_sft["answers"]["A"]))]
    assert results["arms"]["pairs/random"]["wins"] == [vs_sft["comparison"]["wins"]]
    # easy keeps the least similar half, hard the most similar: their selections cannot overlap
    easy = read_jsonl(out / "pairs" / "easy" / "seed0" / "pairs.jsonl")
    hard = read_jsonl(out / "pairs" / "hard" / "seed0" / "pairs.jsonl")
    assert max(p["cosine"] for p in easy) <= min(p["cosine"] for p in hard)
    # on-policy arms: every strategy of a seed selects among the same sampled answers, so per prompt the easy pair
    # (least similar) is never more similar than the hard one (most similar)
    sampled = {s: {p["prompt"]: p for p in read_jsonl(out / "sampled" / s / "seed0" / "pairs.jsonl")}
               for s in ("easy", "hard")}
    assert sampled["easy"] and sampled["easy"].keys() == sampled["hard"].keys()
    assert set(sampled["easy"]) <= {r["prompt"] for r in read_jsonl(tmp_path / "pairs.jsonl")}
    assert all(p["cosine"] <= sampled["hard"][k]["cosine"] + 1e-6 for k, p in sampled["easy"].items())
    # resumable: a second run trains nothing
    capsys.readouterr()
    assert real.main(flags)["arms"] == results["arms"]
    assert "11 of 11 runs finished earlier: skipped" in capsys.readouterr().out


@pytest.mark.slow  # ~1.5 minutes: 20 training runs and 20 evaluations
def test_hbat_quick_runs_every_arm_for_dpo_and_ppo(tmp_path, monkeypatch, tiny_init, tiny_rm):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "hbat"
    results = hbat.main([f"--out={out}", f"--base={tiny_init}", f"--reward_model={tiny_rm}", "--quick",
                         f"--sft_data={head('sft_val.jsonl', tmp_path / 'sft.jsonl', 24)}",
                         f"--pref_data={head('prefs_train.jsonl', tmp_path / 'pairs.jsonl', 24)}",
                         f"--val_pairs={head('prefs_val.jsonl', tmp_path / 'val.jsonl', 4)}",
                         f"--ppo_data={head('sft_val.jsonl', tmp_path / 'prompts.jsonl', 16, skip=24)}"])
    arms = [f"{m}/{a}" for m in ("dpo", "ppo") for a in ("sft", *hbat.ARMS)]
    assert list(results["arms"]) == arms
    for arm in arms:
        expected = ["rouge_l", "closed_accuracy", "win_rate", "mean_quality"]
        if arm.split("/")[1] not in ("sft",):
            expected.append("wall_s")
        if arm.split("/")[1] in ("hbat", "hbat_freeze", "fisher"):
            expected += ["ewc_setup_s", "ewc_memory_mb"]
        assert sorted(results["arms"][arm]) == sorted(expected), arm
    # the model every arm is judged against is the two-stage run after its SFT stage: the --model_b of each arm's
    # evaluation command and of the evaluation that ran (the tiny quick models all answer alike, so the answers
    # themselves cannot tell which model B was)
    for method in ("dpo", "ppo"):
        two_stage = out.resolve() / method / "two_stage" / "seed0"
        assert [s["kind"] for s in read_jsonl(two_stage / "stages.jsonl")] == ["sft", method]
        assert (two_stage / "stage1_sft" / "config.json").is_file()
        for arm in hbat.ARMS:
            eval_dir = out / method / arm / "seed0" / "eval"
            (command,) = (eval_dir / "commands.txt").read_text().splitlines()
            flags = dict(a.split("=", 1) for a in command.split() if a.startswith("--"))
            assert flags["--model_b"] == str(two_stage / "stage1_sft"), (method, arm)
            vs_sft = json.loads((eval_dir / "vs_sft.json").read_text())
            assert vs_sft["config"]["model_b"] == str(two_stage / "stage1_sft"), (method, arm)
    stages = read_jsonl(out / "dpo" / "hbat" / "seed0" / "stages.jsonl")
    assert [s["kind"] for s in stages] == ["sft", "dpo", "sft", "dpo"]
    # Fisher keeps θ* and F, the modified EWC θ* alone: twice the memory
    fisher, modified = results["arms"]["dpo/fisher"]["ewc_memory_mb"][0], results["arms"]["dpo/hbat"]["ewc_memory_mb"][0]
    assert fisher == pytest.approx(2 * modified)
    assert (out / "results.md").read_text().count("| dpo/") == 6


@pytest.mark.parametrize("main, flag, message", [
    (real.main, "--seeds=0", "--seeds=0: must be positive"),
    (real.main, "--parallel=0", "--parallel=0: must be positive"),
    (hbat.main, "--method=sft", "--method=sft: choose one of dpo, ppo, both"),
    (hbat.main, "--splits=0", "--splits=0: must be positive"),
    (hbat.main, "--ppo_steps=-1", "--ppo_steps=-1: must be positive"),
])
def test_bad_flags_are_one_line_errors_before_any_run(main, flag, message, tmp_path):
    with pytest.raises(InputError, match=re.escape(message)):
        main([f"--out={tmp_path / 'exp'}", flag])
    assert not (tmp_path / "exp").exists()
