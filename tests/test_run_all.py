"""run_all.py: the stages run in order with this run's paths, a finished stage is skipped, an interrupted one
resumes, and the summary table holds every model. The stages themselves are tested in their own files; here
they are replaced by recorders so the chaining logic is tested in seconds."""
import json
from pathlib import Path

import pytest

import run_all
from nanoalign.cli import InputError


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    for stage, module in (("sft", run_all.train_sft), ("rm", run_all.train_rm), ("ppo", run_all.train_ppo),
                          ("dpo", run_all.train_dpo)):
        def fake_main(argv, stage=stage):
            calls.append((stage, argv))
            out = Path(next(a for a in argv if a.startswith("--out_dir=")).split("=", 1)[1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text("{}")
        monkeypatch.setattr(module, "main", fake_main)

    def fake_evaluate(argv):
        model_a = next(a for a in argv if a.startswith("--model_a=")).split("=", 1)[1]
        quality = {"ppo": 0.8, "dpo": 0.75}[Path(model_a).parent.name]
        metric = lambda q: {"mean_quality": q, "closed_accuracy": q, "rouge_l": None, "copy_rate": 0.0,  # noqa: E731
                            "mean_words": 7.0}
        calls.append(("evaluate", argv))
        return {"metrics": {"A": metric(quality), "B": metric(0.7)}, "comparison": {"win_rate": quality - 0.1}}
    monkeypatch.setattr(run_all.evaluate, "main", fake_evaluate)
    return calls


def test_stages_run_in_order_then_are_skipped(tmp_path, recorded):
    run_all.main([f"--out={tmp_path}/run", "--seed=3"])
    assert [c[0] for c in recorded] == ["sft", "rm", "ppo", "dpo", "evaluate", "evaluate"]
    sft_argv = dict(a.split("=", 1) for a in recorded[0][1])
    assert sft_argv["--base_dir"] == f"{tmp_path}/run/base" and sft_argv["--seed"] == "3"
    ppo_argv = dict(a.split("=", 1) for a in recorded[2][1])
    assert ppo_argv["--init"] == f"{tmp_path}/run/sft/model" and ppo_argv["--reward_model"] == f"{tmp_path}/run/rm/model"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["PPO"]["win_rate"] == pytest.approx(0.7) and summary["SFT"]["win_rate"] == 0.5
    table = (tmp_path / "run" / "summary.md").read_text()
    assert "| PPO | 0.700 | 0.800 | 80.0% | - | 0.0% | 7.0 |" in table
    assert summary["config"] == {"seed": 3, "device": "cpu", "limit": 0}
    recorded.clear()
    run_all.main([f"--out={tmp_path}/run", "--seed=3"])  # everything done: only the evaluation runs again
    assert [c[0] for c in recorded] == ["evaluate", "evaluate"]
    # another seed into the same directory would tabulate seed 3's models as its own: refused before any work
    recorded.clear()
    with pytest.raises(InputError, match=f"^--seed=0: {tmp_path}/run holds the stages of a --seed=3 run"):
        run_all.main([f"--out={tmp_path}/run"])
    assert recorded == []


def test_an_interrupted_stage_resumes(tmp_path, recorded):
    ckpt = tmp_path / "run" / "rm" / "model"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.pt").write_bytes(b"")
    run_all.main([f"--out={tmp_path}/run"])
    rm_argv = next(argv for stage, argv in recorded if stage == "rm")
    sft_argv = next(argv for stage, argv in recorded if stage == "sft")
    assert "--resume" in rm_argv and "--resume" not in sft_argv


def test_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="--device=tpu"):
        run_all.main([f"--out={tmp_path}", "--device=tpu"])


def test_a_stage_made_with_other_flags_is_refused_not_tabulated(tmp_path, recorded):
    """A quick run of a script left in the output directory (--steps=5) has an eval.json too: it was skipped as
    done and tabulated as the pipeline's stage. The stage's saved config must show run_all's flags."""
    import torch
    from dataclasses import asdict

    out = tmp_path / "run"
    sft = run_all.parse_config(run_all.train_sft.Config, run_all.stage_args(run_all.Config(out=str(out)), "sft"))
    run_all.train_sft.check_config(sft)
    (out / "sft" / "model").mkdir(parents=True)
    (out / "sft" / "eval.json").write_text("{}")
    state = {"step": sft.steps, "rng": [{}], "extra": {}}  # what find_checkpoint requires of a train_state
    for steps, refused in ((5, True), (sft.steps, False)):  # a made-by-hand config as the script saves it
        torch.save({**state, "config": {**asdict(sft), "steps": steps, "device": "cuda", "save_every": 7}},
                   out / "sft" / "model" / "train_state.pt")
        recorded.clear()
        if refused:
            with pytest.raises(InputError, match=rf"^--out={out}: {out}/sft holds a sft run made with --steps=5, where "
                                                 rf"run_all.py passes --steps={sft.steps}; pass another --out"):
                run_all.main([f"--out={out}"])
            assert recorded == []
        else:  # the same recipe (where it ran and how often it saved do not count): skipped as done
            run_all.main([f"--out={out}"])
            assert [c[0] for c in recorded] == ["rm", "ppo", "dpo", "evaluate", "evaluate"]
    # what it evaluated on does not count either, nor where the directory is: a copy holds the same stages
    torch.save({**state, "config": {**asdict(sft), "eval_data": "", "val_data": "other.jsonl"}},
               out / "sft" / "model" / "train_state.pt")
    import shutil
    shutil.copytree(out, tmp_path / "copy")
    for where in (out, tmp_path / "copy"):
        recorded.clear()
        run_all.main([f"--out={where}"])
        assert "sft" not in [c[0] for c in recorded]
