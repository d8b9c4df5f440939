"""nanoalign/losses.py against numbers worked out by hand (in the comments), and log-probs against a naive loop
and the sampler's own log-probs."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanoalign.generate import generate
from nanoalign.losses import (AdaptiveKLController, bt_loss, dpo_loss, entropy_from_logits, explained_variance,
                              gae, masked_mean, masked_var, ppo_policy_loss, ppo_rewards, ppo_value_loss,
                              sequence_logps, shift_mask, token_logprobs, whiten)
from nanoalign.model import ModelConfig, Transformer


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


# --- log-probabilities


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, hidden_dim=64, max_seq_len=64))
    m.init_weights(std=0.3)  # large weights: a wrong shift or position shows in the log-probs (0.02 is ~uniform)
    return m.eval()


def naive_logprobs(model, ids, temperature=1.0):
    # one forward per prefix: entry t is log p(ids[t + 1] | ids[:t + 1])
    out = []
    for t in range(ids.shape[1] - 1):
        logits = model(ids[:, :t + 1])[:, -1] / temperature
        out.append(F.log_softmax(logits, -1).gather(-1, ids[:, t + 1:t + 2]).squeeze(-1))
    return torch.stack(out, 1)


@torch.no_grad()
def test_token_logprobs_equal_a_naive_loop_over_positions(model):
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    lp = token_logprobs(model, ids)
    assert lp.shape == (3, 8) and lp.dtype == torch.float32
    close(lp, naive_logprobs(model, ids))
    # temperature divides the logits before the softmax
    close(token_logprobs(model, ids, torch.ones_like(ids), temperature=0.7), naive_logprobs(model, ids, 0.7))
    assert not torch.allclose(token_logprobs(model, ids, temperature=0.7), lp, atol=1e-3)
    # 0 would divide the logits by zero (greedy sampling has no log-probs), a negative one flip them
    for temperature in (0.0, -0.7):
        with pytest.raises(ValueError, match=f"^temperature must be > 0 for log-probs, got {temperature}$"):
            token_logprobs(model, ids, temperature=temperature)


@torch.no_grad()
def test_token_logprobs_of_a_left_padded_row_equal_the_row_alone(model):
    g = torch.Generator().manual_seed(2)
    long_row, short_row = torch.randint(1, 64, (8,), generator=g), torch.randint(1, 64, (5,), generator=g)
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0], mask[0] = long_row, 1
    ids[1, 3:], mask[1, 3:] = short_row, 1  # 3 pads on the left
    lp = token_logprobs(model, ids, mask)
    close(lp[0], token_logprobs(model, long_row[None])[0])
    # padded entry 3 scores the row's token 1 given token 0: the row alone's entry 0
    close(lp[1, 3:], token_logprobs(model, short_row[None])[0])


@torch.no_grad()
def test_token_logprobs_equal_the_samplers_so_the_first_ppo_ratio_is_one(model):
    prompts = [[5, 9, 11, 3, 7], [4, 2], [8, 8, 1]]
    gen = generate(model, prompts, max_new_tokens=12, stop_ids=range(56, 64), pad_id=0, temperature=0.7,
                   generator=torch.Generator().manual_seed(0))
    P = gen.prompt_ids.shape[1]
    # rows that stopped early (pads after the stop, mid-sequence) and a row cut by the length cap
    assert gen.stopped.tolist() == [True, True, False] and gen.mask.sum() > 12
    lp = token_logprobs(model, gen.sequences, gen.attention_mask, temperature=0.7)[:, P - 1:]  # (B, N)
    valid = gen.mask.bool()
    close(lp[valid], gen.logprobs[valid])
    loss, stats = ppo_policy_loss(lp, gen.logprobs, torch.randn(lp.shape), gen.mask)
    close(stats["ratio"], 1.0)
    close(stats["clipfrac"], 0.0, 0)
    close(stats["approx_kl"], 0.0)


def test_sequence_logps_sum_or_average_the_shifted_response_mask():
    # tokens: p p r r r pad; token_logprobs entry t scores token t + 1
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    lp = t([[-9.0, -1.0, -2.0, -3.0, float("-inf")], [-1.5, -9.0, -7.0, -7.0, -7.0]])
    m = shift_mask(response_mask)
    assert m.tolist() == [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    close(sequence_logps(lp, m), [-6.0, -10.5])  # -1-2-3; -1.5-9 (the -inf under a pad is ignored)
    close(sequence_logps(lp, m, average=True), [-2.0, -5.25])
    close(sequence_logps(lp, torch.zeros_like(m), average=True), [0.0, 0.0])


def test_entropy_from_logits():
    V = 10
    logits = torch.zeros(1, 2, V)
    logits[0, 1, 3] = 100.0
    close(entropy_from_logits(logits), [[math.log(V), 0.0]])
    x = torch.randn(2, 3, V)
    p = x.softmax(-1)
    close(entropy_from_logits(x), -(p * p.log()).sum(-1))


# --- masked statistics


def test_masked_mean_and_var_ignore_padding_and_survive_an_empty_mask():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    close(masked_var(x, mask), 2.5)  # (4 + 1 + 0 + 1 + 4) / (5 - 1)
    close(masked_var(x, mask, unbiased=False), 2.0)
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # not NaN
    # one valid entry: the biased variance is 0 (its spread around itself), the unbiased one is undefined (0 / 0)
    one = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    close(masked_var(x, one, unbiased=False), 0.0, 0)
    with pytest.raises(ValueError, match="^masked_var needs at least 2 valid entries, the mask has 1$"):
        masked_var(x, one)
    with pytest.raises(ValueError, match="^masked_var needs at least 1 valid entries, the mask has 0$"):
        masked_var(x, torch.zeros_like(mask), unbiased=False)


def test_whiten_gives_mean_0_var_1_on_valid_entries_and_ignores_pads():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # mean 3, unbiased var 2.5
    expected = (t([[1.0, 2.0, 3.0, 3.0], [4.0, 5.0, 3.0, 3.0]]) - 3.0) / math.sqrt(2.5 + 1e-8)
    w = whiten(x, mask)
    close(w, expected)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0)
    # padding values change nothing
    x2 = x.clone()
    x2[0, 3], x2[1, 2:] = 1e6, float("inf")
    close(whiten(x2, mask), expected)
    # shift_mean=False keeps the mean: only the scale changes
    close(whiten(x, mask, shift_mean=False), torch.where(mask.bool(), expected + 3.0, 0.0))
    with pytest.raises(ValueError):
        whiten(x, torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]))
    # eps = 1e-8 inside the square root, seen where the variance is as small: 0 and 1e-4 have unbiased variance 5e-9
    # (no eps: +-0.707; eps 1e-5: +-0.016)
    close(whiten(t([[0.0, 1e-4]]), torch.tensor([[1, 1]])), t([[-5e-5, 5e-5]]) / math.sqrt(5e-9 + 1e-8), tol=1e-4)


# --- reward model


def test_bt_loss_and_accuracy_by_hand():
    # margins 1, -1, 0: loss = mean(log(1 + e^-1), log(1 + e), log 2); the tie counts as wrong
    loss, acc = bt_loss(t([2.0, 0.0, 1.0]), t([1.0, 1.0, 1.0]))
    close(loss, (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 3)
    close(acc, 1 / 3)


# --- DPO

# row 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2.5) = -0.5, h = 1.5
# row 1: chosen -5 - (-4) = -1, rejected -1 - (-2) = 1, h = -2
PC, PR, RC, RR = t([-1.0, -5.0]), t([-3.0, -1.0]), t([-2.0, -4.0]), t([-2.5, -2.0])


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_dpo_sigmoid_by_hand():
    pc = PC.clone().requires_grad_()
    losses, rc, rr = dpo_loss(pc, PR, RC, RR, beta=0.1)
    # -log sigmoid(beta h) = log(1 + exp(-beta h)), beta h = 0.15 and -0.2
    close(losses, [softplus(-0.15), softplus(0.2)])
    close(rc, [0.1, -0.1])
    close(rr, [-0.05, 0.1])
    assert not rc.requires_grad and not rr.requires_grad
    # dL/dlogp(y_w) = -beta sigmoid(-beta h)
    losses.sum().backward()
    close(pc.grad, [-0.1 / (1 + math.exp(0.15)), -0.1 / (1 + math.exp(-0.2))])


def test_cdpo_and_ipo_by_hand():
    eps = 0.25
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=eps)
    # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    close(losses, [(1 - eps) * softplus(-0.15) + eps * softplus(0.15),
                   (1 - eps) * softplus(0.2) + eps * softplus(-0.2)])
    # label_smoothing 0.5: the label is a coin flip, the loss is the same for h and -h
    half, _, _ = dpo_loss(t([1.5, -1.5]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=0.1, label_smoothing=0.5)
    close(half, [0.5 * (softplus(-0.15) + softplus(0.15))] * 2)
    # IPO: (h - 1 / (2 beta))^2 with 1 / (2 * 0.1) = 5: (1.5 - 5)^2 = 12.25, (-2 - 5)^2 = 49
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    close(losses, [12.25, 49.0])
    close(rc, [0.1, -0.1])


def test_dpo_is_stable_for_huge_margins_and_checks_its_arguments():
    losses, _, _ = dpo_loss(t([1e4, -1e4]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), beta=1.0)
    close(losses, [0.0, 1e4])
    for kwargs, name in [({"loss_type": "hinge"}, "loss_type"), ({"label_smoothing": 0.6}, "label_smoothing"),
                         ({"label_smoothing": -0.1}, "label_smoothing"), ({"beta": 0.0}, "beta"),
                         ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing")]:  # IPO has no smoothing
        with pytest.raises(ValueError, match=name):
            dpo_loss(PC, PR, RC, RR, **kwargs)


def test_dpo_and_ipo_losses_on_a_random_batch_by_their_equations():
    """Not a call into TRL: TRL 1.16 computes its DPO loss inline in DPOTrainer._compute_loss, after the model forward,
    and importing that module needs accelerate and datasets. This pins the same formulas as written there on a
    random batch: sigmoid -logsigmoid(beta delta), and IPO on each sequence's log-ratio divided by its own length,
    which is what length-averaged log-probs passed to dpo_loss give."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 for _ in range(4))
    beta = 0.3
    delta = (pc - rc) - (pr - rr)
    close(dpo_loss(pc, pr, rc, rr, beta)[0], -F.logsigmoid(beta * delta))
    n_c, n_r = torch.randint(1, 20, (16,), generator=g), torch.randint(1, 20, (16,), generator=g)
    ipo = ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 * beta)) ** 2
    close(dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta, loss_type="ipo")[0], ipo, 1e-4)


