"""nanoalign vs transformers on CPU, fp32: one training step (fwd + loss + bwd) and batched greedy generation.

    python bench/bench_model.py                 # ~34M-param LLaMA, B=8 T=256 training, 8 x (32 + 128) generation
    python bench/bench_model.py --quick         # small config, a smoke run of a few seconds
    python bench/bench_model.py --threads 2 --steps 6 --json /tmp/bench.json

Both implementations compute the same function: the nanoalign model is saved with save_pretrained and loaded
into transformers' LlamaForCausalLM, and the logits (and the greedy tokens) are checked to agree. The two
implementations' runs are interleaved (A B A B ...) so that slow drifts of the machine hit both alike, and
the median of each side is reported.

Targets (nanoalign / transformers): training >= 1.15x, generation >= 3x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanoalign.checkpoint import save_pretrained  # noqa: E402
from nanoalign.generate import generate  # noqa: E402
from nanoalign.model import ModelConfig, Transformer  # noqa: E402

TARGET_TRAIN = 1.15
TARGET_GEN = 3.0

FULL = dict(vocab_size=8192, dim=512, n_layer=8, n_head=8, hidden_dim=1376, max_seq_len=512)
QUICK = dict(vocab_size=1024, dim=128, n_layer=2, n_head=4, hidden_dim=344, max_seq_len=256)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per implementation (default 6, quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps per implementation first")
    ap.add_argument("--gen-repeats", type=int, default=None, help="timed generations per implementation (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small config and shapes for a smoke run")
    ap.add_argument("--batch", type=int, default=None, help="training batch size (default 8, quick 4)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default 256, quick 64)")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 128, quick 32)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH as JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps if args.steps is not None else (3 if q else 6)
    args.gen_repeats = args.gen_repeats if args.gen_repeats is not None else 3
    args.batch = args.batch if args.batch is not None else (4 if q else 8)
    args.seq = args.seq if args.seq is not None else (64 if q else 256)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (32 if q else 128)
    return args


def build_pair(cfg: ModelConfig, tmp: Path, seed: int):
    """The nanoalign model (random init) and transformers' LlamaForCausalLM holding the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    ours.init_weights()
    with torch.no_grad():  # norm gains away from 1 so that a wrong norm mapping would show in the check
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    save_pretrained(ours, tmp / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = LlamaForCausalLM.from_pretrained(tmp / "ckpt", dtype=torch.float32, attn_implementation="sdpa")
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ours.float().eval(), ref.float().eval()


def check_same_function(ours, ref, V: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, V, (2, 64), generator=g)
    with torch.no_grad():
        a, b = ours(x), ref(input_ids=x, use_cache=False).logits
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert diff <= 1e-4 * max(1.0, scale), f"logits differ: max |diff| {diff:.3g} (max |logit| {scale:.3g})"
    return diff


# --- (a) training step

def train_step_ours(model, x, y):
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def train_step_ref(model, x, y):
    logits = model(input_ids=x, use_cache=False).logits  # no cache object during training (HF's fastest path)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def bench_train(ours, ref, V: int, B: int, T: int, steps: int, warmup: int, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    data = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours.train(), ref.train()
    losses = {}
    for _ in range(warmup):
        losses["nanoalign"] = train_step_ours(ours, x, y)
        losses["transformers"] = train_step_ref(ref, x, y)
    times = {"nanoalign": [], "transformers": []}
    for i in range(steps):
        order = [("nanoalign", train_step_ours, ours), ("transformers", train_step_ref, ref)]
        if i % 2:  # A B, B A, A B, ... so neither side always runs right after the other
            order.reverse()
        for name, fn, m in order:
            t0 = time.perf_counter()
            losses[name] = fn(m, x, y)
            times[name].append(time.perf_counter() - t0)
    ours.eval(), ref.eval()
    assert abs(losses["nanoalign"] - losses["transformers"]) < 1e-3, f"losses differ: {losses}"
    tokens = B * T
    return {name: {"times_s": ts, "median_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts)}
            for name, ts in times.items()} | {"tokens_per_step": tokens, "loss": losses["nanoalign"]}


# --- (b) generation

def gen_ours(model, prompts, n):
    return generate(model, prompts.tolist(), n, temperature=0.0, pad_id=0).tokens


def gen_ref(model, prompts, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[:, prompts.shape[1]:]


def bench_gen(ours, ref, V: int, B: int, P: int, N: int, repeats: int, seed: int):
    g = torch.Generator().manual_seed(seed + 3)
    prompts = torch.randint(1, V, (B, P), generator=g)
    # warm up both (shorter) and check they agree token for token on the full run below
    gen_ours(ours, prompts, min(N, 8)), gen_ref(ref, prompts, min(N, 8))
    times = {"nanoalign": [], "transformers": []}
    outs = {}
    for i in range(repeats):
        order = [("nanoalign", gen_ours, ours), ("transformers", gen_ref, ref)]
        if i % 2:
            order.reverse()
        for name, fn, m in order:
            t0 = time.perf_counter()
            outs[name] = fn(m, prompts, N)
            times[name].append(time.perf_counter() - t0)
    a, b = outs["nanoalign"], outs["transformers"]
    assert a.shape == b.shape == (B, N), f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    same = (a == b)
    identical = bool(same.all())
    first_diff = None if identical else int((~same).any(0).nonzero()[0])
    tokens = B * N
    return {name: {"times_s": ts, "median_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts)}
            for name, ts in times.items()} | {"tokens_generated": tokens, "identical_tokens": identical,
                                              "token_match_frac": same.float().mean().item(),
                                              "first_diff_step": first_diff}


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig(**(QUICK if args.quick else FULL))
    if args.prompt_len + args.new_tokens > cfg.max_seq_len or args.seq > cfg.max_seq_len:
        raise SystemExit("shapes exceed max_seq_len")
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, fp32 CPU")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-minute load average is {load:.2f} before starting: other processes share the CPU, "
              "expect noisy timings (the interleaving keeps the ratio fairer than the absolute numbers)")
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = build_pair(cfg, Path(tmp), args.seed)
    n_params = ours.num_params()
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_params == n_ref, (n_params, n_ref)
    print(f"config: vocab {cfg.vocab_size}, dim {cfg.dim}, layers {cfg.n_layer}, heads {cfg.n_head}, "
          f"hidden {cfg.hidden_dim}  ->  {n_params / 1e6:.2f}M parameters")
    diff = check_same_function(ours, ref, cfg.vocab_size, args.seed)
    print(f"sanity: max |logits diff| = {diff:.2e} (same weights, same function)")

    results = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "config": {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layer", "n_head", "hidden_dim")},
               "params": n_params, "logits_max_abs_diff": diff}
    rows = []
    if not args.skip_train:
        print(f"training: B={args.batch} T={args.seq}, {args.warmup} warmup + {args.steps} timed steps each, interleaved ...",
              flush=True)
        tr = bench_train(ours, ref, cfg.vocab_size, args.batch, args.seq, args.steps, args.warmup, args.seed)
        tr |= {"batch": args.batch, "seq": args.seq, "ratio": tr["nanoalign"]["tokens_per_s"] / tr["transformers"]["tokens_per_s"],
               "target": TARGET_TRAIN}
        results["train"] = tr
        rows.append(("train fwd+bwd", tr, TARGET_TRAIN, f"B={args.batch} T={args.seq}"))
    if not args.skip_gen:
        print(f"generation: B={args.gen_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens greedy, "
              f"{args.gen_repeats} timed runs each, interleaved ...", flush=True)
        ge = bench_gen(ours, ref, cfg.vocab_size, args.gen_batch, args.prompt_len, args.new_tokens, args.gen_repeats,
                       args.seed)
        ge |= {"batch": args.gen_batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "ratio": ge["nanoalign"]["tokens_per_s"] / ge["transformers"]["tokens_per_s"], "target": TARGET_GEN}
        results["generate"] = ge
        rows.append(("generate (KV cache)", ge, TARGET_GEN,
                     f"B={args.gen_batch} P={args.prompt_len} N={args.new_tokens}"))

    print()
    head = f"{'benchmark':<22}{'shape':<20}{'nanoalign tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}{'target':>8}  ok"
    print(head)
    print("-" * len(head))
    for name, r, target, shape in rows:
        a, b = r["nanoalign"], r["transformers"]
        ok = "yes" if r["ratio"] >= target else "NO"
        print(f"{name:<22}{shape:<20}{a['tokens_per_s']:>16.1f}{b['tokens_per_s']:>20.1f}{r['ratio']:>7.2f}x"
              f"{target:>7.2f}x  {ok}")
        print(f"{'':<22}{'median s/run':<20}{a['median_s']:>16.3f}{b['median_s']:>20.3f}")
    if "generate" in results:
        ge = results["generate"]
        print(f"\ngenerated tokens identical: {ge['identical_tokens']}"
              + ("" if ge["identical_tokens"] else f" (match {ge['token_match_frac']:.3f}, first diff at step {ge['first_diff_step']})"))
    for key, label in (("train", "training"), ("generate", "generation")):
        if key in results:
            print(f"{label} ratio nanoalign/transformers = {results[key]['ratio']:.2f}x (target >= {results[key]['target']}x)")
    results["wall_s"] = time.perf_counter() - t_start
    results["loadavg_end"] = os.getloadavg()[0]
    print(f"total wall time {results['wall_s']:.1f}s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
