"""Supervised fine-tuning (SFT): the first alignment stage, L = -mean log pi(y_t | x, y_<t) over response tokens.

With no arguments it runs the whole tiny-world recipe on CPU: pretrain a small LLaMA-style model from scratch on
data/pretrain.jsonl (loss on every token; saved to out/base/model), then instruction-tune it on
data/sft_train.jsonl (loss on the response and its EOS only; saved to out/sft/model), then answer held-out
prompts and print the accuracy on the closed-ended ones.

    python train_sft.py                                   # the tiny world, a few minutes on a laptop CPU
    python train_sft.py --resume                          # continue the last run from its checkpoint
    torchrun --nproc_per_node=2 train_sft.py              # the same run, data-parallel with FSDP2 (gloo on CPU)
    torchrun --nproc_per_node=8 train_sft.py --init=meta-llama/Llama-2-7b-hf --device=cuda \\
        --data=alpaca_data.json --template=alpaca --lr=2e-5 --batch_size=64 --micro_batch_size=4 --max_len=1024

Details that matter (docs/methods.md section 1, docs/correctness.md):
- The loss is a sum over response tokens divided by the response-token count of the WHOLE optimizer step
  (all micro-batches, all ranks), so gradient accumulation and data parallelism give the same update as one
  big batch. A micro-batch with no response tokens adds zero, never NaN.
- Schedule, data order, placement, the guarded optimizer step, checkpoints and resume are nanoalign/train.py's.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoalign import dist, hbat, train
from nanoalign.checkpoint import resolve_dir
from nanoalign.cli import (InputError, check_choice, check_device, check_learning_rates, check_non_negative,
                           check_output, check_positive, check_range, parse_config, run)
from nanoalign.data import IGNORE_INDEX, collate_sft, read_alpaca, read_hh, read_jsonl, tokenize_pretrain, tokenize_sft
from nanoalign.evaluate import evaluate_answers, sample_answers
from nanoalign.model import ModelConfig, Transformer
from nanoalign.tokenizer import TEMPLATES, Tokenizer


# --- config
@dataclass
class Config:
    mode: str = "auto"          # auto: pretrain the tiny base (unless --init or out/base exists) then SFT; or pretrain / sft
    init: str = ""              # checkpoint dir or hub id to fine-tune; empty: the tiny base in base_dir
    out_dir: str = "out/sft"    # the run: model/ (HF checkpoint + train_state.pt) and metrics.jsonl
    data: str = "data/sft_train.jsonl"  # .jsonl {"prompt","response"}, an Alpaca/AlpacaFarm .json, or HH-RLHF (--format=hh)
    val_data: str = "data/sft_val.jsonl"  # held-out examples for the eval loss ("" to skip)
    format: str = "auto"        # auto (by name) / jsonl / alpaca / hh
    template: str = "auto"      # prompt template: hh, alpaca, plain; auto: alpaca for Alpaca data, else hh
    eval_data: str = "data/prompts_test.jsonl"  # held-out tiny-world prompts for the closed-ended accuracy ("" to skip)
    # the tiny base model, pretrained from scratch when there is no --init
    base_dir: str = "out/base"  # where the tiny base model is pretrained (model/, metrics.jsonl)
    pretrain_data: str = "data/pretrain.jsonl"  # {"text"} documents, loss on every token
    tokenizer: str = "data/tokenizer"  # for the tiny base; an --init checkpoint brings its own (or names it here)
    pretrain_steps: int = 300  # optimizer steps of the pretraining stage
    pretrain_lr: float = 3e-3  # its peak learning rate
    dim: int = 128              # tiny base: width, layers, heads, MLP width (tied embeddings)
    n_layer: int = 4            # transformer blocks
    n_head: int = 4             # attention heads
    hidden_dim: int = 384       # SwiGLU inner width
    # optimisation
    steps: int = 1000           # optimizer steps
    stop_at: int = 0            # stop after this step as if interrupted (0: run to the end); continue with --resume
    batch_size: int = 32        # sequences per optimizer step, summed over ranks
    micro_batch_size: int = 16  # sequences per forward on one rank (gradient accumulation makes up the rest)
    lr: float = 1e-3            # peak learning rate (use ~2e-5 for a real 7B model)
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30      # linear warmup steps
    weight_decay: float = 0.0   # AdamW decay on matrices (never on norms and biases)
    grad_clip: float = 1.0      # max global gradient norm
    max_len: int = 256          # tokens per example; longer ones keep the end of the prompt
    max_response_len: int = 128
    eval_every: int = 200       # steps between held-out evaluations
    save_every: int = 250       # 0: save only at the end
    seed: int = 0               # weights init and data order
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA: bfloat16 or float32
    resume: bool = False        # continue from out_dir/model/train_state.pt
    num_samples: int = 4        # greedy answers printed at the end


def data_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "alpaca"


def load_sft_examples(path: str, fmt: str) -> list[dict]:
    fmt = data_format(path, fmt)
    if fmt == "jsonl":
        return read_jsonl(path, required=("prompt", "response"))
    if fmt == "alpaca":
        return read_alpaca(path)
    if fmt == "hh":  # SFT on the chosen transcripts
        return [{"prompt": r["prompt"], "response": r["chosen"]} for r in read_hh(path)]
    raise InputError(f"--format={fmt}: choose auto, jsonl, alpaca or hh")


def sft_loss_sum(model, batch, amp):
    """Sum of next-token cross-entropies over the labelled positions, and their count."""
    device = next(model.parameters()).device
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    with amp:
        logits = model(input_ids)  # (B, T, V); right padding needs no attention mask
    # logits at position t predict the token at t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (labels[:, 1:] != IGNORE_INDEX).sum()


def sft_gradients(model, mine, micro_batch_size, d, pad_id, amp):
    """Backward over this rank's rows of a step; the gradients are those of the token mean over the WHOLE
    global step. Returns (this rank's loss sum, the step's labelled-token count over all ranks)."""
    local_tokens = torch.tensor(float(sum(sum(r["mask"][1:]) for r in mine)), device=d.device)
    n_tokens = dist.all_reduce_sum(local_tokens, d).clamp(min=1)  # labelled tokens in the whole step
    loss_sum = train.accumulate_gradients(model, train.micro_batches(mine, micro_batch_size),
                                          lambda mb: sft_loss_sum(model, collate_sft(mb, pad_id), amp)[0], n_tokens, d)
    return loss_sum, n_tokens


def check_config(cfg: Config) -> None:
    """Every flag checked before any work starts; each error names the flag and what is allowed."""
    train.check_divides_world(cfg, "batch_size")
    check_choice(cfg, "mode", ("auto", "pretrain", "sft"))
    check_choice(cfg, "format", ("auto", "jsonl", "alpaca", "hh"))
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    train.check_hh_template(cfg)
    if cfg.dtype not in ("float32", "bfloat16"):
        # fp16 would need loss scaling (a GradScaler); bf16 has fp32's range and does not
        raise InputError(f"--dtype={cfg.dtype}: train in bfloat16 or float32")
    check_positive(cfg, "steps", "batch_size", "micro_batch_size", "max_len", "max_response_len", "lr",
                   "pretrain_steps", "pretrain_lr", "dim", "n_layer", "n_head", "hidden_dim", "eval_every")
    check_non_negative(cfg, "warmup_steps", "weight_decay", "grad_clip", "save_every", "stop_at", "num_samples")
    check_range(cfg, "min_lr_ratio", 0.0, 1.0)
    check_learning_rates(cfg, "lr", "pretrain_lr")
    check_device(cfg)
    if cfg.dim % cfg.n_head or (cfg.dim // cfg.n_head) % 2:
        raise InputError(f"--dim={cfg.dim}: must be a multiple of --n_head={cfg.n_head}, with an even quotient "
                         f"(each head's rotary dimensions turn in pairs)")
    train.check_files(cfg, *(("data", "val_data") if cfg.mode != "pretrain" else ()), "eval_data")
    check_output(cfg.out_dir, "out_dir", directory=True)
    check_output(cfg.base_dir, "base_dir", directory=True)
    train.check_prompt_file(cfg, "eval_data")


# --- the training loop (pretraining, SFT, and the SFT stages of Hbat in train_dpo.py / train_ppo.py)
def fit(cfg: Config, d: dist.Dist, phase: str, model: Transformer, tok: Tokenizer, rows, val_rows, run_dir: Path,
        state: dict | None, steps: int, peak_lr: float):
    """A whole run: the schedule of one stage."""
    if not rows:
        flag = "pretrain_data" if phase == "pretrain" else "data"
        raise InputError(f"--{flag}={getattr(cfg, flag)}: no training examples left after tokenizing (see the counts "
                         f"above)")
    ckpt = run_dir / "model"
    phase_flags = ("pretrain_data", "pretrain_steps", "pretrain_lr", "tokenizer") if phase == "pretrain" else (
        "data", "format", "template", "steps", "lr")  # (the template is resolved from auto by now)
    train.check_resumed_flags(cfg, state, phase_flags + ("seed", "batch_size", "min_lr_ratio", "warmup_steps",
                                                         "weight_decay", "grad_clip", "max_len", "max_response_len"))
    model = train.place(model, d)
    log = train.MetricsLog(run_dir / "metrics.jsonl", d, state["step"] if state else 0)
    stage = hbat.Stage(0, phase, 0, steps, ckpt=ckpt, log=log, state=state, stop_at=cfg.stop_at, config=cfg)
    sft_stage(cfg, d, phase, model, tok, rows, val_rows, stage, peak_lr)
    dist.print0(d, f"[{phase}] saved {ckpt} (step {stage.last}/{steps}); metrics in {log.path}")
    return model, stage.last == steps


def sft_stage(cfg: Config, d: dist.Dist, phase: str, model, tok: Tokenizer, rows, val_rows, stage: hbat.Stage,
              peak_lr: float, penalty_fn=None) -> dict:
    """Train the placed model on rows for stage.steps optimizer steps (from stage.start when resumed, to
    stage.last), with a fresh AdamW and learning-rate schedule; in a Hbat stage, penalty_fn is its EWC penalty,
    backpropagated once a step beside the token-mean loss. Returns the last step's record."""
    train.check_divides_world(cfg, "batch_size", world=d.world_size)
    opt = train.adamw(model, peak_lr, cfg.weight_decay)
    start = stage.restore({"model": (model, opt)}, d)
    if start:
        dist.print0(d, f"[{phase}] resumed from {stage.ckpt} at step {stage.offset + start}")
    amp = train.autocast(d, cfg.dtype)
    bar = train.progress(range(start, stage.last), phase, d)
    t0, tokens_seen, record = time.time(), 0, {}
    for step in bar:
        lr = train.lr_at(step, stage.steps, peak_lr, cfg.warmup_steps, cfg.min_lr_ratio)
        train.set_lr(opt, lr)
        mine = train.rank_share([rows[i] for i in train.batch_indices(step, len(rows), cfg.batch_size, cfg.seed)], d)
        penalty = hbat.step_penalty(penalty_fn)  # Hbat: the EWC penalty at the weights the step starts from
        loss_sum, n_tokens = sft_gradients(model, mine, cfg.micro_batch_size, d, tok.pad_id, amp)
        loss = (dist.all_reduce_sum(loss_sum, d) / n_tokens).item()
        grad_norm = train.optimizer_step(model, opt, step=stage.offset + step + 1, loss=loss + (penalty or 0.0),
                                         grad_clip=cfg.grad_clip, d=d, what=phase)

        tokens_seen += int(n_tokens.item())
        record = {**stage.record(step + 1), "phase": phase, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(n_tokens.item()), "tok_per_s": tokens_seen / (time.time() - t0),
                  **hbat.ewc_record(stage, penalty, loss)}
        if val_rows and ((step + 1) % cfg.eval_every == 0 or step + 1 == stage.steps):
            record["eval_loss"] = eval_loss(model, val_rows, cfg, d, tok.pad_id, amp)
            dist.print0(d, f"\n[{phase}] step {stage.offset + step + 1}: loss {loss:.4f} "
                           f"eval_loss {record['eval_loss']:.4f}")
        stage.log.log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if train.should_save(step + 1, cfg.save_every, stage.last):
            stage.save(d, step + 1, {"model": (model, opt)}, tokenizer=tok, extra={"phase": phase})
    bar.close()
    return record


