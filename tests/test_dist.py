"""nanoalign/dist.py: torchrun's variables, the process group's backend and device, leaving it, rank-0 printing,
seeding, and (two CPU ranks under torchrun) sharding, the collectives and the full state dicts."""
import json
import random
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoalign import dist

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def test_launch_reads_each_of_torchruns_variables_and_a_world_of_one_keeps_its_device(monkeypatch):
    """launch() returns (RANK, WORLD_SIZE, LOCAL_RANK), each from its own variable (they differ on a second node);
    without them init_dist joins nothing and runs on the device asked for, index included."""
    for name, value in zip(TORCHRUN_VARS, ("3", "4", "1")):
        monkeypatch.setenv(name, value)
    assert dist.launch() == (3, 4, 1)
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name)
    d = dist.init_dist("cuda:1")  # no process group, so no CUDA needed to build the Dist
    assert (d.rank, d.world_size, d.local_rank, d.device, d.launched, d.enabled, d.is_main) == \
           (0, 1, 0, torch.device("cuda", 1), False, False, True)
    # torchrun --nproc_per_node=1 is distributed too (a process group, FSDP2 over a mesh of one)
    assert dist.Dist(launched=True).enabled and not dist.Dist(rank=1, world_size=2).is_main


def test_init_dist_under_torchrun_takes_nccl_on_this_ranks_gpu_and_gloo_on_a_cpu(monkeypatch, capsys):
    """The process group is faked: CUDA (as "cuda" or "cuda:0") means NCCL on GPU LOCAL_RANK, set as the current
    device; anything else gloo on the CPU. The Dist carries the global rank, and only rank 0 prints the banner."""
    calls, backend = [], []

    def init_process_group(name, **kw):
        calls.append((name, kw))
        backend.append(name)

    monkeypatch.setattr(dist.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist.dist, "get_backend", lambda: backend[-1])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    for name, value in zip(TORCHRUN_VARS, ("3", "4", "1")):
        monkeypatch.setenv(name, value)
    for device in ("cuda", "cuda:0"):
        calls.clear()
        d = dist.init_dist(device)
        assert calls == [("set_device", 1), ("nccl", {"device_id": torch.device("cuda", 1)})]
        assert d == dist.Dist(3, 4, 1, torch.device("cuda", 1), launched=True)
    calls.clear()
    assert dist.init_dist("cpu") == dist.Dist(3, 4, 1, torch.device("cpu"), launched=True)
    assert calls == [("gloo", {})]
    assert capsys.readouterr().out == ""  # rank 3 is quiet
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.init_dist("cpu").is_main
    assert capsys.readouterr().out == "torchrun: 4 ranks, gloo process group, models sharded by FSDP2, rank 0 on cpu\n"


def test_close_meets_every_rank_at_a_barrier_then_leaves_the_group(monkeypatch):
    """close() (faked process group): barrier first, then destroy_process_group; without torchrun it touches nothing."""
    calls = []
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist.dist, "destroy_process_group", lambda: calls.append("destroy"))
    dist.close(dist.Dist())
    assert calls == []
    dist.close(dist.Dist(rank=1, world_size=2, launched=True))
    assert calls == ["barrier", "destroy"]


def test_print0_prints_on_rank_0_only(capsys):
    dist.print0(dist.Dist(rank=1, world_size=2, launched=True), "from rank 1")
    dist.print0(dist.Dist(rank=0, world_size=2, launched=True), "from rank", 0)
    assert capsys.readouterr().out == "from rank 0\n"


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_seed_everything_adds_the_rank_and_seeds_all_three_generators():
    """seed_everything(s, d) is seed_everything(s + rank): python's, numpy's and torch's generators all restart
    (drawn from in between, they would continue otherwise); numpy gets the seed mod 2**32, torch all of it."""
    dist.seed_everything(7)
    seven = draws()
    draws()
    dist.seed_everything(5, dist.Dist(rank=2, world_size=3))
    assert draws() == seven
    dist.seed_everything(5, dist.Dist(rank=0, world_size=3))
    assert draws() != seven
    dist.seed_everything(2**31 + 3)
    assert draws() == (random.Random(2**31 + 3).random(), np.random.RandomState(2**31 + 3).rand(),
                       torch.rand(1, generator=torch.Generator().manual_seed(2**31 + 3)).item())
    dist.seed_everything(2**32 + 3)  # beyond numpy's range: wrapped, not an error
    assert draws()[1] == np.random.RandomState(3).rand()


