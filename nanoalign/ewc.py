"""Hbat's modified EWC, and the two baselines shipped beside it: Fisher EWC and Hbat-Freeze.

Hbat (hybrid alignment training, docs/methods.md "## 5. Hbat") alternates SFT and preference stages,
SFT_1, Pref_1, SFT_2, Pref_2, ..., and in each stage holds on to the tensors that the latest stages of the
*other* kind changed the most. A parameter unit u is one named tensor (a key of model.named_parameters()):

    s_u   = mean_k (c · Δ_{u,k})²     Δ = θ after − θ before one stage of the other kind, c = 1e10
    S_u   = Σ s_u over every earlier stage of the other kind (no decay)
    Ω_u   = λ_max · softmax_u(S_u / T)                               λ_max = 100, T = 1
    L_EWC = Σ_u Ω_u Σ_k (λ (θ_{u,k} − θ*_{u,k}))²    θ* = the weights at the start of this stage, λ = 1

Baselines: Fisher EWC (Kirkpatrick et al. 2017), Σ_k (λ_max/2) F_k (θ_k − θ*_k)² with F the diagonal
Fisher of the previous stage's data; and Hbat-Freeze, requires_grad=False on the top 20% of tensors by S.

Gotchas:
- S_u is about 1e20·Δ², so at T = 1 (the authors' setting, our default) the softmax is one-hot: only the
  most changed tensor is anchored. Log omega_entropy (0 nats: one-hot, log n: uniform); a T near max S
  spreads Ω. The softmax runs in float64, with the max subtracted before the division by T.
- FSDP2 (nanoalign.dist.shard): parameters are DTensors and each rank holds one shard. Every per-tensor
  sum is all-reduced, so all ranks get the same scores and Ω, and penalty values are global. Call these
  functions between optimizer steps, never between a forward and its backward (FSDP then swaps some
  parameters for their gathered copies), and on every rank (they hold collectives). They reshard the model
  first: after a forward without gradients (an evaluation, PPO's rollout forwards) FSDP2 keeps the root
  module's parameters (embedding, final norm, head) gathered, plain tensors beside the sharded anchors.
- The penalty is computed on each rank's own shard and its gradient never goes through FSDP's gradient
  averaging, so, unlike the task loss, it is NOT multiplied by world_size: backpropagate
  `task_loss * world_size + penalty`, once per optimizer step (see ewc_penalty).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support: nothing is ever sharded
    DTensor = ()


def _local(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (differentiable), or the tensor itself."""
    return x.to_local() if isinstance(x, DTensor) else x


