"""REAL's claim, rerun in miniature: which response pairs are worth labelling?

The paper ("REAL: Response Embedding-based Alignment for LLMs", 2024): embed every response with the model
about to be aligned and pick pairs by the cosine of their two embeddings. DPO on the most dissimilar pairs
(easy, or the responses nearest two k-means centroids) beats random pairs, which beat the most similar (hard)
pairs, because similar pairs carry more label errors: an annotator shown two near-identical answers guesses.

    python experiments/real.py                 # 11 arms x 3 seeds, ~28 minutes on a 2-core laptop CPU
    python experiments/real.py --quick         # 1 seed, tiny budgets: a smoke run of the whole recipe (exp/real_quick)
    python -m nanoalign.report exp/real        # the curves of every arm, overlaid, and the table

Arms (select_pairs.py, then train_dpo.py on what it wrote, from the same SFT model):
- several responses per prompt (data/multi_train.jsonl, 500 prompts x 5 answers, SHP-style): one pair per
  prompt by easy (least similar), hard (most similar), random, centroid (k = 2 k-means), labelled by the tiny
  world's noisy annotator (--label=annotator: a Bradley-Terry judge on the true quality, like a human rater);
  multi/<strategy>. About 500 pairs each (ties skipped), DPO for --multi_steps x 32 pairs (~2 epochs).
- one pair per prompt (data/prefs_train.jsonl, 3000 annotator-labelled pairs, HH-style): keep 50% by easy, hard
  or random; pairs/<strategy>. 1500 pairs each, DPO for --pairs_steps x 32 pairs (~1 epoch).
- on-policy (select_pairs.py --sample=8): 8 answers of the SFT model itself, sampled at temperature 1, to each of
  the 1240 distinct prompts of data/prefs_train.jsonl; one pair per prompt by easy, hard, random or centroid,
  labelled by the annotator; sampled/<strategy>. 1240 pairs each (917-924 on the ideal writer's world, where a
  prompt whose 8 answers are all the same text has no pair), DPO for --sampled_steps x 32 pairs (~2.6 epochs;
  ~3.5 there) at --sampled_lr (1e-4, the other arms' rate, turns these into repeated phrases). The same seed
  samples the same answers for every strategy.
Each seed changes the random selection, the annotator's coin flips and DPO's data order.

Metrics per run:
- label_error: the fraction of selected pairs whose chosen answer has the LOWER true quality (the oracle's);
  equal_quality: the fraction of ties (neither is better: DPO learns noise from them too); quality_gap: the mean
  true quality of chosen minus rejected; cosine: the median cosine of the selected pairs.
- DPO on held-out pairs (data/prefs_val.jsonl): eval/rewards/accuracies, eval/margins/unscaled (the margin REAL
  reports: log-ratio chosen minus rejected, without beta).
- greedy answers to the 300 held-out prompts (data/prompts_test.jsonl) against the SFT model's, judged by the
  oracle: win_rate (ties count half), mean_quality; kept in results.json beside them: wins and losses, and
  padded, how many answers hold a filler sentence (world.is_padded).

Budget: 33 runs, 2 side by side with one thread each (nanoalign/experiment.py). One run: sampling ~10,000
answers (sampled/ arms, ~40 s), embedding 2,500-6,000 responses (~10 s), DPO (~1 s a step), evaluating two models
on 300 prompts (~15 s).
Results: exp/real/results.json and results.md (mean ± std over seeds), each run in exp/real/<arm>/seed<k>/
(pairs.jsonl, the DPO run, vs_sft.json, log.txt). Rerunning skips the runs that finished.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package and the scripts, when run from a checkout

import select_pairs  # noqa: E402
from nanoalign import experiment, world  # noqa: E402
from nanoalign.cli import check_positive, parse_config, run  # noqa: E402
from nanoalign.data import read_jsonl  # noqa: E402


# --- config
@dataclass
class Config:
    out: str = "exp/real"       # one directory per arm and seed, results.json, results.md
    sft: str = "out/sft/model"  # the model that embeds the responses and that DPO starts from (trained if missing)
    seeds: int = 3              # seeds 0..seeds-1 per arm
    multi_steps: int = 30       # DPO steps on the ~500 pairs of a several-responses arm (x batch_size pairs)
    pairs_steps: int = 45       # DPO steps on the 1500 pairs of a one-pair-per-prompt arm
    sampled_steps: int = 100    # DPO steps on the (up to 1240) on-policy pairs of a sampled/ arm
    sampled_lr: float = 3e-5    # DPO learning rate of the sampled/ arms (the others: train_dpo's default)
    batch_size: int = 32        # pairs per DPO step
    eval_prompts: int = 300     # held-out prompts the win rate is measured on (the first N of data/prompts_test.jsonl)
    multi_data: str = "data/multi_train.jsonl"  # several scored responses per prompt (the multi/ arms)
    pairs_data: str = "data/prefs_train.jsonl"  # annotator-labelled pairs (the pairs/ arms)
    val_pairs: str = "data/prefs_val.jsonl"  # held-out pairs of the DPO accuracy and margins
    parallel: int = 2           # runs side by side (one thread each)
    quick: bool = False         # one seed, tiny budgets: checks the recipe end to end (~3 min on 2 CPU cores)


ARMS = {  # arm -> select_pairs flags (the data: --multi_data or --pairs_data, by the arm's prefix)
    "multi/easy": ["--strategy=easy", "--label=annotator"],
    "multi/hard": ["--strategy=hard", "--label=annotator"],
    "multi/random": ["--strategy=random", "--label=annotator"],
    "multi/centroid": ["--strategy=centroid", "--label=annotator"],
    "pairs/easy": ["--strategy=easy", "--fraction=0.5"],
    "pairs/hard": ["--strategy=hard", "--fraction=0.5"],
    "pairs/random": ["--strategy=random", "--fraction=0.5"],
    "sampled/easy": ["--strategy=easy", "--label=annotator"],  # + --sample=SAMPLES (jobs)
    "sampled/hard": ["--strategy=hard", "--label=annotator"],
    "sampled/random": ["--strategy=random", "--label=annotator"],
    "sampled/centroid": ["--strategy=centroid", "--label=annotator"],
}
SAMPLES = 8  # answers of the SFT model per prompt in the sampled/ arms
METRICS = ["label_error", "equal_quality", "quality_gap", "cosine", "eval/rewards/accuracies",
           "eval/margins/unscaled", "win_rate", "mean_quality"]
# kept per seed in results.json, not tabled: pairs selected, the win rate's wins and losses (the rest tie), and
# the held-out answers holding a filler sentence (world.is_padded: what the padded-world run is about)
EXTRAS = ["pairs", "wins", "losses", "padded"]


def jobs(cfg: Config, seeds: list[int]) -> list[experiment.Job]:
    out, quick = Path(cfg.out).resolve(), cfg.quick
    result = []
    for arm, select_flags in ARMS.items():
        kind = arm.split("/")[0]
        data = cfg.multi_data if kind == "multi" else cfg.pairs_data
        steps = 2 if quick else {"multi": cfg.multi_steps, "pairs": cfg.pairs_steps, "sampled": cfg.sampled_steps}[kind]
        if kind == "sampled":  # quick: four short answers per prompt, the recipe, not the numbers
            select_flags = [f"--sample={4 if quick else SAMPLES}", *select_flags,
                            *(["--max_new_tokens=8"] if quick else [])]
        lr = [f"--lr={cfg.sampled_lr}"] if kind == "sampled" else []
        for seed in seeds:
            run_dir = out / arm / f"seed{seed}"
            result.append(experiment.Job(f"{arm}/seed{seed}", run_dir, [
                experiment.script("select_pairs.py", f"--data={data}", *select_flags, f"--model={cfg.sft}",
                                  f"--seed={seed}", f"--out={run_dir / 'pairs.jsonl'}"),
                experiment.script("train_dpo.py", f"--init={cfg.sft}", f"--data={run_dir / 'pairs.jsonl'}",
                                  f"--val_data={cfg.val_pairs}", f"--out_dir={run_dir}", f"--steps={steps}",
                                  f"--batch_size={4 if quick else cfg.batch_size}",
                                  *(["--micro_batch_size=4", "--warmup_steps=0", "--max_len=128"] if quick else []),
                                  "--eval_prompts=", "--save_every=0", f"--seed={seed}", *lr),
                experiment.script("-m", "nanoalign.evaluate", f"--model_a={run_dir / 'model'}",
                                  f"--model_b={cfg.sft}", f"--limit={cfg.eval_prompts}",
                                  f"--out={run_dir / 'vs_sft.json'}")]))
    return result


def run_metrics(run_dir: Path) -> dict:
    """The numbers of one finished run: its selection judged by the oracle, DPO's held-out pairs, the win rate."""
    pairs = read_jsonl(run_dir / "pairs.jsonl")
    oracle = select_pairs.oracle_report(pairs)
    dpo = experiment.read_json(run_dir / "eval.json")
    vs_sft = experiment.read_json(run_dir / "vs_sft.json")
    return {"label_error": oracle["label_error"], "equal_quality": oracle["equal_quality"],
            "quality_gap": oracle["mean_quality_gap"], "cosine": statistics.median(p["cosine"] for p in pairs),
            "eval/rewards/accuracies": dpo["eval/rewards/accuracies"],
            "eval/margins/unscaled": dpo["eval/margins/unscaled"],
            "win_rate": vs_sft["comparison"]["win_rate"], "mean_quality": vs_sft["metrics"]["A"]["mean_quality"],
            "pairs": len(pairs), "wins": vs_sft["comparison"]["wins"], "losses": vs_sft["comparison"]["losses"],
            "padded": sum(map(world.is_padded, vs_sft["answers"]["A"]))}


