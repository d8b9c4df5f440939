"""nanoalign.evaluate's model-side helpers and command line: batched answers equal one-by-one answers, the
printed win rate equals win_rate() on the same answers, a model against itself is exactly 0.5, bad flags."""
import contextlib
import copy
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanoalign import cli, evaluate, world
from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.cli import InputError
from nanoalign.data import read_jsonl
from nanoalign.generate import generate
from nanoalign.model import ModelConfig, Transformer
from nanoalign.reward import RewardModel
from nanoalign.tokenizer import Tokenizer, encode_prompt, encode_response

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PROMPTS = DATA / "prompts_test.jsonl"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DATA / "tokenizer")


def tiny(tok, seed, path):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    return save_pretrained(model, path, tokenizer=tok)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("models")
    return tiny(tok, 0, root / "a"), tiny(tok, 1, root / "b")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, models, tok):
    """A reward model: model A's trunk with a seeded random head, saved and loaded like a trained one."""
    rm = RewardModel.from_causal_lm(models[0], generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("rm") / "model"
    rm.save_pretrained(path, tokenizer=tok)
    return path


def test_sample_answers_batched_equal_one_at_a_time(models, tok):
    model = load_pretrained(models[0])
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:5]]
    batched = evaluate.sample_answers(model, tok, prompts, "hh", max_new_tokens=12, batch_size=3)
    alone = [evaluate.sample_answers(model, tok, [p], "hh", max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == alone
    # by hand: greedy generate, cut at the stop token, decode, strip
    gen = generate(model, [encode_prompt(tok, prompts[1], "hh")], 12, temperature=0.0, stop_ids=tok.stop_ids,
                   pad_id=tok.pad_id)
    ids = gen.tokens[0].tolist()
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert batched[1] == tok.decode(ids).strip()


def test_evaluate_answers_by_hand():
    records = read_jsonl(PROMPTS)
    closed = [r for r in records if r["qtype"] == "CONSTRAINED"][:2]
    opened = [r for r in records if r["qtype"] == "OPENENDED"][:1]
    picked = closed + opened
    answers = [closed[0]["reference"], "I do not know.", opened[0]["prompt"]]  # right, wrong, a copy of the prompt
    m = evaluate.evaluate_answers(picked, answers)
    assert m["n"] == 3 and m["n_closed"] == 2 and m["closed_accuracy"] == 0.5
    assert m["mean_quality"] == pytest.approx((1.0 + 0.0 + world.quality(opened[0]["prompt"], answers[2])) / 3)
    assert m["rouge_l"] == pytest.approx((1.0 + evaluate.rouge_l(answers[1], closed[1]["reference"])
                                          + evaluate.rouge_l(answers[2], opened[0]["reference"])) / 3)
    assert m["copy_rate"] == pytest.approx(1 / 3)
    assert m["mean_words"] == pytest.approx(sum(len(evaluate.rouge_tokens(a)) for a in answers) / 3)
    # outside the tiny world there is no oracle, and no ROUGE-L without references
    m = evaluate.evaluate_answers([{"prompt": "Tell me a joke."}], ["No."])
    assert m["mean_quality"] is None and m["closed_accuracy"] is None and m["rouge_l"] is None


def test_compare_equals_win_rate_and_a_hand_count():
    records = read_jsonl(PROMPTS)[:4]
    prompts = [r["prompt"] for r in records]
    a = [r["reference"] for r in records]
    b = [a[0], "Nothing.", a[2], prompts[3]]  # tie, A wins, tie, A wins
    c = evaluate.compare(prompts, a, b, evaluate.oracle_judge)
    assert (c["wins"], c["ties"], c["losses"]) == (2, 2, 0) and c["win_rate"] == 0.75
    assert c["win_rate"] == evaluate.win_rate(evaluate.oracle_score, prompts, a, b)
    assert evaluate.compare(prompts, b, a, evaluate.oracle_judge)["win_rate"] == 0.25


def rm_score_alone(rm, tok, prompt, answer):
    """The reward of one (prompt, answer), unpadded: template prompt + response + EOS."""
    response = encode_response(tok, answer, "hh") if answer.strip() else [tok.eos_id]
    ids = torch.tensor([encode_prompt(tok, prompt, "hh") + response])
    return rm(ids, torch.ones_like(ids)).item()


def test_cli_win_rate_equals_win_rate_on_the_same_answers(tmp_path, models, rm_dir, tok, capsys):
    out = tmp_path / "eval.json"
    result = evaluate.main([f"--model_a={models[0]}", f"--model_b={models[1]}", f"--judge={rm_dir}", "--limit=7",
                            "--max_new_tokens=10", "--batch_size=4", f"--out={out}", f"--prompts={PROMPTS}"])
    saved = json.loads(out.read_text())
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:7]]
    a, b = saved["answers"]["A"], saved["answers"]["B"]
    assert len(a) == len(b) == 7 and a != b
    rm = RewardModel.from_pretrained(rm_dir)
    scores = {}

    def judge(p, ans):  # the reward of each answer scored alone, a second code path
        return scores.setdefault((p, ans), rm_score_alone(rm, tok, p, ans))

    expected = evaluate.win_rate(judge, prompts, a, b)
    assert expected != 0.5  # an odd number of prompts and no ties: swapping A and B would show
    assert result["comparison"]["win_rate"] == saved["comparison"]["win_rate"] == expected
    assert result["comparison"]["judge_a"] == pytest.approx(sum(judge(p, x) for p, x in zip(prompts, a)) / 7, abs=1e-5)
    printed = re.search(r"win rate of A over B: ([0-9.]+)", capsys.readouterr().out)[1]
    assert printed == f"{expected:.4f}"
    # the per-model metrics are evaluate_answers on the same answers
    assert saved["metrics"]["A"] == evaluate.evaluate_answers(read_jsonl(PROMPTS)[:7], a)


