"""train_sft.py: the loss normalisation, gradient accumulation, data parallelism (torchrun + FSDP2) and resume."""
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_sft
from conftest import DEVICES, logged_losses as losses, ranks, reference, sft_args as args
from nanoalign import dist
from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.data import collate_sft, read_jsonl, tokenize_sft
from nanoalign.model import ModelConfig, Transformer
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "data" / "tokenizer"


@pytest.fixture(scope="module")
def rows(tiny_tok):
    examples = read_jsonl(ROOT / "data" / "sft_val.jsonl")[:8]
    return tokenize_sft(examples, tiny_tok, "hh", max_len=128)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch_and_the_token_mean(tiny_plain, rows, tiny_tok):
    base = load_pretrained(tiny_plain).train()
    no_autocast = torch.autocast("cpu", enabled=False)
    results = {}
    for mb in (8, 2, 3):
        model = copy.deepcopy(base)
        loss_sum, n = train_sft.sft_gradients(model, rows, mb, dist.Dist(), tiny_tok.pad_id, no_autocast)
        results[mb] = (loss_sum.item(), n.item(), grads(model))
    # the definition: mean over every response token of the step, from one padded batch
    model = copy.deepcopy(base)
    batch = collate_sft(rows, tiny_tok.pad_id)
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    expected = grads(model)
    n_tokens = sum(sum(r["mask"]) for r in rows)  # the response tokens with their EOS
    for mb, (loss_sum, n, g) in results.items():
        assert n == n_tokens
        assert abs(loss_sum / n - loss.item()) < 1e-5
        for name in expected:
            torch.testing.assert_close(g[name], expected[name], atol=1e-6, rtol=1e-4)


def test_micro_batch_without_response_tokens_is_zero_not_nan(tiny_plain, rows, tiny_tok):
    model = load_pretrained(tiny_plain).train()
    empty = [{"ids": r["ids"], "mask": [0] * len(r["ids"])} for r in rows[:2]]
    loss_sum, n = train_sft.sft_gradients(model, empty, 2, dist.Dist(), tiny_tok.pad_id,
                                                 torch.autocast("cpu", enabled=False))
    assert loss_sum.item() == 0.0 and n.item() == 1  # clamped count, no division by zero
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0 for p in model.parameters())


def test_resume_continues_exactly(tiny_plain, tmp_path):
    train_sft.main(args(tiny_plain, tmp_path / "full", "--steps=6"))
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=6", "--stop_at=3"))
    state = torch.load(tmp_path / "cut" / "model" / "train_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=6", "--resume"))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(full) == len(cut) == 6
    assert max(abs(a - b) for a, b in zip(full, cut)) <= 1e-6
    assert full[-1] < full[0]
    # the template the run trained in is saved with the model (the generate command reads it)
    assert Tokenizer.from_dir(TOK).template is None
    assert Tokenizer.from_dir(tmp_path / "full" / "model").template == "hh"
    a, b = load_pretrained(tmp_path / "full" / "model"), load_pretrained(tmp_path / "cut" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_resume_drops_metrics_logged_after_the_checkpoint(tiny_plain, tmp_path):
    train_sft.main(args(tiny_plain, tmp_path / "full", "--steps=4"))
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=4", "--stop_at=2"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # step 3 logged, then killed before its save
        f.write(json.dumps({"phase": "sft", "step": 3, "loss": 123.0}) + "\n")
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=4", "--resume"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "full"), losses(tmp_path / "cut"))) <= 1e-6


def test_help_lists_each_flag_with_its_comment_and_default(capsys):
    with pytest.raises(SystemExit):
        train_sft.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--micro_batch_size MICRO_BATCH_SIZE sequences per forward on one rank" in out
    assert "(default: 16)" in out and "--resume [RESUME] continue from" in out


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_plain, tmp_path):
    train_sft.main(args(tiny_plain, tmp_path / "run", "--steps=2"))
    before = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    # (a checkpoint that holds NaN is refused when it is loaded; here the NaN arises in the training forward)
    def poison(module, inputs, output):
        if isinstance(module, Transformer) and module.training:
            return output * float("nan")

    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match="sft step 1: loss nan"):
            train_sft.main(args(tiny_plain, tmp_path / "run", "--steps=2"))
    finally:
        handle.remove()
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == before


@pytest.fixture(scope="module")
def tied_init_dir(tmp_path_factory, tiny_tok):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=tiny_tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                    max_seq_len=128, tie_embeddings=True))
    model.init_weights()
    return save_pretrained(model, tmp_path_factory.mktemp("tied") / "model", tokenizer=tiny_tok)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_resume_with_tied_embeddings_matches_one_process(tied_init_dir, tmp_path, torchrun, device):
    """Rank 0 loads and broadcasts the shards (the others start from an empty meta model), then a run cut
    at step 2 resumes under torchrun; all of it equals one process."""
    on, n = f"--device={device}", ranks(device)
    train_sft.main(args(tied_init_dir, tmp_path / "one", "--steps=4", on))
    torchrun(ROOT / "train_sft.py", *args(tied_init_dir, tmp_path / "two", "--steps=4", "--stop_at=2", on), cwd=tmp_path,
             nproc=n)
    torchrun(ROOT / "train_sft.py", *args(tied_init_dir, tmp_path / "two", "--steps=4", "--resume", on), cwd=tmp_path,
             nproc=n)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4
    a, b = load_pretrained(tmp_path / "one" / "model"), load_pretrained(tmp_path / "two" / "model")
    assert b.lm_head.weight is b.tok_emb.weight
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=n)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_two_ranks_fsdp_matches_one_process(tiny_plain, tmp_path, torchrun, device):
    one_val_row = tmp_path / "val1.jsonl"  # fewer held-out rows than ranks: rank 1 has none
    one_val_row.write_text((ROOT / "data" / "sft_val.jsonl").read_text().splitlines()[0] + "\n")
    extra = ["--steps=3", f"--val_data={one_val_row}", f"--device={device}"]
    train_sft.main(args(tiny_plain, tmp_path / "one", *extra))
    proc = torchrun(ROOT / "train_sft.py", *args(tiny_plain, tmp_path / "two", *extra), cwd=tmp_path,
                    nproc=ranks(device))
    backend = "gloo" if device == "cpu" else "nccl"
    assert f"{backend} process group, models sharded by FSDP2" in proc.stdout, proc.stdout[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4
    evals = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1])["eval_loss"] for r in ("one", "two")]
    assert abs(evals[0] - evals[1]) <= 1e-4
    a, b = load_pretrained(tmp_path / "one" / "model"), load_pretrained(tmp_path / "two" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=n)