def eval_loss(model, rows, cfg, d, pad_id, amp) -> float:
    model.eval()
    sums = train.eval_sums(rows, cfg.micro_batch_size, d,
                           lambda chunk: torch.stack([t.float() for t in sft_loss_sum(model, collate_sft(chunk, pad_id), amp)]))
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def tiny_model(cfg: Config, tok: Tokenizer) -> Transformer:
    mcfg = ModelConfig(vocab_size=tok.vocab_size, dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_len, tie_embeddings=True)
    model = Transformer(mcfg)
    model.init_weights()
    return model


EVAL_NEW_TOKENS = 48  # the length cap of the final evaluation's greedy answers


def final_eval(model, tok, cfg, d):
    """Greedy answers to the held-out prompts, a few printed; the oracle's metrics on tiny-world prompts."""
    if not cfg.eval_data:
        return None
    records = read_jsonl(cfg.eval_data, required=("prompt",))
    answers = sample_answers(model, tok, [r["prompt"] for r in records], cfg.template, max_new_tokens=EVAL_NEW_TOKENS)
    for r, a in list(zip(records, answers))[:cfg.num_samples]:
        dist.print0(d, f"\n> {r['prompt']}\n  {a}\n  (reference: {r.get('reference', '-')})")
    result = evaluate_answers(records, answers)
    if result["mean_quality"] is None:  # the oracle judges only its own world's prompts
        dist.print0(d, f"\n--eval_data={cfg.eval_data} holds prompts from outside the tiny world: answers shown, no "
                       f"oracle metrics")
    if result["closed_accuracy"] is not None:
        dist.print0(d, f"\nclosed-ended accuracy (greedy, {result['n_closed']} held-out prompts): "
                       f"{result['closed_accuracy']:.1%}; mean oracle quality over all {result['n']}: "
                       f"{result['mean_quality']:.3f}")
    return result


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    d = dist.init_dist(cfg.device)
    dist.seed_everything(cfg.seed)

    # --- models
    base_ckpt, sft_ckpt = Path(cfg.base_dir) / "model", Path(cfg.out_dir) / "model"
    for ckpt in (base_ckpt, sft_ckpt):
        train.clean_stale(ckpt, d)
    # --mode=auto without --init pretrains unless a finished base is there: only then is the base's state read
    base_state = train.find_checkpoint(base_ckpt, True, required=False) if cfg.mode == "auto" and not cfg.init else None
    base_finished = base_state is not None and base_state["step"] >= cfg.pretrain_steps
    pretraining = cfg.mode == "pretrain" or (cfg.mode == "auto" and not cfg.init and not base_finished)
    if cfg.resume:  # something of this run must be on disk
        looked = [base_ckpt] if cfg.mode == "pretrain" else [sft_ckpt] if cfg.init or cfg.mode == "sft" else [base_ckpt, sft_ckpt]
        if not any((c / train.STATE_FILE).exists() for c in looked):
            raise InputError(f"--resume: no checkpoint to resume from (looked for "
                             f"{' and '.join(str(c / train.STATE_FILE) for c in looked)})")
    # the SFT data's records are read now, so that a malformed one is named before minutes of pretraining
    sft_examples = train.read_train_and_val(cfg, lambda path: load_sft_examples(path, cfg.format),
                                            "demonstrations") if cfg.mode != "pretrain" else {}
    if pretraining:
        train.check_files(cfg, "pretrain_data")
        train.check_files(cfg, "tokenizer", directory=True)
        tok = Tokenizer.from_dir(cfg.tokenizer)
        state = train.find_checkpoint(base_ckpt, cfg.resume, required=False)
        model = train.load_model(base_ckpt, d) if state else tiny_model(cfg, tok)
        dist.print0(d, f"pretraining a {model.num_params() / 1e6:.2f}M-parameter model on {cfg.pretrain_data}")
        # --- data
        texts = [r["text"] for r in read_jsonl(cfg.pretrain_data, required=("text",))]
        blocks = tokenize_pretrain(texts, tok, cfg.max_len)
        n_val = max(1, len(blocks) // 50)
        # --- loop
        _, finished = fit(cfg, d, "pretrain", model, tok, blocks[n_val:], blocks[:n_val], Path(cfg.base_dir), state,
                          cfg.pretrain_steps, cfg.pretrain_lr)
        if cfg.mode == "pretrain" or not finished:
            dist.close(d)
            return
        cfg.resume = False  # the SFT stage starts fresh from the new base

    state = train.find_checkpoint(sft_ckpt, cfg.resume, required=False)
    init_dir = sft_ckpt if state else resolve_dir(cfg.init or base_ckpt)
    model = train.load_model(init_dir, d)
    if cfg.max_len > model.cfg.max_seq_len:
        raise InputError(f"--max_len={cfg.max_len}: the model's context length is {model.cfg.max_seq_len}")
    if cfg.eval_data and model.cfg.max_seq_len < EVAL_NEW_TOKENS + 2:  # found now, not after training
        raise InputError(f"--eval_data={cfg.eval_data}: answers of up to {EVAL_NEW_TOKENS} tokens leave no room for a "
                         f"prompt in the model's context of {model.cfg.max_seq_len} (pass --eval_data= to skip it)")
    if not (init_dir / "tokenizer.json").exists():
        if cfg.tokenizer == Config.tokenizer:  # the tiny world's: ids a real model would read as other words
            raise InputError(f"--init={cfg.init or init_dir}: no tokenizer.json beside the weights; pass --tokenizer="
                             f"DIR holding the tokenizer.json the model was trained with")
        train.check_files(cfg, "tokenizer", directory=True)
    tok = Tokenizer.from_dir(init_dir if (init_dir / "tokenizer.json").exists() else cfg.tokenizer)
    tok.check_vocab(model.cfg.vocab_size)
    if cfg.template == "auto":
        cfg.template = "alpaca" if data_format(cfg.data, cfg.format) == "alpaca" else "hh"
    tok.template = cfg.template  # saved with the checkpoint: the generate CLI uses it
    dist.print0(d, f"SFT of {init_dir} ({model.num_params() / 1e6:.2f}M parameters) on {cfg.data}, "
                   f"template {cfg.template!r}")

    # --- data
    train_rows, val_rows = (tokenize_sft(sft_examples[name], tok, cfg.template, cfg.max_len, cfg.max_response_len)
                            for name in ("data", "val_data"))
    dist.print0(d, f"{len(train_rows)} training examples, {len(val_rows)} held out")

    # --- loop
    model, finished = fit(cfg, d, "sft", model, tok, train_rows, val_rows, Path(cfg.out_dir), state, cfg.steps, cfg.lr)

    # --- save (done in the loop); sample answers from the final model
    if finished:
        result = final_eval(model, tok, cfg, d)
        if result and d.is_main:
            print(f"results in {train.save_eval(cfg.out_dir, result)}")
    dist.close(d)


if __name__ == "__main__":
    run(main, sys.argv[1:])
