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

Details that matter (METHODS.md section 1, PITFALLS.md):
- The loss is a sum over response tokens divided by the response-token count of the WHOLE optimizer step
  (all micro-batches, all ranks), so gradient accumulation and data parallelism give the same update as one
  big batch. A micro-batch with no response tokens adds zero, never NaN.
- The data order, the learning rate and the RNG are pure functions of the step, and the checkpoint holds
  the optimizer state: --resume continues exactly where the run stopped.
- Checkpoints are written to a temporary directory and renamed: killing the run mid-save keeps the last one.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoalign import dist, world
from nanoalign.checkpoint import load_pretrained, model_config, recover_interrupted_swap, resolve_dir, save_pretrained
from nanoalign.cli import parse_config
from nanoalign.data import IGNORE_INDEX, collate_sft, read_alpaca, read_hh, read_jsonl, tokenize_pretrain, tokenize_sft
from nanoalign.generate import generate
from nanoalign.model import ModelConfig, Transformer
from nanoalign.tokenizer import Tokenizer, encode_prompt


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
    tokenizer: str = "data/tokenizer"  # tokenizer.json for the tiny base (an --init checkpoint brings its own)
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


def lr_at(step: int, cfg: Config, peak: float, total: int) -> float:
    """Linear warmup to the peak, then cosine down to peak * min_lr_ratio at the last step (total - 1)."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - 1 - cfg.warmup_steps)  # 1.0 at the last step
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a global step: a fresh seeded permutation every epoch, read in order."""
    perms = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out


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
    raise ValueError(f"unknown --format {fmt!r}")


def token_loss_sum(model, batch, device, autocast):
    """Sum of next-token cross-entropies over the labelled positions, and their count."""
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    with autocast:
        logits = model(input_ids)  # (B, T, V); right padding needs no attention mask
    # logits at position t predict the token at t + 1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (labels[:, 1:] != IGNORE_INDEX).sum()


def accumulate_gradients(model, mine, micro_batch_size, d, pad_id, autocast):
    """Forward/backward this rank's share of a step in micro-batches; the gradients sum to those of
    sum(token losses of the whole global step) / (its number of labelled tokens).
    Returns (this rank's loss sum, the global token count)."""
    micro = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    local_tokens = torch.tensor(float(sum(sum(r["mask"][1:]) for r in mine)), device=d.device)
    n_tokens = dist.all_reduce_sum(local_tokens, d).clamp(min=1)  # labelled tokens in the whole step
    loss_sum = torch.zeros((), device=d.device)
    for j, mb in enumerate(micro):
        if d.enabled:  # reduce-scatter gradients only after the last micro-batch
            model.set_requires_gradient_sync(j == len(micro) - 1)
        loss, _ = token_loss_sum(model, collate_sft(mb, pad_id), d.device, autocast)
        # FSDP averages gradients over ranks; the loss is already normalised by the global count
        (loss / n_tokens * d.world_size).backward()
        loss_sum += loss.detach()
    return loss_sum, n_tokens


@torch.no_grad()
def evaluate_loss(model, rows, cfg, d, pad_id, autocast) -> float:
    model.eval()
    total = torch.zeros(2, device=d.device)
    mine = rows[d.rank::d.world_size]
    # every rank runs the same number of forwards (FSDP gathers weights collectively)
    n_batches = math.ceil(math.ceil(len(rows) / d.world_size) / cfg.micro_batch_size)
    for b in range(n_batches):
        # a rank with fewer rows runs a dummy forward whose loss is not counted
        chunk = mine[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size] or rows[:1]
        loss, n = token_loss_sum(model, collate_sft(chunk, pad_id), d.device, autocast)
        if b * cfg.micro_batch_size < len(mine):
            total += torch.stack([loss, n.float()])
    total = dist.all_reduce_sum(total, d)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