@pytest.mark.parametrize("judge", ["oracle", "rm"])
def test_a_model_against_itself_is_exactly_one_half(models, rm_dir, judge, capsys):
    result = evaluate.main([f"--model_a={models[1]}", f"--model_b={models[1]}", "--limit=5", "--max_new_tokens=8",
                            f"--judge={rm_dir if judge == 'rm' else 'oracle'}", f"--prompts={PROMPTS}"])
    assert result["comparison"]["win_rate"] == 0.5 and result["comparison"]["ties"] == 5
    assert "win rate of A over B: 0.5000" in capsys.readouterr().out


def test_diversity_samples_is_self_bleu_of_seeded_samples(models, tok):
    """--diversity_samples=K: self-BLEU of K samples per prompt at temperature 1, sample k seeded seed + 1 + k (a
    second code path: sample_answers called here, self_bleu per prompt averaged by hand)."""
    result = evaluate.main([f"--model_a={models[0]}", "--limit=3", "--max_new_tokens=8", "--diversity_samples=3",
                            "--seed=5", f"--prompts={PROMPTS}"])
    model = load_pretrained(models[0])
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:3]]
    samples = [evaluate.sample_answers(model, tok, prompts, "hh", 8, 1.0, 32, 6 + k) for k in range(3)]
    assert samples[0] != samples[1]  # different seeds, different samples: the number measures something
    expected = sum(evaluate.self_bleu([s[i] for s in samples]) for i in range(3)) / 3
    assert result["metrics"]["A"]["self_bleu"] == pytest.approx(expected)
    assert "self_bleu" not in evaluate.main([f"--model_a={models[0]}", "--limit=2", "--max_new_tokens=4",
                                             f"--prompts={PROMPTS}"])["metrics"]["A"]


