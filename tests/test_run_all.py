"""run_all.py: the stages run in order with this run's paths, a finished stage is skipped, an interrupted one
resumes, and the summary table holds every model. The stages themselves are tested in their own files; here
they are replaced by recorders so the chaining logic is tested in seconds."""
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

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
    assert table.splitlines()[2:] == ["| SFT | 0.500 | 0.700 | 70.0% | - | 0.0% | 7.0 |",  # the SFT model: side B
                                      "| PPO | 0.700 | 0.800 | 80.0% | - | 0.0% | 7.0 |",
                                      "| DPO | 0.650 | 0.750 | 75.0% | - | 0.0% | 7.0 |"]
    assert summary["config"] == {"seed": 3, "device": "cpu", "limit": 0}
    recorded.clear()
    run_all.main([f"--out={tmp_path}/run", "--seed=3"])  # everything done: only the evaluation runs again
    assert [c[0] for c in recorded] == ["evaluate", "evaluate"]
    # another seed into the same directory would tabulate seed 3's models as its own: refused before any work
    recorded.clear()
    with pytest.raises(InputError, match=f"^--seed=0: {tmp_path}/run holds the stages of a --seed=3 run"):
        run_all.main([f"--out={tmp_path}/run"])
    assert recorded == []


def test_each_stage_gets_this_runs_paths_seed_and_device(tmp_path, recorded):
    out = tmp_path / "run"
    run_all.main([f"--out={out}", "--seed=2", "--device=cuda", "--limit=5"])
    common = ["--seed=2", "--device=cuda"]
    assert recorded == [
        ("sft", common + [f"--base_dir={out}/base", f"--out_dir={out}/sft"]),
        ("rm", common + [f"--init={out}/sft/model", f"--out_dir={out}/rm"]),
        ("ppo", common + [f"--init={out}/sft/model", f"--reward_model={out}/rm/model", f"--out_dir={out}/ppo"]),
        ("dpo", common + [f"--init={out}/sft/model", f"--out_dir={out}/dpo"]),
        *[("evaluate", [f"--model_a={out}/{stage}/model", f"--model_b={out}/sft/model", "--limit=5", "--device=cuda",
                        f"--out={out}/{stage}/vs_sft.json"]) for stage in ("ppo", "dpo")]]


@pytest.mark.parametrize("checkpoint, resumed", [
    ("rm", "rm"),
    ("base", "sft"),  # interrupted while pretraining the base model: train_sft.py goes on from there
])
def test_an_interrupted_stage_resumes(tmp_path, recorded, checkpoint, resumed):
    ckpt = tmp_path / "run" / checkpoint / "model"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.pt").write_bytes(b"")
    run_all.main([f"--out={tmp_path}/run"])
    assert [stage for stage, argv in recorded if "--resume" in argv] == [resumed]


@pytest.mark.parametrize("flag, message", [("--device=tpu", "--device=tpu: choose cpu or cuda"),
                                           ("--limit=-1", "--limit=-1: must be >= 0")])
