"""nanoalign/hbat.py and the Hbat schedules of train_dpo.py and train_ppo.py: the order of the stages and their
splits, the two-stage pipeline reproduced exactly, the EWC penalty where (and only where) it belongs, each DPO
stage's reference, resume anywhere in the schedule, torchrun = one process, and the flag checks."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_dpo
import train_ppo
import train_sft
from nanoalign import ewc, hbat
from nanoalign.checkpoint import load_pretrained
from nanoalign.cli import InputError
from nanoalign.data import collate_sft, read_jsonl, tokenize_pairs, tokenize_sft
from nanoalign.dpo import response_logps
from nanoalign.reward import RewardModel
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


# --- the schedule


def flags(**kw):
    base = dict(schedule="alternating", splits=2, sft_data="x.jsonl", steps=10, sft_steps=7)
    return SimpleNamespace(**{**base, **kw})


def test_the_schedule_visits_the_splits_in_order():
    stages = hbat.plan(flags(), "dpo")
    assert [(s.index, s.kind, s.split) for s in stages] == [(0, "sft", 0), (1, "dpo", 0), (2, "sft", 1), (3, "dpo", 1)]
    # each kind's budget shared evenly, the first stages taking the remainder; offsets count the run's steps
    assert [s.steps for s in stages] == [4, 5, 3, 5] and [s.offset for s in stages] == [0, 4, 9, 12]
    three = hbat.plan(flags(splits=3, sft_steps=9, steps=3), "ppo")
    assert [(s.kind, s.split, s.steps) for s in three] == [("sft", 0, 3), ("ppo", 0, 1), ("sft", 1, 3), ("ppo", 1, 1),
                                                          ("sft", 2, 3), ("ppo", 2, 1)]
    # two_stage: all of the SFT data then all of the pairs; without SFT data, the plain script's one stage
    two = flags(schedule="two_stage", ewc="modified", splits=2, init="auto", out_dir="auto", fisher_samples=1,
                sft_lr=1.0, lambda_max=1.0, ewc_temperature=1.0, sft_data="auto")
    hbat.check_config(two, "dpo")
    # no SFT data, no split, no EWC: the plain script, from the SFT model, into its usual directory
    assert (two.sft_data, two.splits, two.ewc, two.init, two.out_dir) == ("", 1, "none", hbat.SFT_INIT, "out/dpo")
    assert [(s.kind, s.steps) for s in hbat.plan(two, "dpo")] == [("dpo", 10)]
    two.sft_data = "x.jsonl"
    assert [(s.kind, s.split, s.steps, s.offset) for s in hbat.plan(two, "dpo")] == [("sft", 0, 7, 0), ("dpo", 0, 10, 7)]
    hbat_ = flags(schedule="alternating", ewc="modified", splits=2, init="auto", out_dir="auto", fisher_samples=1,
                  sft_lr=1.0, lambda_max=1.0, ewc_temperature=1.0, sft_data="auto")
    hbat.check_config(hbat_, "ppo")  # Hbat: the tiny SFT data, from the base model, beside the plain run's output
    assert (hbat_.sft_data, hbat_.splits, hbat_.ewc, hbat_.init, hbat_.out_dir) == (
        "data/sft_train.jsonl", 2, "modified", hbat.BASE_INIT, "out/hbat_ppo")


def test_the_splits_are_disjoint_equal_and_cover_the_data():
    rows = list(range(11))
    parts = hbat.split(rows, 3, "data")
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sorted(x for p in parts for x in p) == rows  # every row once: disjoint, and nothing left out
    assert parts[0] == [0, 3, 6, 9]  # strided: a file sorted by task gives every split each task
    assert hbat.split(rows, 1, "data") == [rows]  # one split is the data unchanged, in order
    assert hbat.split([0, 1, 2], 3, "data") == [[0], [1], [2]]  # as many splits as examples: one each
    with pytest.raises(InputError, match=r"^--splits=12: more splits than the 11 examples of --data$"):
        hbat.split(rows, 12, "data")


def test_stage_steps_records_and_stop_at_count_over_the_whole_run():
    stage = hbat.plan(flags(), "dpo")[2]  # SFT_2: run steps 10..12
    stage.tagged = True
    assert stage.record(1) == {"step": 10, "stage": 3}
    assert stage.last == 3
    stage.stop_at = 11  # inside the stage: stop after its second step
    assert stage.last == 2
    stage.stop_at = 5  # before it: nothing of it runs
    assert stage.last == 0


def test_step_penalty_backpropagates_once_and_reports_the_share():
    layer = torch.nn.Linear(2, 2)
    anchor = ewc.snapshot(layer)
    with torch.no_grad():
        layer.weight += 0.5  # every weight 0.5 from the anchor, the bias at it
    omega = {"weight": 3.0, "bias": 7.0}
    layer.weight.grad = torch.ones(2, 2)  # the task loss's gradient, already there
    value = hbat.step_penalty(lambda: ewc.ewc_penalty(layer, anchor, omega))
    assert value == pytest.approx(3.0 * 4 * 0.25)  # Ω Σ (θ - θ*)² = 3 * 4 * 0.5²
    torch.testing.assert_close(layer.weight.grad, torch.full((2, 2), 1.0 + 2 * 3.0 * 0.5))  # added to, once
    stage = hbat.Stage(1, "dpo", 0, 5, ewc_info={"ewc/omega_entropy": 0.25})
    assert hbat.ewc_record(stage, 3.0, -1.0) == {"ewc/penalty": 3.0, "ewc/penalty_share": 0.75,
                                                  "ewc/omega_entropy": 0.25}
    assert hbat.ewc_record(stage, 0.0, 0.0)["ewc/penalty_share"] == 0.0
    assert hbat.step_penalty(None) is None and hbat.ewc_record(stage, None, 1.0) == {}
    # every anchored tensor frozen (Hbat-Freeze beside the penalty): the value is still reported, with nothing
    # to backpropagate into
    layer.weight.requires_grad_(False)
    assert hbat.step_penalty(lambda: ewc.ewc_penalty(layer, anchor, {"weight": 2.0})) == pytest.approx(2.0)


def test_evenly_spaced_sample():
    assert hbat.evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert hbat.evenly_spaced(list(range(4)), 8) == [0, 1, 2, 3]
    assert hbat.evenly_spaced(list(range(7)), 4) == [0, 1, 2, 3]  # a stride of 7 // 4 = 1: the first four


# --- the scripts: tiny models, a couple of steps per stage


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prefs = (ROOT / "data" / "prefs_val.jsonl").read_text().splitlines(True)
    (d / "prefs.jsonl").write_text("".join(prefs[:24]))
    (d / "prefs_val.jsonl").write_text("".join(prefs[24:30]))
    (d / "sft.jsonl").write_text("".join((ROOT / "data" / "sft_val.jsonl").read_text().splitlines(True)[:24]))
    return d


def dpo_args(tiny_init, out, files, *extra):
    """SFT_1, DPO_1, SFT_2, DPO_2 of 2 steps each (run steps 1-2, 3-4, 5-6, 7-8); a repeated flag wins."""
    return [f"--init={tiny_init}", f"--out_dir={out}", f"--data={files}/prefs.jsonl",
            f"--val_data={files}/prefs_val.jsonl", "--eval_prompts=", f"--sft_data={files}/sft.jsonl",
            "--schedule=alternating", "--splits=2", "--steps=4", "--sft_steps=4", "--batch_size=4",
            "--micro_batch_size=4", "--max_len=128", "--warmup_steps=1", "--eval_every=2", "--save_every=0",
            "--device=cpu", "--dtype=float32", "--lr=1e-3", "--sft_lr=1e-3", *extra]


def ppo_args(tiny_init, tiny_rm, out, files, *extra):
    """SFT_1 (run steps 1-2), PPO_1 (3), SFT_2 (4-5), PPO_2 (6); a repeated flag wins."""
    return [f"--init={tiny_init}", f"--reward_model={tiny_rm}", f"--out_dir={out}", f"--data={ROOT}/data/sft_val.jsonl",
            "--eval_data=", f"--sft_data={files}/sft.jsonl", "--schedule=alternating", "--splits=2", "--steps=2",
            "--sft_steps=4", "--rollout_batch_size=8", "--gen_batch_size=4", "--mini_batch_size=4",
            "--micro_batch_size=4", "--ppo_epochs=1", "--max_prompt_len=64", "--max_new_tokens=8", "--lr=1e-3",
            "--critic_lr=1e-3", "--sft_lr=1e-3", "--kl_horizon=100", "--save_every=0", "--device=cpu",
            "--dtype=float32", *extra]


def records(out, name="metrics.jsonl"):
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


def policy_weights(ckpt):
    return load_pretrained(ckpt).state_dict()


def assert_same_weights(a, b, tol):
    wa, wb = policy_weights(a), policy_weights(b)
    for k in wa:
        if tol == 0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


def assert_same_records(a, b, tol, skip=("pairs_per_s", "tok_per_s", "wall_s")):
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        keys = [k for k in x if k not in skip and not k.startswith("time/")]
        assert keys == [k for k in y if k not in skip and not k.startswith("time/")], x["step"]
        for k in keys:
            if isinstance(x[k], str):
                assert x[k] == y[k]
            else:
                assert abs(x[k] - y[k]) <= tol, (x["step"], k, x[k], y[k])


def test_alternating_dpo_stages_ewc_and_references(tiny_init, files, tmp_path, capsys):
    out = tmp_path / "hbat"
    # S_u is ~1e14 here: at T = 1e13 Ω spreads over the tensors, so its entropy shows which scores built it
    train_dpo.main(dpo_args(tiny_init, out, files, "--ewc_temperature=1e13"))
    printed = capsys.readouterr().out
    log = records(out)
    assert [(r["step"], r["stage"]) for r in log] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (7, 4), (8, 4)]
    assert [r.get("phase") for r in log] == ["sft", "sft", None, None, "sft", "sft", None, None]
    # SFT_1 has nothing to protect; every later stage starts AT its anchor (penalty exactly 0), then moves off it
    assert not any(k.startswith("ewc/") for r in log[:2] for k in r)
    for first, second in zip(log[2::2], log[3::2]):
        assert first["ewc/penalty"] == 0.0 and first["ewc/penalty_share"] == 0.0
        assert second["ewc/penalty"] > 0 and 0 < second["ewc/penalty_share"] < 1
        assert "ewc/omega_entropy" in first
    # each DPO stage's reference is the model at its start: at its first step every implicit reward is 0
    for first in (log[2], log[6]):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "margins/unscaled"):
            assert abs(first[key]) <= 1e-5, (first["step"], key)
    assert abs(log[6]["loss"] - math.log(2)) <= 1e-5
    assert (out / "ref_logps_stage2.pt").exists() and (out / "ref_logps_stage4.pt").exists()
    # the stage-start checkpoints, and one summary line per stage
    assert [p.name for p in sorted(out.glob("stage[0-9]*"))] == ["stage1_sft", "stage2_dpo", "stage3_sft"]
    stages = records(out, "stages.jsonl")
    assert [(s["stage"], s["kind"], s["split"], s["steps"], s["step"]) for s in stages] == [
        (1, "sft", 1, 2, 2), (2, "dpo", 1, 2, 4), (3, "sft", 2, 2, 6), (4, "dpo", 2, 2, 8)]
    assert "ewc/penalty_share" not in stages[0] and all("ewc/penalty_share" in s for s in stages[1:])
    assert stages[3]["loss"] == log[-1]["loss"] and stages[1]["ewc/memory_mb"] > 0
    assert printed.count("[stage ") == 4 and "[stage 4/4 dpo, split 2, 2 steps," in printed
    # Ω of DPO_2 comes from the scores of SFT_1 and SFT_2, read back from the stage checkpoints
    snap = lambda p: ewc.snapshot(load_pretrained(p))  # noqa: E731
    init, s1, s2, s3 = snap(tiny_init), snap(out / "stage1_sft"), snap(out / "stage2_dpo"), snap(out / "stage3_sft")
    scores = ewc.accumulate(ewc.delta_scores(init, s1), ewc.delta_scores(s2, s3))
    entropy = lambda scores: ewc.omega_entropy(ewc.importance(scores, 100.0, 1e13))  # noqa: E731
    assert log[6]["ewc/omega_entropy"] == pytest.approx(entropy(scores), abs=1e-9)
    # ... and not from SFT_2's alone (nor SFT_1's): the assertion above can tell them apart
    for alone in (ewc.delta_scores(s2, s3), ewc.delta_scores(init, s1)):
        assert abs(entropy(alone) - entropy(scores)) > 1e-6
    saved = torch.load(out / "model" / "train_state.pt", weights_only=False)["extra"]["hbat"]["scores"]
    assert saved["sft"] == pytest.approx(scores, rel=1e-9)  # the checkpoint carries the accumulated scores


def test_dpo_resume_anywhere_in_the_schedule(tiny_init, files, tmp_path, capsys):
    """Stopped at the end of stage 2, resumed and stopped inside stage 3, resumed to the end: the same metrics
    and weights as a run that never stopped, and the penalty logged inside stage 3 is the formula's."""
    extra = ["--ewc_temperature=1e13"]  # S_u is ~1e14 here: Ω spread over the tensors
    train_dpo.main(dpo_args(tiny_init, tmp_path / "full", files, *extra))
    train_dpo.main(dpo_args(tiny_init, tmp_path / "cut", files, *extra, "--stop_at=4"))
    assert not (tmp_path / "cut" / "stage3_sft").exists() and (tmp_path / "cut" / "stage2_dpo").exists()
    train_dpo.main(dpo_args(tiny_init, tmp_path / "cut", files, *extra, "--stop_at=5", "--resume"))
    cut = tmp_path / "cut"
    state = torch.load(cut / "model" / "train_state.pt", weights_only=False)
    assert state["step"] == 5 and state["extra"]["hbat"]["stage"] == 2
    # the penalty of step 6 is computed at the weights after step 5, anchored at the end of stage 2, with Ω from
    # the scores of DPO_1
    anchor = ewc.snapshot(load_pretrained(cut / "stage2_dpo"))
    scores = ewc.delta_scores(ewc.snapshot(load_pretrained(cut / "stage1_sft")), anchor)
    omega = ewc.importance(scores, 100.0, 1e13)
    expected = ewc.ewc_penalty(load_pretrained(cut / "model"), anchor, omega).item()
    # Ω (or the Fisher) is rebuilt from the saved scores with the resumed run's flags, and SFT_2 trains at --sft_lr:
    # a resume that changed them would finish another run
    for flag, was in (("--ewc_temperature=1.0", "10000000000000.0"), ("--lambda_max=5000", "100.0"),
                      ("--sft_lr=0.005", "0.001"), ("--fisher_samples=8", "64")):
        with pytest.raises(InputError, match=f"^{flag.split('=')[0]}=.*: the checkpoint to resume was written with "
                                             f"{flag.split('=')[0]}={was}"):
            train_dpo.main(dpo_args(tiny_init, cut, files, *extra, flag, "--resume"))
    capsys.readouterr()
    train_dpo.main(dpo_args(tiny_init, cut, files, *extra, "--resume"))
    assert "resumed from" in capsys.readouterr().out
    full = records(tmp_path / "full")
    assert full[5]["ewc/penalty"] == pytest.approx(expected, rel=1e-5)
    assert full[5]["ewc/omega_entropy"] == pytest.approx(ewc.omega_entropy(omega), abs=1e-9)
    assert 0.1 < full[5]["ewc/omega_entropy"] < math.log(len(scores))  # spread, not one-hot nor uniform
    assert_same_records(tmp_path / "full", cut, 1e-6)
    assert records(tmp_path / "full", "stages.jsonl")[3]["loss"] == records(cut, "stages.jsonl")[3]["loss"]
    assert_same_weights(tmp_path / "full" / "model", cut / "model", 1e-6)


