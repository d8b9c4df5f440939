"""DPO training throughput and peak memory on CPU: train_dpo.py's step vs TRL's DPOTrainer, same model and batch.

    python bench/bench_dpo.py              # the tiny-world model of `python train_sft.py`, DPO's batch of 32 pairs
    python bench/bench_dpo.py --steps 20 --json /tmp/dpo.json
    python bench/bench_dpo.py --quick      # a smoke run of a few seconds (what the tests run)

One optimizer step on each side = the DPO loss (sigmoid, train_dpo's beta 0.25) over the same tokenized tiny-world
pairs in micro-batches (chosen and rejected of a micro-batch in one right-padded forward), backward, clipping at
1.0 and the same AdamW update. Both sides start from the same weights (saved by nanoalign, loaded by
transformers) and read the same token ids (TRL's own DataCollatorForPreference collates our tokenized pairs).
- nanoalign: train_dpo.pair_sums + train.accumulate_gradients + train.optimizer_step. The reference log-probs
  were computed once before training (train_dpo's design), so the step holds one model and runs one forward.
- TRL: DPOTrainer.training_step (its loss, its metrics, its backward) with its default resident reference model
  (precompute_ref_log_probs=False, TRL's default and the usual implementation): the step runs a second, no-grad
  forward of the reference. TRL can precompute too (precompute_ref_log_probs=True); this measures its default.
The losses of the two sides are checked to agree at every step. The timed steps are interleaved (A B, B A, ...)
so machine noise hits both alike. Tokens/s counts real (non-pad) tokens of the chosen and rejected sequences.

Fairness of the speed ratio: nanoalign's reference forward is not gone, it moved before training. The headline
`tokens/s ratio` charges nanoalign its precompute as if every pair were seen once (one epoch: the reference
forward of the step's pairs, timed, added to the step); over k epochs that cost is paid once, not k times. The
step alone is printed too.

Peak memory, honestly on CPU: process RSS is dominated by the libraries (TRL imports transformers, datasets,
accelerate: hundreds of MB) and glibc keeps freed pages, so it says little about the training itself. We count
tensor bytes instead: (bytes of every tensor resident at the start of a step: parameters and buffers of every
model the side holds, AdamW moments, cached reference log-probs) + (the peak growth during one optimizer step,
from PyTorch's CPU allocator events recorded by torch.profiler with profile_memory=True: activations, saved
tensors, gradients, temporaries). For nanoalign the peak is the larger of the training step and the reference
precompute (the policy's and the reference's weights, both held by then, + the reference's no-grad forward). Python objects, the allocator's slack and the libraries'
own memory are left out on both sides.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import train_dpo  # noqa: E402
import train_sft  # noqa: E402
from nanoalign import dist, dpo, train  # noqa: E402
from nanoalign.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from nanoalign.data import collate_pairs, read_jsonl, tokenize_pairs  # noqa: E402
from nanoalign.tokenizer import Tokenizer  # noqa: E402


def resident_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors held by modules (parameters, buffers) and optimizers."""
    seen, total = set(), 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        else:
            tensors = [obj]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def peak_growth(fn) -> int:
    """The largest number of tensor bytes alive at once during fn() beyond those alive when it starts, from the
    CPU allocator's events (each allocation and free, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def step_ours(model, opt, rows, cfg, pad_id):
    amp = torch.autocast("cpu", enabled=False)
    stats = []

    def loss_fn(pairs):
        loss_sum, s = train_dpo.pair_sums(model, pairs, cfg, pad_id, amp)
        stats.append(s)
        return loss_sum

    train.accumulate_gradients(model, train.micro_batches(rows, cfg.micro_batch_size), loss_fn, len(rows), dist.Dist())
    loss = (torch.stack(stats).sum(0)[0] / len(rows)).item()
    train.optimizer_step(model, opt, step=1, loss=loss, grad_clip=1.0, d=dist.Dist())
    return loss


def step_trl(trainer, model, opt, batches):
    trainer.current_gradient_accumulation_steps = len(batches)  # set by Trainer's own loop, which we bypass
    total = 0.0
    for batch in batches:
        total += trainer.training_step(model, batch).item()  # this micro-batch's mean loss / number of micro-batches
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def trl_example(row: dict) -> dict:
    """Our tokenized pair as TRL's collator wants it: the shared prompt ids and each response's ids."""
    n = row["chosen_mask"].index(1)
    return {"prompt_ids": row["chosen_ids"][:n], "chosen_ids": row["chosen_ids"][n:], "rejected_ids": row["rejected_ids"][n:]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="2 timed steps of a batch of 8 pairs: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    try:
        from datasets import Dataset
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference
    except ImportError as e:
        sys.exit(f"error: the DPO benchmark compares against TRL: pip install trl accelerate datasets ({e})")
    hf_logging.set_verbosity_error()

    cfg = train_dpo.Config(eval_prompts="", val_data="")  # loss dpo, beta 0.25, batch 32 in micro-batches of 16
    if args.quick:
        cfg.batch_size, cfg.micro_batch_size = 8, 4
    tok = Tokenizer.from_dir(ROOT / "data" / "tokenizer")
    torch.manual_seed(0)
    ours = train_sft.tiny_model(train_sft.Config(), tok)  # the model `python train_sft.py` trains
    pairs = read_jsonl(ROOT / cfg.data)[:cfg.batch_size * (args.warmup + args.steps)]
    rows = tokenize_pairs(pairs, tok, "hh", cfg.max_len, cfg.max_response_len)
    batches = [rows[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(args.warmup + args.steps)]
    tmp = tempfile.TemporaryDirectory()
    save_pretrained(ours, Path(tmp.name) / "m", tokenizer=tok)

    # nanoalign: the reference log-probs of every pair, once, before training (timed and memory-profiled)
    ref = load_pretrained(Path(tmp.name) / "m")
    ref_batches = [train.micro_batches(b, cfg.micro_batch_size) for b in batches]
    with torch.no_grad():
        t0 = time.perf_counter()
        ref_logps = torch.cat([dpo.response_logps(ref, collate_pairs(mb, tok.pad_id)) for b in ref_batches for mb in b])
        ref_s_per_step = (time.perf_counter() - t0) / len(batches)
        ref_phase = resident_bytes(ours, ref) + peak_growth(lambda: [dpo.response_logps(ref, collate_pairs(mb, tok.pad_id))
                                                               for mb in ref_batches[0]])
    del ref
    per_row = []  # collate_pairs puts a micro-batch's chosen rows first, then its rejected rows
    offset = 0
    for mb in (mb for b in ref_batches for mb in b):
        chosen, rejected = ref_logps[offset:offset + 2 * len(mb)].chunk(2)
        per_row += list(zip(chosen.tolist(), rejected.tolist()))
        offset += 2 * len(mb)
    rows = [{**r, "ref_chosen": c, "ref_rejected": rj} for r, (c, rj) in zip(rows, per_row)]
    batches = [rows[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(args.warmup + args.steps)]

    # TRL: DPOTrainer with its resident reference model, built as a user builds it
    policy = LlamaForCausalLM.from_pretrained(Path(tmp.name) / "m", dtype=torch.float32, attn_implementation="sdpa")
    ref_model = LlamaForCausalLM.from_pretrained(Path(tmp.name) / "m", dtype=torch.float32, attn_implementation="sdpa")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(Path(tmp.name) / "m")
    trl_args = DPOConfig(output_dir=str(Path(tmp.name) / "trl"), per_device_train_batch_size=cfg.micro_batch_size,
                         gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size, learning_rate=cfg.lr,
                         beta=cfg.beta, loss_type=["sigmoid"], max_length=None, report_to=[], use_cpu=True,
                         bf16=False, save_strategy="no", disable_tqdm=True)
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[:4]])
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=trl_args, train_dataset=dataset, processing_class=hf_tok)
    collator = DataCollatorForPreference(pad_token_id=tok.pad_id)
    trl_batches = [[collator([trl_example(r) for r in mb]) for mb in train.micro_batches(b, cfg.micro_batch_size)]
                   for b in batches]

    sides = {"nanoalign": ours.train(), "trl": policy.train()}
    opts = {k: train.adamw(m, cfg.lr) for k, m in sides.items()}  # the same AdamW (betas 0.9, 0.95) on both
    run = {"nanoalign": lambda i: step_ours(ours, opts["nanoalign"], batches[i], cfg, tok.pad_id),
           "trl": lambda i: step_trl(trainer, policy, opts["trl"], trl_batches[i])}
    times = {k: [] for k in sides}
    losses = {k: [] for k in sides}
    print(f"tiny-world DPO: {ours.num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size} pairs "
          f"(micro {cfg.micro_batch_size}), torch threads {torch.get_num_threads()}")
    for i in range(len(batches)):
        for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            losses[name].append(run[name](i))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # same weights, same pairs, same optimizer: the two loss curves agree
    gap = max(abs(a - b) for a, b in zip(losses["nanoalign"], losses["trl"]))
    assert gap < 1e-3, f"the two sides compute different losses (max gap {gap:.2e})"

    # peak memory: one more (untimed) step of each side under the allocator profiler
    resident = {"nanoalign": resident_bytes(ours, opts["nanoalign"], ref_logps),
                "trl": resident_bytes(policy, ref_model, opts["trl"])}
    growth = {k: peak_growth(lambda: run[k](0)) for k in sides}
    peak = {k: resident[k] + growth[k] for k in sides}
    peak["nanoalign"] = max(peak["nanoalign"], ref_phase)

    tokens = statistics.mean(sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in b) for b in batches[args.warmup:])
    step_s = {k: statistics.median(v) for k, v in times.items()}
    result = {k: {"median_s": step_s[k], "tokens_per_s": tokens / step_s[k], "peak_mb": peak[k] / 2**20,
                  "resident_mb": resident[k] / 2**20, "step_growth_mb": growth[k] / 2**20} for k in sides}
    result["nanoalign"]["ref_precompute_peak_mb"] = ref_phase / 2**20
    result["nanoalign"]["ref_precompute_s_per_step"] = ref_s_per_step
    result["nanoalign"]["tokens_per_s_with_precompute"] = tokens / (step_s["nanoalign"] + ref_s_per_step)
    for k, r in result.items():
        print(f"{k:<10} {r['tokens_per_s']:>9.0f} tok/s  {r['median_s'] * 1000:>8.1f} ms/step  peak tensors "
              f"{r['peak_mb']:>7.1f} MiB (resident {r['resident_mb']:.1f} + step {r['step_growth_mb']:.1f})")
    print(f"nanoalign reference precompute: {ref_s_per_step * 1000:.1f} ms per step's pairs (once, before training), "
          f"peak tensors {ref_phase / 2**20:.1f} MiB; max loss gap between the sides {gap:.1e}")
    ratio = result["nanoalign"]["tokens_per_s_with_precompute"] / result["trl"]["tokens_per_s"]
    ratio_step = result["nanoalign"]["tokens_per_s"] / result["trl"]["tokens_per_s"]
    mem_ratio = peak["nanoalign"] / peak["trl"]
    print(f"DPO step alone (reference precomputed): ratio {ratio_step:.2f}x")
    print(f"tokens/s ratio nanoalign/trl = {ratio:.2f}x")
    print(f"peak memory ratio nanoalign/trl = {mem_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "tokens_per_s_ratio": ratio, "step_alone_ratio": ratio_step,
                                               "peak_memory_ratio": mem_ratio, "tokens_per_step": tokens,
                                               "max_loss_gap": gap}, indent=2) + "\n")
    tmp.cleanup()
    return ratio


if __name__ == "__main__":
    main()