@pytest.mark.parametrize("flags, message", [
    ([], "--model_a: required"),
    (["--model_a={a}", "--diversity_samples=1"], "--diversity_samples=1: self-BLEU needs at least 2 samples"),
    (["--model_a=./no_such_model"], "--model_a=./no_such_model: checkpoint directory ./no_such_model does not exist"),
    (["--model_a={a}", "--model_b=./missing"], "--model_b=./missing: checkpoint directory ./missing does not exist"),
    (["--model_a={a}", "--model_b={a}", "--judge=rm_missing"], "--judge=rm_missing: choose oracle or a reward model "
                                                                "directory"),
    (["--model_a={a}", "--judge=out/rm/model"], "--judge=out/rm/model: pass --model_b (the judge compares two"),
    (["--model_a={a}", "--temperature=-1"], "--temperature must be >= 0"),
    (["--model_a={a}", "--max_new_tokens=0"], "--max_new_tokens must be at least 1"),
    (["--model_a={a}", "--template=chatml"], "--template=chatml: choose one of auto, plain, hh, alpaca"),
    (["--model_a={a}", "--prompts=nowhere.jsonl"], "--prompts=nowhere.jsonl: not found"),
    (["--model_a={a}", "--prompts=data"], "--prompts=data: expected a file, found a directory"),
    # else range()'s step-zero error, after loading A
    (["--model_a={a}", "--batch_size=0"], "--batch_size=0: must be positive"),
    # else records[:-1]: every prompt but the last, silently
    (["--model_a={a}", "--limit=-1"], "--limit=-1: must be >= 0"),
    (["--model_a={a}", "--dtype=float16"], "--dtype=float16: choose one of float32, bfloat16"),
    (["--model_a={a}", "--device=tpu"], "--device=tpu: choose cpu, or cuda on a machine with a GPU"),
])
def test_bad_flags(flags, message, models, monkeypatch):
    monkeypatch.chdir(ROOT)  # the default --prompts is relative to the repository
    with pytest.raises(InputError, match=re.escape(message)):
        evaluate.main([f.format(a=models[0]) for f in flags])


