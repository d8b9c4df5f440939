"""Direct preference optimisation: DPO (Rafailov et al. 2023), cDPO and IPO (Azar et al. 2023).

DPO fits the policy to preference pairs (prompt x, chosen y_w, rejected y_l) with no reward model and no
sampling. With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)), the policy's
log-ratio margin over the frozen reference pi_ref (the SFT model it starts from):
    --loss=dpo   L = -log sigmoid(beta h): the Bradley-Terry likelihood of the implicit reward beta log pi/pi_ref
    --loss=cdpo  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = --label_smoothing: the
                 labels are assumed flipped with probability eps, so the margin stops growing at a finite value
    --loss=ipo   L = (h - 1/(2 beta))^2 with per-token averaged log-probs: pulls h to a target instead of to
                 infinity, so it does not overfit pairs whose preference is (nearly) deterministic
With no arguments: DPO from the tiny SFT model (out/sft/model, trained first if missing) on
data/prefs_train.jsonl, held-out metrics on data/prefs_val.jsonl, then greedy answers of the DPO and the SFT
model to data/prompts_test.jsonl judged by the world's oracle: win rate and mean quality (out/dpo/eval.json).
--schedule=alternating is Hbat (nanoalign/hbat.py): from the tiny base model, SFT_1, DPO_1, SFT_2, DPO_2 on
halves of data/sft_train.jsonl and of the pairs, with the modified EWC (--ewc) in every stage after the first.

    python train_dpo.py                                   # the tiny world, a few minutes on a laptop CPU
    python train_dpo.py --loss=ipo --beta=2               # a variant
    python train_dpo.py --resume                          # continue from out/dpo/model
    python train_dpo.py --schedule=alternating            # Hbat, into out/hbat_dpo; --ewc=none|freeze|fisher: ablations
    torchrun --nproc_per_node=2 train_dpo.py              # data-parallel with FSDP2 (gloo on CPU)
    torchrun --nproc_per_node=8 train_dpo.py --init=out/sft-7b/model --device=cuda --format=hh \\
        --data=hh-rlhf/helpful-base/train.jsonl.gz --val_data=hh-rlhf/helpful-base/test.jsonl.gz \\
        --eval_prompts= --beta=0.1 --lr=5e-7 --warmup_steps=150 --batch_size=64 --micro_batch_size=4 --max_len=512

Details that matter (docs/methods.md "## 4. DPO", docs/correctness.md):
- The reference is frozen, so log pi_ref of every pair is a constant of the data: it is computed ONCE before
  training, in batches, and cached in out_dir/ref_logps.pt under a hash of the tokenized pairs and of the
  reference checkpoint's files (reused while neither changes). The reference model is freed before training
  starts: training holds one model, like SFT (nanoalign/dpo.py). In Hbat each DPO stage's reference is the
  model at the stage's start, so each stage computes its own (out_dir/ref_logps_stage<k>.pt).
- Log-probs are summed over the response tokens and the EOS (dpo, cdpo), averaged per token for ipo.
- The loss is a sum over pairs divided by the pairs of the whole optimizer step (all micro-batches, ranks).
- Both logps/chosen and logps/rejected usually FALL during DPO, and rewards/chosen often turns negative:
  expected, not a bug. The loss sees only the margin; the chosen and rejected responses share most of their
  tokens, so a step that lowers the rejected one lowers the chosen one too, and the freed probability goes to
  responses outside the pair. Watch rewards/margins and rewards/accuracies rise. (On the tiny world the
  chosen log-prob stays about level: its chosen answers are close to what SFT already taught.)
- Logged (TRL's names): rewards/chosen and rewards/rejected = beta * log-ratio (the implicit rewards),
  rewards/margins (their difference), rewards/accuracies (fraction with margin > 0, a tie is wrong),
  logps/chosen, logps/rejected (the policy's, as the loss uses them), margins/unscaled = h without beta (as
  the REAL paper reports margins), loss, lr, grad_norm; the same on held-out pairs prefixed eval/.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

import train_sft
from nanoalign import dist, dpo, hbat, train, world
from nanoalign.checkpoint import load_pretrained, model_config
from nanoalign.cli import (InputError, check_choice, check_device, check_learning_rates, check_non_negative,
                           check_output, check_positive, check_range, parse_config, run)
from nanoalign.data import collate_pairs, read_jsonl, read_pairs, tokenize_pairs, tokenize_sft
from nanoalign.evaluate import oracle_score, sample_answers, win_rate
from nanoalign.losses import dpo_loss
from nanoalign.tokenizer import TEMPLATES, Tokenizer

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "margins/unscaled")


# --- config
@dataclass
class Config:
    init: str = "auto"          # the policy's start and first reference (dir or hub id); auto: out/sft/model, or out/base/model for Hbat
    out_dir: str = "auto"       # the run: model/, ref_logps.pt, metrics.jsonl, eval.json; auto: out/dpo (out/hbat_dpo if alternating)
    data: str = "data/prefs_train.jsonl"  # {"prompt","chosen","rejected"} JSONL, or HH-RLHF transcripts with --format=hh
    val_data: str = "data/prefs_val.jsonl"  # held-out pairs for the eval/ metrics ("" to skip)
    format: str = "jsonl"       # jsonl ({"prompt","chosen","rejected"}) or hh (Anthropic HH-RLHF {"chosen","rejected"})
    template: str = "auto"      # prompt template: hh, alpaca, plain; auto: the one saved with --init, else hh
    eval_prompts: str = "data/prompts_test.jsonl"  # tiny-world prompts: greedy answers, win rate vs --init ("" to skip)
    loss: str = "dpo"           # dpo (sigmoid), cdpo (DPO with --label_smoothing) or ipo
    beta: float = 0.25          # pull toward the reference, the KL coefficient of the implicit reward (papers: 0.1; 0.25 measured better here)
    label_smoothing: float = 0.0  # cdpo only: the assumed probability that a label is flipped, in (0, 0.5]
    # Hbat: alternating SFT and DPO stages with EWC (docs/methods.md "## 5. Hbat", nanoalign/hbat.py)
    schedule: str = "two_stage"  # two_stage: (all SFT, then) DPO, no EWC; alternating: SFT_1, DPO_1, ..., SFT_n, DPO_n
    splits: int = 2             # alternating: n, SFT/DPO stage pairs, each on its own split of both data sets
    sft_data: str = "auto"      # SFT examples (as train_sft reads them); auto: data/sft_train.jsonl if alternating, else none
    sft_steps: int = 1000       # steps of all SFT stages together (train_sft's; --steps: all DPO stages)
    sft_lr: float = 1e-3        # peak learning rate of each SFT stage (its other settings: train_sft's defaults)
    ewc: str = "modified"       # alternating: modified (Hbat's), fisher (Kirkpatrick's), freeze (Hbat-Freeze) or none
    lambda_max: float = 100.0   # EWC strength: Omega's total (modified), or the Fisher penalty's lambda_max
    ewc_temperature: float = 1.0  # T in Omega = lambda_max softmax(S / T): 1 is the authors' (one-hot); larger spreads it
    fisher_samples: int = 64    # --ewc=fisher: examples of the previous stage's data the Fisher averages over
    # optimisation
    steps: int = 100            # optimizer steps (100 x 32 pairs: about one epoch of the tiny world's 3000 pairs)
    stop_at: int = 0            # stop after this step as if interrupted (0: run to the end); continue with --resume
    batch_size: int = 32        # pairs per optimizer step, summed over ranks
    micro_batch_size: int = 16  # pairs per forward on one rank (each pair is two sequences)
    lr: float = 1e-4            # peak learning rate (use ~5e-7 for a real 7B model)
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10      # linear warmup steps
    weight_decay: float = 0.0   # AdamW decay on matrices (never on norms and biases)
    grad_clip: float = 1.0      # max global gradient norm
    max_len: int = 256          # tokens per sequence; longer pairs keep the end of the prompt
    max_response_len: int = 128  # tokens per response (both responses of a pair get the same cap)
    eval_every: int = 25        # steps between held-out evaluations (and at the end)
    save_every: int = 50        # 0: save only at the end
    seed: int = 0               # data order
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA: bfloat16 or float32
    resume: bool = False        # continue from out_dir/model/train_state.pt
    max_new_tokens: int = 48    # length cap of the greedy answers to --eval_prompts
    num_samples: int = 4        # answers of both models printed at the end


def check_config(cfg: Config) -> None:
    """Every flag checked before any work starts; each error names the flag and what is allowed."""
    train.check_divides_world(cfg, "batch_size")
    check_choice(cfg, "loss", ("dpo", "cdpo", "ipo"))
    check_choice(cfg, "format", ("jsonl", "hh"))
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    train.check_hh_template(cfg)
    check_positive(cfg, "beta", "steps", "batch_size", "micro_batch_size", "lr", "max_len", "max_response_len",
                   "eval_every", "max_new_tokens")
    if cfg.loss == "cdpo" and not 0 < cfg.label_smoothing <= 0.5:
        raise InputError(f"--label_smoothing={cfg.label_smoothing}: --loss=cdpo needs a label smoothing in (0, 0.5]")
    if cfg.loss != "cdpo" and cfg.label_smoothing != 0:
        raise InputError(f"--label_smoothing={cfg.label_smoothing}: applies to --loss=cdpo only (got --loss={cfg.loss})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype={cfg.dtype}: train in bfloat16 or float32")
    check_non_negative(cfg, "warmup_steps", "weight_decay", "grad_clip", "save_every", "stop_at", "num_samples")
    check_range(cfg, "min_lr_ratio", 0.0, 1.0)
    check_learning_rates(cfg, "lr")
    check_device(cfg)
    if cfg.eval_prompts.strip().isdigit() and not Path(cfg.eval_prompts).exists():  # train_ppo's flag is a count
        raise InputError(f"--eval_prompts={cfg.eval_prompts}: a file of held-out prompts here (a number is "
                         f"train_ppo.py's --eval_prompts); pass a .jsonl path, or --eval_prompts= to skip")
    train.check_files(cfg, "data", "val_data", "eval_prompts")
    if cfg.out_dir != "auto":
        check_output(cfg.out_dir, "out_dir", directory=True)
    train.check_prompt_file(cfg, "eval_prompts")
    hbat.check_config(cfg, "dpo")


def pair_sums(model, pairs: list[dict], cfg: Config, pad_id: int, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-pair losses, the STATS summed over the pairs) of pairs carrying their reference log-probs."""
    logps = dpo.response_logps(model, collate_pairs(pairs, pad_id), average=cfg.loss == "ipo", amp=amp)  # (2B,)
    chosen, rejected = logps.chunk(2)  # collate_pairs puts the chosen rows first
    ref_chosen = torch.tensor([p["ref_chosen"] for p in pairs], device=chosen.device)
    ref_rejected = torch.tensor([p["ref_rejected"] for p in pairs], device=chosen.device)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                        cfg.label_smoothing, "ipo" if cfg.loss == "ipo" else "sigmoid")
    margins = chosen_rewards - rejected_rewards
    unscaled = ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()  # h, the margin without beta
    stats = torch.stack([losses.detach(), chosen_rewards, rejected_rewards, margins, (margins > 0).float(),
                         chosen.detach(), rejected.detach(), unscaled]).sum(-1)
    return losses.sum(), stats