def test_one_split_without_ewc_is_the_two_stage_pipeline(tiny_init, files, tmp_path):
    """--schedule=alternating --splits=1 --ewc=none, --schedule=two_stage, and train_sft.py then train_dpo.py:
    the same final weights."""
    common = ["--sft_steps=3", "--steps=3"]
    train_dpo.main(dpo_args(tiny_init, tmp_path / "hbat", files, *common, "--splits=1", "--ewc=none"))
    train_dpo.main(dpo_args(tiny_init, tmp_path / "two", files, *common, "--schedule=two_stage"))
    assert_same_weights(tmp_path / "hbat" / "model", tmp_path / "two" / "model", 0)
    assert [(s["kind"], s["steps"]) for s in records(tmp_path / "two", "stages.jsonl")] == [("sft", 3), ("dpo", 3)]
    # the plain scripts, one after the other, with the SFT stage's settings
    train_sft.main([f"--init={tiny_init}", f"--out_dir={tmp_path}/sft", "--mode=sft", f"--data={files}/sft.jsonl",
                    "--val_data=", "--eval_data=", "--steps=3", "--lr=1e-3", "--micro_batch_size=4", "--max_len=128",
                    "--save_every=0", "--device=cpu", "--dtype=float32"])
    train_dpo.main(dpo_args(tmp_path / "sft" / "model", tmp_path / "dpo", files, "--steps=3", "--schedule=two_stage",
                            "--sft_data="))
    assert_same_weights(tmp_path / "two" / "model", tmp_path / "dpo" / "model", 1e-6)