def test_oracle_refuses_prompts_outside_the_world(tmp_path, models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    with pytest.raises(InputError, match="--judge=oracle: the oracle judges the tiny world's prompts only"):
        evaluate.main([f"--model_a={models[0]}", f"--model_b={models[1]}", f"--prompts={prompts}"])


def test_command_line_errors_are_one_line(models):
    proc = subprocess.run([sys.executable, "-m", "nanoalign.evaluate", f"--model_a={models[0]}",
                           f"--model_b={models[1]}", "--judge=nope"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --judge=nope: choose oracle or a reward model directory "
                                                "(no such directory)"]


def test_sample_answers_keeps_the_end_of_a_long_prompt_and_the_models_mode(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                    max_seq_len=32))
    model.train()
    prompt = "Mia lives in Oslo. " * 20 + "Where does Mia live?"
    assert len(encode_prompt(tok, prompt, "hh")) > 32
    got = evaluate.sample_answers(model, tok, [prompt], "hh", max_new_tokens=8)
    assert model.training  # back in the mode it came in
    # by hand: the prompt's last 32 - 8 tokens, greedy
    ids = encode_prompt(tok, prompt, "hh")[-24:]
    gen = generate(model.eval(), [ids], 8, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    assert got == [tok.decode(gen.response(0)).strip()]


@pytest.mark.parametrize("flags, expected", [
    (["--diversity_samples=3"], [(0.0, 5), (1.0, 6), (1.0, 7), (1.0, 8)]),  # A greedy, then its samples
    (["--model_b={b}", "--best_of=3", "--best_of_rm=oracle"], [(1.0, 6), (1.0, 7), (1.0, 8), (0.0, 5)]),  # then B
])
def test_samples_are_drawn_at_temperature_1_with_seeds_after_the_greedy_ones(models, monkeypatch, flags, expected):
    """Sample k is drawn at temperature 1 seeded seed + 1 + k, for --diversity_samples and --best_of alike. Neither
    output shows the seeds (the tiny model's samples share no 4-grams for self-BLEU; the best-of picks coincided
    under seeds seed + k): spy on them."""
    calls, real = [], evaluate.sample_answers

    def spy(model, tok_, prompts, template, max_new_tokens, temperature, batch_size, seed):
        calls.append((temperature, seed))
        return real(model, tok_, prompts, template, max_new_tokens, temperature, batch_size, seed)

    monkeypatch.setattr(evaluate, "sample_answers", spy)
    evaluate.main([f"--model_a={models[0]}", "--limit=2", "--max_new_tokens=4", "--seed=5", f"--prompts={PROMPTS}",
                   *(f.format(b=models[1]) for f in flags)])
    assert calls == expected


def test_without_limit_every_prompt_is_answered(models, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(True)[:3]))
    result = evaluate.main([f"--model_a={models[0]}", "--max_new_tokens=2", f"--prompts={prompts}"])
    assert result["n_prompts"] == 3 and result["metrics"]["A"]["n"] == 3


def test_reward_judge_scores_an_empty_answer_as_the_eos_alone(rm_dir, tok):
    rm = RewardModel.from_pretrained(rm_dir)
    [score] = evaluate.reward_judge(rm, tok, "hh")(["What is 2 plus 2?"], ["   "])
    ids = torch.tensor([encode_prompt(tok, "What is 2 plus 2?", "hh") + [tok.eos_id]])
    assert score == pytest.approx(rm(ids, torch.ones_like(ids)).item(), abs=1e-5)


def test_reward_judge_cuts_a_long_prompt_after_its_bos_as_training_does(rm_dir, tok):
    """The reward model was trained on prompts cut after their BOS (data.fit_example); its judge cuts them the same
    way, so a long prompt keeps its BOS and its end."""
    bos_tok = copy.copy(tok)
    bos_tok.add_bos = True
    rm = RewardModel.from_pretrained(rm_dir)
    prompt = "Mia lives in Oslo. " * 40 + "Where does Mia live?"
    [score] = evaluate.reward_judge(rm, bos_tok, "hh")([prompt], ["Oslo."])
    ids, response = encode_prompt(bos_tok, prompt, "hh"), encode_response(bos_tok, "Oslo.", "hh")
    L = rm.cfg.max_seq_len
    assert ids[0] == bos_tok.bos_id and len(ids) + len(response) > L
    row = torch.tensor([[bos_tok.bos_id] + ids[len(ids) - (L - len(response) - 1):] + response])
    assert row.shape[1] == L
    assert score == pytest.approx(rm(row, torch.ones_like(row)).item(), abs=1e-5)


def test_a_reward_model_judge_reads_with_its_own_saved_template(tmp_path, models, rm_dir, tok):
    # the judge was trained on alpaca-formatted text: it scores the answers in alpaca, not in the models' template
    judge_dir = tmp_path / "rm_alpaca"
    shutil.copytree(rm_dir, judge_dir)
    config = judge_dir / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "nanoalign_template": "alpaca"}))
    out = tmp_path / "eval.json"
    result = evaluate.main([f"--model_a={models[0]}", f"--model_b={models[1]}", f"--judge={judge_dir}", "--limit=3",
                            "--max_new_tokens=6", f"--out={out}", f"--prompts={PROMPTS}"])
    saved = json.loads(out.read_text())
    assert saved["templates"]["A"] == "hh"  # the models answer in their own template
    answers = saved["answers"]["A"]
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:3]]
    rm = RewardModel.from_pretrained(judge_dir)

    def mean_score(template):
        return sum(evaluate.reward_judge(rm, tok, template)(prompts, answers)) / 3

    assert result["comparison"]["judge_a"] == pytest.approx(mean_score("alpaca"), abs=1e-6)
    assert mean_score("alpaca") != pytest.approx(mean_score("hh"), abs=1e-4)  # the template shows in the score
    # --template changes how the models are prompted, not how the judge reads: it keeps its own
    result = evaluate.main([f"--model_a={models[0]}", f"--model_b={models[1]}", f"--judge={judge_dir}", "--limit=3",
                            "--max_new_tokens=6", f"--out={out}", f"--prompts={PROMPTS}", "--template=plain"])
    answers = json.loads(out.read_text())["answers"]["A"]
    assert result["comparison"]["judge_a"] == pytest.approx(mean_score("alpaca"), abs=1e-6)