def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_positive(cfg, "seeds", "multi_steps", "pairs_steps", "sampled_steps", "sampled_lr", "batch_size",
                   "eval_prompts", "parallel")
    if cfg.quick:
        cfg.eval_prompts = min(cfg.eval_prompts, 8)
        cfg.out = "exp/real_quick" if cfg.out == Config.out else cfg.out  # never mixed with the real run's jobs
    seeds = [0] if cfg.quick else list(range(cfg.seeds))
    t0 = time.time()

    # --- models: the SFT model every arm embeds with and starts from
    experiment.ensure(cfg.sft, experiment.script("train_sft.py"))

    # --- loop: select, train, evaluate; every arm x seed a job
    experiment.run_jobs(jobs(cfg, seeds), parallel=cfg.parallel)

    # --- save: the table
    arms = {}
    for arm in ARMS:
        per_seed = [run_metrics(Path(cfg.out) / arm / f"seed{s}") for s in seeds]
        arms[arm] = {m: [r[m] for r in per_seed] for m in METRICS + EXTRAS}
    results = {"title": "REAL: which pairs to label (DPO from the SFT model on the selected pairs)",
               "metrics": METRICS, "seeds": seeds, "arms": arms, "wall_s": time.time() - t0}
    experiment.write_results(cfg.out, results)
    print(f"REAL experiment: {len(ARMS)} arms x {len(seeds)} seeds in {time.time() - t0:.0f} s")
    return results


if __name__ == "__main__":
    run(main, sys.argv[1:])