def test_train_dpos_sft_stages_get_its_seed_dtype_sft_lr_and_template_and_the_fisher_its_chosen_answers(
        tiny_init, files, tmp_path, monkeypatch):
    """What train_dpo.py hands the SFT stages and the Fisher of an Hbat run, and the model it compares with."""
    stages, fisher_rows = [], []
    sft_stage, fisher_diagonal = train_sft.sft_stage, ewc.fisher_diagonal

    def spy_sft(cfg, d, phase, model, tok, rows, val_rows, stage, peak_lr, penalty_fn=None):
        stages.append((cfg.seed, cfg.batch_size, cfg.dtype, peak_lr, rows))
        return sft_stage(cfg, d, phase, model, tok, rows, val_rows, stage, peak_lr, penalty_fn)

    def spy_fisher(model, batches, logps):
        fisher_rows.extend(tuple(ids[mask.bool()].tolist()) for b in batches
                           for ids, mask in zip(b["input_ids"], b["attention_mask"]))
        return fisher_diagonal(model, batches, logps)

    monkeypatch.setattr(train_sft, "sft_stage", spy_sft)
    monkeypatch.setattr(ewc, "fisher_diagonal", spy_fisher)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "data" / "prompts_test.jsonl").read_text().splitlines(True)[:3]))
    train_dpo.main(dpo_args(tiny_init, tmp_path / "run", files, "--ewc=fisher", "--seed=3", "--sft_lr=2e-3",
                            "--dtype=bfloat16", "--template=plain", f"--eval_prompts={prompts}", "--max_new_tokens=8"))
    tok = Tokenizer.from_dir(tiny_init)
    sft_rows = hbat.split(tokenize_sft(train_sft.load_sft_examples(str(files / "sft.jsonl"), "auto"), tok, "plain",
                                       128, 128), 2, "sft_data")
    assert [s[:4] for s in stages] == [(3, hbat.SFT_BATCH_SIZE, "bfloat16", 2e-3)] * 2
    assert [s[4] for s in stages] == sft_rows
    # DPO_1's Fisher scores SFT_1's examples; SFT_2's, DPO_1's pairs by their chosen answers; DPO_2's, SFT_2's
    pairs = hbat.split(tokenize_pairs(read_jsonl(files / "prefs.jsonl"), tok, "plain", 128, 128), 2, "data")
    assert fisher_rows == ([tuple(r["ids"]) for r in hbat.evenly_spaced(sft_rows[0], 64)]
                           + [tuple(p["chosen_ids"]) for p in hbat.evenly_spaced(pairs[0], 64)]
                           + [tuple(r["ids"]) for r in hbat.evenly_spaced(sft_rows[1], 64)])
    assert "win_rate_vs_init" in json.loads((tmp_path / "run" / "eval.json").read_text())  # against the base


