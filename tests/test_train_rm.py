"""train_rm.py: the per-pair loss over a whole step, the logged accuracy, the offset, resume, the flags, and the
tiny-world default run (slow)."""
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_rm
from conftest import DEVICES, logged as records, ranks
from nanoalign import dist, train
from nanoalign.cli import InputError
from nanoalign.data import collate_sft, read_jsonl, read_pairs, tokenize_pairs, tokenize_sft
from nanoalign.model import ModelConfig
from nanoalign.reward import RewardModel
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small slices of the tiny world's files: 40 training pairs, 12 held out, 6 demonstrations."""
    d = tmp_path_factory.mktemp("data")
    for name, src, n in [("train", "prefs_train", 40), ("val", "prefs_val", 12), ("demos", "sft_val", 6)]:
        (d / f"{name}.jsonl").write_text("".join((ROOT / "data" / f"{src}.jsonl").read_text().splitlines(True)[:n]))
    return d


def args(tiny_plain, files, out, *extra):
    """Small, fast flags; a flag repeated in extra wins (argparse keeps the last)."""
    return [f"--init={tiny_plain}", f"--out_dir={out}", f"--data={files}/train.jsonl", f"--val_data={files}/val.jsonl",
            f"--offset_data={files}/demos.jsonl", "--batch_size=8", "--micro_batch_size=4", "--max_len=128",
            "--warmup_steps=2", "--eval_every=2", "--save_every=0", "--lr=1e-3", "--device=cpu", "--dtype=float32",
            *extra]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_step_loss_is_the_mean_over_every_pair_of_the_step(tiny_plain, tiny_tok):
    """Any micro-batch size gives the gradients of -mean log sigmoid(r_w - r_l) over the step's pairs, with each
    response scored alone (no padding at all)."""
    pairs = tokenize_pairs(read_jsonl(ROOT / "data" / "prefs_val.jsonl")[:6], tiny_tok, "hh", 128)
    base = RewardModel.from_causal_lm(tiny_plain, generator=torch.Generator().manual_seed(0)).train()
    results = {}
    for mb in (6, 1, 4):
        rm = copy.deepcopy(base)
        loss_sum = train.accumulate_gradients(rm, train.micro_batches(pairs, mb), lambda p: train_rm.pair_sums(
            rm, p, tiny_tok.pad_id, NO_AUTOCAST)[0], 6.0, dist.Dist())
        results[mb] = loss_sum.item(), grads(rm)
    rm = copy.deepcopy(base)
    score = lambda ids: rm(torch.tensor([ids]))[0]  # noqa: E731
    margins = torch.stack([score(p["chosen_ids"]) - score(p["rejected_ids"]) for p in pairs])
    loss = -F.logsigmoid(margins).mean()
    loss.backward()
    for mb, (loss_sum, g) in results.items():
        assert abs(loss_sum / 6 - loss.item()) <= 1e-6
        for name, expected in grads(rm).items():
            torch.testing.assert_close(g[name], expected, atol=1e-6, rtol=1e-4, msg=f"micro-batch {mb}: {name}")


def test_a_few_steps_log_the_accuracy_and_save_a_normalised_reward_model(tiny_plain, files, tiny_tok, tmp_path, capsys):
    train_rm.main(args(tiny_plain, files, tmp_path / "run", "--steps=4", "--stop_at=9"))  # a stop past the end: none
    out = capsys.readouterr().out
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == [0, 1, 2, 3, 4]
    assert f"held-out accuracy before training: {logged[0]['eval/accuracy']:.1%}" in out
    assert f"held-out accuracy {logged[-1]['eval/accuracy']:.1%} on 12 pairs (chance 50%)" in out
    assert {"rm/loss", "rm/accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "lr",
            "grad_norm"} <= set(logged[1])
    last = logged[-1]
    assert {"eval/accuracy", "eval/loss", "offset"} <= set(last)
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"])
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["eval/accuracy"] == last["eval/accuracy"] and result["n_val_pairs"] == 12
    assert result["offset"] == last["offset"] == pytest.approx(-last["offset/reference_mean"])  # a new head's is 0
    assert round(result["eval/accuracy"] * 12) == pytest.approx(result["eval/accuracy"] * 12)  # a count of 12

    # the saved model: transformers' layout with the pad id, and the demonstrations average exactly 0
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == tiny_tok.pad_id
    rm = RewardModel.from_pretrained(model_dir)
    assert rm.offset == config["nanoalign_reward_offset"] == last["offset"] != 0.0
    demos = collate_sft(tokenize_sft(read_jsonl(files / "demos.jsonl"), tiny_tok, "hh", 128), tiny_tok.pad_id)
    with torch.no_grad():
        assert abs(rm(demos["input_ids"], demos["attention_mask"]).mean().item()) <= 1e-5
    assert (model_dir / "train_state.pt").exists() and Tokenizer.from_dir(model_dir).template == "hh"


