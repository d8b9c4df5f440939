"""nanoalign vs transformers: one training step (fwd + loss + bwd) and batched greedy generation, and
nanoalign's batch-1 decoding against the weight-streaming floor. CPU fp32 by default; on a GPU also the
sampler replayed as a CUDA graph, and the training step's model FLOP utilisation (MFU).

    python bench/bench_model.py                 # ~34M-param LLaMA, B=8 T=256 training, 8 x (32 + 128) generation
    python bench/bench_model.py --quick         # small config, a smoke run of a few seconds
    python bench/bench_model.py --threads 1 --clock cpu --skip-train   # on a machine shared with other jobs
    python bench/bench_model.py --skip-train --profile                  # where a decode step spends its time
    python bench/bench_model.py --device cuda --dtype bfloat16          # GPU: + CUDA graph, + MFU
    python bench/bench_model.py --device cuda --dtype bfloat16 --config 1b --batch 8 --seq 1024   # ~1.1B LLaMA

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

On a CPU generate() packs the model's weights with oneDNN once per call (the packing is timed with each run);
a third contestant, generate(..., prepack=False), runs the same loop on the model's own F.linear calls, so the
run shows what the packing buys. The run also times a decode step's matmuls alone on the packed weights, back to
back (bench_matmul_bound): a call runs N - 1 decode steps and cannot take less than N - 1 of those passes, which
caps the ratio that any loop on these kernels could reach on this machine, attention, norms, the prompt's
forward and everything else counted as free.

On CUDA every timing waits for the device first (torch.cuda.synchronize). --dtype bfloat16 trains the
way the training scripts do (fp32 weights, bf16 autocast) and generates with bf16 weights (both models). A
third contestant then joins generation: generate(..., cuda_graph=True), each decode step one graph replay
(the capture is timed with it, once per call, as a PPO rollout would pay it). The two libraries' bf16
kernels round differently, so their greedy tokens can part after a near-tie; the agreement is printed.
MFU counts PaLM's model FLOPs per token, 6 N + 12 L d T (N: parameters a token's forward multiplies by, the
input embedding excepted; L layers, width d, sequence T; causal attention counted whole), against the peak
of a large matmul in the same dtype measured in the same run and, on a known GPU, its nominal dense peak.

Targets (nanoalign / transformers): training >= 1.15x, generation >= 2x; MFU >= 40% (GPU, ~1B, bf16).
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

from nanoalign import dist, train  # noqa: E402
from nanoalign.checkpoint import save_pretrained  # noqa: E402
from nanoalign.generate import can_prepack, generate  # noqa: E402
from nanoalign.model import ModelConfig, Transformer  # noqa: E402

clock = time.perf_counter  # --clock cpu: time.process_time

TARGET_TRAIN = 1.15
TARGET_GEN = 2.0

TARGET_MFU = 0.40
CONFIGS = {
    "full": dict(vocab_size=8192, dim=512, n_layer=8, n_head=8, hidden_dim=1376, max_seq_len=512),
    "quick": dict(vocab_size=1024, dim=128, n_layer=2, n_head=4, hidden_dim=344, max_seq_len=256),
    # TinyLlama-1.1B's shape: LLaMA-2 architecture, grouped-query attention with 4 key/value heads
    "1b": dict(vocab_size=32000, dim=2048, n_layer=22, n_head=32, n_kv_head=4, hidden_dim=5632, max_seq_len=2048),
}
# nominal dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name()
NOMINAL_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
DEVICE = torch.device("cpu")
# generation's third contestant (bench_gen): the prepack=False loop on a CPU, the CUDA-graph loop on a GPU
VARIANTS = {"unpacked": "unpacked", "graph": "CUDA graph"}


def tick() -> float:
    """The clock, once the device has finished what it was given."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return clock()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per implementation (default 6, quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps per implementation first")
    ap.add_argument("--gen-repeats", type=int, default=None, help="timed generations per implementation (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small config and shapes for a smoke run (= --config quick)")
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS), help="model shape (default: full, or quick)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16 (CUDA only): autocast training, bf16 weights for generation")
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
    if args.config is None:
        args.config = "quick" if args.quick else "full"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device=cuda: no CUDA device is available")
    if args.dtype != "float32" and args.device != "cuda":
        ap.error(f"--dtype={args.dtype}: needs --device=cuda (the CPU benchmark is fp32)")
    q = args.config == "quick"
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
    return ours.float().eval().to(DEVICE), ref.float().eval().to(DEVICE)


