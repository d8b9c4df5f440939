"""The padded-demonstrations world end to end (slow; README "Padded demonstrations"): SFT on demonstrations of
which 70% end with filler sentences while the compared answers are the ideal writer's (`--padded_prefs=0`), then
preference learning from that model. On-policy pairs (its own answers, labelled by the annotator) teach it to
stop padding, through DPO or through a reward model for PPO; DPO on the world's pairs pads more than the
demonstrations taught. (When the compared answers are padded too, as in the default world, the world's own pairs
teach it: the default-world tests of tests/test_train_ppo.py and tests/test_dpo.py.) About 15 minutes on 2
cores."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import logged, padded_answers
from nanoalign import world

ROOT = Path(__file__).resolve().parents[1]


def script(*argv):
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """The README's commands: the variant world, SFT on it (from the tiny base, as the default run), and
    on-policy pairs of that SFT model on the training and the held-out preference prompts (the same prompts
    as the default world's)."""
    root = tmp_path_factory.mktemp("padded")
    world.build(root / "data", padded_demos=0.7, padded_prefs=0.0)
    script(ROOT / "train_sft.py", f"--data={root}/data/sft_train.jsonl", f"--out_dir={root}/sft")
    for name, data in [("train", "prefs_train"), ("val", "prefs_val")]:
        script(ROOT / "select_pairs.py", "--sample=8", "--label=annotator", "--strategy=random",
               f"--data=data/{data}.jsonl", f"--model={root}/sft/model", f"--out={root}/onpolicy_{name}.jsonl")
    return root


@pytest.mark.slow
def test_on_policy_dpo_beats_the_sft_model_when_its_demonstrations_are_padded(padded):
    """DPO on the SFT model's own labelled answers beats it under the oracle, with held-out implicit-reward
    accuracy above chance on held-out on-policy pairs, and pads fewer answers; DPO on the world's pairs pads
    more and loses. Measured, seeds 0/1/2: on-policy win rate 0.568/0.572/0.572 (quality 0.651/0.650/0.664 vs
    SFT 0.637; held-out accuracy 0.632), world pairs 0.21/0.19/0.18."""
    sft = padded / "sft" / "model"
    script(ROOT / "train_dpo.py", f"--init={sft}", f"--data={padded}/onpolicy_train.jsonl", "--lr=3e-5",
           f"--val_data={padded}/onpolicy_val.jsonl", f"--out_dir={padded}/dpo_onpolicy")
    script(ROOT / "train_dpo.py", f"--init={sft}", f"--data={padded}/data/prefs_train.jsonl",
           f"--val_data={padded}/data/prefs_val.jsonl", f"--out_dir={padded}/dpo_world_pairs")
    on_policy = json.loads((padded / "dpo_onpolicy" / "eval.json").read_text())
    world_pairs = json.loads((padded / "dpo_world_pairs" / "eval.json").read_text())
    assert on_policy["win_rate_vs_sft"] > 0.53 and on_policy["mean_quality/dpo"] > on_policy["mean_quality/sft"]
    assert on_policy["eval/rewards/accuracies"] > 0.5
    assert world_pairs["win_rate_vs_sft"] < 0.4
    assert padded_answers(padded / "dpo_onpolicy" / "model") < padded_answers(sft) < padded_answers(
        padded / "dpo_world_pairs" / "model")


@pytest.mark.slow
def test_ppo_against_a_reward_model_of_the_sft_models_own_answers_raises_oracle_quality(padded):
    """InstructGPT's recipe: the reward model learns from labelled pairs of the SFT model's own answers (above
    chance on held-out ones), and PPO against it raises the oracle quality of the greedy held-out answers
    above the SFT model's. Measured: held-out accuracy 64.7%, quality 0.637 -> 0.653 after 60 steps; 0.637 -> 0.666
    on 2026-11-26, after the CPU sampler began prepacking its weights (its rounding differs, so the rollouts can
    take another path); 0.637 -> 0.665 on 2026-12-07, after PPO's random streams got seeds of their own (seeds 1
    and 2: 0.658, 0.669)."""
    script(ROOT / "train_rm.py", f"--init={padded}/sft/model", f"--data={padded}/onpolicy_train.jsonl",
           f"--val_data={padded}/onpolicy_val.jsonl", f"--out_dir={padded}/rm_onpolicy")
    rm = logged(padded / "rm_onpolicy")
    assert rm[-1]["eval/accuracy"] > 0.55
    script(ROOT / "train_ppo.py", f"--init={padded}/sft/model", f"--reward_model={padded}/rm_onpolicy/model",
           f"--out_dir={padded}/ppo")
    evals = [r for r in logged(padded / "ppo") if "eval/mean_quality" in r]
    assert evals[-1]["eval/mean_quality"] >= evals[0]["eval/mean_quality"] + 0.008, evals