def test_best_of_picks_the_reward_models_top_sample_of_the_seeded_samples(tmp_path, models, rm_dir, tok, capsys):
    """--best_of=3 --best_of_rm=RM: A's answer to each prompt is, of its 3 samples at temperature 1 (seeds
    seed + 1 ..), the one the reward model scores highest, each scored alone here (a second code path)."""
    out = tmp_path / "eval.json"
    result = evaluate.main([f"--model_a={models[0]}", "--best_of=3", f"--best_of_rm={rm_dir}", "--limit=4",
                            "--max_new_tokens=8", "--seed=5", f"--out={out}", f"--prompts={PROMPTS}"])
    model, rm = load_pretrained(models[0]), RewardModel.from_pretrained(rm_dir)
    records = read_jsonl(PROMPTS)[:4]
    prompts = [r["prompt"] for r in records]
    samples = [evaluate.sample_answers(model, tok, prompts, "hh", 8, 1.0, 32, 6 + k) for k in range(3)]
    expected = []
    for i, p in enumerate(prompts):
        scores = [rm_score_alone(rm, tok, p, s[i]) for s in samples]
        expected.append(samples[scores.index(max(scores))][i])
    assert any(expected[i] != samples[0][i] for i in range(4))  # the pick is not always the first sample
    assert json.loads(out.read_text())["answers"]["A"] == expected
    m = result["metrics"]["A"]
    assert m["mean_quality"] == pytest.approx(sum(world.quality(p, a) for p, a in zip(prompts, expected)) / 4)
    q = [[world.quality(p, s[i]) for i, p in enumerate(prompts)] for s in samples]
    assert m["best_of"] == {"n": 3, "chooser": str(rm_dir), "sample_quality": pytest.approx(sum(map(sum, q)) / 12),
                            "oracle_best_quality": pytest.approx(sum(map(max, zip(*q))) / 4)}
    assert f"A's best of 3 by {rm_dir}: mean oracle quality {m['mean_quality']:.3f}" in capsys.readouterr().out


def test_best_of_with_the_oracle_reaches_the_oracles_best(models):
    result = evaluate.main([f"--model_a={models[0]}", f"--model_b={models[0]}", "--best_of=4", "--best_of_rm=oracle",
                            "--limit=5", "--max_new_tokens=8", f"--prompts={PROMPTS}"])
    a = result["metrics"]["A"]
    assert a["mean_quality"] == pytest.approx(a["best_of"]["oracle_best_quality"])
    assert "best_of" not in result["metrics"]["B"]  # B answers greedily, as without --best_of


@pytest.mark.parametrize("flags, message", [
    (["--best_of=2"], "--best_of=2: pass --best_of_rm (a reward model directory, or oracle)"),
    (["--best_of_rm=oracle"], "--best_of_rm=oracle: pass --best_of=N"),
    (["--best_of=2", "--best_of_rm=nowhere"], "--best_of_rm=nowhere: choose oracle or a reward model directory"),
    (["--best_of=-1", "--best_of_rm=oracle"], "--best_of=-1: must be >= 0"),
])
def test_best_of_bad_flags(flags, message, models):
    with pytest.raises(InputError, match=re.escape(message)):
        evaluate.main([f"--model_a={models[0]}", f"--prompts={PROMPTS}", *flags])


def test_best_of_by_the_oracle_refuses_prompts_outside_the_world(tmp_path, models):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    with pytest.raises(InputError, match="--best_of_rm=oracle: the oracle judges the tiny world's prompts only"):
        evaluate.main([f"--model_a={models[0]}", "--best_of=2", "--best_of_rm=oracle", f"--prompts={prompts}"])