def evaluate_pairs(model, rows, cfg, d, pad_id, amp) -> dict:
    model.eval()
    sums = train.eval_sums(rows, cfg.micro_batch_size, d, lambda chunk: torch.cat(
        [pair_sums(model, chunk, cfg, pad_id, amp)[1], torch.tensor([float(len(chunk))], device=d.device)]))
    model.train()
    return {f"eval/{k}": v for k, v in zip(STATS, (sums[:-1] / sums[-1]).tolist())}


def compare_answers(cfg, d, policy, init_dir, tok, template, base: str = "sft") -> dict | None:
    """Greedy answers of the DPO model and of the model it started from (named `base`: the SFT model, or the base
    model Hbat starts from), judged by the tiny world's oracle."""
    prompts = [r["prompt"] for r in read_jsonl(cfg.eval_prompts, required=("prompt",))]
    answers = {}
    for name in ("dpo", base):
        model = policy if name == "dpo" else load_pretrained(init_dir, device=d.device)
        answers[name] = sample_answers(model, tok, prompts, template, cfg.max_new_tokens)
        del model
    for p, a, b in list(zip(prompts, answers["dpo"], answers[base]))[:cfg.num_samples]:
        print(f"\n> {p}\n  dpo: {a}\n  {base}: {b}")
    if not all(world.is_world_prompt(p) for p in prompts):  # the oracle judges only its own world's prompts
        print(f"\n--eval_prompts={cfg.eval_prompts} holds prompts from outside the tiny world: answers shown, no "
              f"oracle win rate (python -m nanoalign.evaluate --judge=REWARD_MODEL_DIR compares them)")
        return None
    result = {"n_prompts": len(prompts),
              f"win_rate_vs_{base}": win_rate(oracle_score, prompts, answers["dpo"], answers[base])}
    for name, ans in answers.items():
        result[f"mean_quality/{name}"] = sum(map(world.quality, prompts, ans)) / len(prompts)
        result[f"correct/{name}"] = sum(map(world.is_correct, prompts, ans)) / len(prompts)
    print(f"\noracle on {len(prompts)} held-out prompts: win rate of DPO vs {base.upper()} "
          f"{result[f'win_rate_vs_{base}']:.3f}; mean quality {result['mean_quality/dpo']:.3f} ({base.upper()} "
          f"{result[f'mean_quality/{base}']:.3f}); task right (closed- and open-ended prompts alike) "
          f"{result['correct/dpo']:.1%} "
          f"({base.upper()} {result[f'correct/{base}']:.1%})")
    return result


