"""train_sft.py: the loss normalisation, gradient accumulation, data parallelism (torchrun + FSDP2) and resume."""
import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_rm
import train_sft
from conftest import DEVICES, logged, logged_losses as losses, ranks, reference, sft_args as args
from nanoalign import dist, hbat, train
from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.cli import InputError
from nanoalign.data import collate_sft, read_jsonl, tokenize_pretrain, tokenize_sft
from nanoalign.model import ModelConfig, Transformer
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "data" / "tokenizer"
FIXTURES = ROOT / "tests" / "fixtures"


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
    for mb in (8, 2, 3, 7):  # 7: a last micro-batch of one row
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
    prompts = tmp_path / "prompts.jsonl"  # the final evaluation runs once the run is finished, not at a stop
    prompts.write_text("".join((ROOT / "data" / "prompts_test.jsonl").read_text().splitlines(True)[:3]))
    train_sft.main(args(tiny_plain, tmp_path / "full", "--steps=6"))
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=6", "--stop_at=3", f"--eval_data={prompts}"))
    state = torch.load(tmp_path / "cut" / "model" / "train_state.pt", weights_only=False)
    assert state["step"] == 3 and state["optimizer"]["state"]
    assert not (tmp_path / "cut" / "eval.json").exists()
    train_sft.main(args(tiny_plain, tmp_path / "cut", "--steps=6", "--resume", f"--eval_data={prompts}"))
    assert json.loads((tmp_path / "cut" / "eval.json").read_text())["n"] == 3
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


ALPACAFARM = FIXTURES / "alpacafarm_sample.json"  # AlpacaFarm's format, five records


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


