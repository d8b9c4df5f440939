"""nanoalign/train.py: schedule, data order, the non-finite guard, multi-model checkpoints, resume, and the
input checks of the scripts built on it (train_sft.py here)."""
import copy
import json
import math
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import train_sft
from conftest import logged_losses as losses, sft_args
from nanoalign import dist, train
from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.cli import InputError
from nanoalign.model import ModelConfig, Transformer
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(ROOT / "data" / "tokenizer")


def tiny(tok, seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**dict(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                              max_seq_len=128), **kw}))
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, tok):
    return save_pretrained(tiny(tok), tmp_path_factory.mktemp("init") / "model", tokenizer=tok)


def args(init_dir, out, *extra):
    return sft_args(init_dir, out, "--save_every=1", *extra)


# --- schedule and order

def test_lr_schedule_by_hand():
    # 111 steps: 0..9 warm up, 10..110 decay, the last executed step (110) sits at the floor
    lr = lambda s: train.lr_at(s, 111, 1.0, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway down the cosine: 0.1 + 0.9 * 0.5
    assert lr(110) == pytest.approx(0.1)
    # a warmup leaving one step: the decay's first step is at the peak, and it is also the last
    assert [train.lr_at(s, 4, 1.0, warmup_steps=3, min_lr_ratio=0.1) for s in range(4)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 1.0])