def test_freeze_keeps_the_most_changed_tensors_for_one_stage(tiny_init, files, tmp_path):
    out = tmp_path / "freeze"
    train_dpo.main(dpo_args(tiny_init, out, files, "--ewc=freeze", "--steps=2", "--sft_steps=4"))
    w = {name: policy_weights(p) for name, p in (("init", tiny_init), ("s1", out / "stage1_sft"),
                                                 ("s2", out / "stage2_dpo"), ("s3", out / "stage3_sft"))}
    scores = ewc.delta_scores(ewc.snapshot(load_pretrained(tiny_init)), ewc.snapshot(load_pretrained(out / "stage1_sft")))
    top = sorted(scores, key=lambda n: -scores[n])[:math.ceil(0.2 * len(scores))]
    assert len(top) >= 2
    for n in scores:  # parameter names are the state_dict's keys
        changed = not torch.equal(w["s1"][n], w["s2"][n])
        assert changed == (n not in top), n  # DPO_1 leaves exactly the top 20% by SFT_1's scores alone
    assert any(not torch.equal(w["s2"][n], w["s3"][n]) for n in top)  # unfrozen after the stage
    # SFT_2 freezes the top 20% by DPO_1's scores alone (not the scores of both stages added up)
    scores = ewc.delta_scores(ewc.snapshot(load_pretrained(out / "stage1_sft")),
                              ewc.snapshot(load_pretrained(out / "stage2_dpo")))
    top = sorted(scores, key=lambda n: -scores[n])[:math.ceil(0.2 * len(scores))]
    for n in scores:
        assert (not torch.equal(w["s2"][n], w["s3"][n])) == (n not in top), n
    stages = records(out, "stages.jsonl")
    assert stages[1]["ewc/frozen"] == len(top) and "ewc/penalty" not in stages[1]


