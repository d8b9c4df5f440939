"""nanoalign/ewc.py: Hbat's modified EWC, Fisher EWC and Hbat-Freeze, against numbers worked out by hand on a
Linear(2, 2) (two units: weight and bias), and under torchrun + FSDP2 against one process."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoalign import ewc

ROOT = Path(__file__).resolve().parents[1]

# the two states of the Linear; Δ_weight = [[0.5, 0], [0, -2]], Δ_bias = [0, 0.25] (exact in float32)
BEFORE = {"weight": [[1.0, 2.0], [3.0, 4.0]], "bias": [0.5, -0.5]}
AFTER = {"weight": [[1.5, 2.0], [3.0, 2.0]], "bias": [0.5, -0.25]}


def linear(state):
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.tensor(state[name]))
    return layer


def test_delta_scores_by_hand():
    before, after = ewc.snapshot(linear(BEFORE)), ewc.snapshot(linear(AFTER))
    # weight: (0.25 + 0 + 0 + 4) / 4 = 1.0625; bias: (0 + 0.0625) / 2 = 0.03125
    assert ewc.delta_scores(before, after, c=1.0) == {"weight": 1.0625, "bias": 0.03125}
    s = ewc.delta_scores(before, after)  # c = 1e10 multiplies each by 1e20
    assert s["weight"] == pytest.approx(1.0625e20, rel=1e-12) and s["bias"] == pytest.approx(3.125e18, rel=1e-12)
    assert ewc.snapshot(linear(AFTER))["weight"].requires_grad is False


def test_accumulate_sums_the_stages_without_decay():
    stage1, stage2 = {"weight": 1.0, "bias": 2.0}, {"weight": 3.0, "bias": 0.5}
    total = ewc.accumulate(None, stage1)
    assert ewc.accumulate(total, stage2) == {"weight": 4.0, "bias": 2.5}
    assert total == stage1  # not mutated


def test_importance_is_one_hot_at_t1_and_spreads_with_temperature():
    s = ewc.delta_scores(ewc.snapshot(linear(BEFORE)), ewc.snapshot(linear(AFTER)))  # 1.0625e20, 3.125e18
    omega = ewc.importance(s)  # exp(1e20) would overflow without the max shift
    assert omega == {"weight": 100.0, "bias": 0.0}  # the authors' behaviour: only the most changed unit
    assert ewc.omega_entropy(omega) == 0.0
    # T = 1e20: softmax([1.0625, 0.03125]), weight's share is the logistic of the gap 1.03125
    spread = ewc.importance(s, lambda_max=50.0, temperature=1e20)
    p = 1 / (1 + math.exp(-1.03125))
    assert spread["weight"] == pytest.approx(50 * p, rel=1e-12)
    assert spread["bias"] == pytest.approx(50 * (1 - p), rel=1e-12)
    assert ewc.omega_entropy(spread) == pytest.approx(-p * math.log(p) - (1 - p) * math.log(1 - p), rel=1e-12)
    assert ewc.omega_entropy(ewc.importance(s, temperature=1e40)) == pytest.approx(math.log(2))  # uniform


def test_importance_stays_one_hot_at_extreme_temperatures_and_is_the_softmax_otherwise():
    # S / T overflowed to inf before the max was subtracted (inf - inf: NaN); (S - max S) / T does not
    assert ewc.importance({"a": 1e20, "b": 3e18}, 100.0, 1e-300) == {"a": 100.0, "b": 0.0}
    assert ewc.importance({"a": 1.5e308, "b": 1e308}, 100.0, 0.5) == {"a": 100.0, "b": 0.0}
    assert ewc.importance({"a": 3.0, "b": 3.0, "c": 1.0}, 100.0, 1e-300) == {"a": 50.0, "b": 50.0, "c": 0.0}
    # a sane T: λ_max exp(S_u / T) / Σ_v exp(S_v / T), by hand
    omega = ewc.importance({"a": 3.0, "b": 1.0, "c": 0.0}, lambda_max=10.0, temperature=2.0)
    z = math.exp(1.5) + math.exp(0.5) + 1.0
    assert omega["a"] == pytest.approx(10 * math.exp(1.5) / z, rel=1e-12)
    assert omega["b"] == pytest.approx(10 * math.exp(0.5) / z, rel=1e-12)
    assert omega["c"] == pytest.approx(10 / z, rel=1e-12)


def test_importance_at_t1_is_one_hot_for_realistic_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    before = ewc.snapshot(model)
    with torch.no_grad():  # an optimizer-sized change, 1e-4 per weight
        for p in model.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    s = ewc.delta_scores(before, ewc.snapshot(model))
    assert all(1e10 < v < 1e14 for v in s.values())
    omega = ewc.importance(s)
    assert sorted(omega.values()) == [0.0, 0.0, 0.0, 100.0] and omega[max(s, key=s.get)] == 100.0
    assert ewc.omega_entropy(ewc.importance(s, temperature=max(s.values()))) > 0.9 * math.log(4)


def test_ewc_penalty_value_and_gradient_by_hand():
    model, anchor = linear(AFTER), ewc.snapshot(linear(BEFORE))
    omega = {"weight": 2.0, "bias": 3.0}
    penalty = ewc.ewc_penalty(model, anchor, omega, lam=0.5)
    # 2 * 0.25 * (0.25 + 4) + 3 * 0.25 * 0.0625
    assert penalty.item() == pytest.approx(2.171875, rel=1e-7)
    penalty.backward()
    # 2 Ω λ² Δ: weight 2 * 2 * 0.25 * Δ = Δ, bias 2 * 3 * 0.25 * Δ = 1.5 Δ
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.5, 0.0], [0.0, -2.0]]))
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.0, 0.375]))


def test_ewc_penalty_is_zero_at_the_anchor_and_skips_units_without_weight():
    model = linear(AFTER)
    at_anchor = ewc.ewc_penalty(model, ewc.snapshot(model), {"weight": 2.0, "bias": 3.0})
    at_anchor.backward()
    assert at_anchor.item() == 0.0 and model.weight.grad.abs().sum() == 0 and model.bias.grad.abs().sum() == 0
    anchor = ewc.snapshot(linear(BEFORE))
    assert ewc.ewc_penalty(model, anchor, {"weight": 0.0}).item() == 0.0  # Ω = 0, bias absent
    assert ewc.ewc_penalty(model, anchor, {"bias": 3.0}).item() == pytest.approx(3 * 0.0625)


def test_frozen_unit_keeps_its_term_in_the_value_but_gets_no_gradient():
    model, anchor = linear(AFTER), ewc.snapshot(linear(BEFORE))
    model.weight.requires_grad_(False)
    penalty = ewc.ewc_penalty(model, anchor, {"weight": 2.0, "bias": 3.0})
    assert penalty.item() == pytest.approx(2 * 4.25 + 3 * 0.0625)
    penalty.backward()
    assert model.weight.grad is None
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.0, 1.5]))


def test_fisher_penalty_value_and_gradient_by_hand():
    model, anchor = linear(AFTER), ewc.snapshot(linear(BEFORE))
    fisher = {"weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "bias": torch.tensor([0.5, 1.0])}
    penalty = ewc.fisher_penalty(model, anchor, fisher)
    # 50 * (1 * 0.25 + 4 * 4) + 50 * (1 * 0.0625)
    assert penalty.item() == pytest.approx(815.625, rel=1e-7)
    penalty.backward()  # λ_max F Δ
    torch.testing.assert_close(model.weight.grad, torch.tensor([[50.0, 0.0], [0.0, -800.0]]))
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.0, 25.0]))


def classifier_logprob(model, batch):
    """log p(y | x) per example of a linear softmax classifier: (B,)."""
    return F.log_softmax(model(batch["x"]), dim=-1).gather(-1, batch["y"][:, None]).squeeze(-1)


def test_fisher_diagonal_equals_a_per_example_gradient_loop():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    batches = [{"x": torch.randn(3, 3), "y": torch.tensor([0, 2, 3])},
               {"x": torch.randn(2, 3), "y": torch.tensor([1, 1])}]
    fisher = ewc.fisher_diagonal(model, batches, classifier_logprob)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        logp = classifier_logprob(model, batch)
        for i in range(len(logp)):
            grads = torch.autograd.grad(logp[i], list(model.parameters()), retain_graph=True)
            for (n, _), g in zip(model.named_parameters(), grads):
                expected[n] += g.square() / 5
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n])
    assert all(p.grad is None for p in model.parameters())
    # the squared mean gradient (what summing unsquared gradients amounts to) is something else
    mean_grad = torch.autograd.grad(sum(classifier_logprob(model, b).sum() for b in batches) / 5, model.weight)[0]
    assert not torch.allclose(mean_grad.square(), fisher["weight"])


def test_freeze_top_freezes_the_top_fraction():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])  # 10 tensors
    model(torch.ones(1, 2)).sum().backward()
    names = [n for n, _ in model.named_parameters()]
    scores = {n: float(i) for i, n in enumerate(names)}
    assert ewc.freeze_top(model, scores) == [names[9], names[8]]  # ceil(0.2 * 10) = 2, highest first
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in names[8:])
        assert (p.grad is None) == (n in names[8:])  # no stale gradient for the optimizer to apply
    assert len(ewc.freeze_top(model, scores, fraction=0.25)) == 3  # ceil(2.5)
    assert len(ewc.freeze_top(model, scores, fraction=0.01)) == 1  # at least one
    assert ewc.freeze_top(model, scores, fraction=0.0) == []
    thirty = {str(i): -1.0 for i in range(20)} | scores
    assert len(ewc.freeze_top(model, thirty, fraction=0.1)) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_fsdp_matches_one_process(tmp_path, torchrun):
    """Scores, Ω, penalty values (on every rank), gradients and the Fisher of an FSDP2-sharded Transformer
    equal those of one process; the penalty is backpropagated unscaled beside the world_size-scaled task loss."""
    out = tmp_path / "ewc.json"
    torchrun(ROOT / "tests" / "ewc_dist_check.py", out, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["dtensors"] == [False, True]
    one, two = r["scores"]
    assert one.keys() == two.keys() and all(two[n] == pytest.approx(one[n], rel=1e-9) for n in one)
    assert r["omega_t1"][0] == r["omega_t1"][1]
    assert all(r["omega"][1][n] == pytest.approx(v, rel=1e-9) for n, v in r["omega"][0].items())
    assert r["entropy"][1] == pytest.approx(r["entropy"][0], rel=1e-9)
    assert r["penalty"][1] == pytest.approx(r["penalty"][0], rel=1e-5)
    assert r["penalty_on_each_rank"][0] == r["penalty_on_each_rank"][1]
    assert r["fisher_penalty"][1] == pytest.approx(r["fisher_penalty"][0], rel=1e-5)
    # the penalty's own gradient 2 Ω λ² (θ − θ*) is exact on every shard, not averaged over ranks
    assert r["penalty_grads_vs_formula"] == [0.0, 0.0] and max(r["penalty_grads_max_diff"].values()) <= 1e-6
    assert r["penalty_grads_max_abs"] > 0.1  # large enough that a world_size factor would show
    assert max(r["grads_max_diff"].values()) <= 1e-4 and max(r["fisher_max_diff"].values()) <= 1e-5
    assert r["frozen"][0] == r["frozen"][1] and len(r["frozen"][0]) == 5  # ceil(0.2 * 21 units)
    assert r["frozen_without_grad"] == [True, True]
