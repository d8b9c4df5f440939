"""Reward model (RM) training: the SFT model with a scalar head, fit to preference pairs (Bradley-Terry).

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)),  r read at the last real token (the EOS)

With no arguments it runs on the tiny world on CPU: start from the tiny SFT model out/sft/model (trained first
with train_sft.py when it is missing) with a new head w ~ N(0, 1/sqrt(d + 1)), train one epoch on
data/prefs_train.jsonl (pairs labelled by the world's noisy annotator), print the held-out accuracy on
data/prefs_val.jsonl, set the offset so that the SFT demonstrations of data/sft_val.jsonl (their "response")
score 0 on average, and save out/rm/model (transformers loads it as a LlamaForSequenceClassification).

    python train_rm.py                                    # the tiny world, a minute on a laptop CPU after SFT
    python train_rm.py --resume                           # continue the last run from its checkpoint
    torchrun --nproc_per_node=2 train_rm.py               # the same run, data-parallel with FSDP2 (gloo on CPU)
    torchrun --nproc_per_node=8 train_rm.py --init=out/sft7b/model --device=cuda --format=hh \\
        --data=hh-rlhf/train.jsonl.gz --val_data=hh-rlhf/test.jsonl.gz --offset_data=sft_val.jsonl \\
        --lr=9e-6 --batch_size=64 --micro_batch_size=4 --max_len=1024 --max_response_len=512

Details that matter (docs/methods.md section 2, docs/correctness.md):
- Chosen and rejected responses go through ONE forward (collate_pairs: chosen rows, then rejected rows), and the
  score is read at each row's last attended token, never at a pad.
- The loss is a sum over pairs divided by the number of pairs of the WHOLE optimizer step (all micro-batches,
  all ranks), so gradient accumulation and data parallelism give the update of one big batch.
- The Bradley-Terry loss sees only differences, so the offset is not trained: it is set once at the end, so that
  a PPO penalty for a missing EOS (a fixed score such as -1) sits on a known scale.
- --init may also be a trained reward model (ours or a HF ...ForSequenceClassification): it keeps its head.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from nanoalign import dist, train
from nanoalign.cli import (InputError, check_choice, check_device, check_learning_rates, check_non_negative,
                           check_output, check_positive, check_range, parse_config, run)
from nanoalign.data import collate_pairs, collate_sft, read_jsonl, read_pairs, tokenize_pairs, tokenize_sft
from nanoalign.losses import bt_loss
from nanoalign.reward import RewardModel, is_reward_checkpoint, set_offset_to_zero_mean
from nanoalign.tokenizer import TEMPLATES, Tokenizer


# --- config
@dataclass
class Config:
    init: str = "out/sft/model"  # SFT checkpoint (dir or hub id) to put a new head on, or a reward model to go on
    out_dir: str = "out/rm"     # the run: model/ (HF sequence-classification checkpoint, train_state.pt), metrics.jsonl
    data: str = "data/prefs_train.jsonl"  # pairs: .jsonl {"prompt","chosen","rejected"}, or HH-RLHF (--format=hh)
    val_data: str = "data/prefs_val.jsonl"  # held-out pairs for the accuracy ("" to skip)
    offset_data: str = "data/sft_val.jsonl"  # .jsonl {"prompt","response"}: their mean reward is set to 0 ("": keep)
    format: str = "jsonl"       # format of data and val_data: jsonl or hh
    template: str = "auto"      # prompt template: hh, alpaca, plain; auto: the one saved with --init, else hh
    # optimisation
    steps: int = 0              # optimizer steps; 0: one epoch over data
    stop_at: int = 0            # stop after this step as if interrupted (0: run to the end); continue with --resume
    batch_size: int = 32        # pairs per optimizer step, summed over ranks
    micro_batch_size: int = 16  # pairs per forward on one rank (2x rows: chosen and rejected)
    lr: float = 1e-3            # peak learning rate (tiny world: 1e-3 beat 3e-4; use ~1e-5 for a real 7B model)
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10      # linear warmup steps
    weight_decay: float = 0.0   # AdamW decay on matrices (never on norms and biases)
    grad_clip: float = 1.0      # max global gradient norm
    max_len: int = 256          # tokens per sequence; longer ones keep the end of the prompt
    max_response_len: int = 128  # tokens per response (a cut response loses its EOS)
    eval_every: int = 50        # steps between held-out evaluations
    save_every: int = 50        # 0: save only at the end
    seed: int = 0               # head init and data order
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA: bfloat16 or float32
    resume: bool = False        # continue from out_dir/model/train_state.pt


def check_config(cfg: Config) -> None:
    """Every flag checked before any work starts; each error names the flag and what is allowed."""
    train.check_divides_world(cfg, "batch_size")
    check_choice(cfg, "format", ("jsonl", "hh"))
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    train.check_hh_template(cfg)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype={cfg.dtype}: train in bfloat16 or float32")
    check_positive(cfg, "batch_size", "micro_batch_size", "max_len", "max_response_len", "lr", "eval_every")
    check_non_negative(cfg, "steps", "warmup_steps", "weight_decay", "grad_clip", "save_every", "stop_at")
    check_range(cfg, "min_lr_ratio", 0.0, 1.0)
    check_learning_rates(cfg, "lr")
    check_device(cfg)
    if not cfg.init:
        raise InputError("--init: give the SFT checkpoint (a directory or a hub id) to start from")
    train.check_files(cfg, "data", "val_data", "offset_data")
    check_output(cfg.out_dir, "out_dir", directory=True)


def pair_sums(rm, pairs: list[dict], pad_id: int, amp):
    """Rewards of a micro-batch of pairs -> (the Bradley-Terry loss summed over the pairs, and the detached
    sums [loss, correct, chosen reward, rejected reward, pairs] for the logs)."""
    device = next(rm.parameters()).device
    batch = collate_pairs(pairs, pad_id)
    with amp:
        rewards = rm(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
    chosen, rejected = rewards.float().chunk(2)  # (B,) each: collate_pairs puts the chosen rows first
    loss = bt_loss(chosen, rejected)[0] * len(pairs)  # bt_loss is a mean: back to a sum
    stats = [loss, (chosen > rejected).sum(), chosen.sum(), rejected.sum(), len(pairs)]
    return loss, torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device) for x in stats]).detach()


def summary(sums: torch.Tensor, prefix: str) -> dict:
    loss, correct, chosen, rejected, n = sums.tolist()
    return {f"{prefix}/loss": loss / n, f"{prefix}/accuracy": correct / n, "rewards/chosen": chosen / n,
            "rewards/rejected": rejected / n, "rewards/margins": (chosen - rejected) / n}


@torch.no_grad()
def evaluate(rm, rows, cfg, d, pad_id, amp) -> dict:
    """eval/loss, eval/accuracy and eval/margins over the held-out pairs (all ranks together)."""
    rm.eval()
    sums = train.eval_sums(rows, cfg.micro_batch_size, d, lambda chunk: pair_sums(rm, chunk, pad_id, amp)[1])
    rm.train()
    s = summary(sums, "eval")
    return {"eval/loss": s["eval/loss"], "eval/accuracy": s["eval/accuracy"], "eval/margins": s["rewards/margins"]}


@torch.no_grad()
def normalize_offset(rm, rows, cfg, d, pad_id, amp) -> tuple[float, float]:
    """Set the offset so that the demonstrations' mean score is 0; returns (their mean before, the offset)."""
    rm.eval()
    device = next(rm.parameters()).device

    def score_sum(chunk):
        batch = collate_sft(chunk, pad_id)
        with amp:
            scores = rm(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return torch.stack([scores.float().sum(), torch.tensor(float(len(chunk)), device=device)])

    total, count = train.eval_sums(rows, cfg.micro_batch_size, d, score_sum).tolist()
    rm.train()
    return total / count, set_offset_to_zero_mean(rm, total, int(count))


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    # the records are read first: a malformed one is named before minutes of training the default SFT model
    pairs = train.read_train_and_val(cfg, lambda path: read_pairs(path, cfg.format), "pairs")
    offset_records = read_jsonl(cfg.offset_data, required=("prompt", "response")) if cfg.offset_data else []
    if cfg.init == Config.init and not cfg.resume:
        import train_sft  # the repository's SFT script, beside this one
        train.train_first(cfg.init, "the tiny SFT model", "train_sft.py", train_sft.main, [f"--device={cfg.device}"])
    d = dist.init_dist(cfg.device)
    dist.seed_everything(cfg.seed)

    # --- models
    ckpt = Path(cfg.out_dir) / "model"
    train.clean_stale(ckpt, d)
    state = train.find_checkpoint(ckpt, cfg.resume)
    init_dir = ckpt if state else train.checkpoint_dir(cfg, "init")
    if state or is_reward_checkpoint(init_dir):
        load = RewardModel.from_pretrained  # a reward model keeps its head (and its offset)
    else:  # the SFT model's trunk, a new N(0, 1/sqrt(d+1)) head drawn from the seed
        load = partial(RewardModel.from_causal_lm, head_init="normal", generator=torch.Generator().manual_seed(cfg.seed))
    rm = train.load_model(init_dir, d, load=load, build=RewardModel.from_config)
    tok = Tokenizer.from_dir(init_dir)
    tok.check_vocab(rm.cfg.vocab_size)
    if cfg.max_len > rm.cfg.max_seq_len:
        raise InputError(f"--max_len={cfg.max_len}: the model's context length is {rm.cfg.max_seq_len}")
    if cfg.template == "auto":
        cfg.template = "hh" if cfg.format == "hh" else tok.template or "hh"
    tok.template = cfg.template
    dist.print0(d, f"reward model from {init_dir} ({rm.num_params() / 1e6:.2f}M parameters) on {cfg.data}, "
                   f"template {cfg.template!r}")

    # --- data
    train_rows, val_rows = (tokenize_pairs(pairs[name], tok, cfg.template, cfg.max_len, cfg.max_response_len)
                            for name in ("data", "val_data"))
    offset_rows = tokenize_sft(offset_records, tok, cfg.template, cfg.max_len, cfg.max_response_len)
    if not train_rows:
        raise InputError(f"--data={cfg.data}: no training pairs left after tokenizing (see the counts above)")
    if cfg.offset_data and not offset_rows:
        raise InputError(f"--offset_data={cfg.offset_data}: no demonstrations to centre the scores on (pass "
                         f"--offset_data= to leave the scores uncentred)")
    steps = cfg.steps or math.ceil(len(train_rows) / cfg.batch_size)
    train.check_resumed_flags(cfg, state, ("data", "format", "template", "offset_data", "steps", "lr", "seed",
                                           "batch_size", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip",
                                           "max_len", "max_response_len"))
    dist.print0(d, f"{len(train_rows)} training pairs ({steps} steps of {cfg.batch_size}), {len(val_rows)} held out")

    # --- loop
    rm = train.place(rm, d)
    opt = train.adamw(rm, cfg.lr, cfg.weight_decay)
    start = train.restore(state, {"model": (rm, opt)}, d)
    if state:
        dist.print0(d, f"resumed from {ckpt} at step {start}")
    log = train.MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", d, start)
    amp = train.autocast(d, cfg.dtype)
    if val_rows and start == 0:
        before = evaluate(rm, val_rows, cfg, d, tok.pad_id, amp)
        log.log({"step": 0, **before})
        dist.print0(d, f"held-out accuracy before training: {before['eval/accuracy']:.1%}")
    last = min(steps, cfg.stop_at) if cfg.stop_at else steps
    bar = train.progress(range(start, last), "rm", d)
    t0 = time.time()
    for step in bar:
        lr = train.lr_at(step, steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        train.set_lr(opt, lr)
        mine = train.rank_share([train_rows[i] for i in train.batch_indices(step, len(train_rows), cfg.batch_size,
                                                                            cfg.seed)], d)
        stats = []

        def loss_fn(pairs):
            loss, sums = pair_sums(rm, pairs, tok.pad_id, amp)
            stats.append(sums)
            return loss

        train.accumulate_gradients(rm, train.micro_batches(mine, cfg.micro_batch_size), loss_fn,
                                   float(cfg.batch_size), d)
        record = summary(dist.all_reduce_sum(torch.stack(stats).sum(0), d), "rm")
        grad_norm = train.optimizer_step(rm, opt, step=step + 1, loss=record["rm/loss"], grad_clip=cfg.grad_clip,
                                         d=d, what="rm")
        record = {"step": step + 1, **record, "lr": lr, "grad_norm": grad_norm,
                  "pairs_per_s": (step + 1 - start) * cfg.batch_size / (time.time() - t0)}
        if val_rows and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            record.update(evaluate(rm, val_rows, cfg, d, tok.pad_id, amp))
            dist.print0(d, f"\nstep {step + 1}: loss {record['rm/loss']:.4f}, held-out accuracy "
                           f"{record['eval/accuracy']:.1%} (loss {record['eval/loss']:.4f})")
        if step + 1 == steps and offset_rows:  # the finished model: demonstrations score 0 on average
            mean, offset = normalize_offset(rm, offset_rows, cfg, d, tok.pad_id, amp)
            record.update({"offset/reference_mean": mean, "offset": offset})
        log.log(record)
        bar.set_postfix(loss=f"{record['rm/loss']:.3f}", acc=f"{record['rm/accuracy']:.2f}", lr=f"{lr:.1e}")
        # --- save
        if train.should_save(step + 1, cfg.save_every, last):
            train.save_checkpoint(ckpt, d, step + 1, {"model": (rm, opt)}, tokenizer=tok, config=cfg)
    bar.close()
    if last == steps and start < steps:
        result = {k: record[k] for k in ("eval/accuracy", "eval/loss") if k in record}
        result.update(n_val_pairs=len(val_rows), offset=rm.offset)
        if "eval/accuracy" in record:
            dist.print0(d, f"held-out accuracy {record['eval/accuracy']:.1%} on {len(val_rows)} pairs (chance 50%)")
        if "offset" in record:
            dist.print0(d, f"offset {rm.offset:+.4f}: the {len(offset_rows)} demonstrations of {cfg.offset_data} "
                           f"now score 0 on average (they scored {record['offset/reference_mean']:+.4f})")
        if d.is_main:
            print(f"results in {train.save_eval(cfg.out_dir, result)}")
    dist.print0(d, f"saved {ckpt} (step {last}/{steps}); metrics in {log.path}")
    dist.close(d)


if __name__ == "__main__":
    run(main, sys.argv[1:])