# --- the training loop (used for both pretraining and SFT)
def train(cfg: Config, d: dist.Dist, phase: str, model: Transformer, tok: Tokenizer, rows, val_rows, out_dir: Path,
          steps: int, peak_lr: float):
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype), enabled=d.device.type == "cuda"
                              and cfg.dtype != "float32")
    if cfg.batch_size % d.world_size:
        raise ValueError(f"--batch_size={cfg.batch_size} must be divisible by the world size {d.world_size}")
    state_path = out_dir / "model" / "train_state.pt"
    # mmap: ranks other than 0 read only the step and RNG, never the (large) optimizer state
    resume_state = torch.load(state_path, weights_only=False, mmap=True) if cfg.resume and state_path.exists() else None
    if d.enabled:
        # rank 0 holds the loaded weights, the other ranks an empty model on the meta device; after sharding,
        # rank 0 broadcasts tensor by tensor and every rank keeps its shard (on its GPU under NCCL)
        full_model_state = model.state_dict() if d.is_main else {}
        dist.shard(model, d)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=d.device)
        dist.load_full_model_state(model, full_model_state, d)
        del full_model_state
    else:
        model.to(d.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95), eps=1e-8)
    start = 0
    if resume_state:
        dist.load_full_optimizer_state(model, opt, resume_state["optimizer"] if d.is_main else {}, d)
        start = resume_state["step"]
        random.setstate(resume_state["rng"]["python"])
        np.random.set_state(resume_state["rng"]["numpy"])
        torch.set_rng_state(resume_state["rng"]["torch"])
        dist.print0(d, f"[{phase}] resumed from {state_path} at step {start}")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    if d.is_main and metrics_path.exists():
        # a fresh run starts a new log; a resumed one drops what was logged after its checkpoint
        kept = [line for line in metrics_path.read_text().splitlines()
                if resume_state and json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(record):
        if d.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step):
        model_state, optim_state = dist.full_state(model, opt)
        if d.is_main:
            train_state = {"step": step, "phase": phase, "optimizer": optim_state, "config": asdict(cfg),
                           "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                   "torch": torch.get_rng_state()}}
            save_pretrained(model, out_dir / "model", tokenizer=tok, state_dict=model_state,
                            extra=lambda tmp: torch.save(train_state, tmp / "train_state.pt"))
        dist.barrier(d)

    model.train()
    last = min(steps, cfg.stop_at) if cfg.stop_at else steps
    bar = tqdm(range(start, last), desc=phase, disable=not d.is_main, dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    for step in bar:
        lr = lr_at(step, cfg, peak_lr, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        mine = [rows[i] for i in batch_indices(step, len(rows), cfg.batch_size, cfg.seed)][d.rank::d.world_size]
        loss_sum, n_tokens = accumulate_gradients(model, mine, cfg.micro_batch_size, d, tok.pad_id, autocast)
        loss = (dist.all_reduce_sum(loss_sum, d) / n_tokens).item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{phase}] loss is {loss} at step {step} (lr {lr:.2e}); "
                                     f"no checkpoint written for this step")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)

        n_tokens = int(n_tokens.item())
        tokens_seen += n_tokens
        record = {"phase": phase, "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens": n_tokens, "tok_per_s": tokens_seen / (time.time() - t0)}
        if val_rows and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            record["eval_loss"] = evaluate_loss(model, val_rows, cfg, d, tok.pad_id, autocast)
            dist.print0(d, f"\n[{phase}] step {step + 1}: loss {loss:.4f} eval_loss {record['eval_loss']:.4f}")
        log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == last:
            save(step + 1)
    bar.close()
    dist.print0(d, f"[{phase}] saved {out_dir / 'model'} (step {last}/{steps}); metrics in {metrics_path}")
    return model, last == steps


def load_model(path, d: dist.Dist) -> Transformer:
    """The checkpoint's weights on rank 0 (CPU, fp32); an empty model on the meta device on the other
    ranks, which receive their shards from rank 0 once sharded (see train)."""
    if d.is_main:
        return load_pretrained(path, device="cpu", dtype=torch.float32)
    with torch.device("meta"):
        return Transformer(model_config(path))


def tiny_model(cfg: Config, tok: Tokenizer) -> Transformer:
    mcfg = ModelConfig(vocab_size=tok.vocab_size, dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_len, tie_embeddings=True)
    model = Transformer(mcfg)
    model.init_weights()
    return model


