"""SFT training throughput on CPU: train_sft.py's step vs transformers with a plain loop, same model and batch.

    python bench/bench_sft.py              # the tiny-world model of `python train_sft.py`, its batch of 32
    python bench/bench_sft.py --steps 20 --json /tmp/sft.json
    python bench/bench_sft.py --quick      # a smoke run of a few seconds (what the tests run)

One optimizer step on each side = forward/backward over the same 32 tokenized tiny-world SFT examples in
micro-batches of 16 (right-padded), gradient clipping and an AdamW update. nanoalign runs
train_sft.sft_gradients; transformers runs LlamaForCausalLM(input_ids, attention_mask, labels) with its
built-in loss, told the step's token count (num_items_in_batch) so that both sides normalise the same way:
the sum of token losses of the whole step divided by its number of labelled tokens. The losses of the two
sides are checked to agree. Both start from the same weights (saved by nanoalign, loaded by transformers) and the
steps are interleaved (A B, B A, ...) so machine noise hits both alike. Tokens/s counts real (non-pad) tokens.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import train_sft  # noqa: E402
from nanoalign import dist  # noqa: E402
from nanoalign.checkpoint import save_pretrained  # noqa: E402
from nanoalign.data import collate_sft, read_jsonl, tokenize_sft  # noqa: E402
from nanoalign.tokenizer import Tokenizer  # noqa: E402


def step_ours(model, opt, rows, micro, pad_id):
    loss_sum, n = train_sft.sft_gradients(model, rows, micro, dist.Dist(), pad_id, torch.autocast("cpu", enabled=False))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (loss_sum / n).item()


def step_ref(model, opt, rows, micro, pad_id):
    chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    n_tokens = sum(sum(r["mask"][1:]) for r in rows)  # labelled tokens of the whole step
    total = 0.0
    for chunk in chunks:
        batch = collate_sft(chunk, pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    use_cache=False, num_items_in_batch=n_tokens)  # loss = this chunk's token sum / n_tokens
        out.loss.backward()
        total += out.loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="2 timed steps of a batch of 8: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    cfg = train_sft.Config(template="hh")  # the template train_sft picks for the tiny world's JSONL data
    if args.quick:
        cfg.batch_size, cfg.micro_batch_size = 8, 4
    tok = Tokenizer.from_dir(ROOT / cfg.tokenizer)
    torch.manual_seed(0)
    ours = train_sft.tiny_model(cfg, tok)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, Path(tmp) / "m")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = LlamaForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32, attn_implementation="sdpa")
    examples = read_jsonl(ROOT / cfg.data)
    rows_all = tokenize_sft(examples, tok, cfg.template, cfg.max_len, cfg.max_response_len)
    batches = [rows_all[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(args.warmup + args.steps)]

    models = {"nanoalign": (ours.train(), step_ours), "transformers": (ref.train(), step_ref)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, (m, _) in models.items()}
    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    print(f"tiny-world SFT: {ours.num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size} "
          f"(micro {cfg.micro_batch_size}), torch threads {torch.get_num_threads()}")
    for i, rows in enumerate(batches):
        names = list(models) if i % 2 == 0 else list(models)[::-1]
        for name in names:
            model, fn = models[name]
            t0 = time.perf_counter()
            losses[name].append(fn(model, opts[name], rows, cfg.micro_batch_size, tok.pad_id))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # same weights, same data, same normalisation: the two loss curves agree
    gap = max(abs(a - b) for a, b in zip(losses["nanoalign"], losses["transformers"]))
    assert gap < 1e-3, f"the two sides compute different losses (max gap {gap:.2e})"
    tokens = statistics.mean(sum(len(r["ids"]) for r in rows) for rows in batches[args.warmup:])
    result = {k: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v)}
              for k, v in times.items()}
    ratio = result["nanoalign"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    for k, r in result.items():
        print(f"{k:<14} {r['tokens_per_s']:>10.0f} tok/s   {r['median_s'] * 1000:>8.1f} ms/step")
    print(f"SFT step ratio nanoalign/transformers = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "ratio": ratio, "tokens_per_step": tokens}, indent=2) + "\n")
    return ratio


if __name__ == "__main__":
    main()