def test_data_order_is_a_permutation_per_epoch():
    seen = [i for s in range(5) for i in train.batch_indices(s, 10, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new order every epoch
    assert train.batch_indices(3, 10, 4, seed=3) == seen[12:16]
    with pytest.raises(InputError, match="no training examples"):
        train.batch_indices(0, 0, 4, seed=3)


def test_derived_seeds_are_a_hash_of_purpose_seed_and_keys():
    # pinned: a change here silently changes every PPO run (blake2b-64 of "rollout:0:0:0", shifted to 63 bits)
    assert train.derived_seed("rollout", 0, 0, 0) == 5350151254464603032
    seeds = {train.derived_seed(p, s, t, i) for p in ("rollout", "minibatch") for s in range(3) for t in range(3)
             for i in range(3)}
    assert len(seeds) == 54 and all(0 <= x < 2**63 for x in seeds)


def test_adamw_decays_matrices_only_and_skips_frozen(tok):
    model = tiny(tok)
    model.layers[0].attn.wq.weight.requires_grad_(False)
    opt = train.adamw(model, 1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert not any(p is model.layers[0].attn.wq.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in model.parameters() if p.requires_grad])


# --- the non-finite guard

def test_guard_stops_on_a_nonfinite_gradient_with_a_finite_loss(tok):
    model = tiny(tok)
    opt = train.adamw(model, 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randint(0, 100, (2, 8))).float().logsumexp(-1).mean()
    loss.backward()
    model.layers[1].mlp.down.weight.grad[0, 0] = float("inf")
    with pytest.raises(train.NonFiniteError) as e:
        train.optimizer_step(model, opt, step=7, loss=loss.item(), grad_clip=1.0, d=dist.Dist(), what="sft")
    msg = str(e.value)
    assert msg.startswith("sft step 7: loss ") and "gradient norm inf" in msg
    assert "non-finite gradients in layers.1.mlp.down.weight;" in msg and "\n" not in msg
    for n, p in model.named_parameters():  # nothing stepped
        assert torch.equal(p, before[n]), n


def test_guard_clips_and_returns_the_unclipped_norm(tok):
    model = tiny(tok)
    opt = train.adamw(model, 0.0)
    model(torch.randint(0, 100, (2, 8))).float().pow(2).sum().backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    clipped = {}
    orig_step = opt.step
    opt.step = lambda: clipped.update({n: p.grad.clone() for n, p in model.named_parameters()}) or orig_step()
    norm = train.optimizer_step(model, opt, step=1, loss=1.0, grad_clip=0.5, d=dist.Dist())
    assert norm == pytest.approx(expected, rel=1e-5) and expected > 0.5
    for n in grads:
        torch.testing.assert_close(clipped[n], grads[n] * 0.5 / expected, rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())  # zeroed


def _poison_gradient_at(step, micro_per_step=2):
    """A global forward hook: on the first training forward of `step`, the next backward writes NaN into
    layers.0.mlp.up.weight's gradient (the loss stays finite)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if isinstance(module, Transformer) and module.training:
            calls["n"] += 1
            if calls["n"] == (step - 1) * micro_per_step + 1:
                module.layers[0].mlp.up.weight.register_hook(lambda g: torch.full_like(g, float("nan")))

    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_nan_gradient_at_step_k_stops_the_run_and_keeps_the_last_good_checkpoint(init_dir, tmp_path):
    handle = _poison_gradient_at(3)
    try:
        with pytest.raises(train.NonFiniteError) as e:
            train_sft.main(args(init_dir, tmp_path / "run", "--steps=5"))
    finally:
        handle.remove()
    msg = str(e.value)
    assert msg.startswith("sft step 3: loss ") and "loss nan" not in msg  # a finite loss
    assert "gradient norm nan" in msg and "non-finite gradients in layers.0.mlp.up.weight;" in msg
    state = torch.load(tmp_path / "run" / "model" / "train_state.pt", weights_only=False)
    assert state["step"] == 2
    model = load_pretrained(tmp_path / "run" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # and the run resumes from it, identical to a run that never met the NaN
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=5", "--resume"))
    train_sft.main(args(init_dir, tmp_path / "clean", "--steps=5"))
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "run"), losses(tmp_path / "clean"))) <= 1e-6


def test_an_update_that_leaves_the_weights_non_finite_is_not_saved(init_dir, tmp_path):
    # the gradients are finite, so the guard lets the step through; what the step makes of the weights (an
    # enormous learning rate, here a post-step hook writing NaN at step 2) must not replace the step-1 checkpoint
    def poison(opt, args, kwargs):
        poison.calls += 1
        if poison.calls == 2:
            next(p for group in opt.param_groups for p in group["params"]).data.fill_(float("nan"))
    poison.calls = 0
    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(train.NonFiniteError, match=r"^step 2: the weights are not finite after the optimizer "
                                                       r"step \(model: tok_emb.weight\); not saved"):
            train_sft.main(args(init_dir, tmp_path / "run", "--steps=3"))
    finally:
        handle.remove()
    assert torch.load(tmp_path / "run" / "model" / "train_state.pt", weights_only=False)["step"] == 1
    assert all(torch.isfinite(p).all() for p in load_pretrained(tmp_path / "run" / "model").parameters())


# --- checkpoints

def test_checkpoint_holds_several_models_optimizers_rng_and_extra_state(tok, tmp_path):
    d = dist.Dist()
    policy, critic = tiny(tok, 0), tiny(tok, 1)
    opts = {}
    for name, m in (("policy", policy), ("critic", critic)):
        opts[name] = train.adamw(m, 1e-2)
        m(torch.randint(0, 100, (2, 8))).float().pow(2).mean().backward()
        train.optimizer_step(m, opts[name], step=1, loss=0.0, grad_clip=1.0, d=d)
    extra = {"kl_coef": 0.123, "reward_stats": {"mean": 1.5, "var": 2.0, "count": 7}, "stage": 3,
             "anchor": {"w": torch.arange(4.0)}}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    train.save_checkpoint(tmp_path / "ckpt", d, 11, {"policy": (policy, opts["policy"]), "critic": (critic, opts["critic"])},
                          tokenizer=tok, extra=extra, config={"lr": 1e-2})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    # the layout: the policy at the root (loadable as is), the critic below it, one train_state
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "critic" / "model.safetensors").exists()
    state = train.find_checkpoint(tmp_path / "ckpt", resume=True)
    assert state["step"] == 11 and state["models"] == ["policy", "critic"] and state["config"] == {"lr": 1e-2}
    assert state["extra"]["reward_stats"] == extra["reward_stats"] and torch.equal(state["extra"]["anchor"]["w"], torch.arange(4.0))

    torch.manual_seed(99)
    new = {name: load_pretrained(train.model_dir(tmp_path / "ckpt", name, state["models"])) for name in ("policy", "critic")}
    new_opts = {name: train.adamw(m, 1e-2) for name, m in new.items()}
    step = train.restore(state, {name: (new[name], new_opts[name]) for name in ("policy", "critic")}, d)
    assert step == 11
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    for name, old in (("policy", policy), ("critic", critic)):
        for (n, p), q in zip(old.named_parameters(), new[name].parameters()):
            assert torch.equal(p, q), (name, n)
        old_state, new_state = opts[name].state_dict()["state"], new_opts[name].state_dict()["state"]
        for k in old_state:
            assert torch.equal(old_state[k]["exp_avg"], new_state[k]["exp_avg"]), (name, k)
            assert torch.equal(old_state[k]["exp_avg_sq"], new_state[k]["exp_avg_sq"]), (name, k)


def test_resume_without_a_checkpoint_says_where_it_looked(init_dir, tmp_path):
    with pytest.raises(InputError, match=f"--resume: no checkpoint to resume from \\(looked for {tmp_path}/none/model/train_state.pt\\)"):
        train_sft.main(args(init_dir, tmp_path / "none", "--steps=2", "--resume"))


def test_metrics_log_keeps_only_what_the_checkpoint_covers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)))
    log = train.MetricsLog(path, dist.Dist(), resume_step=2)
    log.log({"step": 3, "loss": 30})
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1, 2, 30]
    before = path.read_text()
    fresh = train.MetricsLog(path, dist.Dist(), resume_step=0)  # a fresh run starts a new log with its first record:
    assert path.read_text() == before  # one that fails before it leaves the last run's log beside its checkpoint
    fresh.log({"step": 1, "loss": 7})
    fresh.log({"step": 2, "loss": 6})
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [7, 6]


def test_fine_tuning_a_given_model_never_reads_the_tiny_base_state(init_dir, tmp_path):
    """With --init the tiny base plays no part: a damaged base train_state (another run's) must not stop the run."""
    base = tmp_path / "base" / "model"
    base.mkdir(parents=True)
    (base / "train_state.pt").write_bytes(b"not a checkpoint")
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=1", f"--base_dir={tmp_path / 'base'}"))
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_metrics_log_drops_a_last_line_cut_short_and_names_a_damaged_one(tmp_path):
    """A step is logged before it is saved, so a record cut short by a crash is past the checkpoint: dropped. A
    damaged line anywhere else is an error naming the file and the line."""
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2))
    path.write_text(whole + '{"step": 3, "lo')
    train.MetricsLog(path, dist.Dist(), resume_step=2)
    assert path.read_text() == whole
    path.write_text(json.dumps({"step": 1}) + "\n{oops\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(InputError, match=rf"^--resume: {re.escape(str(path))}:2: not a JSON record"):
        train.MetricsLog(path, dist.Dist(), resume_step=2)
    path.write_text(json.dumps({"step": 1}) + "\n\n" + json.dumps({"step": 2}) + "\n" + json.dumps({"step": 3}) + "\n")
    train.MetricsLog(path, dist.Dist(), resume_step=2)  # a blank line is no record, not a damaged one
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import train_sft
    real_save = torch.save
    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # the weights of this step are written, its train_state not
        return real_save(obj, f, *a, **k)
    torch.save = dying_save
    train_sft.main({argv!r})
""")


def test_a_run_killed_mid_save_resumes_to_the_uninterrupted_result(init_dir, tmp_path, capsys):
    argv = args(init_dir, tmp_path / "cut", "--steps=4")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=str(ROOT), kill_at=3, argv=argv)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = list((tmp_path / "cut").glob(".model.tmp-*"))
    assert leftovers, "the kill should have left the half-written save behind"
    step = torch.load(tmp_path / "cut" / "model" / "train_state.pt", weights_only=False)["step"]
    assert step == 2, (step, proc.stdout[-2000:])
    train_sft.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert f"removed {leftovers[0]}" in printed, (leftovers, printed[-2000:])
    assert not list((tmp_path / "cut").glob(".model.tmp-*"))
    train_sft.main(args(init_dir, tmp_path / "full", "--steps=4"))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == len(cut) == 4 and max(abs(a - b) for a, b in zip(full, cut)) <= 1e-6, (full, cut)
    a, b = load_pretrained(tmp_path / "full" / "model"), load_pretrained(tmp_path / "cut" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


# --- every bad input gets one line naming it, before any work

@pytest.mark.parametrize("flag, message", [
    ("--mode=sfft", "--mode=sfft: choose one of auto, pretrain, sft"),
    ("--batch_size=0", "--batch_size=0: must be positive"),
    ("--micro_batch_size=0", "--micro_batch_size=0: must be positive"),
    ("--steps=0", "--steps=0: must be positive"),
    ("--max_response_len=0", "--max_response_len=0: must be positive"),
    ("--min_lr_ratio=1.5", "--min_lr_ratio=1.5: must be in [0.0, 1.0]"),
    ("--template=chatml", "--template=chatml: choose one of auto, "),
    ("--dtype=float16", "--dtype=float16: train in bfloat16 or float32"),
    ("--device=tpu", "--device=tpu: choose cpu, or cuda"),
    ("--warmup_steps=-1", "--warmup_steps=-1: must be >= 0"),
    ("--lr=inf", "argument --lr: expected a finite number, got 'inf'"),
    ("--weight_decay=nan", "argument --weight_decay: expected a finite number, got 'nan'"),
    ("--steps=ten", "argument --steps: invalid int value: 'ten'"),
    ("--stepz=10", "unrecognized arguments: --stepz=10"),
    ("--warmup=5", "unrecognized arguments: --warmup=5"),  # not taken for --warmup_steps, a prefix of it
    ("--seed=9223372036854775807", "argument --seed: expected a seed in [0, 4294967295]"),  # overflowed int64 seeds
    ("--data=/", "--data=/: expected a file, found a directory"),
    ("--n_head=3", "--dim=128: must be a multiple of --n_head=3, with an even quotient"),
    ("--device=cpux", "--device=cpux: choose cpu, or cuda"),  # not a device torch can parse
    ("--lr=1e5", "--lr=100000.0: must be in (0.0, 1.0]"),  # 1e-5 mistyped: it would train to garbage and save it
    ("--pretrain_lr=2", "--pretrain_lr=2.0: must be in (0.0, 1.0]"),
])
def test_bad_flags_are_refused_before_any_work(init_dir, tmp_path, flag, message):
    with pytest.raises(InputError) as e:
        train_sft.main(args(init_dir, tmp_path / "run", flag))
    assert str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()


def test_a_bad_eval_file_or_a_max_len_past_the_context_fails_before_training(init_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 2?"}\n{"question": "no prompt key"}\n')
    with pytest.raises(ValueError, match=f"^{bad}:2: missing key 'prompt'"):
        train_sft.main(args(init_dir, tmp_path / "run", f"--eval_data={bad}"))
    with pytest.raises(InputError, match="^--max_len=1000: the model's context length is 128$"):
        train_sft.main(args(init_dir, tmp_path / "run", "--max_len=1000"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match=f"^--eval_data={empty}: no prompts \\(pass --eval_data= to skip"):
        train_sft.main(args(init_dir, tmp_path / "run", f"--eval_data={empty}"))
    with pytest.raises(InputError, match=f"^--data={empty}: no training examples left after tokenizing"):
        train_sft.main(args(init_dir, tmp_path / "run", f"--data={empty}"))
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_init_without_a_tokenizer_needs_tokenizer_named(tok, tmp_path):
    """A checkpoint saved without tokenizer.json: the tiny world's tokenizer (the --tokenizer default) would feed a
    real model ids of other words and ship with it, so it must be named."""
    bare = save_pretrained(tiny(tok), tmp_path / "bare")  # no tokenizer
    assert not (bare / "tokenizer.json").exists()
    with pytest.raises(InputError, match=f"^--init={bare}: no tokenizer.json beside the weights; pass --tokenizer="):
        train_sft.main(args(bare, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    train_sft.main(args(bare, tmp_path / "run", "--steps=1", f"--tokenizer={ROOT / 'data' / 'tokenizer'}"))
    assert Tokenizer.from_dir(tmp_path / "run" / "model").vocab_size == tok.vocab_size


def test_the_final_evaluation_that_cannot_fit_the_context_fails_before_training(tok, tmp_path):
    short = save_pretrained(tiny(tok, max_seq_len=32), tmp_path / "short", tokenizer=tok)
    with pytest.raises(InputError, match=r"^--eval_data=.*: answers of up to 48 tokens leave no room for a prompt in "
                                         r"the model's context of 32"):
        train_sft.main(args(short, tmp_path / "run", "--max_len=32",
                            f"--eval_data={ROOT / 'data' / 'prompts_test.jsonl'}"))
    assert not (tmp_path / "run" / "model").exists()


def test_resume_refuses_flags_that_change_the_updates(init_dir, tmp_path):
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--stop_at=1"))
    for flag, was in (("--lr=0.5", "--lr=0.001"), ("--steps=2", "--steps=3"), ("--seed=7", "--seed=0"),
                      ("--template=plain", "--template=hh")):  # the template every token of the run was cut by
        with pytest.raises(InputError, match=f"^{flag}: the checkpoint to resume was written with {was}; resume "
                                             f"with the flags of the interrupted run$"):
            train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", flag, "--resume"))
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--micro_batch_size=1", "--resume"))  # same updates


def test_a_damaged_train_state_is_one_error_naming_the_file_and_key(init_dir, tmp_path):
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--stop_at=1"))
    path = tmp_path / "run" / "model" / "train_state.pt"
    good = torch.load(path, weights_only=False)

    def moment_reshaped(state):
        exp_avg = next(iter(state["optimizer"]["state"].values()))["exp_avg"]
        next(iter(state["optimizer"]["state"].values()))["exp_avg"] = exp_avg.flatten()[:3].clone()
        return state

    def moments_added(state):  # a checkpoint of a larger model: torch would load it, dropping the unknown name
        moments = state["optimizer"]["state"]
        moments["blocks.0.weight"] = moments["tok_emb.weight"]
        return state

    def moments_dropped(state):
        del state["optimizer"]["state"]["norm.weight"]
        return state

    for damage, message in [
        (lambda st: [st], f"--resume: {path} is not a train_state (a dict), it holds a list"),
        (lambda st: st | {"step": "two"}, f"--resume: {path}: key 'step' must hold a step number, got str"),
        (lambda st: {k: v for k, v in st.items() if k != "rng"},
         f"--resume: {path}: key 'rng' must hold the RNG state of each rank, it is missing"),
        (lambda st: st | {"step": -1}, f"--resume: {path}: key 'step' must hold a step number, got int"),
        (lambda st: st | {"rng": []}, f"--resume: {path}: key 'rng' must hold the RNG state of each rank, got list"),
        (lambda st: st | {"extra": None}, f"--resume: {path}: key 'extra' must hold a dict, got NoneType"),
        (moment_reshaped, "train_state.pt: optimizer holds exp_avg of shape (3,) for tok_emb.weight, whose shape is"),
        (moments_added, "train_state.pt: optimizer holds parameters this model does not have: blocks.0.weight (a "
                          "checkpoint of another model?)"),
        (moments_dropped, "train_state.pt: optimizer holds no moments for parameters: norm.weight (a checkpoint"),
    ]:
        torch.save(damage(copy.deepcopy(good)), path)
        with pytest.raises(InputError) as e:
            train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--resume"))
        assert str(e.value).startswith(message), str(e.value)
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match=f"^--resume: cannot read {path}: not a torch checkpoint, or a truncated one"):
        train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--resume"))
    torch.save(good, path)
    train_sft.main(args(init_dir, tmp_path / "run", "--steps=3", "--resume"))  # the intact state still resumes


def test_an_empty_training_set_is_named(init_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="no training examples"):
        train_sft.main(args(init_dir, tmp_path / "run", f"--data={empty}", "--val_data="))


def test_run_from_another_directory_explains_the_relative_default_paths(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--steps=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("error: --data=data/sft_train.jsonl: not found")
    assert f"the default data/ paths are relative to the repository: run from {ROOT}" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_world_size_variable_alone_is_not_torchrun(monkeypatch):
    """A job scheduler may export WORLD_SIZE to a plain `python` run: one process, which init_dist treats as a world
    of one, so the flag checks must too (they refused --batch_size=3 as not divisible by 2)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.launched_world_size() == 1 and dist.launch() is None
    train.check_divides_world(train_sft.Config(batch_size=3), "batch_size")
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.launched_world_size() == 2 and dist.launch() == (1, 2, 1)
    with pytest.raises(InputError, match="^--batch_size=3 must be divisible by the world size 2$"):
        train.check_divides_world(train_sft.Config(batch_size=3), "batch_size")


def test_a_malformed_sft_record_is_named_before_pretraining(tmp_path, monkeypatch):
    """--mode=auto pretrains first when no base is there: a bad SFT record was found only after those minutes."""
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 2?", "response": "1 plus 2 is 3."}\n{"prompt": "no response"}\n')
    monkeypatch.setattr(train_sft, "fit", lambda *a, **k: pytest.fail("training started"))
    for flag in (f"--data={bad}", f"--val_data={bad}"):
        with pytest.raises(ValueError, match=f"^{bad}:2: missing key 'response'"):
            train_sft.main([f"--base_dir={tmp_path / 'base'}", f"--out_dir={tmp_path / 'sft'}", "--device=cpu", flag])
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize("script, flags", [
    ("train_rm", ["--val_data=", "--offset_data="]),
    ("train_dpo", ["--val_data=", "--eval_prompts="]),
    ("train_ppo", ["--eval_data="]),
])
def test_a_malformed_record_is_named_before_the_default_models_are_trained(tmp_path, monkeypatch, script, flags):
    """With the default --init missing, the reward-model, DPO and PPO scripts train the tiny SFT (and reward)
    model first: a bad record of --data was found only after those minutes."""
    import importlib

    import train_rm
    run = importlib.import_module(script).main
    for trainer in (train_sft, train_rm):
        monkeypatch.setattr(trainer, "main", lambda *a, **k: pytest.fail("a default model was trained"))
    monkeypatch.chdir(tmp_path)  # no out/sft/model, no out/rm/model here
    bad = tmp_path / "bad.jsonl"
    record = {"prompt": "What is 1 plus 2?", "chosen": 5, "rejected": "3."}
    if script == "train_ppo":
        record = {"prompt": ["What is 1 plus 2?"]}
    bad.write_text('{"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."}\n' + json.dumps(record) + "\n")
    key = "prompt" if script == "train_ppo" else "chosen"
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}:2: key '{key}' must be a non-empty string"):
        run([f"--data={bad}", "--device=cpu", *flags])
    assert not (tmp_path / "out").exists()


def test_the_script_prints_a_bad_flag_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), "--batch_size=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --batch_size=0: must be positive\n"