@torch.no_grad()
def sample_answers(model, tok, cfg, d):
    """Greedy answers to held-out prompts; for tiny-world prompts, the closed-ended accuracy by the oracle."""
    if not cfg.eval_data or not Path(cfg.eval_data).exists():
        return None
    model.eval()
    prompts = read_jsonl(cfg.eval_data, required=("prompt",))
    answers = []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i:i + 32]
        gen = generate(model, [encode_prompt(tok, p["prompt"], cfg.template) for p in chunk], 48,
                       temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id, vocab_size=tok.vocab_size)
        answers += [tok.decode(gen.response(j)).strip() for j in range(len(chunk))]
    for p, a in list(zip(prompts, answers))[:cfg.num_samples]:
        dist.print0(d, f"\n> {p['prompt']}\n  {a}\n  (reference: {p.get('reference', '-')})")
    if not all(world.is_world_prompt(p["prompt"]) for p in prompts):
        return None  # the oracle judges only its own world's prompts
    closed = [(p["prompt"], a) for p, a in zip(prompts, answers) if p.get("qtype") == "CONSTRAINED"]
    accuracy = sum(world.is_correct(p, a) for p, a in closed) / max(1, len(closed))
    mean_quality = sum(world.quality(p["prompt"], a) for p, a in zip(prompts, answers)) / len(prompts)
    dist.print0(d, f"\nclosed-ended accuracy (greedy, {len(closed)} held-out prompts): {accuracy:.1%}; "
                   f"mean oracle quality over all {len(prompts)}: {mean_quality:.3f}")
    return {"closed_accuracy": accuracy, "mean_quality": mean_quality, "n_closed": len(closed)}


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    if cfg.dtype not in ("float32", "bfloat16"):
        # fp16 would need loss scaling (a GradScaler); bf16 has fp32's range and does not
        raise ValueError(f"--dtype={cfg.dtype}: train in bfloat16 or float32")
    d = dist.init_dist(cfg.device)
    dist.seed_everything(cfg.seed)

    # --- models
    if d.is_main:
        for run_dir in (cfg.base_dir, cfg.out_dir):
            recover_interrupted_swap(Path(run_dir) / "model")
    dist.barrier(d)
    base_state = Path(cfg.base_dir) / "model" / "train_state.pt"
    base_finished = base_state.exists() and torch.load(base_state, weights_only=False)["step"] >= cfg.pretrain_steps
    if cfg.mode == "pretrain" or (cfg.mode == "auto" and not cfg.init and not base_finished):
        tok = Tokenizer.from_dir(cfg.tokenizer)
        resuming = cfg.resume and base_state.exists()
        model = load_model(Path(cfg.base_dir) / "model", d) if resuming else tiny_model(cfg, tok)
        dist.print0(d, f"pretraining a {model.num_params() / 1e6:.2f}M-parameter model on {cfg.pretrain_data}")
        # --- data
        texts = [r["text"] for r in read_jsonl(cfg.pretrain_data, required=("text",))]
        blocks = tokenize_pretrain(texts, tok, cfg.max_len)
        n_val = max(1, len(blocks) // 50)
        _, finished = train(cfg, d, "pretrain", model, tok, blocks[n_val:], blocks[:n_val], Path(cfg.base_dir),
                            cfg.pretrain_steps, cfg.pretrain_lr)
        if cfg.mode == "pretrain" or not finished:
            dist.close(d)
            return
        cfg.resume = False  # the SFT stage starts fresh from the new base

    init = cfg.init or str(Path(cfg.base_dir) / "model")
    sft_state = Path(cfg.out_dir) / "model" / "train_state.pt"
    if cfg.resume and sft_state.exists():
        init = str(Path(cfg.out_dir) / "model")
    init_dir = resolve_dir(init)
    model = load_model(init_dir, d)
    tok = Tokenizer.from_dir(init_dir if (init_dir / "tokenizer.json").exists() else cfg.tokenizer)
    tok.check_vocab(model.cfg.vocab_size)
    if cfg.template == "auto":
        cfg.template = "alpaca" if data_format(cfg.data, cfg.format) == "alpaca" else "hh"
    dist.print0(d, f"SFT of {init} ({model.num_params() / 1e6:.2f}M parameters) on {cfg.data}, template {cfg.template!r}")

    # --- data
    train_rows = tokenize_sft(load_sft_examples(cfg.data, cfg.format), tok, cfg.template, cfg.max_len,
                              cfg.max_response_len)
    val_rows = tokenize_sft(load_sft_examples(cfg.val_data, cfg.format), tok, cfg.template, cfg.max_len,
                            cfg.max_response_len) if cfg.val_data else []
    dist.print0(d, f"{len(train_rows)} training examples, {len(val_rows)} held out")

    # --- loop
    model, finished = train(cfg, d, "sft", model, tok, train_rows, val_rows, Path(cfg.out_dir), cfg.steps, cfg.lr)

    # --- save (done in the loop); sample answers from the final model
    if finished:
        result = sample_answers(model, tok, cfg, d)
        if result and d.is_main:
            (Path(cfg.out_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    dist.close(d)


if __name__ == "__main__":
    main(sys.argv[1:])
