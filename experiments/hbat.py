"""Hbat's claim, rerun in miniature: alternate SFT and preference stages instead of doing them one after another.

The paper (Hbat: alternating alignment with a parameter-delta EWC): SFT_1, Pref_1, ..., SFT_n, Pref_n on
disjoint splits, each stage penalised for moving the weights the other objective relied on, beats the usual
two-stage pipeline (all SFT, then all preference training) on both axes at once, instruction following (+2.26
ROUGE-L on summarisation) and preference (a higher win rate on dialogue); and the modified EWC (importance from
how much each tensor moved) costs far less time and memory than Fisher EWC (per-example gradients).

    python experiments/hbat.py                 # 10 arms x 3 seeds from the tiny base model, 30-33 min on 2 cores
    python experiments/hbat.py --method=dpo    # the DPO half only (its table: exp/hbat/results_dpo.json)
    python experiments/hbat.py --quick         # 1 seed, tiny budgets: a smoke run of the whole recipe (exp/hbat_quick)
    python -m nanoalign.report exp/hbat/dpo exp/hbat/ppo   # curves of every arm, overlaid

Arms, for DPO (train_dpo.py) and for PPO (train_ppo.py), every one from the tiny pretrained base model with the
same budget (--sft_steps SFT steps and --dpo_steps / --ppo_steps preference steps in all):
  two_stage     --schedule=two_stage: SFT on all of data/sft_train.jsonl, then the preference stage on all the data
  hbat          --schedule=alternating --ewc=modified (Hbat: Ω = λ_max softmax(S / T) of the delta scores)
  hbat_no_ewc   --ewc=none (the alternation alone)
  hbat_freeze   --ewc=freeze (Hbat-Freeze: the top 20% of tensors by delta score get no gradient)
  fisher        --ewc=fisher (Kirkpatrick et al.'s EWC: the diagonal Fisher of the previous stage's data)
with --splits=2 (SFT_1, Pref_1, SFT_2, Pref_2). The PPO arms score with the tiny reward model (out/rm/model).

Metrics, on the held-out prompts (data/prompts_test.jsonl, greedy answers):
- instruction following: rouge_l (against the references), closed_accuracy (the closed-ended questions);
- preference: win_rate against the SFT model of the same budget (the two-stage arm's model after its SFT stage,
  same seed; ties count half, judged by the tiny world's oracle) and mean_quality (the oracle's);
- cost: ewc_setup_s (wall time of computing Ω or the Fisher, summed over stages: the penalty's per-step cost is
  a few element-wise products either way), ewc_memory_mb (MiB, what EWC keeps: θ*, plus F for Fisher; on a GPU the
  allocator's peak over the set-up), wall_s (the whole training run).
The "sft" row is that SFT model itself (win rate 0.5 against itself by definition).

Budget: the tiny model's full recipe is 1000 SFT + 100 DPO steps; 30 runs of it would take hours on a laptop,
so every arm gets 240 SFT steps (a model that answers in the right format but is not done learning), 30 DPO
or 12 PPO steps (64 rollouts each), and the evaluation uses the first 150 held-out prompts. Two runs side by side,
one thread each (nanoalign/experiment.py). Results: exp/hbat/results.json and results.md (mean ± std over
seeds); each run in exp/hbat/<method>/<arm>/seed<k>/ (the run, its stages.jsonl and log.txt, eval/vs_sft.json).
Rerunning skips the runs that finished.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, when run from a checkout

from nanoalign import experiment  # noqa: E402
from nanoalign.cli import check_choice, check_positive, parse_config, run  # noqa: E402
from nanoalign.data import read_jsonl  # noqa: E402


# --- config
@dataclass
class Config:
    out: str = "exp/hbat"       # <method>/<arm>/seed<k>/ per run, results.json, results.md
    method: str = "both"        # dpo, ppo or both
    base: str = "out/base/model"  # the pretrained model every arm starts from (python train_sft.py makes it)
    reward_model: str = "out/rm/model"  # the PPO arms' reward model and critic start (python train_rm.py)
    sft_data: str = "data/sft_train.jsonl"  # the SFT stages' examples
    pref_data: str = "data/prefs_train.jsonl"  # the DPO stages' pairs
    val_pairs: str = "data/prefs_val.jsonl"  # held-out pairs (DPO's eval/ metrics)
    ppo_data: str = "data/sft_train.jsonl"  # the PPO stages' prompts
    seeds: int = 3              # seeds 0..seeds-1 per arm
    sft_steps: int = 240        # SFT steps of every arm, all stages together
    dpo_steps: int = 30         # DPO steps, all stages together (x 32 pairs)
    ppo_steps: int = 12         # PPO steps, all stages together (x 64 rollouts)
    splits: int = 2             # Hbat's n: SFT_1, Pref_1, ..., SFT_n, Pref_n
    eval_prompts: int = 150     # held-out prompts of the evaluation (the first N of data/prompts_test.jsonl)
    parallel: int = 2           # runs side by side (one thread each)
    quick: bool = False         # one seed, a few steps, tiny batches: checks the recipe end to end


ARMS = {  # arm -> the schedule flags
    "two_stage": ["--schedule=two_stage"],
    "hbat": ["--schedule=alternating", "--ewc=modified"],
    "hbat_no_ewc": ["--schedule=alternating", "--ewc=none"],
    "hbat_freeze": ["--schedule=alternating", "--ewc=freeze"],
    "fisher": ["--schedule=alternating", "--ewc=fisher"],
}
METRICS = ["rouge_l", "closed_accuracy", "win_rate", "mean_quality", "ewc_setup_s", "ewc_memory_mb", "wall_s"]
QUICK = {  # small batches and contexts, so the smoke run takes seconds with a tiny model
    "dpo": ["--batch_size=4", "--micro_batch_size=4", "--max_len=128", "--warmup_steps=0"],
    "ppo": ["--rollout_batch_size=8", "--gen_batch_size=4", "--mini_batch_size=4", "--micro_batch_size=4",
            "--ppo_epochs=1", "--max_prompt_len=64", "--max_new_tokens=8"],
}


def run_dir(cfg: Config, method: str, arm: str, seed: int) -> Path:
    return Path(cfg.out).resolve() / method / arm / f"seed{seed}"


def sft_model(cfg: Config, method: str, seed: int) -> Path:
    """The SFT model every arm of a seed is compared with: the two-stage run after its SFT stage."""
    return run_dir(cfg, method, "two_stage", seed) / "stage1_sft"


def train_command(cfg: Config, method: str, arm: str, seed: int) -> list[str]:
    common = [f"--init={cfg.base}", f"--sft_data={cfg.sft_data}", f"--sft_steps={cfg.sft_steps}",
              f"--splits={cfg.splits}", *ARMS[arm], f"--seed={seed}", f"--out_dir={run_dir(cfg, method, arm, seed)}",
              "--save_every=0"]
    if method == "dpo":
        flags = [f"--data={cfg.pref_data}", f"--val_data={cfg.val_pairs}", f"--steps={cfg.dpo_steps}",
                 "--eval_prompts="]
    else:
        flags = [f"--reward_model={cfg.reward_model}", f"--data={cfg.ppo_data}", f"--steps={cfg.ppo_steps}",
                 "--eval_data="]
    return experiment.script(f"train_{method}.py", *common, *flags, *(QUICK[method] if cfg.quick else []))


def eval_command(cfg: Config, method: str, arm: str, seed: int) -> list[str]:
    out = run_dir(cfg, method, arm, seed)
    return experiment.script("-m", "nanoalign.evaluate", f"--model_a={out / 'model'}",
                             f"--model_b={sft_model(cfg, method, seed)}", f"--limit={cfg.eval_prompts}",
                             f"--out={out / 'eval' / 'vs_sft.json'}")


def run_metrics(cfg: Config, method: str, arm: str, seed: int) -> dict:
    """One finished run's numbers: its answers against the SFT model's, what EWC cost, the run's wall time."""
    out = run_dir(cfg, method, arm, seed)
    vs_sft = experiment.read_json(out / "eval" / "vs_sft.json")
    stages = read_jsonl(out / "stages.jsonl")
    mine = vs_sft["metrics"]["A"]
    result = {"rouge_l": mine["rouge_l"], "closed_accuracy": mine["closed_accuracy"],
              "win_rate": vs_sft["comparison"]["win_rate"], "mean_quality": mine["mean_quality"],
              "wall_s": experiment.job_wall(out)}
    setup = [s["ewc/setup_s"] for s in stages if "ewc/setup_s" in s and s["stage"] > 1]
    if setup:  # the arms with an EWC (from the second stage on: the first has nothing to anchor to)
        result["ewc_setup_s"] = sum(setup)
        result["ewc_memory_mb"] = max(s["ewc/memory_mb"] for s in stages if "ewc/memory_mb" in s)
    return result