def _sum_over_ranks(x: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Per-rank partial sums of sharded tensors -> the global sums (a no-op for unsharded tensors, which every
    rank holds whole)."""
    if sharded:
        x = x.clone()
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x


def _resharded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every FSDP2 module's parameters back in their shards (a no-op without FSDP)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return model
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters, sharded ones staying sharded: the anchor θ*, or a before/after state."""
    return {name: p.detach().clone() for name, p in _resharded(model).named_parameters()}


def delta_scores(before: dict, after: dict, c: float = 1e10) -> dict[str, float]:
    """s_u = mean_k (c · (after_u − before_u)_k)², one float per unit. The sums run in float64 (bf16 weights
    differ in their last bits, and the values reach 1e20·Δ²); for DTensors the sum of squares of each shard is
    all-reduced and divided by the global numel, in one collective for all units."""
    names = list(before)  # named_parameters order: the same on every rank
    sums = torch.stack([(c * (_local(after[n]).double() - _local(before[n]).double())).square().sum() for n in names])
    sums = _sum_over_ranks(sums, any(isinstance(t, DTensor) for t in before.values())).tolist()
    return {n: s / before[n].numel() for n, s in zip(names, sums)}  # DTensor.numel() is the global size


def accumulate(total: dict | None, scores: dict) -> dict[str, float]:
    """S_u = S_u + s_u: the running sum over the stages of the other kind (Hbat uses no decay)."""
    total = dict(total or {})
    for name, s in scores.items():
        total[name] = total.get(name, 0.0) + s
    return total


def importance(scores: dict, lambda_max: float = 100.0, temperature: float = 1.0) -> dict[str, float]:
    """Ω_u = λ_max · softmax_u(S_u / T), so Σ_u Ω_u = λ_max."""
    names = list(scores)
    s = torch.tensor([scores[n] for n in names], dtype=torch.float64)
    # the scores are ~1e20: exp would overflow without the shift, which leaves the softmax unchanged. Shifted
    # BEFORE dividing: S / T overflows to inf for a tiny T (inf - inf = NaN), while (S - max S) / T is 0 for the
    # largest and at worst -inf for the others, so Ω stays one-hot as T -> 0
    e = ((s - s.max()) / temperature).exp()
    return {n: w for n, w in zip(names, (lambda_max * e / e.sum()).tolist())}


def omega_entropy(omega: dict) -> float:
    """Entropy (nats) of Ω / λ_max: 0 when one tensor takes all the weight, log(n units) when spread evenly."""
    p = torch.tensor(list(omega.values()), dtype=torch.float64)
    return torch.special.entr(p / p.sum()).sum().item()  # entr(x) = −x log x, and 0 at x = 0


def _weighted_sq_distance(model: torch.nn.Module, anchor: dict, weights: dict) -> torch.Tensor:
    """Σ_u Σ_k w_{u,k} (θ_{u,k} − θ*_{u,k})² over the units in `weights` (a number or a tensor per unit).
    The value is the sum over all ranks; the gradient is that of this rank's shards alone."""
    local, sharded = None, False
    for name, p in _resharded(model).named_parameters():
        w = weights.get(name)
        if w is None or (not torch.is_tensor(w) and w == 0):
            continue
        if isinstance(p, DTensor) != isinstance(anchor[name], DTensor):
            raise RuntimeError(f"{name}: the parameter and its anchor are not sharded alike; take the anchor with "
                               "snapshot(model) after sharding, and call the penalty outside forward/backward")
        sharded |= isinstance(p, DTensor)
        term = (_local(w) * (_local(p).float() - _local(anchor[name]).float()).square()).sum()
        local = term if local is None else local + term
    if local is None:
        return torch.zeros((), device=next(model.parameters()).device)
    # value: the global sum, for logging; gradient: d(local)/dθ, exact on this rank's shard
    return local + (_sum_over_ranks(local.detach(), sharded) - local.detach())


def ewc_penalty(model: torch.nn.Module, anchor: dict, omega: dict, lam: float = 1.0) -> torch.Tensor:
    """L_EWC = Σ_u Ω_u Σ_k (λ (θ_{u,k} − θ*_{u,k}))², a scalar; ∂L/∂θ_u = 2 Ω_u λ² (θ_u − θ*_u).

    anchor: snapshot(model) at the start of the stage. Units absent from omega or with Ω_u = 0 add nothing.
    Frozen tensors (requires_grad=False) keep their term in the value (zero when they were frozen since the
    anchor was taken) and get no gradient.

    Under FSDP each rank differentiates only its own shard's terms, and the gradient lands directly in the
    sharded parameter's .grad: it is exact there and not averaged over ranks. So backpropagate the penalty
    with weight 1 (`task_loss * world_size + penalty`); multiplied by world_size like the task loss, it would
    pull world_size times too hard. The value (.item()) is the global L_EWC on every rank."""
    return _weighted_sq_distance(model, anchor, {n: om * lam**2 for n, om in omega.items()})


def fisher_penalty(model: torch.nn.Module, anchor: dict, fisher: dict, lambda_max: float = 100.0) -> torch.Tensor:
    """Original EWC (Kirkpatrick et al. 2017): Σ_k (λ_max/2) F_k (θ_k − θ*_k)². The same FSDP contract as
    ewc_penalty: backpropagate it unscaled."""
    return _weighted_sq_distance(model, anchor, {n: (lambda_max / 2) * f for n, f in fisher.items()})


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        return next(_batch_size(v) for v in batch.values() if torch.is_tensor(v) or isinstance(v, dict))
    return batch.shape[0]


def _example(batch, i: int):
    """Example i as a batch of one, from a tensor or a dict of tensors whose first dim is the batch."""
    if isinstance(batch, dict):
        return {k: _example(v, i) for k, v in batch.items()}
    return batch[i : i + 1] if torch.is_tensor(batch) else batch


def fisher_diagonal(model: torch.nn.Module, batches, logprob_fn) -> dict[str, torch.Tensor]:
    """Diagonal Fisher (Kirkpatrick et al. 2017): F_k = mean over examples of (∂ log π_θ(y|x) / ∂θ_k)².

    batches: an iterable of batches (a tensor or a dict of tensors, batch first); logprob_fn(model, batch)
    -> (B,) sequence log-likelihoods. The per-example gradients come from one forward and backward per
    example (a batch of one), so the cost is N forward/backward passes for N examples: use a sample of the
    previous stage's data. Clears every .grad. Returns float32 tensors shaped (and sharded) like the params.
    (The Hbat authors' Fisher baseline sums the unsquared gradients: that is a mean gradient, not a Fisher.)

    Under FSDP every rank must pass the SAME batches: FSDP averages the ranks' gradients, and the average of
    identical per-example gradients is that gradient exactly, which each rank then squares on its own shard.
    (Different examples per rank would square an average of gradients, not average the squares.) The result
    equals the one-process Fisher over those examples."""
    params = dict(_resharded(model).named_parameters())
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_examples = 0
    for batch in batches:
        for i in range(_batch_size(batch)):
            model.zero_grad(set_to_none=True)
            logprob_fn(model, _example(batch, i)).sum().backward()
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:  # frozen tensors get F = 0
                        fisher[n] += p.grad.float().square()
            n_examples += 1
    model.zero_grad(set_to_none=True)
    return {n: f / max(n_examples, 1) for n, f in fisher.items()}


def freeze_top(model: torch.nn.Module, scores: dict, fraction: float = 0.2) -> list[str]:
    """Hbat-Freeze: requires_grad=False on the ceil(fraction · n_units) units with the highest score (at least
    one when fraction > 0; ties keep the order of `scores`). Returns their names, highest first."""
    k = math.ceil(round(fraction * len(scores), 9))  # round: 0.1 * 30 is 3.0000000000000004 in floating point
    top = sorted(scores, key=lambda n: -scores[n])[:k]
    params = dict(_resharded(model).named_parameters())
    for name in top:
        params[name].requires_grad_(False)
        params[name].grad = None  # a stale gradient would still be applied by the optimizer
    return top
