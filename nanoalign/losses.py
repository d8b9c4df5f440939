"""The alignment losses as small pure functions: log-probs, reward model, DPO, PPO (GAE, clipped losses, KL).

    token_logprobs / sequence_logps      every stage's log-probabilities (DPO, RM, PPO, REAL)
    bt_loss                              reward model, Bradley-Terry            (docs/methods.md "## 2. Reward model")
    ppo_rewards, gae, whiten,            PPO: reward assembly, advantages,      (docs/methods.md "## 3. PPO")
    ppo_policy_loss, ppo_value_loss,     clipped losses, adaptive KL coefficient
    AdaptiveKLController
    dpo_loss                             DPO, cDPO, IPO                         (docs/methods.md "## 4. DPO")

Shapes: B sequences, T tokens, V vocabulary. A "mask" is 1 on the tokens that count and 0 elsewhere; every
mean over tokens is a masked mean over all valid tokens of the batch, never over a row first.

Gotchas pinned by tests/test_losses.py:
- Shift: logits at position t predict token t + 1, so token_logprobs is (B, T - 1) and a (B, T) response mask
  must be shifted with shift_mask before it is applied to it (off by one drops the first response token).
- PPO's log-probs must come from logits / temperature with the sampler's masks and positions; otherwise the
  first PPO ratio is not 1 and the measured KL goes negative.
- Values at masked-out entries (pads, tokens after EOS) may be garbage, even inf: every function selects
  with torch.where instead of multiplying by the mask, so garbage never leaks in as NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# --- log-probabilities


def logprobs_from_logits(logits, labels, temperature: float = 1.0):
    """logits (B, T, V), labels (B, T) -> log softmax(logits / temperature)[labels], float32 (B, T).

    Gathers the label's logit and subtracts the logsumexp, so no (B, T, V) log-softmax copy is kept."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return chosen - torch.logsumexp(logits, dim=-1)


def token_logprobs(model, input_ids, attention_mask=None, temperature: float = 1.0):
    """input_ids (B, T) -> (B, T - 1) with entry [b, t] = log p(input_ids[b, t + 1] | input_ids[b, :t + 1]).

    Computed from logits / temperature, the distribution the sampler draws from (nanoalign/generate.py).
    Positions count real tokens only (cumsum(mask) - 1) and pads are hidden, so a left-padded row gets the same
    log-probs as the row alone. Entries whose target is a pad are finite garbage: mask them out."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    positions = None
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions)  # (B, T, V)
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature)


def shift_mask(mask):
    """A (B, T) mask over tokens -> the (B, T - 1) mask over token_logprobs' entries (entry t scores token t + 1)."""
    return mask[:, 1:]