@pytest.mark.parametrize("flags, message", [
    (["--dtype=float16"], "--dtype=float16: train in bfloat16 or float32"),
    (["--eval_every=0"], "--eval_every=0: must be positive"),
    (["--dim=20", "--n_head=4"], "--dim=20: must be a multiple of --n_head=4, with an even quotient"),  # 5 a head
    (["--dim=30", "--n_head=4"], "--dim=30: must be a multiple of --n_head=4, with an even quotient"),
    (["--base_dir={file}/base"], "--base_dir={file}/base: {file} is a file, not a directory"),
    (["--format=hh", "--template=alpaca"], "--template=alpaca: HH-RLHF transcripts (--format=hh) use the hh template"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, flags, message):
    (tmp_path / "file").write_text("not a directory\n")
    flags, message = [f.format(file=tmp_path / "file") for f in flags], message.format(file=tmp_path / "file")
    with pytest.raises(InputError, match="^" + re.escape(message)):
        train_sft.main([f"--base_dir={tmp_path}/base", f"--out_dir={tmp_path}/sft", f"--data={ROOT}/data/sft_val.jsonl",
                        f"--val_data={ROOT}/data/sft_val.jsonl", "--eval_data=", *flags])
    assert not (tmp_path / "base").exists() and not (tmp_path / "sft").exists()


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


# --- the script's own plumbing (a mutation audit of train_sft.py found these untested)

def test_data_format_by_name_and_hh_trains_on_the_chosen_transcript():
    assert [train_sft.data_format(p, "auto") for p in ("a.jsonl", "a.jsonl.gz", "a.json")] == ["jsonl", "jsonl",
                                                                                                 "alpaca"]
    assert train_sft.data_format("a.jsonl", "hh") == "hh"
    examples = train_sft.load_sft_examples(str(FIXTURES / "hh_rlhf_sample.jsonl"), "hh")
    assert examples[0] == {"prompt": "What are some cuss words in english?", "response": "I'm not going to help with "
                           "that, but I can tell you about the history of swearing if you like."}


def test_the_default_directories_are_where_the_later_stages_look():
    """`python train_rm.py` (and DPO, PPO, Hbat) with no arguments start from what `python train_sft.py` saved."""
    cfg = train_sft.Config()
    assert Path(cfg.out_dir) / "model" == Path(hbat.SFT_INIT) == Path(train_rm.Config().init)
    assert Path(cfg.base_dir) / "model" == Path(hbat.BASE_INIT)


def test_pretraining_blocks_count_every_token_but_the_first(tiny_plain, tiny_tok):
    """A block's mask is all ones, its first token included; only the tokens after it have a prediction to score."""
    texts = [r["text"] for r in read_jsonl(ROOT / "data" / "pretrain.jsonl")[:20]]
    blocks = tokenize_pretrain(texts, tiny_tok, 64)[:3]
    model = load_pretrained(tiny_plain).eval()
    no_autocast = torch.autocast("cpu", enabled=False)
    ids = torch.tensor([b["ids"] for b in blocks])
    with torch.no_grad():
        expected = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        loss_sum, n = train_sft.sft_loss_sum(model, collate_sft(blocks, tiny_tok.pad_id), no_autocast)
        mean = train_sft.eval_loss(model, blocks, train_sft.Config(micro_batch_size=2), dist.Dist(), tiny_tok.pad_id,
                                   no_autocast)
    assert n == 3 * 63 and loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    assert mean == pytest.approx(expected.item() / (3 * 63), rel=1e-5)


def test_each_step_runs_at_the_scheduled_lr_with_the_weight_decay_asked_and_evaluates_on_val_data(
        tiny_plain, tiny_tok, tmp_path, optimizer_groups):
    val = tmp_path / "val.jsonl"  # (the other tests train and evaluate on the same file)
    val.write_text("".join((ROOT / "data" / "sft_train.jsonl").read_text().splitlines(True)[:8]))
    train_sft.main(args(tiny_plain, tmp_path / "run", "--steps=4", "--lr=2e-3", "--warmup_steps=2",
                        "--weight_decay=0.05", f"--val_data={val}"))
    records = logged(tmp_path / "run")
    scheduled = [train.lr_at(step, 4, 2e-3, 2, 0.1) for step in range(4)]
    assert len(set(scheduled)) == 3 and [r["lr"] for r in records] == scheduled  # warmup, then cosine
    assert [{lr for lr, _ in groups} for groups in optimizer_groups] == [{lr} for lr in scheduled]
    # matrices decay; norms and biases do not
    assert {wd for groups in optimizer_groups for _, wd in groups} == {0.0, 0.05}
    # the last step's eval_loss is the final model's on --val_data
    rows = tokenize_sft(read_jsonl(val), tiny_tok, "hh", max_len=128)
    with torch.no_grad():
        expected = train_sft.eval_loss(load_pretrained(tmp_path / "run" / "model"), rows, train_sft.Config(),
                                       dist.Dist(), tiny_tok.pad_id, torch.autocast("cpu", enabled=False))
    assert records[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_final_evaluation_prints_num_samples_answers_and_the_oracles_numbers(tiny_tok, monkeypatch, capsys):
    records = read_jsonl(ROOT / "data" / "prompts_test.jsonl")[:12]
    answers = [r["reference"] if i % 3 else "I do not know." for i, r in enumerate(records)]
    monkeypatch.setattr(train_sft, "sample_answers", lambda model, tok, prompts, template, max_new_tokens: answers)
    cfg = train_sft.Config(eval_data=str(ROOT / "data" / "prompts_test.jsonl"), num_samples=2, template="hh")
    monkeypatch.setattr(train_sft, "read_jsonl", lambda path, required: records)
    result = train_sft.final_eval(None, tiny_tok, cfg, dist.Dist())
    out = capsys.readouterr().out
    assert out.count("\n> ") == 2 and f"> {records[1]['prompt']}\n  {answers[1]}\n" in out
    assert 0 < result["closed_accuracy"] != result["mean_quality"] > 0
    assert (f"closed-ended accuracy (greedy, {result['n_closed']} held-out prompts): {result['closed_accuracy']:.1%}; "
            f"mean oracle quality over all 12: {result['mean_quality']:.3f}") in out


def test_pretraining_holds_out_one_block_in_fifty_and_trains_on_the_rest(tmp_path, tiny_tok, monkeypatch):
    split = {}

    def fit(cfg, d, phase, model, tok, rows, val_rows, *rest):
        split.update(rows=rows, val=val_rows)
        return model, False  # stopped: nothing after pretraining runs

    monkeypatch.setattr(train_sft, "fit", fit)
    train_sft.main([f"--base_dir={tmp_path}/base", f"--out_dir={tmp_path}/sft", "--mode=pretrain", "--dim=32",
                    "--n_layer=1", "--n_head=2", "--hidden_dim=64", "--max_len=96", "--eval_data=",
                    "--data=", "--val_data=no/such.jsonl",  # pretraining reads no SFT data: not checked
                    f"--pretrain_data={ROOT}/data/pretrain.jsonl", f"--tokenizer={TOK}"])
    blocks = tokenize_pretrain([r["text"] for r in read_jsonl(ROOT / "data" / "pretrain.jsonl")], tiny_tok, 96)
    assert len(split["val"]) == len(blocks) // 50 > 1 and split["val"] + split["rows"] == blocks


@pytest.mark.parametrize("context, refused", [(49, True), (50, False)])
def test_a_context_too_short_for_the_final_answers_is_refused_before_training(tmp_path, tiny_tok, monkeypatch,
                                                                               context, refused):
    """The final evaluation answers in up to 48 tokens after a prompt of at least two (BOS and one more)."""
    model = Transformer(ModelConfig(vocab_size=tiny_tok.vocab_size, dim=32, n_layer=1, n_head=2, hidden_dim=64,
                                    max_seq_len=context))
    init = save_pretrained(model, tmp_path / "init", tokenizer=tiny_tok)
    monkeypatch.setattr(train_sft, "fit", lambda cfg, d, phase, model, *rest: (model, False))
    prompts = ROOT / "data" / "prompts_test.jsonl"
    argv = args(init, tmp_path / "run", f"--max_len={context}", f"--eval_data={prompts}")
    if refused:
        with pytest.raises(InputError, match=rf"^--eval_data={prompts}: answers of up to 48 tokens leave no room for a "
                                             rf"prompt in the model's context of 49 \(pass --eval_data= to skip it\)$"):
            train_sft.main(argv)
    else:
        train_sft.main(argv)  # reaches training


def test_pretraining_stopped_and_resumed_continues_exactly_then_fine_tunes_from_scratch(tmp_path):
    """--stop_at ends the pretraining stage as if interrupted (no SFT after it); a bare --resume continues it (auto
    mode looks for the base's checkpoint too), refusing other flags; the SFT stage after a resumed pretraining starts
    fresh, whatever SFT checkpoint an earlier run left."""
    common = ["--dim=32", "--n_layer=1", "--n_head=2", "--hidden_dim=64", "--max_len=96", "--batch_size=4",
              "--micro_batch_size=4", "--warmup_steps=1", "--pretrain_steps=4", "--steps=2", "--save_every=0",
              f"--data={ROOT}/data/sft_val.jsonl", "--val_data=", "--eval_data=", "--device=cpu",
              f"--pretrain_data={ROOT}/data/pretrain.jsonl", f"--tokenizer={TOK}"]

    def run(name, *extra):
        train_sft.main([f"--base_dir={tmp_path}/{name}/base", f"--out_dir={tmp_path}/{name}/sft", *common, *extra])

    run("full")
    run("cut", "--stop_at=2")
    assert len(losses(tmp_path / "cut" / "base")) == 2 and not (tmp_path / "cut" / "sft").exists()
    with pytest.raises(InputError, match="^--pretrain_steps=5: the checkpoint to resume was written with "
                                         "--pretrain_steps=4"):
        run("cut", "--resume", "--pretrain_steps=5")
    run("cut", "--resume", "--stop_at=3")
    shutil.copytree(tmp_path / "full" / "sft" / "model", tmp_path / "cut" / "sft" / "model")  # a finished SFT run's
    run("cut", "--resume")
    for phase in ("base", "sft"):
        full, cut = losses(tmp_path / "full" / phase), losses(tmp_path / "cut" / phase)
        assert len(full) == len(cut) == {"base": 4, "sft": 2}[phase]
        assert max(abs(a - b) for a, b in zip(full, cut)) <= 1e-6, phase