def cast_reference(ref, dtype):
    """ref.to(dtype), except the rotary inverse frequencies: transformers keeps those buffers in fp32 when it
    loads a model in bf16 (from_pretrained(dtype=...)), and a plain .to() would round them too."""
    keep = {name: buf for name, buf in ref.named_buffers() if name.endswith("inv_freq")}
    ref.to(dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(owner), attr, buf)


def check_same_function(ours, ref, V: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, V, (2, 64), generator=g).to(DEVICE)
    with torch.no_grad():
        a, b = ours(x), ref(input_ids=x, use_cache=False).logits
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    tol = 1e-4 if DEVICE.type == "cpu" else 1e-3  # cuBLAS picks its reduction order by shape
    assert diff <= tol * max(1.0, scale), f"logits differ: max |diff| {diff:.3g} (max |logit| {scale:.3g})"
    return diff


# --- (a) training step

def autocast(dtype: str):
    """As the training scripts run: fp32 weights, bf16 matmuls on CUDA (a no-op in fp32)."""
    return train.autocast(dist.Dist(device=DEVICE), dtype)


def train_step_ours(model, x, y, dtype="float32"):
    with autocast(dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def train_step_ref(model, x, y, dtype="float32"):
    with autocast(dtype):
        logits = model(input_ids=x, use_cache=False).logits  # no cache object during training (HF's fastest path)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def bench_train(ours, ref, V: int, B: int, T: int, steps: int, warmup: int, seed: int, dtype: str = "float32"):
    g = torch.Generator().manual_seed(seed + 2)
    data = torch.randint(0, V, (B, T + 1), generator=g).to(DEVICE)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours.train(), ref.train()
    losses = {}
    for _ in range(warmup):
        losses["nanoalign"] = train_step_ours(ours, x, y, dtype)
        losses["transformers"] = train_step_ref(ref, x, y, dtype)
    times = {"nanoalign": [], "transformers": []}
    for i in range(steps):
        order = [("nanoalign", train_step_ours, ours), ("transformers", train_step_ref, ref)]
        if i % 2:  # A B, B A, A B, ... so neither side always runs right after the other
            order.reverse()
        for name, fn, m in order:
            t0 = tick()
            losses[name] = fn(m, x, y, dtype)
            times[name].append(tick() - t0)
    ours.eval(), ref.eval()
    tol = 1e-3 if dtype == "float32" else 2e-2  # bf16 autocast: the two libraries' kernels round differently
    assert abs(losses["nanoalign"] - losses["transformers"]) < tol, f"losses differ: {losses}"
    tokens = B * T
    return {name: {"times_s": ts, "median_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts)}
            for name, ts in times.items()} | {"tokens_per_step": tokens, "loss": losses["nanoalign"]}


# --- (b) generation

def gen_ours(model, prompts, n):
    return generate(model, prompts.tolist(), n, temperature=0.0, pad_id=0).tokens


def gen_graph(model, prompts, n):
    return generate(model, prompts.tolist(), n, temperature=0.0, pad_id=0, cuda_graph=True).tokens


def gen_unpacked(model, prompts, n):
    return generate(model, prompts.tolist(), n, temperature=0.0, pad_id=0, prepack=False).tokens


def gen_ref(model, prompts, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    return out[:, prompts.shape[1]:]


def agreement(a, b) -> dict:
    """How far two (B, N) greedy token tables agree: identical, the matching fraction, the first step that differs."""
    assert a.shape == b.shape, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    same = a == b
    identical = bool(same.all())
    return {"identical_tokens": identical, "token_match_frac": same.float().mean().item(),
            "first_diff_step": None if identical else int((~same).any(0).nonzero()[0])}


def describe(agree: dict) -> str:
    if agree["identical_tokens"]:
        return "True"
    return f"False (match {agree['token_match_frac']:.3f}, first diff at step {agree['first_diff_step']})"


def bench_gen(ours, ref, V: int, B: int, P: int, N: int, repeats: int, seed: int):
    g = torch.Generator().manual_seed(seed + 3)
    prompts = torch.randint(1, V, (B, P), generator=g).to(DEVICE)
    contestants = [("nanoalign", gen_ours, ours), ("transformers", gen_ref, ref)]
    if DEVICE.type == "cuda":
        contestants.append(("nanoalign_graph", gen_graph, ours))
    else:  # the same loop with the model's own F.linear calls: what prepacking the weights buys
        contestants.append(("nanoalign_unpacked", gen_unpacked, ours))
    for name, fn, m in contestants:  # warm up (shorter); the full runs below are compared token for token
        fn(m, prompts, min(N, 8))
    times = {name: [] for name, _, _ in contestants}
    outs = {}
    for i in range(repeats):
        order = contestants[i % len(contestants):] + contestants[:i % len(contestants)]  # rotate who goes first
        for name, fn, m in order:
            t0 = tick()
            outs[name] = fn(m, prompts, N)
            times[name].append(tick() - t0)
    assert outs["nanoalign"].shape == (B, N), tuple(outs["nanoalign"].shape)
    tokens = B * N
    res = {name: {"times_s": ts, "median_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts)}
           for name, ts in times.items()}
    res |= {"tokens_generated": tokens} | agreement(outs["nanoalign"], outs["transformers"])
    if "nanoalign_graph" in outs:  # the same step replayed, but attending the whole cache under a mask: equal
        # tokens in fp32; in bf16 that attention kernel rounds differently and can part at a near-tie
        res["graph_vs_eager"] = agreement(outs["nanoalign_graph"], outs["nanoalign"])
    if "nanoalign_unpacked" in outs:
        res["unpacked_vs_packed"] = agreement(outs["nanoalign_unpacked"], outs["nanoalign"])
    return res


def bench_matmul_bound(model, B: int, N: int, repeats: int, steps: int = 20) -> dict:
    """How fast a CPU decode step could be with the matmul kernels generate() uses: the step's projections alone
    (PackedLinear on the prepacked weights: q/k/v, o, gate, up, down of every layer, then the LM head), B rows each,
    back to back, as the median over `repeats` of `steps` passes. Every pass streams all the weights, as a decode
    step does. A generate() call runs N - 1 decode steps, so it cannot take less than N - 1 such passes: against a
    peer's time T, the ratio cannot exceed T / ((N - 1) x pass), whatever the rest of the step costs (the
    prompt's forward and the packing are left out, so the bound is generous)."""
    from nanoalign.generate import PackedModel

    with torch.no_grad():
        packed = PackedModel(model, B)
        linears = [lin for block in packed.blocks for lin in (block.qkv, block.o, block.gate, block.up, block.down)
                   if lin is not None] + [packed.head]
        g = torch.Generator().manual_seed(0)
        inputs = {n: torch.randn(B, n, generator=g) for n in {lin.weight.shape[1] for lin in linears}}

        def one_pass():
            for lin in linears:
                lin(inputs[lin.weight.shape[1]])

        one_pass()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = tick()
            for _ in range(steps):
                one_pass()
            times.append((tick() - t0) / steps)
    per_step = statistics.median(times)
    return {"matmuls_per_step": len(linears), "matmul_s_per_step": per_step, "min_decode_s": (N - 1) * per_step}


# --- (c) batch-1 decoding against the weight-streaming floor

def matmul_weights(model) -> list:
    """The weights a token's forward multiplies by: every parameter but the embedding table, of which it
    reads one row (tied embeddings count, as the output layer)."""
    emb = model.tok_emb.weight
    return [p for p in model.parameters() if p is not emb or model.cfg.tie_embeddings]


def streamed_bytes(model) -> int:
    """Bytes of weights one decode step reads (matmul_weights)."""
    return sum(p.numel() * p.element_size() for p in matmul_weights(model))


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second, the best of `repeats` timed sums over a float32 buffer of nbytes (on the device)."""
    buf = torch.ones(nbytes // 4, device=DEVICE)
    buf.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = tick()
        buf.sum()
        best = min(best, tick() - t0)
    return buf.numel() * 4 / best


def bench_floor(model, V: int, P: int, N: int, repeats: int, seed: int):
    """Batch-1 decode time per token against the floor, for the eager loop and (on CUDA) the graphed one."""
    g = torch.Generator().manual_seed(seed + 4)
    prompt = torch.randint(1, V, (1, P), generator=g).tolist()
    variants = {"eager": {}} | ({"graph": {"cuda_graph": True}} if DEVICE.type == "cuda" else {})
    for kw in variants.values():
        generate(model, prompt, 4, temperature=0.0, **kw)  # warm-up
    nbytes = streamed_bytes(model)
    buffer = max(256 * 2**20, 4 * nbytes)  # far above any last-level cache
    bandwidths, full, prompt_only = [], {v: [] for v in variants}, {v: [] for v in variants}
    for _ in range(repeats):  # interleaved, so that the bandwidth is measured under the same conditions
        bandwidths.append(memory_bandwidth(buffer))
        for v, kw in variants.items():
            t0 = tick()
            generate(model, prompt, N, temperature=0.0, **kw)
            full[v].append(tick() - t0)
            t0 = tick()
            generate(model, prompt, 1, temperature=0.0, **kw)
            prompt_only[v].append(tick() - t0)
    bandwidth = max(bandwidths)
    floor = nbytes / bandwidth
    res = {"prompt_len": P, "new_tokens": N, "streamed_bytes": nbytes, "bandwidth_bytes_per_s": bandwidth,
           "floor_s_per_token": floor}
    for v in variants:
        per_token = max(statistics.median(full[v]) - statistics.median(prompt_only[v]), 0.0) / (N - 1)
        key = "" if v == "eager" else f"{v}_"
        res |= {f"{key}decode_s_per_token": per_token, f"{key}percent_of_floor": 100 * per_token / floor}
    return res


# --- (d) model FLOP utilisation of the training step

def flops_per_token(cfg: ModelConfig, n_matmul_params: int, T: int) -> float:
    """PaLM's model FLOPs for one token of a training step (forward + backward): 6 N + 12 L d T."""
    return 6 * n_matmul_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


def matmul_peak(dtype: str, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in dtype on the device: the best this machine does, measured now."""
    n = 8192 if DEVICE.type == "cuda" else 1024
    a = torch.randn(n, n, device=DEVICE, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=DEVICE, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    t0 = tick()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (tick() - t0)


def nominal_peak(dtype: str) -> tuple[str, float] | None:
    if DEVICE.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name()
    return next(((name, f) for key, f in NOMINAL_BF16_FLOPS.items() if key in name), None)


def profile_generation(ours, ref, V: int, B: int, P: int, N: int, seed: int, rows: int = 12):
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(seed + 5)
    prompts = torch.randint(1, V, (B, P), generator=g).to(DEVICE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    for name, fn, m in (("nanoalign", gen_ours, ours), ("transformers", gen_ref, ref)):
        with profile(activities=activities) as prof:
            fn(m, prompts, N)
        what = "GPU time per kernel" if DEVICE.type == "cuda" else "wall time per operator"
        print(f"\nprofile: {name} generate, B={B} P={P} N={N} ({what}, self)")
        sort = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main(argv=None):
    global clock
    args = parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    global DEVICE
    DEVICE = torch.device(args.device)
    cfg = ModelConfig(**CONFIGS[args.config])
    if args.prompt_len + args.new_tokens > cfg.max_seq_len or args.seq > cfg.max_seq_len:
        raise SystemExit("shapes exceed max_seq_len")
    t_start = time.perf_counter()
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {args.dtype} on {where}, clock {args.clock}")
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
               "clock": args.clock, "device": where, "dtype": args.dtype, "config_name": args.config,
               "config": {k: getattr(cfg, k) for k in ("vocab_size", "dim", "n_layer", "n_head", "hidden_dim")},
               "params": n_params, "logits_max_abs_diff": diff}
    rows = []
    if not args.skip_train:
        print(f"training: B={args.batch} T={args.seq}, {args.warmup} warmup + {args.steps} timed steps each, interleaved ...",
              flush=True)
        tr = bench_train(ours, ref, cfg.vocab_size, args.batch, args.seq, args.steps, args.warmup, args.seed,
                         args.dtype)
        tr |= {"batch": args.batch, "seq": args.seq, "ratio": tr["nanoalign"]["tokens_per_s"] / tr["transformers"]["tokens_per_s"],
               "target": TARGET_TRAIN}
        per_token = flops_per_token(cfg, sum(p.numel() for p in matmul_weights(ours)), args.seq)
        peak = matmul_peak(args.dtype)
        tr["mfu"] = {"flops_per_token": per_token, "matmul_peak_flops": peak, "nominal": nominal_peak(args.dtype)}
        for name in ("nanoalign", "transformers"):
            achieved = per_token * tr[name]["tokens_per_s"]
            tr["mfu"][name] = {"flops": achieved, "of_matmul_peak": achieved / peak}
            if tr["mfu"]["nominal"]:
                tr["mfu"][name]["of_nominal"] = achieved / tr["mfu"]["nominal"][1]
        results["train"] = tr
        rows.append(("train fwd+bwd", tr, TARGET_TRAIN, f"B={args.batch} T={args.seq}"))
    if args.dtype != "float32":  # generation runs on weights in the dtype itself, as inference does
        ours.to(getattr(torch, args.dtype))
        cast_reference(ref, getattr(torch, args.dtype))
    if not args.skip_gen:
        print(f"generation: B={args.gen_batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens greedy, "
              f"{args.gen_repeats} timed runs each, interleaved ...", flush=True)
        ge = bench_gen(ours, ref, cfg.vocab_size, args.gen_batch, args.prompt_len, args.new_tokens, args.gen_repeats,
                       args.seed)
        ge |= {"batch": args.gen_batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "ratio": ge["nanoalign"]["tokens_per_s"] / ge["transformers"]["tokens_per_s"], "target": TARGET_GEN}
        if DEVICE.type == "cpu" and can_prepack(ours):  # the ceiling that the matmul kernels put on the ratio
            ge["matmul_bound"] = bench_matmul_bound(ours, args.gen_batch, args.new_tokens, args.gen_repeats)
            ge["matmul_bound"]["max_ratio"] = ge["transformers"]["median_s"] / ge["matmul_bound"]["min_decode_s"]
        results["generate"] = ge
        shape = f"B={args.gen_batch} P={args.prompt_len} N={args.new_tokens}"
        rows.append(("generate (KV cache)", ge, TARGET_GEN, shape))
        for variant, label in VARIANTS.items():  # the third contestant, on this device
            if f"nanoalign_{variant}" in ge:
                mine = ge[f"nanoalign_{variant}"]
                ge[f"{variant}_ratio"] = mine["tokens_per_s"] / ge["transformers"]["tokens_per_s"]
                rows.append((f"generate ({label})", {"nanoalign": mine, "transformers": ge["transformers"],
                                                     "ratio": ge[f"{variant}_ratio"]}, TARGET_GEN, shape))

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
        print(f"\ngenerated tokens identical to transformers': {describe(ge)}")
        if "graph_vs_eager" in ge:
            print(f"CUDA-graph tokens identical to the eager loop's: {describe(ge['graph_vs_eager'])}")
        if "unpacked_vs_packed" in ge:
            print(f"unpacked-weights tokens identical to the prepacked loop's: {describe(ge['unpacked_vs_packed'])}")
        if "matmul_bound" in ge:
            mb, n = ge["matmul_bound"], args.new_tokens
            print(f"a decode step's {mb['matmuls_per_step']} matmuls alone (prepacked, B={args.gen_batch}, back to back) "
                  f"take {1e3 * mb['matmul_s_per_step']:.2f} ms; {n - 1} decode steps cannot take less than "
                  f"{mb['min_decode_s']:.3f} s, so on this machine with these kernels the generation ratio cannot "
                  f"exceed {mb['max_ratio']:.2f}x (nanoalign's whole step: "
                  f"{1e3 * ge['nanoalign']['median_s'] / (n - 1):.2f} ms a token, prompt and packing included)")
    for key, label in (("train", "training"), ("generate", "generation")):
        if key in results:
            print(f"{label} ratio nanoalign/transformers = {results[key]['ratio']:.2f}x (target >= {results[key]['target']}x)")
    for variant, label in VARIANTS.items():
        if f"{variant}_ratio" in results.get("generate", {}):
            print(f"generation ({label}) ratio nanoalign/transformers = {results['generate'][f'{variant}_ratio']:.2f}x"
                  + (f" (target >= {TARGET_GEN}x)" if variant == "graph" else ""))  # the unpacked loop is no contender
    if "train" in results:
        mfu = results["train"]["mfu"]
        nominal = mfu["nominal"]
        for name in ("nanoalign", "transformers"):
            m = mfu[name]
            print(f"training MFU {name} = {100 * m['of_matmul_peak']:.1f}% of the measured {args.dtype} matmul peak "
                  f"({mfu['matmul_peak_flops'] / 1e12:.1f} TFLOP/s)"
                  + (f", {100 * m['of_nominal']:.1f}% of {nominal[0]}'s nominal {nominal[1] / 1e12:.0f} TFLOP/s "
                     f"(target >= {100 * TARGET_MFU:.0f}%)" if nominal else "")
                  + f": {m['flops'] / 1e12:.2f} TFLOP/s at {mfu['flops_per_token'] / 1e9:.2f} GFLOP/token")
    if "floor" in results:
        fl = results["floor"]
        for key, label in (("", "batch-1 decode"), ("graph_", "batch-1 decode (CUDA graph)")):
            if f"{key}decode_s_per_token" in fl:
                print(f"{label} = {1e3 * fl[f'{key}decode_s_per_token']:.3f} ms/token = "
                      f"{fl[f'{key}percent_of_floor']:.0f}% of the weight-streaming floor "
                      f"({1e3 * fl['floor_s_per_token']:.3f} ms/token: {fl['streamed_bytes'] / 1e6:.1f} MB of weights "
                      f"at {fl['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
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