# --- edge cases a mutation audit found untested

def _linear_with_grads(g=3.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)  # weight (2, 3) -> decay group, bias (2,) -> no-decay group
    with torch.no_grad():
        lin.weight.zero_(), lin.bias.zero_()
    for p in lin.parameters():
        p.grad = torch.full_like(p, g)
    return lin


def test_set_lr_sets_every_param_group():
    opt = train.adamw(torch.nn.Linear(3, 2), 1e-3, weight_decay=0.1)
    assert len(opt.param_groups) == 2
    train.set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_data_order_depends_on_the_seed():
    a = train.batch_indices(0, 10, 10, seed=0)
    b = train.batch_indices(0, 10, 10, seed=1)
    assert sorted(a) == sorted(b) == list(range(10)) and a != b
    # seeding epoch e of seed s with s + e would make --seed=1 replay the second epoch of --seed=0: two
    # "independent" seeds of a comparison would share most of their data order
    for seed in range(3):
        assert train.batch_indices(1, 10, 10, seed=seed) != train.batch_indices(0, 10, 10, seed=seed + 1)


def test_guard_stops_on_a_nonfinite_loss_with_finite_gradients():
    lin = _linear_with_grads()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    with pytest.raises(train.NonFiniteError, match=r"^step 4: loss nan, gradient norm 8\.48"):
        train.optimizer_step(lin, opt, step=4, loss=float("nan"), grad_clip=1.0, d=dist.Dist())
    assert (lin.weight == 0).all() and (lin.bias == 0).all()  # nothing stepped
    assert all(p.grad is None for p in lin.parameters())  # and the gradients are dropped


