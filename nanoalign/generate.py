"""Batched sampling with a preallocated KV cache, and a command line to try any checkpoint.

    python -m nanoalign.generate --init=DIR_OR_HUB_ID --prompt="The capital of France is" --temperature=0

The command line formats the prompt with the template saved with the checkpoint (tokenizer_config.json's
"nanoalign_template", written by training), else passes it verbatim; --template overrides both.

Prompts of different lengths are left-padded, so every row's next token sits in the same column. Positions
count real tokens only (cumsum(mask) - 1) and pads are masked from attention, which makes each row's
logits equal to those of the row run alone (tests/test_model.py pins this).

For PPO the sampler returns the log-probability of each sampled token under softmax(logits / temperature)
with nothing filtered: that is the distribution the trainer recomputes later. top-k / top-p change the
sampling distribution, so a rollout that uses them no longer matches those log-probs
(docs/correctness.md, "Log-probabilities"): leave them off for PPO rollouts.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import KVCache, Transformer


@dataclass
class Generation:
    tokens: torch.Tensor          # (B, N) sampled ids; pad_id after a row stopped
    mask: torch.Tensor            # (B, N) 1 for generated tokens, the stop token included, 0 after it
    logprobs: torch.Tensor        # (B, N) log pi(token) under logits / temperature, 0 where mask is 0
    prompt_ids: torch.Tensor      # (B, P) left-padded prompts
    prompt_mask: torch.Tensor     # (B, P)
    stopped: torch.Tensor         # (B,) True where the row produced a stop id (False: cut by max_new_tokens)

    @property
    def sequences(self):  # (B, P + N) prompt and response, ready for a later forward
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    @property
    def attention_mask(self):  # (B, P + N)
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def response(self, i: int) -> list[int]:
        """Row i's generated ids up to and including its stop token."""
        return self.tokens[i, :int(self.mask[i].sum())].tolist()


def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """list of id lists -> ids (B, P) left-padded with pad_id, and mask (B, P)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_error(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> str | None:
    """What is wrong with these sampling settings, naming the argument, or None when they are valid."""
    if max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {max_new_tokens}"
    if not temperature >= 0:
        return f"temperature must be >= 0 (0 = greedy), got {temperature}"
    if top_k is not None and top_k < 0:
        return f"top_k must be >= 0 (0 = off), got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        return f"top_p must be in (0, 1] (1 = off), got {top_p}"
    return None


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, stop_ids=(),
             pad_id: int = 0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             vocab_size: int | None = None, generator: torch.Generator | None = None) -> Generation:
    """Sample up to max_new_tokens for each prompt (lists of token ids); temperature 0 means greedy.

    vocab_size: ids >= vocab_size are never sampled (Pythia's embedding is padded past its tokenizer)."""
    if problem := sampling_error(max_new_tokens, temperature, top_k, top_p):
        raise ValueError(problem)
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = prompt_ids.shape
    if P + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds the context length "
                         f"{model.cfg.max_seq_len}")
    cache = KVCache(model.cfg, B, P + max_new_tokens, device, next(model.parameters()).dtype)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)

    # without padding the mask is all ones: pass None and let attention take its unmasked fast path
    attn = prompt_mask if bool((prompt_mask == 0).any()) else None
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    logits = model(prompt_ids, attention_mask=attn, position_ids=positions, cache=cache, start_pos=0)[:, -1]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for t in range(max_new_tokens):
        logits = logits.float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        scaled = logits / temperature if temperature > 0 else logits
        logp = F.log_softmax(scaled, dim=-1)  # (B, V)
        if temperature > 0:
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            nxt = logits.argmax(-1)
        live = ~done
        tokens[:, t] = torch.where(live, nxt, pad_id)
        mask[:, t] = live.long()
        logprobs[:, t] = torch.where(live, logp.gather(-1, nxt[:, None]).squeeze(-1), 0.0)
        hit = live & torch.isin(nxt, stop)
        stopped |= hit
        done |= hit
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if attn is not None:
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        logits = model(tokens[:, t:t + 1], attention_mask=attn, position_ids=next_pos, cache=cache,
                       start_pos=P + t)[:, -1]
        next_pos = next_pos + 1
    return Generation(tokens, mask, logprobs, prompt_ids, prompt_mask, stopped)


def main(argv=None):
    from .checkpoint import load_pretrained, resolve_dir
    from .tokenizer import TEMPLATES, Tokenizer, encode_prompt

    ap = argparse.ArgumentParser(description="Sample a completion from a checkpoint (local dir or hub id).")
    ap.add_argument("--init", required=True, help="checkpoint directory or Hugging Face hub id")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                    help="prompt template; default: the checkpoint's own (saved by training), else plain (verbatim)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling, in (0, 1] (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if problem := sampling_error(args.max_new_tokens, args.temperature, args.top_k, args.top_p):
        ap.error("--" + problem)  # before loading a model that may take minutes

    ckpt = resolve_dir(args.init)
    model = load_pretrained(ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    tok = Tokenizer.from_dir(ckpt)
    tok.check_vocab(model.cfg.vocab_size)
    ids = encode_prompt(tok, args.prompt, args.template or tok.template or "plain")
    gen = generate(model, [ids], args.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, vocab_size=tok.vocab_size,
                   generator=torch.Generator(args.device).manual_seed(args.seed))
    print(tok.decode(gen.response(0)))


if __name__ == "__main__":
    from .cli import run

    run(main)  # a bad checkpoint or prompt: one line naming it, no traceback