def sequence_logps(token_logps, mask, average: bool = False):
    """token_logps (B, T - 1), mask (B, T - 1) (shift_mask of the response mask) -> (B,).

    log p(y | x) = sum over the response tokens; average=True divides by the number of response tokens
    (IPO and other length-normalised losses). A row with no response token gives 0."""
    mask = mask.bool()
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def entropy_from_logits(logits):
    """logits (B, T, V) -> entropy of softmax(logits), float32 (B, T): H = logsumexp(l) - sum_v p_v l_v.

    Divide the logits by the sampling temperature first to get the entropy of the sampled distribution."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(-1) * logits).sum(-1)


# --- masked statistics


def masked_mean(x, mask, dim=None):
    """Mean of x over the entries where mask is 1 (over everything when dim is None, else along dim).

    An empty mask gives 0, not NaN: a micro-batch without a valid token must not poison the step."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask, unbiased: bool = True):
    """Variance of x over all entries where mask is 1, Bessel-corrected (n - 1) when unbiased.

    Raises ValueError with fewer than 2 valid entries (1 when biased): one value has no spread, and a silent
    variance of 0 would turn whitening into a multiplication by 1 / sqrt(1e-8) = 1e4."""
    mask = mask.bool()
    n = int(mask.sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, the mask has {n}")
    centered = torch.where(mask, x - masked_mean(x, mask), 0.0)
    return centered.pow(2).sum() / (n - 1 if unbiased else n)


def whiten(x, mask, shift_mean: bool = True):
    """x' = (x - mean) / sqrt(var + 1e-8) with the masked mean and unbiased masked variance of the whole batch.

    shift_mean=False adds the mean back (only the scale changes; used for rewards). Entries outside the mask are
    set to 0. Fewer than 2 valid entries raise ValueError (see masked_var)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0.0)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the valid tokens, a scalar tensor: 1 is a perfect critic, 0 is no better than
    predicting the mean return, negative is worse. NaN or inf when the returns have no spread."""
    with torch.no_grad():
        return 1 - masked_var(returns - values, mask) / masked_var(returns, mask)


# --- reward model


def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry pairwise loss (InstructGPT, Ouyang et al. 2022), rewards (B,) -> (loss, accuracy) scalars.

    loss = mean_b -log sigmoid(r_w - r_l);  accuracy = mean_b [r_w > r_l], a tie counts as wrong."""
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    accuracy = (chosen_rewards > rejected_rewards).float().mean().detach()
    return loss, accuracy


# --- DPO


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Sequence log-probs (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,).

    h = (logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l)), the policy's margin over the reference.
      sigmoid  DPO (Rafailov et al. 2023):  L = -log sigmoid(beta h)
               cDPO (Mitchell 2023), label_smoothing eps in (0, 0.5], the label is flipped with probability eps:
               L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo      IPO (Azar et al. 2023):  L = (h - 1 / (2 beta))^2, a squared loss that stops pushing once the
               margin reaches 1 / (2 beta). Pass length-averaged log-probs (sequence_logps(average=True)).
    Implicit rewards r = beta (logp - logp_ref), detached, for logging. Both rewards (and both log-probs) often
    fall during training; only the margin has to rise.
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing > 0:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only (cDPO), not to 'ipo'")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid()): stays finite for margins of any size
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --- PPO


@torch.no_grad()
def ppo_rewards(logprobs, ref_logprobs, mask, scores, kl_coef: float):
    """Per-token PPO rewards (Ziegler et al. 2019; InstructGPT): (B, T) log-probs of the response tokens under the
    rollout policy and the reference, mask (B, T), scores (B,) -> (rewards (B, T), kl (B, T)).

    kl_t = logp_t - logp_ref_t on response tokens, 0 elsewhere (so 0 after EOS);
    r_t  = -kl_coef * kl_t, plus the sequence score at the row's last response token (its EOS, or the last token
    when the length cap cut it). kl.sum(-1) is each sequence's sampled KL, the quantity the KL controller tracks."""
    mask = mask.bool()
    kl = torch.where(mask, logprobs - ref_logprobs, 0.0)
    rewards = -kl_coef * kl
    T = mask.shape[1]
    # index of the last valid token: argmax of (position + 1) over the valid entries
    last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(-1)  # (B,)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


@torch.no_grad()
def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016), (B, T) tensors -> (advantages, returns), (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_k (gamma lam)^k delta_{t+k},  returns R_t = A_t + V_t.
    mask marks the response tokens, right-padded (1...1 0...0 per row); the value after the last response token
    is 0 (the episode ends there). Zero outside the mask; no gradient flows (the targets are fixed)."""
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, torch.where(mask, advantages + values, 0.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """Clipped surrogate (Schulman et al. 2017), (B, T) tensors -> (loss, stats).

    rho = exp(logp - logp_old);  loss = masked mean over all valid tokens of max(-A rho, -A clip(rho, 1-eps, 1+eps)).
    stats (detached scalar tensors): clipfrac, the fraction of valid tokens where the clipped term is the larger
    one (their gradient is 0); approx_kl, the masked mean of 1/2 (logp - logp_old)^2 (the "k2" estimator of
    KL(old || new)); ratio, the mean of rho."""
    mask = mask.bool()
    # a garbage log-prob at a pad must not become exp(inf) and then a NaN gradient
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss (as in the PPO baselines), (B, T) tensors -> (loss, stats).

    V_clip = V_old + clip(V - V_old, -eps, eps);  loss = 1/2 masked mean of max((V - R)^2, (V_clip - R)^2).
    The returns R and V_old come from the rollout, before any update. stats: vf_clipfrac (fraction of valid
    tokens where the clipped term is the larger one), detached."""
    mask = mask.bool()
    # masked entries are selected away BEFORE the arithmetic: (V - inf)^2 selected out by masked_mean still sends
    # 0 * inf = NaN back to V
    values, old_values, returns = (torch.where(mask, x, 0.0) for x in (values, old_values, returns))
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns).pow(2)
    clipped = (values_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


class AdaptiveKLController:
    """The KL coefficient beta of the PPO reward, adapted toward a target KL (Ziegler et al. 2019):

        e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + e n_steps / horizon)

    KL is the measured KL of the batch (mean over rollouts of kl.sum(-1) from ppo_rewards), n_steps the number of
    rollouts that batch held. target=None turns the controller off: beta stays at init_kl_coef (a fixed
    coefficient is the same object). Call update once per PPO step."""

    def __init__(self, init_kl_coef: float = 0.2, target: float | None = 6.0, horizon: int = 10000):
        if target is not None and target <= 0:
            raise ValueError(f"target must be > 0 or None (fixed coefficient), got {target}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict):
        self.value, self.target, self.horizon = float(state["value"]), state["target"], state["horizon"]