def test_grad_clip_zero_means_no_clipping():
    lin = _linear_with_grads(3.0)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    norm = train.optimizer_step(lin, opt, step=1, loss=1.0, grad_clip=0.0, d=dist.Dist())
    assert norm == pytest.approx(3.0 * math.sqrt(8))  # 8 gradient entries of 3
    assert torch.equal(lin.weight, torch.full((2, 3), -3.0)) and torch.equal(lin.bias, torch.full((2,), -3.0))


def test_a_single_inf_weight_is_not_saved(tok, tmp_path):
    model = tiny(tok)
    with torch.no_grad():
        model.norm.weight[3] = float("inf")  # one entry, not the whole tensor
    with pytest.raises(train.NonFiniteError, match=r"^step 5: the weights are not finite .*\(model: norm\.weight\)"):
        train.save_checkpoint(tmp_path / "ckpt", dist.Dist(), 5, {"model": (model, None)})
    assert not (tmp_path / "ckpt").exists()


def test_resume_with_a_frozen_parameter(tok, tmp_path):
    def build():
        m = tiny(tok)
        m.tok_emb.weight.requires_grad_(False)  # frozen: AdamW holds no moments for it
        return m

    d = dist.Dist()
    model = build()
    opt = train.adamw(model, 1e-2)
    model(torch.randint(0, 50, (2, 8))).float().pow(2).mean().backward()
    train.optimizer_step(model, opt, step=1, loss=0.0, grad_clip=1.0, d=d)
    train.save_checkpoint(tmp_path / "ckpt", d, 1, {"model": (model, opt)})
    state = train.find_checkpoint(tmp_path / "ckpt", resume=True)
    new = build()
    new_opt = train.adamw(new, 1e-2)
    assert train.restore(state, {"model": (new, new_opt)}, d) == 1
    assert len(new_opt.state) == len(opt.state) == sum(p.requires_grad for p in new.parameters())