def sft_metrics(cfg: Config, method: str, seed: int) -> dict:
    """The SFT model's own numbers, read from any of the seed's comparisons (it is model B in all of them)."""
    vs_sft = experiment.read_json(run_dir(cfg, method, "two_stage", seed) / "eval" / "vs_sft.json")
    theirs = vs_sft["metrics"]["B"]
    return {"rouge_l": theirs["rouge_l"], "closed_accuracy": theirs["closed_accuracy"], "win_rate": 0.5,
            "mean_quality": theirs["mean_quality"]}


def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_choice(cfg, "method", ("dpo", "ppo", "both"))
    check_positive(cfg, "seeds", "sft_steps", "dpo_steps", "ppo_steps", "splits", "eval_prompts", "parallel")
    if cfg.quick:
        cfg.sft_steps, cfg.dpo_steps, cfg.ppo_steps, cfg.eval_prompts = 4, 2, 2, min(cfg.eval_prompts, 8)
        cfg.out = "exp/hbat_quick" if cfg.out == Config.out else cfg.out  # never mixed with the real run's jobs
    methods = ["dpo", "ppo"] if cfg.method == "both" else [cfg.method]
    seeds = [0] if cfg.quick else list(range(cfg.seeds))
    t0 = time.time()

    # --- models: the base model every arm starts from; PPO's reward model
    experiment.ensure(cfg.base, experiment.script("train_sft.py"))
    if "ppo" in methods:
        experiment.ensure(cfg.reward_model, experiment.script("train_rm.py"))

    # --- loop: train every arm x seed, then evaluate each against its seed's SFT model (the two-stage run's)
    runs = [(method, arm, seed) for method in methods for arm in ARMS for seed in seeds]
    experiment.run_jobs([experiment.Job(f"{m}/{a}/seed{s}", run_dir(cfg, m, a, s),
                                        [train_command(cfg, m, a, s)]) for m, a, s in runs], parallel=cfg.parallel)
    experiment.run_jobs([experiment.Job(f"eval {m}/{a}/seed{s}", run_dir(cfg, m, a, s) / "eval",
                                        [eval_command(cfg, m, a, s)]) for m, a, s in runs], parallel=cfg.parallel)

    # --- save: the table, one row per method and arm (and the SFT model each was compared with)
    arms = {}
    for method in methods:
        for arm in ["sft", *ARMS]:
            per_seed = [sft_metrics(cfg, method, s) if arm == "sft" else run_metrics(cfg, method, arm, s)
                        for s in seeds]
            arms[f"{method}/{arm}"] = {m: [r[m] for r in per_seed] for m in METRICS if m in per_seed[0]}
    results = {"title": "Hbat: alternating SFT / preference stages vs the two-stage pipeline", "metrics": METRICS,
               "seeds": seeds, "arms": arms, "wall_s": time.time() - t0}
    # one method alone writes results_<method>.json: results.json (both methods) is not overwritten by half a table
    experiment.write_results(cfg.out, results, "results" if cfg.method == "both" else f"results_{cfg.method}")
    print(f"Hbat experiment: {len(runs)} runs in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    run(main, sys.argv[1:])