def test_alternating_ppo_with_fisher_ewc_resumes_exactly(tiny_init, tiny_rm, files, tmp_path):
    """PPO stages between SFT stages with Fisher EWC (SFT_2's Fisher over answers sampled to PPO_1's prompts,
    recomputed from the stage-start checkpoint after the resume): stopped inside stage 3 and resumed, the same
    run; the critic carries over from PPO_1 to PPO_2."""
    extra = ["--ewc=fisher", "--fisher_samples=4", "--lambda_max=1e4"]
    train_ppo.main(ppo_args(tiny_init, tiny_rm, tmp_path / "full", files, *extra))
    train_ppo.main(ppo_args(tiny_init, tiny_rm, tmp_path / "cut", files, *extra, "--stop_at=4"))
    train_ppo.main(ppo_args(tiny_init, tiny_rm, tmp_path / "cut", files, *extra, "--resume"))
    assert_same_records(tmp_path / "full", tmp_path / "cut", 1e-6)
    assert_same_weights(tmp_path / "full" / "model", tmp_path / "cut" / "model", 1e-6)
    full_critic = RewardModel.from_pretrained(tmp_path / "full" / "model" / "critic").state_dict()
    cut_critic = RewardModel.from_pretrained(tmp_path / "cut" / "model" / "critic").state_dict()
    assert all(torch.allclose(full_critic[k], cut_critic[k], atol=1e-6, rtol=0) for k in full_critic)
    log = records(tmp_path / "full")
    assert [r.get("stage") for r in log] == [1, 1, 2, 3, 3, 4]
    assert not any(k.startswith("ewc/") for r in log[:2] for k in r)
    assert log[3]["ewc/penalty"] == 0.0 and log[4]["ewc/penalty"] > 0  # SFT_2 starts at its anchor, moves off it
    for ppo_step in (log[2], log[5]):  # the mean over the step's policy updates, the first at the anchor
        assert ppo_step["ewc/penalty"] > 0 and 0 < ppo_step["ewc/penalty_share"] < 1
        assert ppo_step["objective/kl"] == 0.0  # each PPO stage's KL reference is the model at its start
    # PPO_2's critic starts where PPO_1's ended (carried through SFT_2), not from the reward model
    stage3 = RewardModel.from_pretrained(tmp_path / "full" / "stage3_sft" / "critic").state_dict()
    stage2 = RewardModel.from_pretrained(tmp_path / "full" / "stage2_ppo" / "critic").state_dict()
    rm = RewardModel.from_pretrained(tiny_rm).state_dict()
    assert all(torch.equal(stage2[k], stage3[k]) for k in stage2)
    assert not torch.equal(stage2["score.weight"], rm["score.weight"])