def test_transformers_loads_the_sft_checkpoint(tiny_plain, tmp_path):
    transformers = reference("transformers")
    train_sft.main(args(tiny_plain, tmp_path / "run", "--steps=2"))
    ours = load_pretrained(tmp_path / "run" / "model")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    x = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() <= 1e-4
    assert (tmp_path / "run" / "model" / "tokenizer.json").exists()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "tokens", "tok_per_s", "eval_loss"} <= set(record)


ALPACAFARM = ROOT / "tests" / "fixtures" / "alpacafarm_sample.json"  # AlpacaFarm's format, five records


def test_sft_on_real_alpacafarm_data_uses_the_alpaca_template(tiny_plain, tmp_path, capsys):
    train_sft.main(args(tiny_plain, tmp_path / "alpaca", "--steps=2", f"--data={ALPACAFARM}", "--val_data=",
                        "--num_samples=0"))
    out = capsys.readouterr().out
    assert "template 'alpaca'" in out and "truncated" in out  # long AlpacaFarm answers are cut to --max_len
    assert Tokenizer.from_dir(tmp_path / "alpaca" / "model").template == "alpaca"  # saved with the model
    assert len(losses(tmp_path / "alpaca")) == 2


def test_held_out_prompts_from_outside_the_tiny_world_are_answered_and_said_to_have_no_oracle(tiny_plain, tmp_path,
                                                                                              capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a haiku about the sea."}) + "\n")
    train_sft.main(args(tiny_plain, tmp_path / "run", "--steps=1", f"--eval_data={prompts}", "--num_samples=1"))
    out = capsys.readouterr().out
    assert "> Write a haiku about the sea." in out
    assert f"--eval_data={prompts} holds prompts from outside the tiny world: answers shown, no oracle metrics" in out


def test_no_init_pretrains_a_base_then_fine_tunes_and_scores(tmp_path, capsys):
    """The default flow on a miniature budget: pretrain (every token), SFT, greedy answers judged by the oracle."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join((ROOT / "data" / "prompts_test.jsonl").read_text().splitlines(True)[::15]))
    common = [f"--base_dir={tmp_path}/base", f"--out_dir={tmp_path}/sft", "--dim=32", "--n_layer=1", "--n_head=2",
              "--hidden_dim=64", "--max_len=96", "--batch_size=4", "--micro_batch_size=4", "--warmup_steps=1",
              f"--data={ROOT}/data/sft_val.jsonl", f"--eval_data={prompts}", "--num_samples=1", "--device=cpu"]
    train_sft.main(common + ["--pretrain_steps=2", "--steps=2"])
    out = capsys.readouterr().out
    assert "pretraining a" in out and "closed-ended accuracy" in out
    pre = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in pre] == ["pretrain"] * 2
    assert pre[0]["tokens"] == 4 * 95  # every token of each 96-token block but the first is trained
    result = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert result["n_closed"] == sum('"CONSTRAINED"' in line for line in prompts.read_text().splitlines())
    # a second call finds the finished base and goes straight to SFT
    train_sft.main(common + ["--pretrain_steps=2", "--steps=2"])
    assert "pretraining a" not in capsys.readouterr().out


def test_fp16_training_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--dtype=float16: train in bfloat16 or float32"):
        train_sft.main([f"--base_dir={tmp_path}/base", "--dtype=float16"])
    assert not (tmp_path / "base").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_cuda_tracks_fp32_and_keeps_fp32_weights(tiny_plain, tmp_path):
    """--dtype=bfloat16 (the default on CUDA): the matmuls run in bf16 while the weights, gradients and AdamW
    state stay fp32. Three steps follow the fp32 run's losses to bf16 precision, and the checkpoint is fp32."""
    from safetensors import safe_open

    train_sft.main(args(tiny_plain, tmp_path / "fp32", "--steps=3", "--device=cuda"))
    train_sft.main(args(tiny_plain, tmp_path / "bf16", "--steps=3", "--device=cuda", "--dtype=bfloat16"))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 3 and a != b  # autocast did change the arithmetic
    assert max(abs(x - y) for x, y in zip(a, b)) <= 0.02 * max(a), (a, b)
    with safe_open(tmp_path / "bf16" / "model" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


# --- edge cases a mutation audit found untested

@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_with_several_micro_batches_per_rank_matches_one_process(tiny_plain, tmp_path, torchrun):
    extra = ["--steps=2", "--micro_batch_size=1", "--val_data=", "--device=cpu"]  # 4 micro-batches on each rank
    train_sft.main(args(tiny_plain, tmp_path / "one", *extra))
    torchrun(ROOT / "train_sft.py", *args(tiny_plain, tmp_path / "two", *extra), cwd=tmp_path, nproc=2)
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two"))) <= 1e-4
    a, b = load_pretrained(tmp_path / "one" / "model"), load_pretrained(tmp_path / "two" / "model")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=n)
