"""experiments/r3.py: the command lines of every arm, bad flags, and (--quick, tiny random models) the whole recipe
end to end: PPO per arm, the evaluation against SFT, a table holding every arm and metric, and a rerun that
skips the finished jobs and restarts an interrupted one."""
import json
import math
import sys
from pathlib import Path

import pytest

from experiments import r3
from nanoalign.cli import InputError

ROOT = Path(__file__).resolve().parents[1]


def flags(command: list[str]) -> dict:
    return dict(a[2:].split("=", 1) for a in command if a.startswith("--"))


def test_each_arm_is_train_ppo_with_its_reward_then_evaluate_against_sft(tmp_path):
    cfg = r3.Config(out=str(tmp_path / "exp"), sft="out/sft/model", reward_model="out/rm/model",
                    ppo_args="--lr=5e-5 --kl_coef=0.1")
    jobs = r3.jobs(cfg, list(r3.ARMS), [0, 1, 2])
    assert [j.name for j in jobs] == [f"{arm}/seed{s}" for arm in r3.ARMS for s in range(3)]
    for job in jobs:
        arm, seed = job.name.split("/seed")
        ppo, evaluate = job.commands
        assert ppo[:2] == [sys.executable, str(ROOT / "train_ppo.py")]
        assert evaluate[:3] == [sys.executable, "-m", "nanoalign.evaluate"]
        p, e = flags(ppo), flags(evaluate)
        run_dir = tmp_path / "exp" / arm / f"seed{seed}"
        assert job.run_dir == run_dir
        assert p == {"reward": arm, "seed": seed, "out_dir": str(run_dir), "init": "out/sft/model",
                     "reward_model": "out/rm/model", "eval_data": "", "steps": "25", "rollout_batch_size": "64",
                     "save_every": "0", "lr": "5e-5", "kl_coef": "0.1"}
        assert e == {"model_a": str(run_dir / "model"), "model_b": "out/sft/model", "limit": "100",
                     "diversity_samples": "4", "out": str(run_dir / "eval_vs_sft.json")}
    # paths stay as given: relative to the directory the experiment runs in, as a user would type them
    default = r3.jobs(r3.Config(), ["rm"], [0])[0]
    assert flags(default.commands[0])["out_dir"] == "exp/r3/rm/seed0" and default.run_dir == Path("exp/r3/rm/seed0")


@pytest.mark.parametrize("argv, flag", [
    (["--arms=rm,relevance_only"], "--arms"), (["--arms=rm,rm"], "--arms"), (["--arms=,"], "--arms"),
    (["--seeds=0"], "--seeds"), (["--steps=-1"], "--steps"), (["--parallel=0"], "--parallel"),
    (["--diversity_samples=1"], "--diversity_samples"), (["--sft=no/such/model"], "--sft"),
    (["--reward_model=no/such/rm"], "--reward_model"), (["--ppo_args=--lr='1"], "--ppo_args")])
def test_bad_flags_name_the_flag_before_any_work(argv, flag, tmp_path):
    with pytest.raises(InputError, match=f"^{flag}="):
        r3.main([*argv, f"--out={tmp_path}"])
    assert not tmp_path.joinpath("results.json").exists()


def run_quick(flags, capsys) -> str:
    capsys.readouterr()
    r3.main(flags)
    return capsys.readouterr().out


def test_quick_run_end_to_end_then_resumes(tmp_path, monkeypatch, capsys, tiny_init, tiny_rm):
    monkeypatch.chdir(ROOT)  # the scripts read data/ by relative paths
    out = tmp_path / "exp"
    flags = ["--quick", f"--sft={tiny_init}", f"--reward_model={tiny_rm}", f"--out={out}"]
    run_quick(flags, capsys)
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["sft", *r3.ARMS] and results["metrics"] == r3.METRICS and results["seeds"] == [0]
    for arm, values in results["arms"].items():
        expected = [m for m in r3.METRICS if not (arm == "sft" and m == "kl")]
        assert all(m in values for m in expected), arm
        for m in expected:
            assert len(values[m]) == 1 and math.isfinite(values[m][0]), (arm, m, values[m])
    table = (out / "results.md").read_text()
    assert all(f"| {arm} | 1 |" in table for arm in results["arms"]) and all(m in table for m in r3.METRICS)

    # the numbers are the runs': the evaluation of each policy against SFT, and the last PPO step's KL
    sft_side = None
    for arm in r3.ARMS:
        run_dir = out / arm / "seed0"
        evaluation = json.loads((run_dir / "eval_vs_sft.json").read_text())
        a = evaluation["metrics"]["A"]
        assert results["arms"][arm]["win_rate"] == [evaluation["comparison"]["win_rate"]]
        assert [results["arms"][arm][k][0] for k in ("quality", "copy_rate", "mean_words", "self_bleu")] == \
               [a["mean_quality"], a["copy_rate"], a["mean_words"], a["self_bleu"]]
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]  # --quick: 2 steps, no held-out evaluation inside PPO
        assert results["arms"][arm]["kl"] == [records[-1]["objective/kl"]]
        assert f"--reward={arm} " in (run_dir / "commands.txt").read_text()
        assert (sft_side or evaluation["metrics"]["B"]) == evaluation["metrics"]["B"]  # SFT: the same in every job
        sft_side = evaluation["metrics"]["B"]
    assert results["arms"]["sft"]["win_rate"] == [0.5]
    assert results["arms"]["sft"]["quality"] == [sft_side["mean_quality"]]
    # the first step's rollouts are the same in every arm (same start, same seed), scored by each arm's reward:
    # the scores differ (relevance_length and r3_no_branching may tie: RP = 1 when no trigram repeats)
    first = {arm: json.loads((out / arm / "seed0" / "metrics.jsonl").read_text().splitlines()[0]) for arm in r3.ARMS}
    assert len({r["ppo/response_length"] for r in first.values()}) == 1
    assert len({r["objective/scores"] for r in first.values()}) >= 6

    # a rerun skips every finished job and writes the same table
    logs = {arm: (out / arm / "seed0" / "log.txt").stat().st_mtime_ns for arm in r3.ARMS}
    printed = run_quick(flags, capsys)
    assert "7 of 7 runs finished earlier: skipped" in printed
    assert {arm: (out / arm / "seed0" / "log.txt").stat().st_mtime_ns for arm in r3.ARMS} == logs
    again = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in results.items() if k != "wall_s"}

    # an interrupted job (no done marker, a half-written run) starts again from nothing; the others are kept
    # (the oracle arm: the quickest job, no relevance model to load)
    (out / "oracle" / "seed0" / "done").unlink()
    (out / "oracle" / "seed0" / "stale.txt").write_text("from the interrupted run")
    printed = run_quick(flags, capsys)
    assert "6 of 7 runs finished earlier: skipped" in printed
    assert not (out / "oracle" / "seed0" / "stale.txt").exists() and (out / "oracle" / "seed0" / "done").exists()
    assert all((out / arm / "seed0" / "log.txt").stat().st_mtime_ns == logs[arm] for arm in r3.ARMS if arm != "oracle")
