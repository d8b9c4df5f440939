"""PPO for language models (RLHF): everything between the sampler and the losses. train_ppo.py is the recipe.

One PPO step (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022; docs/methods.md "## 3. PPO"):

    sample_rollouts      y ~ pi(.|x) at temperature tau with the KV-cache sampler, a generator per prompt chunk
    rollout_forwards     no-grad forwards on prompt + response: the policy's log-probs ("old", RECOMPUTED by the
                         trainer), the reference's log-probs, the critic's values, the entropy
    score_rollouts       the score of each answer from the --reward source: the reward model (reward_model_scores)
                         or a reward that reads text (text_scores): R3 and its ablations (nanoalign.r3), the oracle
    gather_rollouts      every rank gets the whole global batch (it is small: ids and per-token floats)
    shape_scores         running mean/std normalisation, clipping, the missing-EOS penalty
    advantages           per-token KL penalty + score on the last token, GAE, masked whitening
    update               several epochs over shuffled minibatches: clipped policy and value losses

Design decisions and the gotchas they avoid (tests/test_ppo.py pins each):
- The trainer recomputes the "old" log-probs itself, with the same function, temperature, masks and positions
  as every later training forward, so before the first update the ratio is 1 and the KL to the (identical)
  reference is 0. The sampler's own log-probs are only compared with them (ppo/logprob_gap); they come from an
  incremental KV-cache forward and differ by float noise. No top-k/top-p in rollouts: the trainer does not
  apply them, so the ratio would not start at 1.
- A row is laid out as [left-padded prompt | response, right-padded], positions = cumsum(mask) - 1 and pads
  hidden from attention, so a row's numbers do not depend on the other rows of its batch. The response mask
  covers the generated tokens up to and including the stop token: KL, values and advantages are 0 after it.
- Rollouts are a pure function of (seed, step, chunk of gen_batch_size prompts) and the weights: chunk c is
  sampled by rank c % world_size with its own generator, so 1 process and N processes sample the same global
  batch, and a resumed run samples what the uninterrupted one did. Every random stream of a step (this sampling,
  the minibatch order, r3_random_qtype's query types) has a seed of its own, train.derived_seed(purpose, seed,
  step, index), so no two of them draw the same numbers.
- Everything normalised (score statistics, advantage whitening, the loss's token mean) is global: ranks
  exchange their rollouts, and a minibatch's loss is (sum over its tokens on this rank) / (its token count over
  all ranks), the SFT normalisation, so micro-batching and data parallelism give the same update.
- Under FSDP the policy is unsharded for sampling (gathered_for_generation): ranks stop sampling at different
  steps, and a sharded forward would wait for the others at every token.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from . import dist, hbat, train, world
from .cli import InputError
from .data import read_jsonl
from .generate import generate, left_pad
from .losses import (entropy_from_logits, explained_variance, gae, logprobs_from_logits, masked_mean,
                     ppo_policy_loss, ppo_rewards, ppo_value_loss, whiten)
from .r3 import CLOSED, r3_reward
from .evaluate import evaluate_answers, reward_judge, sample_answers
from .tokenizer import encode_prompt

TEXT_REWARDS = ("r3", "relevance", "length", "relevance_length", "r3_no_branching", "r3_random_qtype", "oracle")
REWARDS = ("rm", *TEXT_REWARDS)


# --- running reward statistics

class RunningMoments:
    """Mean and standard deviation of every score seen so far (Welford / Chan et al.'s parallel update).

    Scores are normalised as (s - mean) / std with the statistics INCLUDING the current batch, then clipped.
    std is Bessel-corrected (numpy's ddof=1); 1 while fewer than 2 scores were seen."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # python floats (float64): no drift over a long run

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(raw, stopped, stats: RunningMoments | None, clip: float, missing_eos_penalty: float):
    """Raw sequence scores (B,) -> the scores PPO adds on the last response token (B,).

    stats (None: no normalisation) first absorbs the batch, then s = (raw - mean) / std, clipped to [-clip, clip].
    A response cut by the length cap (no stop token) gets the fixed penalty instead: its score would judge an
    unfinished answer, and a reward model never saw one. The statistics still absorb that raw score: they describe
    what the scorer gives the policy's rollouts, all of them (the methods leave this open)."""
    s = raw.float()
    if stats is not None:
        stats.update(raw)
        s = (s - stats.mean) / (stats.std + 1e-8)
    s = s.clamp(-clip, clip)
    return torch.where(stopped.bool(), s, torch.full_like(s, missing_eos_penalty))


# --- rollouts

def rollout_generator(seed: int, step: int, chunk: int, device="cpu") -> torch.Generator:
    """The sampling generator of one chunk of prompts at one step: a pure function of (seed, step, chunk), so the
    samples do not depend on the number of ranks nor on where a run was resumed."""
    return torch.Generator(device).manual_seed(train.derived_seed("rollout", seed, step, chunk))


def minibatch_order(n: int, seed: int, step: int, epoch: int) -> torch.Tensor:
    """The order in which update() reads the n rollouts of a step in one epoch: a pure function of (seed, step,
    epoch), drawn from a stream of its own (not the sampler's)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(train.derived_seed("minibatch", seed, step,
                                                                                         epoch)))


@contextmanager
def gathered_for_generation(model, d: dist.Dist):
    """Under FSDP2: the whole model unsharded on every rank for the duration, so forwards need no collective
    (ranks sample different numbers of tokens). A no-op without torchrun."""
    if not d.enabled:
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:  # FSDP's defaults: blocks reshard after forward, the root keeps its parameters
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def _pad_right(t: torch.Tensor, width: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) if t.shape[1] < width else t


def cat_rows(parts: list[dict], pad_id: int) -> dict:
    """Concatenate batches of rollouts along the rows; per-token (B, N) tensors are right-padded to one width."""
    out = {"prompt": [p for part in parts for p in part["prompt"]]}
    width = max(part["tokens"].shape[1] for part in parts)
    for key, value in parts[0].items():
        if key == "prompt":
            continue
        tensors = [part[key] for part in parts]
        if value.dim() == 2:
            tensors = [_pad_right(t, width, pad_id if key == "tokens" else 0) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def select_rows(batch: dict, rows) -> dict:
    """The rollouts at the given row indices (a list or a 1-D tensor), per-token tensors cut to their width."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    out = {"prompt": [batch["prompt"][i] for i in rows.tolist()]}
    width = max(int(batch["mask"][rows].sum(-1).max()), 1) if len(rows) else 1
    for key, value in batch.items():
        if key != "prompt":
            value = value[rows.to(value.device)]
            out[key] = value[:, :width] if value.dim() == 2 else value
    return out


@torch.no_grad()
def sample_rollouts(policy, prompts: list[list[int]], *, step: int, seed: int, gen_batch_size: int,
                    max_new_tokens: int, temperature: float, tok, d: dist.Dist, amp, cuda_graph: bool = False) -> dict:
    """This rank's rollouts of a global batch of prompts (token ids). Chunk c (prompts c*G .. c*G + G - 1) is
    sampled by rank c % world_size. Returns {"prompt", "index" (B,), "tokens", "mask", "sampler_logprobs"
    (B, N), "stopped" (B,)} with the response mask covering the stop token.

    cuda_graph: replay each decode step as a CUDA graph (generate's cuda_graph) when the policy is on a GPU and
    not sharded; under FSDP2 the eager loop runs (FSDP's forward hooks are not captured)."""
    graph = cuda_graph and d.device.type == "cuda" and not d.enabled
    parts = []
    n_chunks = math.ceil(len(prompts) / gen_batch_size)
    with gathered_for_generation(policy, d), amp:
        for c in range(d.rank, n_chunks, d.world_size):
            index = list(range(c * gen_batch_size, min((c + 1) * gen_batch_size, len(prompts))))
            gen = generate(policy, [prompts[i] for i in index], max_new_tokens, stop_ids=tok.stop_ids,
                           pad_id=tok.pad_id, temperature=temperature, vocab_size=tok.vocab_size,
                           generator=rollout_generator(seed, step, c, d.device), cuda_graph=graph)
            parts.append({"prompt": [prompts[i] for i in index], "index": torch.tensor(index, device=d.device),
                          "tokens": gen.tokens, "mask": gen.mask, "sampler_logprobs": gen.logprobs,
                          "stopped": gen.stopped})
    return cat_rows(parts, tok.pad_id)


def answer_rows(policy, prompts: list[list[int]], *, tok, max_new_tokens: int, temperature: float, seed: int,
                d: dist.Dist, amp) -> list[dict]:
    """Answers the policy samples to prompts (token ids) as SFT-style rows, {"ids": prompt + answer, "mask": 1 on
    the answer and its stop token}: what Hbat's Fisher EWC scores for a PPO stage, whose data is prompts alone.
    One generator seeded with `seed` and the whole model on every rank: every rank gets the same rows."""
    with gathered_for_generation(policy, d), amp:
        gen = generate(policy, prompts, max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                       temperature=temperature, vocab_size=tok.vocab_size,
                       generator=torch.Generator(d.device).manual_seed(seed))
    return [{"ids": p + gen.response(j), "mask": [0] * len(p) + [1] * len(gen.response(j))}
            for j, p in enumerate(prompts)]


def collate(prompts: list[list[int]], tokens, mask, pad_id: int):
    """Prompts (left-padded) + responses (B, N) right-padded -> input_ids, attention_mask (B, P + N), and P."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, tokens.device)
    return torch.cat([prompt_ids, tokens], 1), torch.cat([prompt_mask, mask.long()], 1), prompt_ids.shape[1]


def response_logprobs(model, input_ids, attention_mask, P: int, temperature: float, vocab_size: int | None = None,
                      with_entropy: bool = False):
    """log pi(y_t | x, y_<t) / tau-scaled, for the response tokens input_ids[:, P:] -> (B, N) float32
    [and the entropy of the sampled distribution (B, N)]. The logits at position t predict token t + 1, so the
    response's log-probs come from positions P - 1 .. P + N - 2. Ids >= vocab_size are excluded as the sampler
    excludes them (an embedding padded past the tokenizer)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # real tokens only, as in the sampler
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions)[:, P - 1:-1]  # (B, N, V)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.float().masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size,
                                            float("-inf"))
    logps = logprobs_from_logits(logits, input_ids[:, P:], temperature)
    if not with_entropy:
        return logps
    scaled = logits.float() / temperature
    return logps, entropy_from_logits(scaled.masked_fill(scaled == float("-inf"), -1e9))


