"""The whole tiny pipeline from nothing, in one command: world data -> pretrain -> SFT -> reward model ->
PPO and DPO -> evaluation of each aligned model against the SFT model, ending with a summary table.

    python run_all.py                        # everything under out/, ~10 minutes on a 2-core laptop CPU
    python run_all.py --out=runs/seed1 --seed=1
    python run_all.py --device=cuda          # the same recipe on a GPU

Run it from the repository root: the stages read the tiny world's data/ files by their default relative paths.
Resumable: a stage whose result (its eval.json, describing the checkpoint beside it) exists is skipped, and a
stage that was interrupted after a checkpoint continues from it (--resume), once its saved config shows the flags
run_all passes (a quick run of a script left in out/, --steps=5, is refused, not tabulated). A finished stage is
reused only while the data and the earlier models it was trained from are the same bytes (out/run_all.json keeps
their sha256): rebuild data/ or retrain a stage, and the stages trained from the old ones are refused. Only with
the same --seed: out/run_all.json records the seed the directory was made with, and another one is refused (its
stages would be the other seed's models). Each stage
is the flat script of the same name, run with its own defaults and this run's paths; read those scripts for the
recipes. The final table compares PPO and DPO with
the SFT model on the held-out prompts (data/prompts_test.jsonl), greedy decoding, judged by the world's
oracle: win rate against SFT (ties count half), mean oracle quality, closed-ended accuracy, ROUGE-L against the
references, the fraction of answers that copy the prompt, and the mean answer length.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import train_dpo
import train_ppo
import train_rm
import train_sft
from nanoalign import evaluate, train, world
from nanoalign.cli import InputError, check_non_negative, check_output, parse_config, run


# --- config
@dataclass
class Config:
    out: str = "out"            # every stage writes out/<stage>/ (base, sft, rm, ppo, dpo) and out/summary.md
    seed: int = 0               # passed to every stage
    device: str = "cpu"         # cpu or cuda
    limit: int = 0              # evaluate on the first N held-out prompts only (0: all 300)


def stage_args(cfg: Config, stage: str) -> list[str]:
    """The flags of one stage: its own defaults (the tiny world's data/ files), with this run's paths, seed and
    device."""
    out = Path(cfg.out)
    return [f"--seed={cfg.seed}", f"--device={cfg.device}"] + {
        "sft": [f"--base_dir={out / 'base'}", f"--out_dir={out / 'sft'}"],
        "rm": [f"--init={out / 'sft' / 'model'}", f"--out_dir={out / 'rm'}"],
        "ppo": [f"--init={out / 'sft' / 'model'}", f"--reward_model={out / 'rm' / 'model'}", f"--out_dir={out / 'ppo'}"],
        "dpo": [f"--init={out / 'sft' / 'model'}", f"--out_dir={out / 'dpo'}"],
    }[stage]


def check_same_seed(cfg: Config) -> None:
    """Finished stages are reused, so a directory holds one seed's run: record the seed on the first run, refuse
    another one later (--seed=1 into a --seed=0 directory would tabulate seed 0's models as seed 1's)."""
    record = Path(cfg.out) / "run_all.json"
    if record.exists():
        made = json.loads(record.read_text())
        if made.get("seed") != cfg.seed:
            raise InputError(f"--seed={cfg.seed}: {cfg.out} holds the stages of a --seed={made.get('seed')} run "
                             f"({record}); pass another --out, or --seed={made.get('seed')} to go on with it")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seed": cfg.seed}) + "\n")


# flags that do not change what a stage trains: where it runs, how often it saves, what and how often it evaluates
# (run_all evaluates every model itself), the micro-batch (the same updates up to float rounding)
NOT_THE_RECIPE = ("resume", "stop_at", "device", "dtype", "save_every", "eval_every", "num_samples", "micro_batch_size",
                  "val_data", "eval_data", "eval_prompts", "cuda_graph")
NOT_THE_RECIPE_OF = {"dpo": ("max_new_tokens",)}  # DPO's answers the evaluation's only (PPO's rollouts are its data)


def check_same_recipe(cfg: Config, stage: str, script) -> None:
    """A stage found on disk (finished or interrupted) must have been made with the flags run_all passes it: a
    quick run of the script left in out/ (--steps=5) would otherwise be tabulated as the pipeline's. Compared
    with the checkpoint's saved config, each flag that shapes the training, after the script's own check_config
    has resolved the automatic values."""
    run_dir = Path(cfg.out) / stage
    try:
        state = train.find_checkpoint(run_dir / "model", resume=True, required=False)
    except InputError:  # unreadable: the stage's own --resume names what is wrong with it
        return
    if state is None:
        return
    saved = state.get("config") or {}
    expected = parse_config(script.Config, stage_args(cfg, stage))
    script.check_config(expected)  # resolves what the script resolves (a two-stage run is one split, no EWC)
    expected = asdict(expected)
    # the paths run_all derives from --out are compared inside each run's own root, so a copied or moved output
    # directory still holds the same stages
    saved_root = Path(saved.get("out_dir") or expected["out_dir"]).parent
    for name, want in expected.items():
        have = saved.get(name, want)
        if name in NOT_THE_RECIPE + NOT_THE_RECIPE_OF.get(stage, ()) or want == "auto" or have == want:
            continue
        if (inside := _inside(want, cfg.out)) is not None and _inside(have, saved_root) == inside:
            continue
        raise InputError(f"--out={cfg.out}: {run_dir} holds a {stage} run made with --{name}={have}, where run_all.py "
                         f"passes --{name}={want}; pass another --out, or remove {run_dir}")


def _inside(path, root) -> Path | None:
    """path relative to root when it is a path inside root, else None."""
    if not isinstance(path, str) or not path:
        return None
    try:
        return Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None


def finished(run_dir: Path) -> bool:
    """Does run_dir hold a finished run: its eval.json, describing the checkpoint that is there now? (A later run
    of the script into the same directory, interrupted or stopped early, leaves the old eval.json beside its own
    part-trained checkpoint: that stage is resumed, not tabulated.)"""
    if not (run_dir / "eval.json").exists():
        return False
    described = json.loads((run_dir / "eval.json").read_text()).get("checkpoint_step")
    state = train.find_checkpoint(run_dir / "model", resume=True, required=False)
    return described is None or state is None or state["step"] == described  # (None: written before the step was)


def stage_inputs(cfg: Config, stage: str) -> dict[str, str]:
    """What a stage was trained from, as a sha256 of each input's bytes: the world's data (data/world.json records
    how it was built) and the earlier stages' models it reads (by content, so a moved or copied --out matches)."""
    out = Path(cfg.out)
    paths = {"data/world.json": train.REPO_ROOT / "data" / "world.json"}
    for earlier in {"sft": ["base"], "rm": ["sft"], "ppo": ["sft", "rm"], "dpo": ["sft"]}[stage]:
        paths[earlier] = out / earlier / "model"
    digests = {}
    for name, path in paths.items():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []:
            if f.is_file():
                h.update(str(f.relative_to(path) if f != path else "").encode() + b"\0" + f.read_bytes())
        digests[name] = h.hexdigest()
    return digests


def record_inputs(cfg: Config, stage: str, reused: bool) -> None:
    """Keep the stage's inputs (stage_inputs) in out/run_all.json. A finished stage being reused (reused=True)
    must have been trained from the inputs there now, when they were recorded: after `python -m nanoalign.world`
    rebuilt data/, or an earlier stage was retrained, its model would be tabulated against models of other data."""
    record = Path(cfg.out) / "run_all.json"
    made, now = json.loads(record.read_text()), stage_inputs(cfg, stage)
    if reused and made.get("inputs", {}).get(stage, now) != now:
        raise InputError(f"--out={cfg.out}: {Path(cfg.out) / stage} was trained from other data or other earlier "
                         f"models than those there now (data/ rebuilt, or a stage retrained); remove it (and the "
                         f"stages after it), or pass another --out")
    made.setdefault("inputs", {})[stage] = now  # (a stage finished before inputs were recorded: from now on)
    record.write_text(json.dumps(made) + "\n")


def run_stage(cfg: Config, stage: str, script) -> None:
    run_dir = Path(cfg.out) / stage
    check_same_recipe(cfg, stage, script)
    if finished(run_dir):
        record_inputs(cfg, stage, reused=True)
        print(f"[{stage}] done already ({run_dir / 'eval.json'}): skipped", flush=True)
        return
    argv = stage_args(cfg, stage)
    ckpt = run_dir / "model" / train.STATE_FILE
    if ckpt.exists() or (stage == "sft" and (Path(cfg.out) / "base" / "model" / train.STATE_FILE).exists()):
        argv.append("--resume")  # interrupted earlier: continue from its checkpoint
    print(f"\n[{stage}] python {Path(script.__file__).name} {' '.join(argv)}", flush=True)
    t0 = time.time()
    script.main(argv)
    record_inputs(cfg, stage, reused=False)
    print(f"[{stage}] finished in {time.time() - t0:.0f} s", flush=True)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_non_negative(cfg, "limit")
    if cfg.device not in ("cpu", "cuda"):
        raise InputError(f"--device={cfg.device}: choose cpu or cuda")
    check_output(cfg.out, "out", directory=True)
    check_same_seed(cfg)
    t0 = time.time()

    # --- data: the tiny world, rebuilt byte for byte from its seed when missing
    if not (train.REPO_ROOT / "data" / "world.json").exists():
        print("[data] building the tiny world in data/", flush=True)
        world.build(str(train.REPO_ROOT / "data"))

    # --- models: each stage is its script, run with its defaults
    for stage, script in (("sft", train_sft), ("rm", train_rm), ("ppo", train_ppo), ("dpo", train_dpo)):
        run_stage(cfg, stage, script)

    # --- evaluation: each aligned model against the SFT model, same prompts, same judge
    out = Path(cfg.out)
    rows = {}
    for stage in ("ppo", "dpo"):
        result = evaluate.main([f"--model_a={out / stage / 'model'}", f"--model_b={out / 'sft' / 'model'}",
                                f"--limit={cfg.limit}",
                                f"--device={cfg.device}", f"--out={out / stage / 'vs_sft.json'}"])
        rows[stage.upper()] = {**result["metrics"]["A"], "win_rate": result["comparison"]["win_rate"]}
        rows.setdefault("SFT", {**result["metrics"]["B"], "win_rate": 0.5})

    # --- save: the summary table
    columns = [("win_rate", "win rate vs SFT", ".3f"), ("mean_quality", "oracle quality", ".3f"),
               ("closed_accuracy", "closed-ended acc.", ".1%"), ("rouge_l", "ROUGE-L", ".3f"),
               ("copy_rate", "copies prompt", ".1%"), ("mean_words", "words", ".1f")]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in ("SFT", "PPO", "DPO"):
        lines.append(f"| {name} | " + " | ".join("-" if rows[name][k] is None else format(rows[name][k], f)
                                                  for k, _, f in columns) + " |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({**rows, "config": {"seed": cfg.seed, "device": cfg.device,
                                                                     "limit": cfg.limit}}, indent=2) + "\n")
    print(f"\n{table}\n\nsummary in {out / 'summary.md'}; whole pipeline {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run(main, sys.argv[1:])
