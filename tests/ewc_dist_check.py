"""Run by tests/test_ewc.py as `torchrun --standalone --nproc_per_node=2 tests/ewc_dist_check.py OUT.json`.

Each EWC statistic of an FSDP2-sharded Transformer against the same model unsharded (computed on every
rank, so no rank waits alone in a collective); rank 0 writes both sides, or their largest differences for
tensors, as JSON for the test to compare."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanoalign import cli, dist, ewc  # noqa: E402
from nanoalign.model import ModelConfig, Transformer  # noqa: E402

CFG = ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, hidden_dim=64, max_seq_len=32)
LAM = 2.0


def build(d):
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.init_weights()
    return dist.shard(model, d)


def local(x):
    return x.to_local() if isinstance(x, DTensor) else x


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


@torch.no_grad()
def perturb(model):
    """A change of a different size in every unit; elementwise, so it needs no shard offsets."""
    for u, (_, p) in enumerate(model.named_parameters()):
        x = local(p)
        x.add_(1e-3 * (u % 5 + 1) * torch.sin(37.0 * x + u))


def logprob_fn(model, batch):
    ids = batch["input_ids"]
    logp = F.log_softmax(model(ids)[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)  # (B,)


def full_grads(model):
    return {n: full(p.grad).clone() for n, p in model.named_parameters()}


def run(model, d, ids):
    out = {"dtensors": all(isinstance(p, DTensor) for p in model.parameters())}
    before = ewc.snapshot(model)
    perturb(model)
    scores = ewc.delta_scores(before, ewc.snapshot(model))
    omega = ewc.importance(scores, temperature=max(scores.values()))  # spread, so every unit is anchored
    out.update(scores=scores, omega_t1=ewc.importance(scores), omega=omega, entropy=ewc.omega_entropy(omega))

    # the penalty alone, then the penalty backpropagated first and the task loss (scaled as the trainers do) after
    model.zero_grad(set_to_none=True)
    penalty = ewc.ewc_penalty(model, before, omega, lam=LAM)
    penalty.backward()
    out["penalty"], out["penalty_grads"] = penalty.item(), full_grads(model)
    expected = {n: 2 * omega[n] * LAM**2 * (full(p.detach()) - full(before[n])) for n, p in model.named_parameters()}
    out["penalty_grads_vs_formula"] = max((g - expected[n]).abs().max().item() for n, g in out["penalty_grads"].items())
    model.zero_grad(set_to_none=True)
    ewc.ewc_penalty(model, before, omega, lam=LAM).backward()
    mine = ids[d.rank :: d.world_size]
    (-logprob_fn(model, {"input_ids": mine}).sum() * d.world_size).backward()
    out["grads"] = full_grads(model)

    # every rank passes the same examples to fisher_diagonal
    fisher = ewc.fisher_diagonal(model, [{"input_ids": ids[:3]}, {"input_ids": ids[3:5]}], logprob_fn)
    out["fisher"] = {n: full(f) for n, f in fisher.items()}
    out["fisher_penalty"] = ewc.fisher_penalty(model, before, fisher).item()

    out["frozen"] = ewc.freeze_top(model, scores, 0.2)
    (-logprob_fn(model, {"input_ids": mine}).sum()).backward()
    out["frozen_without_grad"] = all((p.grad is None) == (n in out["frozen"]) for n, p in model.named_parameters())
    return out


def max_diff(a, b):
    return {n: (a[n] - b[n]).abs().max().item() for n in a}


def main():
    torch.set_num_threads(1)
    d = dist.init_dist("cpu")
    ids = torch.randint(0, CFG.vocab_size, (8, 12), generator=torch.Generator().manual_seed(1))
    two = run(build(d), d, ids)
    penalties = [None] * d.world_size
    torch_dist.all_gather_object(penalties, two["penalty"])
    # every rank runs the one-process reference, so no rank waits alone in a collective while another computes
    # (rank 0 alone doing it left rank 1 in the closing barrier; under CPU load gloo then aborted it now and then)
    one = run(build(dist.Dist()), dist.Dist(), ids)
    if d.is_main:
        result = {k: [one[k], two[k]] for k in ("dtensors", "scores", "omega_t1", "omega", "entropy", "penalty",
                                                "fisher_penalty", "frozen", "frozen_without_grad")}
        result["penalty_on_each_rank"] = penalties
        for k in ("penalty_grads", "grads", "fisher"):
            result[k + "_max_diff"] = max_diff(one[k], two[k])
            result[k + "_max_abs"] = max(t.abs().max().item() for t in one[k].values())
        result["penalty_grads_vs_formula"] = [one["penalty_grads_vs_formula"], two["penalty_grads_vs_formula"]]
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier(d)
    dist.close(d)


if __name__ == "__main__":
    cli.run(lambda argv: main())  # as the scripts end: FSDP2's cycles are collected before the interpreter shuts down