def response_values(critic, input_ids, attention_mask, P: int):
    """The critic's V(x, y_<t) for each response token t: its scalar head at position P - 1 + t, the state in
    which y_t is chosen -> (B, N) float32."""
    return critic(input_ids, attention_mask=attention_mask, per_token=True)[:, P - 1:-1].float()


@torch.no_grad()
def rollout_forwards(batch: dict, policy, ref, critic, *, micro_batch_size: int, temperature: float,
                     vocab_size: int, pad_id: int, amp) -> dict:
    """Adds to this rank's rollouts (B, N): "logprobs" (the policy's, recomputed by the trainer), "ref_logprobs",
    "values" and "entropy", 0 outside the response mask. Every model sees the same collated micro-batch, so the
    policy and the reference agree exactly while their weights do."""
    out = {k: [] for k in ("logprobs", "ref_logprobs", "values", "entropy")}
    for mb in _micro(batch, micro_batch_size):
        ids, attn, P = collate(mb["prompt"], mb["tokens"], mb["mask"], pad_id)
        with amp:
            logps, entropy = response_logprobs(policy, ids, attn, P, temperature, vocab_size, with_entropy=True)
            out["logprobs"].append(logps)
            out["entropy"].append(entropy)
            out["ref_logprobs"].append(response_logprobs(ref, ids, attn, P, temperature, vocab_size))
            out["values"].append(response_values(critic, ids, attn, P))
    width, mask = batch["tokens"].shape[1], batch["mask"].bool()
    for key, parts in out.items():
        batch[key] = torch.where(mask, torch.cat([_pad_right(t, width, 0.0) for t in parts]), 0.0)
    return batch