def test_restore_gives_each_rank_its_own_rng_state():
    torch.manual_seed(1)
    s0 = train._rng_state()
    torch.manual_seed(2)
    s1 = train._rng_state()
    expected = torch.rand(3)  # what rank 1 drew next when the checkpoint was written
    torch.manual_seed(99)
    assert train.restore({"step": 4, "rng": [s0, s1], "extra": {}}, {}, dist.Dist(rank=1, world_size=2)) == 4
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(1)
    rank_0_next = torch.rand(3)
    torch.manual_seed(99)  # a rank the checkpoint has no state for (resumed on more ranks) takes rank 0's
    assert train.restore({"step": 4, "rng": [s0], "extra": {}}, {}, dist.Dist(rank=2, world_size=3)) == 4
    assert torch.equal(torch.rand(3), rank_0_next)


def test_eval_sums_counts_no_dummy_forward():
    """A rank with fewer rows still runs the forwards the others run (FSDP gathers weights collectively: one fewer
    hangs the others), each on a real row, never on an empty batch, and the dummy ones are not counted."""
    calls = []

    def fn(chunk):
        assert chunk, "a forward on no rows"
        calls.append(list(chunk))
        return torch.tensor([float(sum(chunk)), float(len(chunk))])

    rows = [1.0, 2.0, 4.0]
    # rank 1 of 2 holds [2.0] and runs a second, dummy forward (rank 0 holds [1.0, 4.0]): not counted
    assert train.eval_sums(rows, 1, dist.Dist(rank=1, world_size=2), fn).tolist() == [2.0, 1.0]
    assert calls == [[2.0], [1.0]]  # its row, then the dummy on a real row
    assert train.eval_sums(rows, 1, dist.Dist(rank=0, world_size=2), fn).tolist() == [5.0, 2.0]
    assert train.eval_sums(rows, 2, dist.Dist(), fn).tolist() == [7.0, 3.0]  # a last, partial micro-batch
    with pytest.raises(InputError, match="^no held-out examples to evaluate$"):
        train.eval_sums([], 2, dist.Dist(), fn)