# --- PPO


def test_ppo_rewards_put_the_score_on_the_last_response_token():
    logprobs = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    ref = t([[-1.5, -2.0, -2.0], [-2.0, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = ppo_rewards(logprobs, ref, mask, scores=t([10.0, 20.0]), kl_coef=0.1)
    close(kl, [[0.5, 0.0, -1.0], [1.0, -0.5, 0.0]])  # 0 after EOS
    # -0.1 kl, plus the score on the last valid token (row 0: the length cap; row 1: its EOS at index 1)
    close(rewards, [[-0.05, 0.0, 10.1], [-0.1, 20.05, 0.0]])


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8  # gamma lam = 0.72
    rewards = t([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = t([[0.5, 1.0, 1.5], [0.5, 1.0, 77.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: delta_2 = 2 + 0 - 1.5 = 0.5, delta_1 = 0 + 0.9 * 1.5 - 1 = 0.35, delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4
    #        A_2 = 0.5, A_1 = 0.35 + 0.72 * 0.5 = 0.71, A_0 = 1.4 + 0.72 * 0.71 = 1.9112
    # row 1 (last token is index 1, the pad's reward and value are ignored, V after it is 0):
    #        delta_1 = 2 - 1 = 1, delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4; A_1 = 1, A_0 = 1.4 + 0.72 = 2.12
    close(adv, [[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]])
    # gamma = lam = 1: A_t is the reward-to-go minus V_t (Monte Carlo)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    close(ret, [[3.0, 2.0, 2.0], [3.0, 2.0, 0.0]])
    assert not gae(rewards.requires_grad_(), values, mask)[0].requires_grad


def test_ppo_policy_loss_clips_both_sides_and_counts_clipfrac():
    # token: (A, rho) -> -A rho, -A clip(rho, 0.8, 1.2) -> max
    #  a: (+1, 1.5) -> -1.5, -1.2 -> -1.2  clipped
    #  b: (-1, 0.5) ->  0.5,  0.8 ->  0.8  clipped
    #  c: (+1, 0.5) -> -0.5, -0.8 -> -0.5
    #  d: (-1, 1.5) ->  1.5,  1.2 ->  1.5
    #  e: (+2, 1.1) -> -2.2, -2.2 -> -2.2
    #  f: pad (A = 100, rho = e^30) ignored
    # loss = (-1.2 + 0.8 - 0.5 + 1.5 - 2.2) / 5 = -0.32, clipfrac 2/5, mean ratio 5.1 / 5 = 1.02
    rho = t([[1.5, 0.5, 0.5], [1.5, 1.1, 1.0]])
    old = t([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    logprobs = (old + rho.log())
    logprobs[1, 2] = 30.0
    logprobs.requires_grad_()
    adv = t([[1.0, -1.0, 1.0], [-1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip=0.2)
    close(loss, -0.32)
    close(stats["clipfrac"], 0.4)
    close(stats["ratio"], 1.02)
    l15, l05, l11 = math.log(1.5), math.log(0.5), math.log(1.1)
    close(stats["approx_kl"], 0.5 * (2 * l15 ** 2 + 2 * l05 ** 2 + l11 ** 2) / 5)
    # d(-A rho)/dlogp = -A rho / 5 on unclipped tokens, 0 on clipped tokens and pads
    loss.backward()
    close(logprobs.grad, [[0.0, 0.0, -0.1], [0.3, -0.44, 0.0]])


def test_ppo_value_loss_clips_around_the_old_values():
    # V_old = 1, eps = 0.2: (V, R) -> V_clip; (V - R)^2, (V_clip - R)^2 -> max
    #  (1.5, 2.0) -> 1.2; 0.25, 0.64 -> 0.64  clipped
    #  (1.5, 1.0) -> 1.2; 0.25, 0.04 -> 0.25
    #  (0.9, 0.0) -> 0.9; 0.81, 0.81 -> 0.81
    #  (0.5, 2.0) -> 0.8; 2.25, 1.44 -> 2.25
    #  (0.5, 0.0) -> 0.8; 0.25, 0.64 -> 0.64  clipped
    # loss = 1/2 (0.64 + 0.25 + 0.81 + 2.25 + 0.64) / 5 = 0.459, vf_clipfrac 2/5
    values = t([[1.5, 1.5, 0.9], [0.5, 0.5, 50.0]])
    returns = t([[2.0, 1.0, 0.0], [2.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_value_loss(values.requires_grad_(), torch.ones(2, 3), returns, mask, clip=0.2)
    close(loss, 0.459)
    close(stats["vf_clipfrac"], 0.4)
    # dL/dV = (V - R) / 5 where the unclipped term is the larger, 0 where the clipped one is (and on the pad)
    loss.backward()
    close(values.grad, [[0.0, 0.1, 0.18], [-0.3, 0.0, 0.0]])
    # garbage under the mask, even inf, changes neither the loss nor the gradient (no 0 * inf = NaN)
    garbage = values.detach().clone().requires_grad_()
    loss2, _ = ppo_value_loss(garbage, t([[1.0, 1.0, 1.0], [1.0, 1.0, float("nan")]]),
                              t([[2.0, 1.0, 0.0], [2.0, 0.0, float("inf")]]), mask, clip=0.2)
    loss2.backward()
    close(loss2, 0.459)
    close(garbage.grad, values.grad)


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = t([[1.0, 2.0, 3.0, 9.0]])
    close(explained_variance(returns, returns, mask), 1.0)
    close(explained_variance(torch.zeros(1, 4), returns, mask), 0.0)
    # R - V = (0, 0, 1): var 1/3; var R = 1 -> 2/3
    close(explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 2 / 3)


def test_adaptive_kl_controller_by_hand():
    # beta <- beta (1 + clip(KL / 6 - 1, -0.2, 0.2) * n / 10000), n = 1000
    for kl, expected in [(9.0, 0.2 * 1.02),   # e = 0.5 clipped to 0.2
                         (6.6, 0.2 * 1.01),   # e = 0.1
                         (5.4, 0.2 * 0.99),   # e = -0.1
                         (3.0, 0.2 * 0.98),   # e = -0.5 clipped to -0.2
                         (6.0, 0.2)]:         # on target
        ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
        assert ctl.update(torch.tensor(kl), 1000) == pytest.approx(expected)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 1000)
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.2 * 1.02 * 1.01)
    # restored into a controller built with other arguments: the value, the target and the horizon all come back
    # (target 1, horizon 10 would give 0.2 * 1.02 * 1.01 * (1 + 0.2 * 100) from KL 3)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=10)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value and restored.update(3.0, 1000) == pytest.approx(0.2 * 1.02 * 1.01 * 0.98)
    assert (restored.target, restored.horizon) == (6.0, 10000)
    fixed = AdaptiveKLController(0.05, target=None)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05
    restored.load_state_dict(fixed.state_dict())  # a fixed coefficient stays fixed once restored
    assert restored.update(100.0, 1000) == 0.05
    for target in (0.0, -6.0):  # KL / 0; a negative target drives beta the wrong way
        with pytest.raises(ValueError, match=rf"^target must be > 0 or None \(fixed coefficient\), got {target}$"):
            AdaptiveKLController(0.2, target=target)


def test_ppo_policy_loss_gives_a_pad_with_a_huge_log_prob_no_nan_gradient():
    """exp(log-ratio) at a pad overflows to inf past ~88 nats: the ratio must be masked before the exp, or the
    pad's gradient is 0 * inf = NaN and poisons the step."""
    old = torch.tensor([[-1.0, -1.0]])
    lp = torch.tensor([[-1.0, 100.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(lp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == -1.0 and lp.grad.tolist() == [[-1.0, 0.0]]  # -ratio * A at the real token, 0 at the pad
