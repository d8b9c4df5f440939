"""R3's claim, rerun in miniature: can PPO do without preference labels?

The paper (R3, the Regularized Relevance Reward; docs/methods.md "## 6. R3", nanoalign/r3.py): PPO rewarded by
R3, built from an off-the-shelf relevance model and the reference answers alone (no reward model, no preference
pairs), comes close to PPO with a reward model trained on preferences; and each regulariser is needed, since
relevance alone is hacked (the policy copies the prompt, which is maximally relevant to itself, or rambles).

    python experiments/r3.py                   # 7 arms x 3 seeds, ~27 minutes on a 2-core CPU
    python experiments/r3.py --quick           # 1 seed, tiny budgets: the whole recipe end to end (into exp/r3_quick)
    python experiments/r3.py --arms=rm,r3 --seeds=1 --out=exp/r3_try   # a subset
    python -m nanoalign.report exp/r3          # the training curves of every arm, overlaid, and the table

Run it from the repository root: every job is a command line run in the current directory, and the scripts read
the tiny world's data/ files by their default relative paths.

Arms: `python train_ppo.py --reward=<arm>` from the same SFT model (out/sft/model, also the KL reference), on
the SFT prompts (data/sft_train.jsonl, which carry each prompt's qtype and reference answer). With M the
relevance model (the packaged all-MiniLM-L6-v2), r(a, b) = M(a) · M(b), LI(y) = #tokens(y) / 100 (length
incentive), RP(y) = the fraction of distinct trigrams (repetition penalty), F a linear map of r onto LI's scale:
- rm                the reward model out/rm/model (Bradley-Terry, trained on 3000 preference pairs): the baseline
                    R3 wants to match. Its critic starts from the reward model; every other arm's from the SFT
                    trunk with a zero value head (there is no reward model to start from).
- r3                RP(y) r(x, y) LI(y) for an open-ended prompt x, RP(y) F(r(y_ref, y)) for a closed-ended one
- relevance         r(x, y) alone: the reward the claim says is hacked
- length            LI(y) alone
- relevance_length  r(x, y) LI(y): no repetition penalty, no closed-ended branch
- r3_no_branching   RP(y) r(x, y) LI(y) for every prompt: no closed-ended branch (no reference answers)
- oracle            the tiny world's exact quality (world.quality): PPO on the true objective, the ceiling
Every score is normalised by its running mean and std before PPO sees it, so the arms' scales do not matter.
A seed changes the rollouts' sampling and the minibatch order (seeds 0 .. --seeds-1).

Metrics: each trained policy answers the first --eval_prompts held-out prompts (data/prompts_test.jsonl, none of
them seen in training) greedily, and so does the SFT model (`python -m nanoalign.evaluate --model_a=<run>/model
--model_b=<sft> --diversity_samples=4`):
- quality           mean oracle quality of the answers (world.quality, in [0, 1])
- win_rate          against the SFT model's answers, judged by the oracle (ties count half; SFT: 0.5)
- closed_accuracy   fraction of the closed-ended prompts answered right
- copy_rate         fraction of answers that copy the prompt (evaluate.copies_prompt): the relevance hack
- mean_words        mean answer length in words: rambling
- self_bleu         mean self-BLEU of 4 answers per prompt sampled at temperature 1 (1 = all alike): collapse
- kl                KL(policy || SFT) of the last step's rollouts, nats per answer: how far PPO moved
The sft row is the evaluation's model B (the same prompts and sampling seeds in every job, so the same numbers):
one value, seed-independent.

Budget (the default must finish in 30 minutes on a 2-core CPU; nanoalign/experiment.py runs 2 jobs side by side,
one thread each): 21 jobs on 2 lanes is 11 jobs end to end, so a job gets ~160 s at most. One PPO step (64
rollouts of 48 tokens, 4 epochs of minibatches of 16) takes ~3.8 s with one thread on an idle core; R3 and its
ablations add ~1.1-1.4 s for MiniLM embedding the 64 answers and their prompts or references (time/scoring in
metrics.jsonl). Starting the two processes takes ~8 s, the evaluation of 100 prompts (greedy, and 4 samples
each, for both models) ~8 s. So --steps=25: ~110 s a job for rm, length, oracle and ~130 s for the four
relevance arms on idle cores, 11 x ~125 s = 23 minutes; measured on a machine busy with other work, the r3 job
took 157 s (5.7 s a step), which would make ~27 minutes. 30 steps would not fit that margin. (train_ppo's own
default is 60 steps: this experiment trains every arm for less than that, the same for all.) Measured on the
default world (1604 s; 1804 s in a rerun after PPO's random streams got seeds of their own, a little over the
30 minutes): the policies move ~0.5-2 nats from the SFT model; rm, r3, relevance and the oracle arm remove the
fillers the SFT model writes and beat it (win rates 0.74-0.88), while the three arms that pay for length on
closed-ended questions (length, relevance_length, r3_no_branching) add fillers and lose (0.11-0.12).
On the ideal writer's world (--padded_demos=0 --padded_prefs=0) the policies stayed within KL ~0.1-0.4 and every
arm within a few points of the SFT model; --lr=1e-4 moved them further (KL 1-3.5) and every arm, the oracle's
too, below SFT (README; docs/experiments_ideal_writer.md).

Results: exp/r3/results.json and results.md (mean ± std over seeds); each run in exp/r3/<arm>/seed<k>/ (the PPO
run's metrics.jsonl and model/, eval_vs_sft.json with the answers, commands.txt, log.txt). Rerunning skips the
jobs that finished with the same command lines; an interrupted job, or one whose commands changed (other
--steps, --lr, --ppo_args or models), starts again.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, when run from a checkout

from nanoalign import experiment  # noqa: E402
from nanoalign.cli import InputError, check_positive, parse_config, run  # noqa: E402

ARMS = ("rm", "r3", "relevance", "length", "relevance_length", "r3_no_branching", "oracle")
METRICS = ["quality", "win_rate", "closed_accuracy", "copy_rate", "mean_words", "self_bleu", "kl"]
DEFAULT_SFT, DEFAULT_RM = "out/sft/model", "out/rm/model"
# --quick: one seed and budgets that only check the recipe runs end to end (any model with a 128-token context)
QUICK = {"seeds": 1, "steps": 2, "rollout_batch_size": 8, "eval_prompts": 8}
QUICK_PPO = ["--gen_batch_size=8", "--mini_batch_size=4", "--micro_batch_size=4", "--ppo_epochs=1",
             "--max_prompt_len=64", "--max_new_tokens=16"]
QUICK_EVAL = ["--max_new_tokens=16"]


# --- config
@dataclass
class Config:
    out: str = "exp/r3"         # one directory per arm and seed, results.json, results.md (--quick: exp/r3_quick)
    sft: str = DEFAULT_SFT      # the policy's start, KL reference and evaluation baseline (trained if missing)
    reward_model: str = DEFAULT_RM  # the rm arm's reward model and critic start (trained if missing)
    arms: str = ",".join(ARMS)  # the arms to run, comma-separated (train_ppo.py --reward values)
    seeds: int = 3              # seeds 0..seeds-1 per arm
    steps: int = 25             # PPO steps per run (see Budget)
    lr: float = 2e-5            # policy learning rate of every arm (train_ppo's; see Budget for 1e-4)
    rollout_batch_size: int = 64  # prompts sampled per PPO step
    eval_prompts: int = 100     # held-out prompts each policy and the SFT model answer (the first N)
    diversity_samples: int = 4  # answers sampled per prompt for self-BLEU
    ppo_args: str = ""          # more train_ppo.py flags for every arm, e.g. "--lr=5e-5 --kl_coef=0.1"
    parallel: int = 2           # jobs side by side, one thread each
    quick: bool = False         # 1 seed, 2 PPO steps of 8 rollouts, 8 eval prompts: the recipe end to end in ~1 minute


def check_config(cfg: Config) -> list[str]:
    """Every flag checked before any work starts; returns the arms."""
    check_positive(cfg, "seeds", "steps", "rollout_batch_size", "eval_prompts", "parallel")
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise InputError(f"--arms={cfg.arms}: a comma-separated list of {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise InputError(f"--arms={cfg.arms}: an arm is listed twice")
    if cfg.diversity_samples < 2:
        raise InputError(f"--diversity_samples={cfg.diversity_samples}: self-BLEU needs at least 2 samples per prompt")
    for name, default in (("sft", DEFAULT_SFT), ("reward_model", DEFAULT_RM)):
        # a default path missing is trained; another path must exist
        if getattr(cfg, name) != default and not Path(getattr(cfg, name)).is_dir():
            raise InputError(f"--{name}={getattr(cfg, name)}: no such checkpoint directory")
    try:
        shlex.split(cfg.ppo_args)
    except ValueError as e:
        raise InputError(f"--ppo_args={cfg.ppo_args}: {e}") from None
    return arms


def jobs(cfg: Config, arms: list[str], seeds: list[int]) -> list[experiment.Job]:
    """One job per arm and seed: PPO from the SFT model, then its greedy answers (and samples) against SFT's."""
    quick_ppo, quick_eval = (QUICK_PPO, QUICK_EVAL) if cfg.quick else ([], [])
    result = []
    for arm in arms:
        for seed in seeds:
            run_dir = Path(cfg.out) / arm / f"seed{seed}"
            result.append(experiment.Job(f"{arm}/seed{seed}", run_dir, [
                experiment.script("train_ppo.py", f"--reward={arm}", f"--seed={seed}", f"--out_dir={run_dir}",
                                  f"--init={cfg.sft}", f"--reward_model={cfg.reward_model}", "--eval_data=", f"--steps={cfg.steps}",
                                  f"--lr={cfg.lr}", f"--rollout_batch_size={cfg.rollout_batch_size}", "--save_every=0", *quick_ppo,
                                  *shlex.split(cfg.ppo_args)),
                experiment.script("-m", "nanoalign.evaluate", f"--model_a={run_dir / 'model'}", f"--model_b={cfg.sft}",
                                  f"--limit={cfg.eval_prompts}", f"--diversity_samples={cfg.diversity_samples}",
                                  *quick_eval, f"--out={run_dir / 'eval_vs_sft.json'}")]))
    return result