def test_place_freezes_a_model_that_is_not_trained():
    frozen = train.place(torch.nn.Linear(3, 2).train(), dist.Dist(), trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    trained = train.place(torch.nn.Linear(3, 2).eval(), dist.Dist())
    assert trained.training and all(p.requires_grad for p in trained.parameters())


def test_train_first_trains_a_missing_default_once_and_only_rank_0_says_so(tmp_path, monkeypatch, capsys):
    """A script's missing default model is trained by the script before it (every rank calls it: under torchrun
    they run it together); present means it holds a config.json, so an empty directory left behind is trained."""
    calls = []
    path = tmp_path / "sft" / "model"

    def fake_train(argv):
        calls.append(argv)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")

    path.mkdir(parents=True)  # an empty directory is not a model
    train.train_first(path, "the tiny SFT model", "train_sft.py", fake_train, ["--device=cpu"])
    assert calls == [["--device=cpu"]]
    assert capsys.readouterr().out == f"{path} not found: training the tiny SFT model first (python train_sft.py --device=cpu)\n"
    train.train_first(path, "the tiny SFT model", "train_sft.py", fake_train, ["--device=cpu"])
    assert len(calls) == 1  # now it is there
    (path / "config.json").unlink()
    monkeypatch.setenv("RANK", "1")
    train.train_first(path, "the tiny SFT model", "train_sft.py", fake_train, ["--device=cpu"])
    assert len(calls) == 2 and capsys.readouterr().out == ""


# --- edge cases a second mutation audit found untested

def test_resume_checks_only_the_flags_the_checkpoint_recorded():
    """Checkpoints written without a config, or before a flag existed, resume; a recorded flag that differs does not."""
    cfg = SimpleNamespace(lr=0.1, new_flag=3)
    train.check_resumed_flags(cfg, None, ["lr"])  # a fresh run
    train.check_resumed_flags(cfg, {"step": 2, "config": None}, ["lr", "new_flag"])  # saved with config=None
    train.check_resumed_flags(cfg, {"step": 2}, ["lr", "new_flag"])
    train.check_resumed_flags(cfg, {"step": 2, "config": {"lr": 0.1}}, ["lr", "new_flag"])  # new_flag added since
    with pytest.raises(InputError, match=r"^--lr=0\.2: the checkpoint to resume was written with --lr=0\.1; "):
        train.check_resumed_flags(SimpleNamespace(lr=0.2, new_flag=3), {"config": {"lr": 0.1}}, ["lr", "new_flag"])


def test_only_rank_0_writes_the_metrics_log(tmp_path):
    """Under torchrun every rank builds the log; a second writer would truncate or duplicate rank 0's records."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    before = path.read_text()
    log = train.MetricsLog(path, dist.Dist(rank=1, world_size=2), resume_step=1)
    log.log({"step": 2, "loss": 1.0})
    assert path.read_text() == before


def test_save_eval_never_leaves_a_half_written_file(tmp_path):
    """run_all.py skips a stage that has an eval.json: a failed write must leave the previous one whole."""
    path = train.save_eval(tmp_path, {"reward": 1.0})
    before = path.read_text()
    with pytest.raises(TypeError):
        train.save_eval(tmp_path, {"reward": 2.0, "model": object()})  # json cannot write it: fails mid-record
    assert path.read_text() == before and json.loads(before) == {"reward": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_should_save_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 8) if train.should_save(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 5) if train.should_save(s, 0, 4)] == [4]  # 0: only the last


def test_check_files_names_a_file_given_for_a_directory_and_hints_only_at_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(InputError, match="^--tokenizer=tok.json: expected a directory, found a file$"):
        train.check_files(SimpleNamespace(tokenizer="tok.json"), "tokenizer", directory=True)
    train.check_files(SimpleNamespace(tokenizer=str(tmp_path)), "tokenizer", directory=True)
    # a relative path the repository does not hold either: no advice to run from the repository
    with pytest.raises(InputError) as e:
        train.check_files(SimpleNamespace(data="data/no_such_file.jsonl"), "data")
    assert str(e.value) == f"--data=data/no_such_file.jsonl: not found (looked in {tmp_path})"


@pytest.mark.parametrize("optimizer, message", [
    ("missing", r"^checkpoint holds no optimizer state 'optimizer' \(has \['extra', 'rng', 'step'\]\)$"),
    (None, r"^train_state\.pt: optimizer is not an optimizer state \(a dict with 'state'\), it holds a NoneType$"),
])
def test_restore_names_a_missing_or_malformed_optimizer_state(optimizer, message):
    model = torch.nn.Linear(2, 2)
    state = {"step": 1, "rng": [train._rng_state()], "extra": {}}
    if optimizer != "missing":
        state["optimizer"] = optimizer
    with pytest.raises(InputError, match=message):
        train.restore(state, {"model": (model, train.adamw(model, 1e-3))}, dist.Dist())
