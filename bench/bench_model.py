"""nanoalign vs transformers on CPU, fp32: one training step (fwd + loss + bwd) and batched greedy generation,
and nanoalign's batch-1 decoding against the weight-streaming floor.

    python bench/bench_model.py                 # ~34M-param LLaMA, B=8 T=256 training, 8 x (32 + 128) generation
    python bench/bench_model.py --quick         # small config, a smoke run of a few seconds
    python bench/bench_model.py --threads 1 --clock cpu --skip-train   # on a machine shared with other jobs
    python bench/bench_model.py --skip-train --profile                  # where a decode step spends its time

Both implementations compute the same function: the nanoalign model is saved with save_pretrained and loaded
into transformers' LlamaForCausalLM, and the logits (and the greedy tokens) are checked to agree. The two
implementations' runs are interleaved (A B A B ...) so that slow drifts of the machine hit both alike, and
the median of each side is reported. --clock cpu times with the process's CPU time instead of the wall clock:
with --threads 1 it ignores the time other processes hold the core (with more threads it would count the
threads' spin-waiting).

The weight-streaming floor: decoding one token at batch 1 must read every weight once (the embedding
table excepted: one row of it), so it cannot beat parameter bytes / memory bandwidth. The bandwidth is
measured in the same run, as the best of several timed sums over a float32 buffer far larger than the
last-level cache (a read stream from DRAM, like the weights', which is true of the full configuration's
118 MB, not of --quick's 2 MB). The decode time per token is
(time of N new tokens - time of 1 new token) / (N - 1), which leaves the prompt's forward out, and is
printed as a percentage of the floor (100% = as fast as the memory allows).

Targets (nanoalign / transformers): training >= 1.15x, generation >= 2x.
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

clock = time.perf_counter  # --clock cpu: time.process_time

TARGET_TRAIN = 1.15
TARGET_GEN = 2.0

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
    ap.add_argument("--skip-floor", action="store_true", help="skip the batch-1 decode vs weight-streaming floor")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: perf_counter; cpu: process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top operators for a generation by each implementation")
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
            t0 = clock()
            losses[name] = fn(m, x, y)
            times[name].append(clock() - t0)
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
            t0 = clock()
            outs[name] = fn(m, prompts, N)
            times[name].append(clock() - t0)
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


# --- (c) batch-1 decoding against the weight-streaming floor

def streamed_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table, of which it reads
    one row (tied embeddings are read whole, as the output layer)."""
    emb = model.tok_emb.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not emb or model.cfg.tie_embeddings)


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second, the best of `repeats` timed sums over a float32 buffer of nbytes."""
    buf = torch.ones(nbytes // 4)
    buf.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        buf.sum()
        best = min(best, clock() - t0)
    return buf.numel() * 4 / best


def bench_floor(model, V: int, P: int, N: int, repeats: int, seed: int):
    g = torch.Generator().manual_seed(seed + 4)
    prompt = torch.randint(1, V, (1, P), generator=g).tolist()
    generate(model, prompt, 4, temperature=0.0)  # warm-up
    nbytes = streamed_bytes(model)
    buffer = max(256 * 2**20, 4 * nbytes)  # far above any last-level cache
    bandwidths, full, prompt_only = [], [], []
    for _ in range(repeats):  # interleaved, so that the bandwidth is measured under the same conditions
        bandwidths.append(memory_bandwidth(buffer))
        t0 = clock()
        generate(model, prompt, N, temperature=0.0)
        full.append(clock() - t0)
        t0 = clock()
        generate(model, prompt, 1, temperature=0.0)
        prompt_only.append(clock() - t0)
    per_token = max(statistics.median(full) - statistics.median(prompt_only), 0.0) / (N - 1)
    bandwidth = max(bandwidths)
    floor = nbytes / bandwidth
    return {"prompt_len": P, "new_tokens": N, "streamed_bytes": nbytes, "bandwidth_bytes_per_s": bandwidth,
            "decode_s_per_token": per_token, "floor_s_per_token": floor, "percent_of_floor": 100 * per_token / floor}


def profile_generation(ours, ref, V: int, B: int, P: int, N: int, seed: int, rows: int = 12):
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(seed + 5)
    prompts = torch.randint(1, V, (B, P), generator=g)
    for name, fn, m in (("nanoalign", gen_ours, ours), ("transformers", gen_ref, ref)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(m, prompts, N)
        print(f"\nprofile: {name} generate, B={B} P={P} N={N} (wall time per operator, self)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    global clock
    args = parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig(**(QUICK if args.quick else FULL))
    if args.prompt_len + args.new_tokens > cfg.max_seq_len or args.seq > cfg.max_seq_len:
        raise SystemExit("shapes exceed max_seq_len")
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, fp32 CPU, clock {args.clock}")
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
               "clock": args.clock,
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

    if not args.skip_floor:
        n_floor = args.new_tokens
        print(f"batch-1 decode: prompt {args.prompt_len}, {n_floor} new tokens greedy, {args.gen_repeats} runs, "
              "with the memory bandwidth measured between them ...", flush=True)
        results["floor"] = bench_floor(ours, cfg.vocab_size, args.prompt_len, n_floor, args.gen_repeats, args.seed)

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
    if "floor" in results:
        fl = results["floor"]
        print(f"batch-1 decode = {1e3 * fl['decode_s_per_token']:.2f} ms/token = {fl['percent_of_floor']:.0f}% of the "
              f"weight-streaming floor ({1e3 * fl['floor_s_per_token']:.2f} ms/token: "
              f"{fl['streamed_bytes'] / 1e6:.1f} MB of weights at {fl['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    if args.profile:
        profile_generation(ours, ref, cfg.vocab_size, args.gen_batch, args.prompt_len, min(args.new_tokens, 32),
                           args.seed)
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