def side_metrics(evaluation: dict, side: str) -> dict:
    """The table's numbers of one side (A: the PPO policy, B: the SFT model) of an eval_vs_sft.json."""
    m = evaluation["metrics"][side]
    win = evaluation["comparison"]["win_rate"]
    return {"quality": m["mean_quality"], "win_rate": win if side == "A" else 0.5,
            "closed_accuracy": m["closed_accuracy"], "copy_rate": m["copy_rate"], "mean_words": m["mean_words"],
            "self_bleu": m["self_bleu"]}


def run_metrics(run_dir: Path) -> dict:
    """The numbers of one finished job: its evaluation against SFT, the last step's KL, the job's wall time."""
    last = experiment.read_json(run_dir / "eval_vs_sft.json")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kl = [r["objective/kl"] for r in records if "objective/kl" in r]
    return {**side_metrics(last, "A"), "kl": kl[-1], "wall_s": experiment.job_wall(run_dir)}


def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    if cfg.quick:
        cfg.__dict__.update(QUICK)
        cfg.out = "exp/r3_quick" if cfg.out == Config.out else cfg.out  # never mixed with the real run's jobs
    arms = check_config(cfg)
    seeds = list(range(cfg.seeds))
    t0 = time.time()

    # --- models: the SFT model every arm starts from, the reward model of the rm arm
    experiment.ensure(cfg.sft, experiment.script("train_sft.py"))
    experiment.ensure(cfg.reward_model, experiment.script("train_rm.py", f"--init={cfg.sft}"))

    # --- loop: PPO, then the evaluation against SFT; every arm x seed a job
    all_jobs = jobs(cfg, arms, seeds)
    experiment.run_jobs(all_jobs, parallel=cfg.parallel)

    # --- save: the table, SFT first
    runs = {arm: [run_metrics(Path(cfg.out) / arm / f"seed{s}") for s in seeds] for arm in arms}
    first = Path(cfg.out) / arms[0] / "seed0" / "eval_vs_sft.json"
    results = {"title": "R3: PPO without preference labels (each arm a train_ppo.py --reward, from the SFT model)",
               "metrics": METRICS, "seeds": seeds,
               "arms": {"sft": {m: [v] for m, v in side_metrics(experiment.read_json(first), "B").items()},
                        **{arm: {m: [r[m] for r in per_seed] for m in [*METRICS, "wall_s"]}
                           for arm, per_seed in runs.items()}},
               "wall_s": time.time() - t0}
    bad = [f"{arm}.{m}" for arm, values in results["arms"].items() for m, vs in values.items()
           if not all(v is not None and math.isfinite(v) for v in vs)]
    if bad:
        raise FloatingPointError(f"non-finite or missing results: {', '.join(bad)} (see the runs' log.txt)")
    experiment.write_results(cfg.out, results)
    print(f"R3 experiment: {len(arms)} arms x {len(seeds)} seeds in {time.time() - t0:.0f} s "
          f"(the jobs took {sum(sum(v['wall_s']) for v in results['arms'].values() if 'wall_s' in v):.0f} s in all)")
    return results


if __name__ == "__main__":
    run(main, sys.argv[1:])