def dpo_stage(cfg: Config, d, tok, val_rows, run_dir: Path, amp, stage: hbat.Stage, model, rows, penalty_fn=None):
    """A DPO stage on the pairs `rows` (a plain run is one): the reference log-probs of the model at the stage's
    start, computed once (cached) before any step, then stage.steps optimizer steps with a fresh AdamW."""
    splits = {"train": rows, **({"val": val_rows} if val_rows else {})}
    cache = run_dir / ("ref_logps.pt" if stage.index == 0 else f"ref_logps_stage{stage.index + 1}.pt")
    ref = dpo.reference_logps(stage.start_dir, splits, tok.pad_id, cache, d, cfg.micro_batch_size, cfg.dtype)
    if stage.state:
        dpo.check_resumed_reference((stage.state.get("extra") or {}).get("reference_logps"), ref["train"], stage.index)
    average = cfg.loss == "ipo"
    rows = dpo.with_reference(rows, ref["train"], average)
    val_rows = dpo.with_reference(val_rows, ref["val"], average) if val_rows else []
    opt = train.adamw(model, cfg.lr, cfg.weight_decay)
    start = stage.restore({"model": (model, opt)}, d)
    if start:
        dist.print0(d, f"resumed from {stage.ckpt} at step {stage.offset + start}")
    bar = train.progress(range(start, stage.last), cfg.loss, d)
    t0, pairs_seen, record = time.time(), 0, {}
    for step in bar:
        lr = train.lr_at(step, stage.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        train.set_lr(opt, lr)
        mine = train.rank_share([rows[i] for i in train.batch_indices(step, len(rows), cfg.batch_size, cfg.seed)], d)
        stats = []

        def loss_fn(pairs):
            loss_sum, s = pair_sums(model, pairs, cfg, tok.pad_id, amp)
            stats.append(s)
            return loss_sum

        penalty = hbat.step_penalty(penalty_fn)  # Hbat: the EWC penalty at the weights the step starts from
        # the normaliser is the number of pairs in the global step, so every pair weighs the same
        train.accumulate_gradients(model, train.micro_batches(mine, cfg.micro_batch_size), loss_fn, cfg.batch_size, d)
        means = dist.all_reduce_sum(torch.stack(stats).sum(0), d) / cfg.batch_size
        record = {**stage.record(step + 1), **dict(zip(STATS, means.tolist())), "lr": lr}
        record["grad_norm"] = train.optimizer_step(model, opt, step=stage.offset + step + 1,
                                                   loss=record["loss"] + (penalty or 0.0), grad_clip=cfg.grad_clip,
                                                   d=d, what=cfg.loss)
        record.update(hbat.ewc_record(stage, penalty, record["loss"]))
        pairs_seen += cfg.batch_size
        record["pairs_per_s"] = pairs_seen / (time.time() - t0)
        if val_rows and ((step + 1) % cfg.eval_every == 0 or step + 1 == stage.steps):
            record.update(evaluate_pairs(model, val_rows, cfg, d, tok.pad_id, amp))
            dist.print0(d, f"\n[{cfg.loss}] step {stage.offset + step + 1}: loss {record['loss']:.4f} eval/loss "
                           f"{record['eval/loss']:.4f} eval/rewards/accuracies {record['eval/rewards/accuracies']:.3f} "
                           f"eval/rewards/margins {record['eval/rewards/margins']:.3f}")
        stage.log.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", margin=f"{record['rewards/margins']:.2f}", lr=f"{lr:.1e}")
        if train.should_save(step + 1, cfg.save_every, stage.last):
            stage.save(d, step + 1, {"model": (model, opt)}, tokenizer=tok,
                       extra={"reference_logps": {"stage": stage.index, "logps": ref["train"]}})
    bar.close()
    return record


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    stages = hbat.plan(cfg, "dpo")
    # the records are read first: a malformed one is named before minutes of training the default SFT model
    pairs = train.read_train_and_val(cfg, lambda path: read_pairs(path, cfg.format), "pairs")
    sft_examples = train_sft.load_sft_examples(cfg.sft_data, "auto") if cfg.sft_data else []
    if cfg.init in (hbat.SFT_INIT, hbat.BASE_INIT):
        hbat.train_init_first(cfg.init, cfg.device, train_sft.main)
    d = dist.init_dist(cfg.device)
    dist.seed_everything(cfg.seed)
    t_start = time.time()
    run_dir, ckpt = Path(cfg.out_dir), Path(cfg.out_dir) / "model"
    train.clean_stale(ckpt, d)
    state = train.find_checkpoint(ckpt, cfg.resume)
    init_dir = train.checkpoint_dir(cfg, "init")
    tok = Tokenizer.from_dir(init_dir)
    mcfg = model_config(init_dir)
    tok.check_vocab(mcfg.vocab_size)
    context = mcfg.max_seq_len
    if cfg.max_len > context or (cfg.eval_prompts and cfg.max_new_tokens >= context):
        flag = "max_len" if cfg.max_len > context else "max_new_tokens"
        raise InputError(f"--{flag}={getattr(cfg, flag)}: does not fit the context of {init_dir} ({context} tokens)")
    if cfg.template == "auto":
        cfg.template = "hh" if cfg.format == "hh" else tok.template or "hh"
    template = tok.template = cfg.template  # saved with the checkpoint: the generate CLI uses it
    # (--steps and Hbat's flags: hbat.run_schedule; the template compared as resolved from auto)
    train.check_resumed_flags(cfg, state, ("init", "data", "format", "template", "loss", "beta", "label_smoothing",
                                           "lr", "seed", "batch_size", "min_lr_ratio", "warmup_steps", "weight_decay",
                                           "grad_clip", "max_len", "max_response_len"))

    # --- data: the pairs (and Hbat's SFT examples), each in --splits disjoint parts
    train_rows, val_rows = (tokenize_pairs(pairs[name], tok, template, cfg.max_len, cfg.max_response_len)
                            for name in ("data", "val_data"))
    if not train_rows:
        raise InputError(f"--data={cfg.data}: no preference pairs left after tokenizing")
    sft_rows = tokenize_sft(sft_examples, tok, template, cfg.max_len, cfg.max_response_len)
    data = {"dpo": hbat.split(train_rows, cfg.splits, "data"),
            "sft": hbat.split(sft_rows, cfg.splits, "sft_data") if cfg.sft_data else []}
    dist.print0(d, f"{cfg.loss.upper()} (beta {cfg.beta}) from {init_dir} on {cfg.data}: {len(train_rows)} pairs, "
                   f"{len(val_rows)} held out, template {template!r}"
                   + (f"; {len(sft_rows)} SFT examples from {cfg.sft_data}; stages: "
                      + ", ".join(f"{s.kind}_{s.split + 1} ({s.steps} steps)" for s in stages) if cfg.sft_data else ""))

    # --- models: the policy; each DPO stage's reference runs once over its pairs and is freed (dpo_stage)
    model = train.place(train.load_model(ckpt if state else init_dir, d), d)
    log = train.MetricsLog(run_dir / "metrics.jsonl", d, state["step"] if state else 0)
    amp = train.autocast(d, cfg.dtype)

    # --- loop: the stages of the schedule (a plain run: one DPO stage)
    sft_cfg = train_sft.Config(lr=cfg.sft_lr, batch_size=hbat.SFT_BATCH_SIZE, micro_batch_size=cfg.micro_batch_size,
                               max_len=cfg.max_len, save_every=cfg.save_every, seed=cfg.seed, device=cfg.device,
                               dtype=cfg.dtype)
    last = hbat.run_schedule(
        cfg, d, stages, model, data, init_dir=init_dir, run_dir=run_dir, state=state, log=log, tok=tok, amp=amp,
        sft_stage=lambda stage, m, rows, penalty_fn: train_sft.sft_stage(sft_cfg, d, "sft", m, tok, rows, [], stage,
                                                                        cfg.sft_lr, penalty_fn),
        pref_stage=partial(dpo_stage, cfg, d, tok, val_rows, run_dir, amp),
        # the Fisher's sequences (--ewc=fisher): the SFT responses, the chosen responses of the pairs
        sequences=lambda kind, rows, m: rows if kind == "sft" else [{"ids": r["chosen_ids"], "mask": r["chosen_mask"]}
                                                                     for r in rows])
    total = stages[-1].offset + stages[-1].steps
    dist.print0(d, f"[{cfg.loss}] saved {ckpt} (step {min(cfg.stop_at or total, total)}/{total}); metrics in {log.path}")

    # --- save (done in the loop); greedy answers of the final model against the one it started from, on rank 0
    # alone, after the ranks have left the process group: NCCL would abort the others' wait after 10 minutes
    dist.close(d)
    if last is not None and d.is_main:
        result = {}
        if cfg.eval_prompts:
            policy = load_pretrained(ckpt, device=d.device) if d.enabled else model  # unsharded for generate()
            result = compare_answers(cfg, d, policy, init_dir, tok, template, "init" if cfg.sft_data else "sft") or {}
        result.update({k: v for k, v in last.items() if k.startswith("eval/")})
        result["wall_s"] = round(time.time() - t_start, 1)
        print(f"wall time {result['wall_s']:.0f} s; results in {train.save_eval(run_dir, result)}")


if __name__ == "__main__":
    run(main, sys.argv[1:])