@pytest.mark.parametrize("flag, message", [
    ("--ewc=foo", "--ewc=foo: choose one of modified, fisher, freeze, none"),
    ("--splits=0", "--splits=0: must be positive"),
    ("--lambda_max=-1", "--lambda_max=-1.0: must be positive"),
    ("--schedule=x", "--schedule=x: choose one of two_stage, alternating"),
    ("--ewc_temperature=0", "--ewc_temperature=0.0: must be positive"),
    ("--sft_data=", "--sft_data=: --schedule=alternating needs SFT data"),
    ("--sft_data=nope.jsonl", "--sft_data=nope.jsonl: not found"),
    ("--steps=1", "--steps=1: fewer than one step for each of the --splits=2 stages"),
])
def test_bad_hbat_flags_are_refused_with_one_line(tiny_init, tiny_rm, files, tmp_path, flag, message):
    for script, argv in ((train_dpo, dpo_args(tiny_init, tmp_path / "dpo", files, flag)),
                         (train_ppo, ppo_args(tiny_init, tiny_rm, tmp_path / "ppo", files, flag))):
        with pytest.raises(InputError) as e:
            script.main(argv)
        assert str(e.value).startswith(message), (script.__name__, str(e.value))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "ppo" / "model").exists()


def test_splits_larger_than_the_data_and_resuming_another_schedule_are_refused(tiny_init, files, tmp_path):
    many = ["--splits=30", "--steps=30", "--sft_steps=30"]
    with pytest.raises(InputError, match=r"^--splits=30: more splits than the 24 examples of --data$"):
        train_dpo.main(dpo_args(tiny_init, tmp_path / "many", files, *many))
    train_dpo.main(dpo_args(tiny_init, tmp_path / "run", files, "--stop_at=3"))
    with pytest.raises(InputError, match=r"^--splits=1: the checkpoint to resume was written with --splits=2"):
        train_dpo.main(dpo_args(tiny_init, tmp_path / "run", files, "--splits=1", "--resume"))