def test_a_judge_without_its_own_tokenizer_reads_in_the_answering_models_template(tmp_path, models, rm_dir, tok):
    """Without tokenizer.json the judge borrows model A's tokenizer: it then reads the prompts as the models were
    prompted (--template), not in A's saved template (it read hh while the models answered in alpaca)."""
    judge_dir = tmp_path / "rm_bare"
    shutil.copytree(rm_dir, judge_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (judge_dir / name).unlink()
    model_a = tmp_path / "a_hh"  # model A saved with its training template, hh
    shutil.copytree(models[0], model_a)
    config = model_a / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "nanoalign_template": "hh"}))
    out = tmp_path / "eval.json"
    result = evaluate.main([f"--model_a={model_a}", f"--model_b={models[1]}", f"--judge={judge_dir}", "--limit=3",
                            "--max_new_tokens=6", f"--out={out}", f"--prompts={PROMPTS}", "--template=alpaca"])
    answers = json.loads(out.read_text())["answers"]["A"]
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:3]]
    rm = RewardModel.from_pretrained(judge_dir)
    mean = {t: sum(evaluate.reward_judge(rm, tok, t)(prompts, answers)) / 3 for t in ("alpaca", "hh")}
    assert mean["alpaca"] != pytest.approx(mean["hh"], abs=1e-4)
    assert result["comparison"]["judge_a"] == pytest.approx(mean["alpaca"], abs=1e-6)


def test_an_answer_ends_before_a_stop_id_that_is_an_ordinary_token(tmp_path, tok):
    """A checkpoint may list an ordinary token as an extra eos_token_id: decoding drops a special EOS by itself,
    not that one, which stayed at the end of every answer that hit it."""
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=1, n_head=2, hidden_dim=64,
                                    max_seq_len=64))
    stop = tok.encode(" tiger")[-1]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[stop] = 1.0  # with a positive final-norm direction on every position, ~always
        model.norm.weight.fill_(1.0)
        model.lm_head.bias = None
    prompts = [r["prompt"] for r in read_jsonl(PROMPTS)[:2]]
    plain = evaluate.sample_answers(model, tok, prompts, "hh", max_new_tokens=4)
    tok_stop = Tokenizer.from_dir(DATA / "tokenizer")
    tok_stop.stop_ids = [tok.eos_id, stop]
    gen = generate(model, [encode_prompt(tok, p, "hh") for p in prompts], 4, temperature=0.0,
                   stop_ids=tok_stop.stop_ids, pad_id=tok.pad_id)
    assert gen.stopped.all() and gen.answer(0) == gen.response(0)[:-1] and gen.response(0)[-1] == stop
    stopped = evaluate.sample_answers(model, tok_stop, prompts, "hh", max_new_tokens=4)
    assert [tok.decode(gen.answer(i)).strip() for i in range(2)] == stopped
    assert all("tiger" not in a for a in stopped) and plain != stopped


# --- edge cases a second mutation audit found untested


def test_refuses_to_run_under_torchrun(models, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match="nanoalign.evaluate runs in one process: start it with python, not torchrun"):
        evaluate.main([f"--model_a={models[0]}", f"--prompts={PROMPTS}"])


def test_a_prompt_file_without_prompts_names_the_flag(models, tmp_path):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("\n")
    with pytest.raises(InputError, match=re.escape(f"--prompts={prompts}: no prompts")):
        evaluate.main([f"--model_a={models[0]}", f"--prompts={prompts}"])


def test_out_in_a_new_directory_is_written(models, tmp_path):
    out = tmp_path / "new" / "dir" / "eval.json"
    evaluate.main([f"--model_a={models[0]}", "--limit=1", "--max_new_tokens=1", f"--prompts={PROMPTS}", f"--out={out}"])
    assert json.loads(out.read_text())["n_prompts"] == 1


def test_sample_answers_needs_room_for_two_prompt_tokens(models, tok):
    """max_new_tokens may leave the prompt two tokens of the context at least (one would be a BOS alone)."""
    model = load_pretrained(models[0])  # max_seq_len 128
    with pytest.raises(ValueError, match="max_new_tokens=127 leaves no room for a prompt in the context of 128"):
        evaluate.sample_answers(model, tok, ["What is 2 plus 2?"], "hh", max_new_tokens=127)
    assert len(evaluate.sample_answers(model, tok, ["What is 2 plus 2?"], "hh", max_new_tokens=126)) == 1