@torch.no_grad()
def reward_model_scores(batch: dict, reward_model, *, micro_batch_size: int, pad_id: int, amp) -> torch.Tensor:
    """The reward model's score of prompt + response (B,), read at the last real token: the stop token."""
    scores = []
    for mb in _micro(batch, micro_batch_size):
        ids, attn, _ = collate(mb["prompt"], mb["tokens"], mb["mask"], pad_id)
        with amp:
            scores.append(reward_model(ids, attention_mask=attn).float())
    return torch.cat(scores)


def _micro(batch: dict, size: int):
    n = len(batch["prompt"])
    for start in range(0, n, size):
        yield select_rows(batch, range(start, min(start + size, n)))


def text_scores(reward: str, prompts: list[dict], responses: list[str], *, encoder=None, max_new_tokens: int,
                seed: int, step: int, index: list[int]) -> torch.Tensor:
    """Scores of decoded responses (B,) from a reward that reads text: the tiny world's oracle, or R3 and its
    ablations (the response cut at the first stop string inside r3_reward). prompts are the data rows (raw
    "prompt", and "qtype"/"reference" for R3). r3_random_qtype draws each row's query type from a generator of
    (seed, step, row index), so it too is the same for any number of ranks."""
    if reward == "oracle":  # judged as the held-out evaluation judges an answer: stripped (evaluate.sample_answers)
        return torch.tensor([world.quality(p["prompt"], y.strip()) for p, y in zip(prompts, responses)],
                            dtype=torch.float64)
    qtypes, variant = [p.get("qtype") for p in prompts], reward
    if reward == "r3_random_qtype":  # R3 with the query type drawn at random instead of read from the data
        qtypes = [random.Random(train.derived_seed("qtype", seed, step, i)).choice(("OPENENDED", "CONSTRAINED"))
                  for i in index]
        variant = "r3"
    return r3_reward(encoder, [p["prompt"] for p in prompts], [p.get("reference") for p in prompts], responses,
                     qtypes if variant == "r3" else None, max_new_tokens, variant=variant)