def test_resume_continues_exactly(tiny_plain, files, tmp_path):
    train_rm.main(args(tiny_plain, files, tmp_path / "full", "--steps=6"))
    train_rm.main(args(tiny_plain, files, tmp_path / "cut", "--steps=6", "--stop_at=3"))
    assert torch.load(tmp_path / "cut" / "model" / "train_state.pt", weights_only=False)["step"] == 3
    assert not any("offset" in r for r in records(tmp_path / "cut"))  # centred once finished, not at a stop
    with pytest.raises(InputError, match="^--offset_data=: the checkpoint to resume was written with --offset_data="):
        train_rm.main(args(tiny_plain, files, tmp_path / "cut", "--steps=6", "--resume", "--offset_data="))
    train_rm.main(args(tiny_plain, files, tmp_path / "cut", "--steps=6", "--resume"))
    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in full] == [r["step"] for r in cut] == list(range(7))
    for key in ("rm/loss", "rm/accuracy", "eval/loss"):
        a, b = [r[key] for r in full if key in r], [r[key] for r in cut if key in r]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, key
    assert full[-1]["rm/loss"] != full[1]["rm/loss"]
    a, b = (RewardModel.from_pretrained(tmp_path / r / "model") for r in ("full", "cut"))
    assert a.offset == pytest.approx(b.offset, abs=1e-6)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_init_from_a_reward_model_keeps_its_head_and_offset(tiny_tok, files, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(ModelConfig(vocab_size=tiny_tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                 max_seq_len=128), offset=0.5)
    with torch.no_grad():
        rm.score.weight.fill_(0.3)  # no draw of the N(0, 1/sqrt(d+1)) init could give this
    tok = copy.copy(tiny_tok)
    tok.template = "plain"  # the template it was trained in, saved with it
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    train_rm.main(args(tmp_path / "rm", files, tmp_path / "run", "--steps=1", "--lr=1e-9", "--offset_data="))
    trained = RewardModel.from_pretrained(tmp_path / "run" / "model")
    assert trained.offset == 0.5  # --offset_data= keeps it
    assert Tokenizer.from_dir(tmp_path / "run" / "model").template == "plain"  # --template=auto: the init's
    assert (trained.score.weight - 0.3).abs().max() <= 1e-6


@pytest.mark.parametrize("flag, message", [
    ("--format=csv", "--format=csv: choose one of jsonl, hh"),
    ("--template=chatml", "--template=chatml: choose one of auto, plain, hh, alpaca"),
    ("--batch_size=0", "--batch_size=0: must be positive"),
    ("--micro_batch_size=-2", "--micro_batch_size=-2: must be positive"),
    ("--lr=0", "--lr=0.0: must be positive"),
    ("--steps=-1", "--steps=-1: must be >= 0"),
    ("--stop_at=-1", "--stop_at=-1: must be >= 0"),
    ("--eval_every=0", "--eval_every=0: must be positive"),
    ("--min_lr_ratio=1.5", r"--min_lr_ratio=1.5: must be in \[0.0, 1.0\]"),
    ("--dtype=float16", "--dtype=float16: train in bfloat16 or float32"),
    ("--device=tpu", "--device=tpu: choose cpu, or cuda"),
    ("--init=", "--init: give the SFT checkpoint"),
    ("--data=no/such.jsonl", "--data=no/such.jsonl: not found"),
    ("--val_data=no/such.jsonl", "--val_data=no/such.jsonl: not found"),
    ("--offset_data=no_demos.jsonl", "--offset_data=no_demos.jsonl: not found"),
])
def test_bad_flags_are_refused_before_any_work(tiny_plain, files, tmp_path, flag, message):
    with pytest.raises(InputError, match=message):
        train_rm.main(args(tiny_plain, files, tmp_path / "run", flag))
    assert not (tmp_path / "run").exists()


def test_a_context_longer_than_the_model_is_refused(tiny_plain, files, tmp_path):
    with pytest.raises(InputError, match="--max_len=512: the model's context length is 128"):
        train_rm.main(args(tiny_plain, files, tmp_path / "run", "--max_len=512"))


def test_the_script_prints_a_bad_flag_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_rm.py"), "--format=csv"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --format=csv: choose one of jsonl, hh\n"
    assert not (tmp_path / "out").exists()


def test_a_missing_default_init_is_trained_first_with_train_sft(tiny_plain, files, tmp_path, monkeypatch, capsys):
    import train_sft

    calls = []

    def fake_sft(argv):  # stands in for the minutes of the real one: leaves a checkpoint where it would
        calls.append(argv)
        shutil.copytree(tiny_plain, tmp_path / "out" / "sft" / "model")

    monkeypatch.setattr(train_sft, "main", fake_sft)
    monkeypatch.chdir(tmp_path)
    small = args(tiny_plain, files, tmp_path / "rm", "--steps=1")[1:]  # every flag but --init
    train_rm.main(small)
    assert calls == [["--device=cpu"]]
    assert "out/sft/model not found: training the tiny SFT model first" in capsys.readouterr().out
    assert (tmp_path / "rm" / "model" / "model.safetensors").exists()
    train_rm.main(small)  # now it is there
    shutil.rmtree(tmp_path / "out" / "sft")
    train_rm.main(small + ["--resume"])  # a resumed run starts from its own checkpoint
    assert len(calls) == 1


def test_a_tie_is_not_a_correct_pair_and_evaluate_reports_the_mean_margin(tiny_plain, tiny_tok, files):
    rm = RewardModel.from_causal_lm(tiny_plain, generator=torch.Generator().manual_seed(0)).eval()
    pairs = tokenize_pairs(read_jsonl(files / "val.jsonl"), tiny_tok, "hh", 128)
    ties = [{**p, "rejected_ids": p["chosen_ids"], "rejected_mask": p["chosen_mask"]} for p in pairs]
    with torch.no_grad():
        assert train_rm.pair_sums(rm, ties, tiny_tok.pad_id, NO_AUTOCAST)[1][1] == 0  # no pair's chosen is higher
        margins = torch.stack([rm(torch.tensor([p["chosen_ids"]]))[0] - rm(torch.tensor([p["rejected_ids"]]))[0]
                               for p in pairs])
    got = train_rm.evaluate(rm, pairs, train_rm.Config(micro_batch_size=5), dist.Dist(), tiny_tok.pad_id, NO_AUTOCAST)
    assert got["eval/margins"] == pytest.approx(margins.mean().item(), rel=1e-5, abs=1e-6)
    assert got["eval/loss"] == pytest.approx(-F.logsigmoid(margins).mean().item(), rel=1e-5)
    assert got["eval/accuracy"] == (margins > 0).sum().item() / 12


def test_an_epoch_by_default_from_the_seeds_head_in_the_runs_template(tiny_plain, tiny_tok, files, tmp_path,
                                                                      optimizer_groups, capsys):
    """--steps=0: one epoch rounded up to whole steps (40 pairs in 3 steps of 16, the third completed from the next
    epoch's order: train.batch_indices); the held-out accuracy at every
    --eval_every and at the end; the first step's gradient norm is that of the step's mean loss; the head comes from
    --seed and the matrices decay by --weight_decay; the demonstrations that set the offset use --template."""
    train_rm.main(args(tiny_plain, files, tmp_path / "run", "--steps=0", "--batch_size=16", "--micro_batch_size=8",
                       "--seed=1", "--template=plain", "--lr=1e-9", "--weight_decay=0.1"))
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == [0, 1, 2, 3]
    assert {wd for groups in optimizer_groups for _, wd in groups} == {0.0, 0.1}
    assert [r["step"] for r in logged if "eval/accuracy" in r] == [0, 2, 3]
    last = logged[-1]  # the summary line gives the held-out accuracy, not the last batch's
    assert last["rm/accuracy"] != last["eval/accuracy"]
    assert f"held-out accuracy {last['eval/accuracy']:.1%} on 12 pairs (chance 50%)" in capsys.readouterr().out
    head = RewardModel.from_causal_lm(tiny_plain, head_init="normal", generator=torch.Generator().manual_seed(1))
    rows = tokenize_pairs(read_jsonl(files / "train.jsonl"), tiny_tok, "plain", 128)
    first = [rows[i] for i in train.batch_indices(0, len(rows), 16, 1)]
    (train_rm.pair_sums(head, first, tiny_tok.pad_id, NO_AUTOCAST)[0] / 16).backward()
    norm = torch.cat([p.grad.flatten() for p in head.parameters()]).norm().item()
    assert logged[1]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    trained = RewardModel.from_pretrained(tmp_path / "run" / "model")
    torch.testing.assert_close(trained.score.weight, head.score.weight, atol=1e-6, rtol=0)
    demos = collate_sft(tokenize_sft(read_jsonl(files / "demos.jsonl"), tiny_tok, "plain", 128), tiny_tok.pad_id)
    with torch.no_grad():
        assert abs(trained(demos["input_ids"], demos["attention_mask"]).mean().item()) <= 1e-5


def test_the_default_flags_read_the_tiny_worlds_pairs_and_hh_reads_both_files(tiny_plain, files, tmp_path):
    assert len(read_pairs(ROOT / train_rm.Config.data, train_rm.Config.format)) > 1000
    hh = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
    train_rm.main(args(tiny_plain, files, tmp_path / "run", "--format=hh", f"--data={hh}", f"--val_data={hh}",
                       "--steps=1"))
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n_val_pairs"] == 3


def test_hh_transcripts_take_the_hh_template(tiny_plain, tiny_tok, files, tmp_path):
    """--format=hh: --template=auto is hh whatever template the init was saved with (its transcripts are rebuilt in
    hh's turns), and another --template is refused before any work."""
    from nanoalign.checkpoint import load_pretrained, save_pretrained

    hh = ROOT / "tests" / "fixtures" / "hh_rlhf_sample.jsonl"
    alpaca_tok = copy.deepcopy(tiny_tok)
    alpaca_tok.template = "alpaca"
    init = save_pretrained(load_pretrained(tiny_plain), tmp_path / "init", tokenizer=alpaca_tok)
    flags = args(init, files, tmp_path / "run", "--format=hh", f"--data={hh}", f"--val_data={hh}", "--steps=1",
                 "--offset_data=")
    with pytest.raises(InputError, match=r"^--template=plain: HH-RLHF transcripts \(--format=hh\) use the hh template"):
        train_rm.main(flags + ["--template=plain"])
    assert not (tmp_path / "run").exists()
    train_rm.main(flags)
    assert Tokenizer.from_dir(tmp_path / "run" / "model").template == "hh"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_two_ranks_fsdp_matches_one_process(tiny_plain, files, tmp_path, torchrun, device):
    """Rank 1 builds the reward model on the meta device (from_config) and receives rank 0's weights, head
    included; the losses, the offset and the saved weights equal those of one process."""
    extra = ["--steps=3", f"--device={device}"]
    train_rm.main(args(tiny_plain, files, tmp_path / "one", *extra))
    torchrun(ROOT / "train_rm.py", *args(tiny_plain, files, tmp_path / "two", *extra), cwd=tmp_path,
             nproc=ranks(device))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("rm/loss", "eval/loss", "offset"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, key
    a, b = (RewardModel.from_pretrained(tmp_path / r / "model") for r in ("one", "two"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=n)


@pytest.mark.slow
def test_the_default_run_beats_chance_on_held_out_pairs(tmp_path, monkeypatch, capsys):
    """`python train_rm.py` with no arguments, in an empty directory with the repository's data/: it trains the
    tiny SFT model first (the default --init is missing), then the reward model."""
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    train_rm.main(["--device=cpu"])
    out = capsys.readouterr().out
    assert "out/sft/model not found: training the tiny SFT model first" in out
    result = json.loads((tmp_path / "out" / "rm" / "eval.json").read_text())
    assert result["n_val_pairs"] == 300 and result["eval/accuracy"] >= 0.6
    rm = RewardModel.from_pretrained(tmp_path / "out" / "rm" / "model")
    assert rm.offset == result["offset"]