def test_bad_flags(tmp_path, recorded, flag, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        run_all.main([f"--out={tmp_path / 'run'}", flag])
    assert recorded == [] and not (tmp_path / "run").exists()  # refused before any work


def test_the_tiny_world_is_built_only_when_missing(tmp_path, recorded, monkeypatch):
    built = []

    def build(out):  # as the real one, it writes data/world.json
        built.append(out)
        (Path(out) / "world.json").write_text("{}")
    monkeypatch.setattr(run_all.world, "build", build)
    monkeypatch.setattr(run_all.train, "REPO_ROOT", tmp_path / "repo")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    run_all.main([f"--out={tmp_path / 'run'}"])
    assert built == [str(tmp_path / "repo" / "data")]
    run_all.main([f"--out={tmp_path / 'run'}"])
    assert len(built) == 1


def test_a_finished_stage_whose_checkpoint_moved_on_is_resumed_not_tabulated(tmp_path, recorded):
    """A later run of train_ppo.py into out/ppo, stopped at step 10, left the finished run's eval.json (step 60)
    beside its own checkpoint: that was tabulated as the pipeline's PPO. The eval.json names the step it describes."""
    out = tmp_path / "run"
    cfg = run_all.parse_config(run_all.train_ppo.Config, run_all.stage_args(run_all.Config(out=str(out)), "ppo"))
    run_all.train_ppo.check_config(cfg)
    (out / "ppo" / "model").mkdir(parents=True)
    (out / "ppo" / "eval.json").write_text(json.dumps({"checkpoint_step": 60}))
    for step, resumed in ((10, True), (60, False)):
        torch.save({"step": step, "rng": [{}], "extra": {}, "config": {**asdict(cfg), "stop_at": 10}},
                   out / "ppo" / "model" / "train_state.pt")
        recorded.clear()
        run_all.main([f"--out={out}"])
        assert [argv for stage, argv in recorded if stage == "ppo"] == ([run_all.stage_args(
            run_all.Config(out=str(out)), "ppo") + ["--resume"]] if resumed else [])


def test_save_eval_names_the_checkpoint_step_it_describes(tmp_path):
    from nanoalign import train

    (tmp_path / "model").mkdir()
    torch.save({"step": 7, "rng": [{}], "extra": {}}, tmp_path / "model" / "train_state.pt")
    assert json.loads(train.save_eval(tmp_path, {"eval/x": 1.0}).read_text()) == {"eval/x": 1.0, "checkpoint_step": 7}


def test_a_stage_trained_from_other_data_or_other_models_is_refused(tmp_path, recorded, monkeypatch):
    """After `python -m nanoalign.world` rebuilt data/ (other fractions), or a stage was retrained, the finished
    stages trained from the old ones were reused and tabulated against the new. A copied --out still matches."""
    monkeypatch.setattr(run_all.train, "REPO_ROOT", tmp_path / "repo")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "world.json").write_text('{"padded_demos": 0.9}')
    out = tmp_path / "run"
    (out / "sft" / "model").mkdir(parents=True)
    (out / "sft" / "model" / "model.safetensors").write_bytes(b"sft weights")
    run_all.main([f"--out={out}"])
    shutil.copytree(out, tmp_path / "copy")
    recorded.clear()
    run_all.main([f"--out={tmp_path / 'copy'}"])  # moved or copied: the same bytes
    assert [c[0] for c in recorded] == ["evaluate", "evaluate"]
    (out / "sft" / "model" / "model.safetensors").write_bytes(b"retrained sft weights")
    with pytest.raises(InputError, match=rf"^--out={out}: {out}/rm was trained from other data or other earlier "
                                         r"models than those there now"):
        run_all.main([f"--out={out}"])
    (tmp_path / "repo" / "data" / "world.json").write_text('{"padded_demos": 0.7}')
    with pytest.raises(InputError, match=rf"{out}/sft was trained from other data"):
        run_all.main([f"--out={out}"])


def test_a_stage_made_with_other_flags_is_refused_not_tabulated(tmp_path, recorded):
    """A quick run of a script left in the output directory (--steps=5) has an eval.json too: it was skipped as
    done and tabulated as the pipeline's stage. The stage's saved config must show run_all's flags."""
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
    # what it evaluated on does not count either, nor where the directory is: a copy holds the same stages (the
    # stages after it go: rewritten, the SFT checkpoint is another input to them, test_a_stage_trained_from_...)
    torch.save({**state, "config": {**asdict(sft), "eval_data": "", "val_data": "other.jsonl"}},
               out / "sft" / "model" / "train_state.pt")
    for later in ("rm", "ppo", "dpo"):
        shutil.rmtree(out / later)
    shutil.copytree(out, tmp_path / "copy")
    for where in (out, tmp_path / "copy"):
        recorded.clear()
        run_all.main([f"--out={where}"])
        assert "sft" not in [c[0] for c in recorded]


@pytest.mark.parametrize("stage, changed, refused", [
    ("rm", None, False), ("ppo", None, False), ("dpo", None, False),
    ("sft", "micro_batch_size", False),  # the same updates up to float rounding
    ("dpo", "max_new_tokens", False),    # DPO's answers are the evaluation's only
    ("ppo", "max_new_tokens", True),     # PPO's rollouts are its training data
])
def test_a_stage_saved_as_its_script_saves_it_is_skipped_as_done(tmp_path, recorded, stage, changed, refused):
    """The saved config is the script's after check_config resolved it (PPO and DPO: one split, no EWC) and after
    the run resolved --template=auto from the model; a checkpoint written before a flag existed lacks it."""
    out = tmp_path / "run"
    script = {"sft": run_all.train_sft, "rm": run_all.train_rm, "ppo": run_all.train_ppo,
              "dpo": run_all.train_dpo}[stage]
    cfg = run_all.parse_config(script.Config, run_all.stage_args(run_all.Config(out=str(out)), stage))
    script.check_config(cfg)
    saved = {**asdict(cfg), "template": "hh"}
    del saved["min_lr_ratio"]
    if changed:
        saved[changed] += 1
    (out / stage / "model").mkdir(parents=True)
    (out / stage / "eval.json").write_text("{}")
    torch.save({"step": cfg.steps, "rng": [{}], "extra": {}, "config": saved}, out / stage / "model" / "train_state.pt")
    if refused:
        with pytest.raises(InputError, match=rf"holds a {stage} run made with --{changed}={saved[changed]}, where "
                                             rf"run_all.py passes --{changed}={saved[changed] - 1}"):
            run_all.main([f"--out={out}"])
    else:
        run_all.main([f"--out={out}"])
        assert stage not in [c[0] for c in recorded] and "evaluate" in [c[0] for c in recorded]
