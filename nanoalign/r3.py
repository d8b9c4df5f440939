"""R3, the Regularized Relevance Reward: a preference-free reward for PPO (no reward model, no preference pairs).

A relevance model M (encoder.Encoder: a BERT, mean-pooled, unnormalised) scores two texts by
r(a, b) = M(a) · M(b). For a prompt x, its reference answer y_ref and a sampled response y, cut at the
first stop string:

    tokens(y) = the matches of \\w+|[^\\w\\s]+ (words, and runs of punctuation)
    LI(y) = len(tokens(y)) / 100                         length incentive
    RP(y) = #distinct trigrams / #trigrams of tokens(y)  repetition penalty; 1 below 3 tokens
    F(r)  = r / 3.5 * (L_max / 100)                      linear, [0, 3.5] -> [0, L_max / 100]
    R3    = RP(y) * r(x, y) * LI(y)       if x is open-ended   (qtype OPENENDED)
    R3    = RP(y) * F(r(y_ref, y))        if x is closed-ended (qtype CONSTRAINED)

Open-ended questions reward long answers about the question; RP keeps the length from being bought
by repeating a phrase. Closed-ended questions reward closeness to the reference, and F puts that on
the scale of LI of an answer as long as the rollout allows (L_max tokens). See docs/methods.md "## 6. R3".

The paper's ablations are one switch, `variant`: "relevance" r(x, y), "length" LI(y), "relevance_length"
r(x, y) * LI(y), "r3_no_branching" RP * r(x, y) * LI for every query, "r3_random_qtype" R3 with the
query type drawn at random (from a seeded rng) instead of read from the data.

Gotchas:
- F is not clipped: r outside [0, 3.5] maps outside [0, L_max / 100]. 3.5 is Contriever's scale of dot
  products; another encoder (all-MiniLM-L6-v2's self dot products are ~30) shifts the balance of the
  two branches.
- LI counts regex tokens of the decoded text, while L_max counts the policy's tokens.
- Score the response cut at the first stop string: a policy that runs on into a new "Human:" turn
  would otherwise be paid for the text it invents after its answer.
"""
from __future__ import annotations

import random
import re

import torch

TOKEN = re.compile(r"\w+|[^\w\s]+")
OPEN, CLOSED = "OPENENDED", "CONSTRAINED"
VARIANTS = ("r3", "relevance", "length", "relevance_length", "r3_no_branching", "r3_random_qtype")
# the role tags of the hh and alpaca templates, and end-of-text strings a decode may leave in
STOP_STRINGS = ("\n\nHuman:", "\n\nAssistant:", "### Instruction:", "### Input:", "### Response:",
                "</s>", "<|endoftext|>")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def length_incentive(text: str) -> float:
    return len(tokens(text)) / 100


def repetition_penalty(text: str) -> float:
    words = tokens(text)
    if len(words) < 3:
        return 1.0
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) / len(trigrams)


def closed_ended_map(r, max_len: int):
    """F(r) = r / 3.5 * (max_len / 100): a relevance in [0, 3.5] -> [0, max_len / 100]. Not clipped."""
    return r / 3.5 * (max_len / 100)


def cut_at_stop(text: str, stop_strings=STOP_STRINGS) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[:min(hits, default=len(text))]


def relevance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """r = M(a) · M(b), row by row: (N, C), (N, C) -> (N,)."""
    return (a * b).sum(-1)


def r3_reward(encoder, prompts: list[str], references: list[str | None], responses: list[str],
              qtypes: list[str] | None, max_len: int, variant: str = "r3", stop_strings=STOP_STRINGS,
              rng: random.Random | None = None) -> torch.Tensor:
    """The R3 reward (or one of its ablations, see the module docstring) of each response -> (N,) float32 on
    the CPU. prompts are the raw questions (no template); references may be None where the query is
    open-ended; max_len is the rollout length cap in policy tokens. encoder is anything with
    embed(texts) -> (N, C), normally encoder.Encoder; it is called once per kind of text."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown R3 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    N = len(responses)
    if len(prompts) != N or len(references) != N or (qtypes is not None and len(qtypes) != N):
        raise ValueError(f"{len(prompts)} prompts, {len(references)} references, "
                         f"{len(qtypes) if qtypes is not None else 'no'} qtypes for {N} responses")
    for q in qtypes or ():
        if q not in (OPEN, CLOSED):
            raise ValueError(f"unknown qtype {q!r}; expected {OPEN} or {CLOSED}")
    if variant == "r3_random_qtype":
        if rng is None:
            raise ValueError("variant 'r3_random_qtype' needs rng=random.Random(seed)")
        qtypes = [rng.choice((OPEN, CLOSED)) for _ in range(N)]
    elif variant == "r3" and qtypes is None:
        raise ValueError("variant 'r3' needs the query types (qtypes)")

    responses = [cut_at_stop(y, stop_strings) for y in responses]
    li = torch.tensor([length_incentive(y) for y in responses])
    rp = torch.tensor([repetition_penalty(y) for y in responses])
    if variant == "length":
        return li
    resp_emb = encoder.embed(responses).float().cpu()
    r_xy = relevance(encoder.embed(prompts).float().cpu(), resp_emb)
    if variant == "relevance":
        return r_xy
    if variant == "relevance_length":
        return r_xy * li
    reward = rp * r_xy * li  # the open-ended branch, and every query without branching
    closed = [i for i, q in enumerate(qtypes or ()) if q == CLOSED]
    if variant == "r3_no_branching" or not closed:
        return reward
    if any(references[i] is None for i in closed):
        raise ValueError("a closed-ended (CONSTRAINED) query has no reference answer")
    r_ref = relevance(encoder.embed([references[i] for i in closed]).float().cpu(), resp_emb[closed])
    reward[closed] = rp[closed] * closed_ended_map(r_ref, max_len)
    return reward