def test_reward_judge_refuses_an_answer_longer_than_its_context(rm_dir, tok):
    rm = RewardModel.from_pretrained(rm_dir)
    answer = "Bees make honey. " * 60
    n = len(encode_response(tok, answer, "hh"))
    assert n > rm.cfg.max_seq_len
    with pytest.raises(ValueError, match=f"an answer of {n} tokens does not fit the reward model's context of 128"):
        evaluate.reward_judge(rm, tok, "hh")(["What is 2 plus 2?"], [answer])


# --- nanoalign.cli


@dataclass
class _Flags:
    resume: bool = False  # a bool flag
    seed: int = 0         # a seed


@pytest.mark.parametrize("argv, expected", [
    ([], (False, 0)), (["--resume"], (True, 0)), (["--resume=on"], (True, 0)), (["--resume=yes"], (True, 0)),
    (["--resume=off"], (False, 0)), (["--resume=0"], (False, 0)), (["--resume=TRUE"], (True, 0)),
    (["--seed=4294967295"], (False, 2**32 - 1)),  # the largest seed numpy takes is allowed
])
def test_parse_config_bool_and_seed_flags(argv, expected):
    cfg = cli.parse_config(_Flags, argv)
    assert (cfg.resume, cfg.seed) == expected


@pytest.mark.parametrize("argv, message", [
    (["--resume=maybe"], "argument --resume: expected a boolean, got 'maybe'"),
    (["--seed=4294967296"], "argument --seed: expected a seed in [0, 4294967295], got '4294967296'"),
])
def test_parse_config_bad_bool_and_seed_values(argv, message):
    with pytest.raises(InputError, match=re.escape(message)):
        cli.parse_config(_Flags, argv)


def test_check_device_names_the_gpus_this_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cli.check_device(SimpleNamespace(device="cuda:1"))  # the last GPU is fine
    cli.check_device(SimpleNamespace(device="cuda"))
    with pytest.raises(InputError, match=re.escape("--device=cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1")):
        cli.check_device(SimpleNamespace(device="cuda:2"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=re.escape("--device=cuda: choose cpu, or cuda on a machine with a GPU")):
        cli.check_device(SimpleNamespace(device="cuda"))


def test_check_range_refuses_nan_set_in_code():
    """A Config built by hand may hold NaN, which every comparison lets through: the range check names it."""
    with pytest.raises(InputError, match=re.escape("--x=nan: must be a finite number")):
        cli.check_range(SimpleNamespace(x=float("nan")), "x", 0.0, 1.0)


@pytest.mark.parametrize("error, code, line", [
    (ValueError("--x=1: bad"), 2, "error: --x=1: bad"),
    (KeyError("missing tensors: w"), 2, "error: missing tensors: w"),  # not "'missing tensors: w'"
    (FloatingPointError("loss is nan at step 3"), 1, "error: loss is nan at step 3"),  # a stopped run, not a bad input
])
def test_run_prints_one_line_and_exits_with_the_code_of_the_error(error, code, line, capsys, monkeypatch):
    monkeypatch.delenv("NANOALIGN_DEBUG", raising=False)

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [])
    assert exit_.value.code == code
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("refused", [False, True])
def test_run_collects_what_main_left_in_reference_cycles_before_it_returns_or_exits(refused, monkeypatch):
    """Under torchrun, FSDP2's modules and what they hold are left in reference cycles; collected only at the
    interpreter's shutdown, gloo aborted 14 of 480 finished two-rank runs there (run's docstring). run() collects
    them itself, after a normal return and after a refused input alike (whose message must not keep the
    exception, and with it main's frames, alive); the automatic collector is off here, so only run's own
    collection can free them."""
    monkeypatch.delenv("NANOALIGN_DEBUG", raising=False)
    left = []

    class Node:
        pass

    def main(argv):
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: freed by the collector only
        left.append(weakref.ref(a))
        if refused:
            raise ValueError("--x=1: bad")  # its traceback holds main's frame until run has handled it

    enabled = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(SystemExit) if refused else contextlib.nullcontext():
            cli.run(main, [])
        assert left[0]() is None
    finally:
        if enabled:
            gc.enable()