def score_rollouts(batch: dict, reward: str, rows: list[dict], *, tok, reward_model=None, encoder=None,
                   micro_batch_size: int, max_new_tokens: int, seed: int, step: int, amp) -> torch.Tensor:
    """This rank's rollouts scored by the source --reward names (B,): "rm", the reward model on the token ids
    (reward_model_scores); any other, a reward that reads the decoded answer, the stop token dropped
    (text_scores). rows: the data rows of the step's prompt list, which batch["index"] points into. The text is
    passed on unstripped: R3 cuts it at the first stop string BEFORE anything else, and "\n\nHuman:" stripped to
    "Human:" would no longer be one (an answer that opens a new turn would be paid for the turn)."""
    if reward == "rm":
        return reward_model_scores(batch, reward_model, micro_batch_size=micro_batch_size, pad_id=tok.pad_id, amp=amp)
    mine = batch["index"].tolist()
    answers = [tok.decode(batch["tokens"][j, :int(batch["mask"][j].sum()) - int(batch["stopped"][j])])
               for j in range(len(mine))]
    return text_scores(reward, [rows[i] for i in mine], answers, encoder=encoder, max_new_tokens=max_new_tokens,
                       seed=seed, step=step, index=mine).to(batch["tokens"].device)


def gather_rollouts(batch: dict, d: dist.Dist, pad_id: int) -> dict:
    """The global batch on every rank, rows in the order of the global prompt list (so it is the same batch,
    bit for bit, whatever the number of ranks)."""
    if d.enabled:
        cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch = cat_rows(dist.all_gather_object(cpu, d), pad_id)
        batch = {k: (v.to(d.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return select_rows(batch, torch.argsort(batch["index"]).cpu())


# --- advantages

@torch.no_grad()
def advantages(batch: dict, scores, kl_coef: float, gamma: float, lam: float) -> dict:
    """Per-token rewards r_t = -kl_coef (logp_t - logp_ref_t) (+ the score at the last response token), GAE
    advantages whitened over all valid tokens of the batch, and the returns (targets of the value loss, fixed
    before any update). Adds "advantages", "returns" (B, N) and returns the statistics to log."""
    mask = batch["mask"].bool()
    rewards, kl = ppo_rewards(batch["logprobs"], batch["ref_logprobs"], mask, scores, kl_coef)
    adv, returns = gae(rewards, batch["values"], mask, gamma, lam)
    # whitening divides by the batch's standard deviation, which one response token alone (a single rollout that
    # ended at once) does not have; that lone advantage, centred, is 0
    batch["advantages"] = whiten(adv, mask) if int(mask.sum()) > 1 else torch.zeros_like(adv)
    batch["returns"] = returns
    return {"kl": kl.sum(-1).mean().item(), "advantages_mean": masked_mean(adv, mask).item(),
            "returns_mean": masked_mean(returns, mask).item(), "rewards_mean": rewards.sum(-1).mean().item(),
            "explained_variance": _explained_variance(batch["values"], returns, mask)}


def _explained_variance(values, returns, mask) -> float:
    try:
        return explained_variance(values, returns, mask).item()
    except ValueError:  # fewer than 2 response tokens in the whole batch
        return float("nan")


# --- the update

STAT_NAMES = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac")


def minibatch_loss(mb: dict, policy, critic, *, update_policy: bool, temperature: float, vocab_size: int,
                   pad_id: int, cliprange: float, cliprange_value: float, vf_coef: float, amp):
    """(loss SUM over the micro-batch's valid tokens, per-token stat sums (len(STAT_NAMES),)).

    The losses are token means (losses.ppo_policy_loss / ppo_value_loss); mean * count is the sum, which the
    caller divides by the minibatch's global token count. policy_loss + vf_coef * value_loss: with a separate
    critic and its own optimizer vf_coef only scales the critic's gradient (under AdamW that matters through
    gradient clipping alone)."""
    ids, attn, P = collate(mb["prompt"], mb["tokens"], mb["mask"], pad_id)
    mask = mb["mask"].bool()
    n = mask.sum()
    with amp:
        values = response_values(critic, ids, attn, P)
        logps = response_logprobs(policy, ids, attn, P, temperature, vocab_size) if update_policy else None
    value_loss, vstats = ppo_value_loss(values, mb["values"], mb["returns"], mask, cliprange_value)
    loss = vf_coef * value_loss * n
    zero = torch.zeros((), device=n.device)
    pstats = {"clipfrac": zero, "approx_kl": zero, "ratio": zero}
    policy_loss = zero
    if update_policy:
        policy_loss, pstats = ppo_policy_loss(logps, mb["logprobs"], mb["advantages"], mask, cliprange)
        loss = loss + policy_loss * n
    stats = torch.stack([policy_loss.detach(), value_loss.detach(), pstats["clipfrac"], pstats["approx_kl"],
                         pstats["ratio"], vstats["vf_clipfrac"]]).float() * n
    return loss, stats


def update(batch: dict, policy, critic, policy_opt, critic_opt, *, step: int, seed: int, ppo_epochs: int,
           mini_batch_size: int, micro_batch_size: int, update_policy: bool, grad_clip: float, d: dist.Dist,
           penalty_fn=None, **loss_kwargs) -> dict:
    """ppo_epochs passes over the global batch in shuffled minibatches (the order a pure function of (seed, step,
    epoch)), one optimizer step of each model per minibatch. Every rank holds the whole batch and trains on its
    share of each minibatch; update_policy=False (the value warm-up) trains the critic alone. penalty_fn: a Hbat
    stage's EWC penalty on the policy, backpropagated once before each policy step (hbat.step_penalty).
    Returns the token-weighted means of STAT_NAMES over every minibatch (the critic's alone with update_policy=False)
    and "penalty", the mean penalty."""
    R = len(batch["prompt"])
    totals = torch.zeros(len(STAT_NAMES) + 1, device=d.device)  # stat sums and the token count
    penalties = []
    models = [policy, critic] if update_policy else [critic]
    for epoch in range(ppo_epochs):
        order = minibatch_order(R, seed, step, epoch)
        for k in range(0, R, mini_batch_size):
            rows = order[k:k + mini_batch_size]
            n_tokens = batch["mask"][rows.to(batch["mask"].device)].sum().float()  # over all ranks: all hold it
            sums = torch.zeros(len(STAT_NAMES), device=d.device)

            def loss_fn(micro_rows):
                nonlocal sums
                loss, stats = minibatch_loss(select_rows(batch, micro_rows), policy, critic,
                                             update_policy=update_policy, **loss_kwargs)
                sums = sums + stats
                return loss

            mine = train.rank_share(rows.tolist(), d)
            penalty = hbat.step_penalty(penalty_fn if update_policy else None)
            train.accumulate_gradients(models, train.micro_batches(mine, micro_batch_size), loss_fn, n_tokens, d)
            sums = dist.all_reduce_sum(sums, d)
            means = (sums / n_tokens).tolist()
            if update_policy:
                train.optimizer_step(policy, policy_opt, step=step + 1, loss=means[0] + (penalty or 0.0),
                                     grad_clip=grad_clip, d=d, what="policy")
            if penalty is not None:
                penalties.append(penalty)
            train.optimizer_step(critic, critic_opt, step=step + 1, loss=means[1], grad_clip=grad_clip, d=d,
                                 what="critic")
            totals += torch.cat([sums, n_tokens[None]])
    out = {name: (totals[i] / totals[-1]).item() for i, name in enumerate(STAT_NAMES)
           # the value warm-up has no policy statistics: zeros would log a ratio of 0, a collapsed policy
           if update_policy or name in ("value_loss", "vf_clipfrac")}
    return {**out, "penalty": sum(penalties) / len(penalties)} if penalties else out


# --- what a step logs, and what a resumed run restores

def step_metrics(batch: dict, adv_stats: dict, update_stats: dict, kl_coef: float) -> dict:
    """A step's metrics (docs/methods.md "## 3. PPO"), from the gathered batch after the update:
    objective/kl (nats per answer, what the adaptive coefficient targets), objective/kl_coef (the beta the step's
    rewards used), objective/scores (the raw scores' mean, before normalisation and the missing-EOS penalty),
    objective/entropy (per response token), ppo/<update stats>, ppo/explained_variance, ppo/logprob_gap (the
    largest |sampler - trainer| log-prob of a response token: float noise, unless the two disagree on the
    distribution), ppo/response_length, ppo/eos_fraction, ppo/advantages_mean and ppo/returns_mean."""
    mask = batch["mask"].bool()
    gap = torch.where(mask, (batch["sampler_logprobs"] - batch["logprobs"]).abs(), 0.0).max().item()
    return {"objective/kl": adv_stats["kl"], "objective/kl_coef": kl_coef,
            "objective/scores": batch["scores"].float().mean().item(),
            "objective/entropy": masked_mean(batch["entropy"], mask).item(),
            **{f"ppo/{k}": v for k, v in update_stats.items()},
            "ppo/explained_variance": adv_stats["explained_variance"], "ppo/logprob_gap": gap,
            "ppo/response_length": mask.sum(-1).float().mean().item(),
            "ppo/eos_fraction": batch["stopped"].float().mean().item(),
            "ppo/advantages_mean": adv_stats["advantages_mean"], "ppo/returns_mean": adv_stats["returns_mean"]}


def run_state(kl_ctl, stats: RunningMoments) -> dict:
    """What a PPO run carries from step to step besides the models: the KL controller and the score statistics
    (saved as a checkpoint's extra state)."""
    return {"kl_ctl": kl_ctl.state_dict(), "score_stats": stats.state_dict()}


def restore_run_state(state: dict | None, kl_ctl, stats: RunningMoments, path) -> None:
    """Load run_state's parts from a checkpoint's train state (None: a fresh run, nothing to do); a train state
    without them (path: where it was read) is not a PPO run's."""
    if state is None:
        return
    if missing := [k for k in ("kl_ctl", "score_stats") if k not in state["extra"]]:
        raise InputError(f"--resume: {path} holds no {' and no '.join(missing)} (not a PPO run's)")
    kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
    stats.load_state_dict(state["extra"]["score_stats"])


def save_results(run_dir, last: dict | None, log_path, wall_s: float) -> Path | None:
    """A finished run's final numbers, run_dir/eval.json: the last step's eval/ and objective/ metrics, and the wall
    time. last: the run's last record, None when --stop_at ended it (nothing written), {} when a resume found
    nothing left to train (written only if missing, a run killed before writing it, from its metrics log and
    without a wall time). Returns the path written, or None."""
    finished_before = last == {}
    if finished_before and not (Path(run_dir) / "eval.json").exists():
        from .report import load_metrics  # the metrics reader, here only

        last = (load_metrics(log_path) or [{}])[-1]
    if not last:
        return None
    result = {k: v for k, v in last.items() if k.startswith(("eval/", "objective/"))}
    return train.save_eval(run_dir, result if finished_before else result | {"wall_s": round(wall_s, 1)})


# --- prompts and held-out evaluation

def prompt_keys(reward: str, row) -> tuple[str, ...]:
    """The keys of a prompt row that the reward reads, each required (and checked) when the prompts are read: R3
    branches on "qtype" and reads the "reference" of a closed-ended row only; r3_random_qtype draws the query type
    instead of reading it, so any row may be closed-ended and needs its reference; the other ablations and the
    oracle read the prompt alone."""
    if reward == "r3":
        return ("prompt", "qtype", *(("reference",) if isinstance(row, dict) and row.get("qtype") == CLOSED else ()))
    return ("prompt", "reference") if reward == "r3_random_qtype" else ("prompt",)


def load_prompts(data: str, eval_data: str, eval_prompts: int, reward: str) -> tuple[list[dict], list[dict]]:
    """PPO's prompts (.jsonl rows, each with the keys the reward reads: prompt_keys) and the first eval_prompts
    held-out ones ("" for none). The oracle reward, and the held-out evaluation, judge only tiny-world prompts."""
    rows = read_jsonl(data, required=lambda row: prompt_keys(reward, row))
    if not rows:
        raise InputError(f"--data={data}: no prompts")
    if reward == "oracle" and not all(world.is_world_prompt(r["prompt"]) for r in rows):
        raise InputError(f"--reward=oracle judges only tiny-world prompts; {data} has others")
    eval_rows = read_jsonl(eval_data, required=("prompt",))[:eval_prompts] if eval_data else []
    if not all(world.is_world_prompt(r["prompt"]) for r in eval_rows):
        raise InputError(f"--eval_data={eval_data}: the oracle judges only tiny-world prompts (pass --eval_data=)")
    return rows, eval_rows


def relevance_encoder(reward: str, relevance_model: str, device):
    """The sentence encoder of the rewards that measure relevance (R3 and its ablations but "length"), loaded
    from relevance_model (nanoalign.encoder); None for the others."""
    if reward not in TEXT_REWARDS or reward in ("oracle", "length"):
        return None
    from .encoder import Encoder  # only these rewards need it
    try:
        return Encoder.from_pretrained(relevance_model, device=device)
    except (ValueError, KeyError, OSError, ImportError) as e:  # ImportError: the packaged MiniLM is not installed
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise InputError(f"--relevance_model={relevance_model}: {message}") from None


def encode_prompts(tok, rows: list[dict], template: str, max_prompt_len: int) -> list[list[int]]:
    """Each row's prompt in the template; a longer one keeps its end (the question), and its BOS."""
    out = []
    for r in rows:
        ids = encode_prompt(tok, r["prompt"], template)
        if len(ids) > max_prompt_len:
            bos = ids[:1] if tok.add_bos else []
            ids = bos + ids[len(ids) - (max_prompt_len - len(bos)):]
        out.append(ids)
    return out


@torch.no_grad()
def held_out_quality(policy, tok, rows: list[dict], *, template: str, max_new_tokens: int, batch_size: int,
                     d: dist.Dist, reward_model=None) -> tuple[dict, list[tuple[str, str]]]:
    """Greedy answers to held-out tiny-world prompts (each rank answers its share), judged by the oracle:
    eval/mean_quality, eval/closed_accuracy, and two signs of reward hacking, eval/copy_rate (answers that copy
    the prompt) and eval/mean_words. With a reward model, eval/reward: its mean score of the same answers, what
    PPO maximises, on prompts that do not change from one evaluation to the next (the training batches' mean
    score moves with their mix of prompts). Returns the metrics and rank 0's (prompt, answer) pairs."""
    mine = train.rank_share(rows, d)
    with gathered_for_generation(policy, d):
        answers = sample_answers(policy, tok, [r["prompt"] for r in mine], template, max_new_tokens,
                                 temperature=0.0, batch_size=batch_size)
    reward = 0.0
    if reward_model is not None:  # every rank gathers (a collective), one with no prompts of its own too
        with gathered_for_generation(reward_model, d):  # ranks may run different numbers of batches
            if mine:
                reward = sum(reward_judge(reward_model, tok, template, batch_size)([r["prompt"] for r in mine],
                                                                                   answers))
    m = evaluate_answers(mine, answers) if mine else {"n": 0, "n_closed": 0}
    n, n_closed = m["n"], m["n_closed"]
    sums = torch.tensor([n, n_closed, n * (m.get("mean_quality") or 0), n_closed * (m.get("closed_accuracy") or 0),
                         n * m.get("copy_rate", 0), n * m.get("mean_words", 0), reward], dtype=torch.float64)
    n, n_closed, quality, correct, copies, words, reward = dist.all_reduce_sum(sums.to(d.device), d).tolist()
    metrics = {"eval/mean_quality": quality / max(n, 1), "eval/closed_accuracy": correct / max(n_closed, 1),
               "eval/copy_rate": copies / max(n, 1), "eval/mean_words": words / max(n, 1)}
    if reward_model is not None:
        metrics["eval/reward"] = reward / max(n, 1)
    return metrics, [(r["prompt"], a) for r, a in zip(mine, answers)]