def test_the_script_prints_a_bad_hbat_flag_as_one_line():
    for script in ("train_dpo.py", "train_ppo.py"):
        proc = subprocess.run([sys.executable, str(ROOT / script), "--ewc=foo"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr == "error: --ewc=foo: choose one of modified, fisher, freeze, none\n"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_alternating_dpo_matches_one_process(tiny_init, files, tmp_path, torchrun):
    """Sharded parameters: the anchors, the scores, Ω, the penalty and its gradient (weight 1 beside the task
    loss's world_size) give the losses and penalties of one process. An evaluation at every step, inside the
    stages too: after a forward without gradients FSDP2 leaves the root's weights (embedding, final norm, head)
    unsharded, and the next penalty met them beside their sharded anchors."""
    extra = ["--ewc_temperature=1e13", "--eval_every=1"]
    train_dpo.main(dpo_args(tiny_init, tmp_path / "one", files, *extra))
    torchrun(ROOT / "train_dpo.py", *dpo_args(tiny_init, tmp_path / "two", files, *extra), cwd=tmp_path, timeout=600)
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert sum("ewc/penalty" in r for r in one) == 6 and max(r.get("ewc/penalty", 0) for r in one) > 0
    assert_same_records(tmp_path / "one", tmp_path / "two", 1e-4, skip=("pairs_per_s", "tok_per_s",
                                                                      "rewards/accuracies"))
    for a, b in zip(one, two):  # at a DPO stage's first step every margin is 0 up to rounding: its sign is noise
        if "rewards/accuracies" in a and abs(a["rewards/margins"]) > 1e-3:
            assert a["rewards/accuracies"] == b["rewards/accuracies"], a["step"]
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", 1e-4)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_alternating_ppo_matches_one_process(tiny_init, tiny_rm, files, tmp_path, torchrun):
    """PPO's rollout forwards run without gradients before every update, so its penalty always meets a model whose
    root FSDP2 left gathered: Fisher EWC (every tensor weighted) over two ranks gives the one process's run."""
    extra = ["--ewc=fisher"]
    train_ppo.main(ppo_args(tiny_init, tiny_rm, tmp_path / "one", files, *extra))
    torchrun(ROOT / "train_ppo.py", *ppo_args(tiny_init, tiny_rm, tmp_path / "two", files, *extra), cwd=tmp_path,
             timeout=600)
    one = records(tmp_path / "one")
    assert sum("ewc/penalty" in r for r in one) == 4 and max(r.get("ewc/penalty", 0) for r in one) > 0
    assert_same_records(tmp_path / "one", tmp_path / "two", 1e-4, skip=("tok_per_s", "time/generation",
                                                                      "time/scoring", "time/update"))


@pytest.mark.parametrize("ewc_kind", ["modified", "fisher"])
def test_lambda_max_scales_the_penalty(ewc_kind, tiny_init, files, tmp_path):
    # DPO_1's first step (run step 3) starts at its anchor, where the penalty's gradient is 0, so the weights at
    # step 4 are the same for any --lambda_max and the penalty logged there (Omega's or the Fisher's) scales with it
    penalty = {}
    for lambda_max in (1.0, 100.0):
        out = tmp_path / f"lambda{lambda_max}"
        train_dpo.main(dpo_args(tiny_init, out, files, f"--ewc={ewc_kind}", f"--lambda_max={lambda_max}",
                                "--stop_at=4", "--fisher_samples=4"))
        penalty[lambda_max] = records(out)[3]["ewc/penalty"]
    assert penalty[1.0] > 0 and penalty[100.0] == pytest.approx(100 * penalty[1.0], rel=1e-4)


def test_fisher_is_estimated_on_the_previous_stages_split(tiny_init, files, tmp_path, monkeypatch):
    splits, sampled = {}, []
    real_split, real_sample = hbat.split, hbat.evenly_spaced
    monkeypatch.setattr(hbat, "split", lambda rows, n, flag: splits.setdefault(flag, real_split(rows, n, flag)))
    monkeypatch.setattr(hbat, "evenly_spaced", lambda rows, k: sampled.append(rows) or real_sample(rows, k))
    train_dpo.main(dpo_args(tiny_init, tmp_path / "fisher", files, "--ewc=fisher", "--fisher_samples=4"))
    # DPO_1 <- SFT_1's split 0; SFT_2 <- DPO_1's split 0; DPO_2 <- SFT_2's split 1
    expected = [splits["sft_data"][0], splits["data"][0], splits["sft_data"][1]]
    assert len(sampled) == 3 and all(a is b for a, b in zip(sampled, expected))


def test_fisher_penalty_is_the_formula_on_the_previous_stage(tiny_init, files, tmp_path):
    extra = ["--ewc=fisher", "--fisher_samples=4", "--lambda_max=1e4"]
    train_dpo.main(dpo_args(tiny_init, tmp_path / "a", files, *extra, "--stop_at=3"))  # the weights after step 3
    train_dpo.main(dpo_args(tiny_init, tmp_path / "b", files, *extra, "--stop_at=4"))  # the penalty at step 4
    logged = records(tmp_path / "b")[3]["ewc/penalty"]
    # DPO_1's anchor and Fisher: SFT_1's end (stage1_sft), on 4 evenly spaced rows of SFT_1's split of the SFT
    # data, F the mean squared gradient of each row's summed response log-prob; lambda_max / 2 sum F (theta - theta*)^2
    tok = Tokenizer.from_dir(tiny_init)
    rows = tokenize_sft(train_sft.load_sft_examples(str(files / "sft.jsonl"), "auto"), tok, "hh", 128, 128)
    sample = hbat.evenly_spaced(hbat.split(rows, 2, "sft_data")[0], 4)
    start = load_pretrained(tmp_path / "a" / "stage1_sft")
    fisher = ewc.fisher_diagonal(start, [collate_sft(sample, tok.pad_id)], lambda m, b: response_logps(m, b))
    expected = ewc.fisher_penalty(load_pretrained(tmp_path / "a" / "model"), ewc.snapshot(start), fisher, 1e4).item()
    assert logged > 0 and logged == pytest.approx(expected, rel=1e-4)