def test_a_plain_module_loads_a_full_state_without_a_process_group():
    """load_full_model_state / load_full_optimizer_state are full_state's inverses for a plain module too."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    a(torch.ones(1, 3)).sum().backward()
    opt_a.step()
    weights, opt_state = dist.full_state(a, opt_a)
    only_weights, none = dist.full_state(a)
    assert none is None and weights.keys() == only_weights.keys() == {"weight", "bias"}
    dist.load_full_model_state(b, weights, dist.Dist())
    dist.load_full_optimizer_state(b, opt_b, opt_state, dist.Dist())
    assert all(torch.equal(b.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(opt_b.state[b.weight]["exp_avg"], opt_a.state[a.weight]["exp_avg"])


DIST_CHECK = '''
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from torch.distributed.fsdp import FSDPModule
from nanoalign import dist
from nanoalign.cli import run
from nanoalign.model import Block, ModelConfig, Transformer


def main(argv):
    torch.set_num_threads(1)
    d = dist.init_dist("cpu")
    out = {"rank": d.rank, "world_size": d.world_size, "enabled": d.enabled}
    x = torch.tensor([1.0 + d.rank, 10.0])
    out["sum"] = dist.all_reduce_sum(x, d).tolist()
    out["x_after"] = x.tolist()
    out["gathered"] = dist.all_gather_object(f"r{d.rank}", d)
    flag = Path(sys.argv[2]) / "rank1_was_here"
    if d.rank == 1:  # late on purpose: rank 0 must still find the file after the barrier
        time.sleep(1.0)
        flag.write_text("x")
    dist.barrier(d)
    out["flag_after_barrier"] = flag.exists()
    cfg = ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, hidden_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    ref.init_weights()
    want = ref.state_dict()
    out["want_keys"] = sorted(want)
    torch.manual_seed(1 + d.rank)  # other weights on every rank, replaced by rank 0's
    model = Transformer(cfg)
    model.init_weights()
    dist.shard(model, d)
    out["sharded"] = [isinstance(m, FSDPModule) for m in [model, *(b for b in model.modules() if isinstance(b, Block))]]
    dist.load_full_model_state(model, dict(want) if d.is_main else {}, d)  # a copy: its values become DTensors
    # every rank gathers
    out["loaded"] = all([torch.equal(p.full_tensor(), want[n]) for n, p in model.named_parameters()])
    state, _ = dist.full_state(model)
    out["full_keys"] = sorted(state)
    out["full_equal"] = all(torch.equal(t, want[k]) for k, t in state.items())
    out["full_devices"] = sorted({t.device.type for t in state.values()})
    Path(sys.argv[2], f"rank{d.rank}.json").write_text(json.dumps(out))
    dist.close(d)


run(main)  # as the scripts end: it collects FSDP2's cycles before the interpreter shuts down
'''


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_shard_reduce_gather_wait_and_gather_the_full_state_on_rank_0(tmp_path, torchrun):
    """Two CPU ranks: every block and the root are FSDP2 modules; all_reduce_sum sums and leaves its input alone;
    all_gather_object is in rank order; barrier waits for a late rank; rank 0's weights reach every shard; full_state
    gives rank 0 the whole model on the CPU and rank 1 nothing."""
    (tmp_path / "dist_check.py").write_text(textwrap.dedent(DIST_CHECK))
    torchrun(tmp_path / "dist_check.py", ROOT, tmp_path, cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    for i, r in enumerate((r0, r1)):
        assert (r["rank"], r["world_size"], r["enabled"]) == (i, 2, True)
        assert r["sum"] == [3.0, 20.0] and r["x_after"] == [1.0 + i, 10.0]
        assert r["gathered"] == ["r0", "r1"]
        assert r["sharded"] == [True, True, True] and r["loaded"]
    assert r0["flag_after_barrier"]
    assert len(r0["full_keys"]) > 0 and r0["full_keys"] == r0["want_keys"] and r0["full_equal"]
    assert r0["full_devices"] == ["cpu"]
    assert r1["full_keys"] == [] and r1["full_devices"] == []
