"""select_pairs.py: REAL selection on a tiny random model, labels by scores or the annotator (never list order),
ties skipped and counted, the cosines it reports, the oracle's label-error rate against a hand count."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import select_pairs
from nanoalign import real, world
from nanoalign.checkpoint import load_pretrained
from nanoalign.cli import InputError
from nanoalign.data import read_hh, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def multi():
    """Six real tiny-world prompts with five responses each; record 0 has all scores equal (a tie whatever pair
    is selected), the others distinct scores that disagree with the list order."""
    records = read_jsonl(DATA / "multi_train.jsonl")[:6]
    for k, r in enumerate(records):
        r["scores"] = [1.0] * 5 if k == 0 else [float((3 * i + k) % 5) for i in range(5)]
    return records


def select(tmp_path, data, tiny_plain, *flags, name="out.jsonl"):
    out = tmp_path / name
    result = select_pairs.main([f"--data={data}", f"--model={tiny_plain}", f"--out={out}", "--batch_size=7", *flags])
    return result, read_jsonl(out, required=("prompt", "chosen", "rejected"))


def embed(tiny_plain, tiny_tok, prompt, texts):
    model = load_pretrained(tiny_plain)
    return real.embed_responses(model, tiny_tok, [{"prompt": prompt, "response": t} for t in texts], "hh", 128,
                                max_response_len=127)


def test_scores_label_the_pair_and_ties_are_skipped(tmp_path, tiny_plain, multi):
    data = write_jsonl(tmp_path / "multi.jsonl", multi)
    result, pairs = select(tmp_path, data, tiny_plain, "--strategy=hard")
    assert result["pairs"] == len(pairs) == 5 and result["skipped_ties"] == 1
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in multi[1:]]
    for p, r in zip(pairs, multi[1:]):
        score = dict(zip(r["responses"], r["scores"]))
        assert score[p["chosen"]] > score[p["rejected"]]
        assert (p["chosen_score"], p["rejected_score"]) == (score[p["chosen"]], score[p["rejected"]])
        assert p["qtype"] == r["qtype"] and p["reference"] == r["reference"]  # extras carried along

    # reversed lists: the same pairs with the same chosen side (the label is the score's, not the position's)
    reversed_records = [{**r, "responses": r["responses"][::-1], "scores": r["scores"][::-1]} for r in multi]
    _, again = select(tmp_path, write_jsonl(tmp_path / "rev.jsonl", reversed_records), tiny_plain, "--strategy=hard",
                      name="rev_out.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in again] == [(p["chosen"], p["rejected"]) for p in pairs]
    for p, q in zip(pairs, again):
        assert abs(p["cosine"] - q["cosine"]) < 1e-6
    # only ties: an error, not an empty file that the training script would reject later
    with pytest.raises(InputError, match=r"^--data=.*: no pair to write: all 1 prompts were ties"):
        select(tmp_path, write_jsonl(tmp_path / "ties.jsonl", multi[:1]), tiny_plain, name="ties_out.jsonl")
    assert not (tmp_path / "ties_out.jsonl").exists()


def test_easy_takes_the_least_similar_pair_and_hard_the_most(tmp_path, tiny_plain, tiny_tok, multi):
    data = write_jsonl(tmp_path / "multi.jsonl", multi[1:])
    easy_result, easy = select(tmp_path, data, tiny_plain, "--strategy=easy", name="easy.jsonl")
    hard_result, hard = select(tmp_path, data, tiny_plain, "--strategy=hard", name="hard.jsonl")
    assert len(easy) == len(hard) == 5
    for e, h, r in zip(easy, hard, multi[1:]):
        # every candidate pair's cosine, from embeddings computed here one prompt at a time
        emb = embed(tiny_plain, tiny_tok, r["prompt"], r["responses"])
        cos = real.cosine_matrix(emb)
        rows, cols = torch.triu_indices(5, 5, offset=1)
        assert abs(e["cosine"] - cos[rows, cols].min().item()) < 1e-5
        assert abs(h["cosine"] - cos[rows, cols].max().item()) < 1e-5
        assert e["cosine"] < h["cosine"] and {e["chosen"], e["rejected"]} != {h["chosen"], h["rejected"]}
        i, j = r["responses"].index(e["chosen"]), r["responses"].index(e["rejected"])
        assert abs(cos[i, j].item() - e["cosine"]) < 1e-5  # the written cosine is the written pair's
    assert easy_result["selected"].mean() < hard_result["selected"].mean()
    # both see the same candidates: 10 pairs per prompt
    assert torch.equal(easy_result["candidates"], hard_result["candidates"]) and len(easy_result["candidates"]) == 50


def test_pairs_input_keeps_a_fraction_with_their_labels(tmp_path, tiny_plain, tiny_tok):
    records = read_jsonl(DATA / "prefs_train.jsonl")[:10]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    easy_result, easy = select(tmp_path, data, tiny_plain, "--strategy=easy", name="easy.jsonl")
    _, hard = select(tmp_path, data, tiny_plain, "--strategy=hard", name="hard.jsonl")
    assert len(easy) == len(hard) == 5
    assert max(p["cosine"] for p in easy) <= min(p["cosine"] for p in hard)  # 10 pairs split in two halves
    given = {(r["prompt"], r["chosen"], r["rejected"]) for r in records}
    assert all((p["prompt"], p["chosen"], p["rejected"]) in given for p in easy + hard)
    # the cosines of all candidates are those of each pair's two embeddings
    r = records[3]
    emb = embed(tiny_plain, tiny_tok, r["prompt"], [r["chosen"], r["rejected"]])
    assert abs(easy_result["candidates"][3].item() - real.pair_cosine(emb[:1], emb[1:]).item()) < 1e-5
    # a fraction that rounds to no pair at all is an error, not an empty file
    with pytest.raises(InputError, match=r"^--fraction=0.04: keeps none of the 10 pairs$"):
        select(tmp_path, data, tiny_plain, "--strategy=easy", "--fraction=0.04", name="none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()
    # a pair of two identical texts carries no preference, and "hard" would pick it first: skipped as a tie
    twin = {**records[0], "rejected": records[0]["chosen"]}
    twin_result, twin_hard = select(tmp_path, write_jsonl(tmp_path / "twins.jsonl", [twin] + records[1:]), tiny_plain,
                                    "--strategy=hard", name="twin_hard.jsonl")
    assert twin_result["skipped_ties"] == 1 and all(p["chosen"] != p["rejected"] for p in twin_hard)
    with pytest.raises(InputError, match=r"^--data=.*: every pair's chosen and rejected are the same text"):
        select(tmp_path, write_jsonl(tmp_path / "all_twins.jsonl", [twin]), tiny_plain, name="nothing.jsonl")
    assert not (tmp_path / "nothing.jsonl").exists()


def test_label_error_rate_equals_a_hand_count(tmp_path, tiny_plain, capsys):
    # annotator-labelled pairs of the tiny world: some with the worse response chosen, some of equal quality
    records = read_jsonl(DATA / "prefs_train.jsonl")[:600]
    gap = [world.quality(r["prompt"], r["chosen"]) - world.quality(r["prompt"], r["rejected"]) for r in records]
    picked = ([r for r, g in zip(records, gap) if g < 0][:3] + [r for r, g in zip(records, gap) if g == 0][:2]
              + [r for r, g in zip(records, gap) if g > 0][:7])
    data = write_jsonl(tmp_path / "pairs.jsonl", picked)
    result, pairs = select(tmp_path, data, tiny_plain, "--strategy=random", "--fraction=0.5")
    assert len(pairs) == 6
    gaps = [world.quality(p["prompt"], p["chosen"]) - world.quality(p["prompt"], p["rejected"]) for p in pairs]
    errors, ties = sum(g < 0 for g in gaps), sum(g == 0 for g in gaps)
    assert result["oracle"]["label_error"] == errors / 6 and result["oracle"]["equal_quality"] == ties / 6
    assert abs(result["oracle"]["mean_quality_gap"] - sum(gaps) / 6) < 1e-12
    out = capsys.readouterr().out
    assert f"label errors (chosen worse than rejected) {errors / 6:.1%}, equal quality {ties / 6:.1%}" in out

    # several responses scored by MINUS the oracle: every written pair is a label error
    multi = read_jsonl(DATA / "multi_train.jsonl")[:8]
    for r in multi:
        r["scores"] = [-world.quality(r["prompt"], x) for x in r["responses"]]
    result, pairs = select(tmp_path, write_jsonl(tmp_path / "neg.jsonl", multi), tiny_plain, "--strategy=centroid",
                           name="neg_out.jsonl")
    assert len(pairs) + result["skipped_ties"] == 8 and pairs
    assert result["oracle"]["label_error"] == 1.0 and result["oracle"]["mean_quality_gap"] < 0


def test_annotator_labels_are_seeded_and_ignore_list_order(tmp_path, tiny_plain, multi):
    data = write_jsonl(tmp_path / "multi.jsonl", multi)
    _, first = select(tmp_path, data, tiny_plain, "--label=annotator", "--strategy=easy", name="a.jsonl")
    _, second = select(tmp_path, data, tiny_plain, "--label=annotator", "--strategy=easy", name="b.jsonl")
    assert first == second and len(first) == 6  # the annotator always states a preference: no prompt skipped
    reversed_records = [{**r, "responses": r["responses"][::-1]} for r in multi]
    _, rev = select(tmp_path, write_jsonl(tmp_path / "rev.jsonl", reversed_records), tiny_plain, "--label=annotator",
                    "--strategy=easy", name="c.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in rev] == [(p["chosen"], p["rejected"]) for p in first]
    # the same pair, the annotator's coin by hand: Bradley-Terry with the seeded generator
    p = first[2]
    a, b = sorted((p["chosen"], p["rejected"]))
    prefers_a = world.annotate(p["prompt"], a, b, random.Random(f"0:{p['prompt']}"))
    assert p["chosen"] == (a if prefers_a else b)


def test_default_model_is_trained_first_when_missing(tmp_path, tiny_plain, multi, monkeypatch, capsys):
    import shutil

    import train_sft
    calls = []

    def fake_sft(argv):  # stands in for the few-minute SFT run: puts a model where it would write one
        calls.append(argv)
        shutil.copytree(tiny_plain, tmp_path / "out" / "sft" / "model")

    monkeypatch.setattr(train_sft, "main", fake_sft)
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "multi.jsonl", multi)
    select_pairs.main([f"--data={data}", "--device=cpu"])
    assert calls == [["--device=cpu"]]
    assert "out/sft/model not found: training the tiny SFT model first" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "out" / "real" / "pairs_easy.jsonl")) == 5  # the default output path


def test_sample_pairs_the_models_own_answers(tmp_path, tiny_init, tiny_tok):
    """--sample=K: K seeded answers per distinct prompt from the model; a pair is two of that prompt's distinct
    answers, labelled by the seeded annotator; prompts with one distinct answer are skipped and counted."""
    from nanoalign.evaluate import sample_answers

    records = read_jsonl(DATA / "prompts_test.jsonl")[:5]
    data = write_jsonl(tmp_path / "prompts.jsonl", records + records[:2])  # repeated prompts are sampled once
    result, pairs = select(tmp_path, data, tiny_init, "--sample=3", "--label=annotator", "--strategy=random",
                           "--max_new_tokens=6", "--seed=4")
    prompts = [r["prompt"] for r in records]
    answers = sample_answers(load_pretrained(tiny_init), tiny_tok, [p for p in prompts for _ in range(3)], "hh",
                             max_new_tokens=6, temperature=1.0, batch_size=7, seed=4)
    distinct = {p: set(a for a in answers[3 * k:3 * k + 3] if a) for k, p in enumerate(prompts)}
    pairable = [p for p in prompts if len(distinct[p]) >= 2]
    assert 0 < len(pairable) and result["skipped_ties"] == len(prompts) - len(pairable)
    assert [p["prompt"] for p in pairs] == pairable
    for p in pairs:
        assert p["chosen"] != p["rejected"] and {p["chosen"], p["rejected"]} <= distinct[p["prompt"]]
        a, b = sorted((p["chosen"], p["rejected"]))
        prefers_a = world.annotate(p["prompt"], a, b, random.Random(f"4:{p['prompt']}"))
        assert p["chosen"] == (a if prefers_a else b)
        assert p["reference"] == next(r["reference"] for r in records if r["prompt"] == p["prompt"])


def test_sample_with_no_pair_left_is_one_error(tmp_path, tiny_init):
    data = write_jsonl(tmp_path / "prompts.jsonl", read_jsonl(DATA / "prompts_test.jsonl")[:3])
    with pytest.raises(InputError, match=r"--sample=2: no prompt got two distinct non-empty answers.*--temperature "
                                         r"\(now 1e-06\) or --max_new_tokens \(now 48\)"):
        select(tmp_path, data, tiny_init, "--sample=2", "--label=annotator", "--temperature=1e-6")
    with pytest.raises(InputError, match=r"--max_new_tokens=100000: leaves no room for a prompt in the context of "):
        select(tmp_path, data, tiny_init, "--sample=2", "--label=annotator", "--max_new_tokens=100000")


def test_sample_dedupes_drops_empty_answers_and_counts_skipped_prompts(tmp_path, tiny_plain, monkeypatch):
    """The answers stand in for the sampler (one list, K per prompt, in prompt order): duplicates and empty answers
    go, prompts left with fewer than two answers are skipped and counted, fields of old responses are dropped."""
    records = read_jsonl(DATA / "prompts_test.jsonl")[:4]
    records[3] = {**records[3], "chosen": "old", "rejected": "old too", "chosen_score": 1.0, "rejected_score": 0.0}
    records.append({**records[1], "reference": "a later record of the same prompt"})  # sampled once, as the first
    canned = ["x", "x", "", "a", "b", "a", "", "", "", "p", "q", "r"]
    calls = []

    def fake_sample(model, tok, prompts, template, max_new_tokens, temperature, batch_size, seed):
        calls.append((prompts, max_new_tokens, temperature, seed))
        return canned

    monkeypatch.setattr(select_pairs, "sample_answers", fake_sample)
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    flags = [f"--data={data}", f"--model={tiny_plain}", "--sample=3", "--label=annotator", "--strategy=random",
             "--temperature=0.7", "--seed=2"]
    with pytest.raises(InputError, match=r"^--max_new_tokens=127: leaves no room for a prompt in the context of"):
        select_pairs.main(flags + ["--max_new_tokens=127"])  # 128 tokens: BOS and one prompt token at least
    monkeypatch.chdir(tmp_path)
    result = select_pairs.main(flags + ["--max_new_tokens=126"])
    assert result["out"] == Path("out/real/onpolicy_random.jsonl")  # the default name of sampled pairs
    pairs = read_jsonl(tmp_path / result["out"])
    prompts = [r["prompt"] for r in records[:4]]
    assert calls == [([p for p in prompts for _ in range(3)], 126, 0.7, 2)]
    assert result["skipped_ties"] == 2 and [p["prompt"] for p in pairs] == [prompts[1], prompts[3]]
    assert pairs[0]["reference"] == records[1]["reference"]
    assert {pairs[0]["chosen"], pairs[0]["rejected"]} == {"a", "b"}
    assert {pairs[1]["chosen"], pairs[1]["rejected"]} <= {"p", "q", "r"}
    assert "chosen_score" not in pairs[1] and pairs[1]["reference"] == records[3]["reference"]


@pytest.mark.parametrize("flags, message", [
    (["--sample=4"], "--label=scores: sampled answers have no scores; --sample needs --label=annotator"),
    (["--sample=1", "--label=annotator"], "--sample=1: a pair needs at least 2 answers per prompt"),
    (["--sample=-1"], "--sample=-1: must be"),
    (["--sample=4", "--label=annotator", "--temperature=0"], "--temperature=0.0: must be"),
    (["--sample=4", "--label=annotator", "--format=hh"], "--format=hh: --sample reads the prompts"),
    (["--strategy=best"], "--strategy=best: choose one of easy, hard, random, centroid"),
    (["--label=votes"], "--label=votes: choose one of scores, annotator"),
    (["--fraction=0"], "--fraction=0.0: must be in (0.0, 1.0]"),
    (["--format=csv"], "--format=csv: choose one of auto, pairs, multi, hh, shp"),
    (["--dtype=float16"], "--dtype=float16: choose one of float32, bfloat16"),
    (["--data=nowhere.jsonl"], "--data=nowhere.jsonl: not found"),
    (["--data=data/prefs_train.jsonl", "--strategy=centroid"], "--strategy=centroid: needs several responses"),
    (["--data=data/prefs_train.jsonl", "--label=annotator"], "--label=annotator: pairs keep the chosen/rejected"),
])
def test_bad_flags(flags, message, tiny_plain, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(InputError, match=re.escape(message)):
        select_pairs.main([f"--model={tiny_plain}", *flags])


def no_model_load(monkeypatch):
    """Makes loading a model fail the test: the error must come before that expensive step."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(select_pairs, "load_pretrained", load)


def test_max_len_needs_a_prompt_and_a_response_token_before_any_model_is_loaded(tmp_path, tiny_plain, tiny_tok,
                                                                                 monkeypatch):
    """--max_len=1 (or 2 with a BOS) left no response token: every response was cut to nothing, and the run failed
    after loading the model, with an error about labels. The smallest --max_len that fits runs."""
    import copy

    from nanoalign.checkpoint import save_pretrained
    assert not tiny_tok.add_bos
    bos_tok = copy.copy(tiny_tok)
    bos_tok.add_bos = True
    bos_model = save_pretrained(load_pretrained(tiny_plain), tmp_path / "bos_model", tokenizer=bos_tok)
    data = write_jsonl(tmp_path / "pairs.jsonl", read_jsonl(DATA / "prefs_train.jsonl")[:4])
    with monkeypatch.context() as m:
        no_model_load(m)
        with pytest.raises(InputError, match=r"^--max_len=1: needs room for one prompt token and one response "
                                             r"token: at least 2$"):
            select(tmp_path, data, tiny_plain, "--max_len=1")
        with pytest.raises(InputError, match=rf"^--max_len=2: needs room for one prompt token and one response "
                                             rf"token, plus the BOS that the tokenizer of {re.escape(str(bos_model))} "
                                             rf"adds: at least 3$"):
            select(tmp_path, data, bos_model, "--max_len=2")
    assert not (tmp_path / "out.jsonl").exists()
    for model, max_len in ((tiny_plain, 2), (bos_model, 3)):
        result, pairs = select(tmp_path, data, model, f"--max_len={max_len}", "--fraction=1", name=f"{max_len}.jsonl")
        assert result["pairs"] == len(pairs) == 4


@pytest.mark.parametrize("data, flags, message", [
    ("multi_train.jsonl", ["--fraction=0.25"], "--fraction=0.25: several responses per prompt give one pair per "
                                               "prompt; --fraction applies to pairs input"),
    ("multi_train.jsonl", ["--fraction=1", "--format=multi"], "--fraction=1.0: several responses per prompt give "
                                                              "one pair per prompt; --fraction applies to pairs input"),
    ("prefs_train.jsonl", ["--fraction=0.25", "--sample=4", "--label=annotator"], "--fraction=0.25: --sample writes "
                                                                                 "one pair per prompt; --fraction "
                                                                                 "applies to pairs input"),
])
def test_fraction_is_refused_where_one_pair_per_prompt_is_written(data, flags, message, tiny_plain, monkeypatch):
    """--fraction keeps a share of the pairs input; with several responses per prompt, read or sampled, every prompt
    gives its one pair and the flag was silently ignored. Refused like --label on pairs, before any model loads."""
    no_model_load(monkeypatch)
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
        select_pairs.main([f"--data={DATA / data}", f"--model={tiny_plain}", *flags])


def test_annotator_refuses_prompts_outside_the_world(tmp_path, tiny_plain):
    data = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Tell me a joke.", "responses": ["No.", "Why not."],
                                               "scores": [1, 2]}])
    with pytest.raises(InputError, match="--label=annotator: the tiny world's annotator judges its own prompts"):
        select_pairs.main([f"--data={data}", f"--model={tiny_plain}", "--label=annotator"])


def test_errors_are_one_line_and_torchrun_is_refused(tiny_plain):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # as torchrun sets them
    proc = subprocess.run([sys.executable, "select_pairs.py", f"--model={tiny_plain}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: select_pairs.py runs in one process (a forward with no "
                                                "gradients): start it with python, not torchrun"]


def test_a_response_as_long_as_the_context_fits_beside_the_bos(tmp_path, tiny_plain, tiny_tok):
    """With a tokenizer that adds BOS, the response cap leaves room for the BOS and one prompt token: capped at
    max_len - 1 it left none, and the example was dropped with an error telling the user to cap the response."""
    import copy

    from nanoalign.checkpoint import save_pretrained
    bos_tok = copy.copy(tiny_tok)
    bos_tok.add_bos = True
    ckpt = save_pretrained(load_pretrained(tiny_plain), tmp_path / "bos_model", tokenizer=bos_tok)
    long = "Bees make honey. " * 40  # far more tokens than --max_len
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Tell me about bees.", "chosen": long,
                                                   "rejected": "Bees can sting."}] * 2)
    result, pairs = select(tmp_path, data, ckpt, "--max_len=32", "--max_response_len=1000", "--fraction=1")
    assert result["pairs"] == len(pairs) == 2


def test_the_computed_labels_win_over_stale_fields_of_the_same_name(tmp_path, tiny_plain, multi):
    stale = [{**r, "chosen_score": 99.0, "rejected_score": -99.0} for r in multi[1:]]
    _, pairs = select(tmp_path, write_jsonl(tmp_path / "stale.jsonl", stale), tiny_plain, "--strategy=hard")
    for p, r in zip(pairs, stale):
        score = dict(zip(r["responses"], r["scores"]))
        assert (p["chosen_score"], p["rejected_score"]) == (score[p["chosen"]], score[p["rejected"]])


def test_the_format_is_told_from_the_first_record_and_hh_transcripts_are_split(tmp_path, tiny_plain):
    fixtures = ROOT / "tests" / "fixtures"
    assert [select_pairs.detect_format(str(path), "auto") for path in (
        DATA / "prefs_val.jsonl", DATA / "multi_train.jsonl", fixtures / "hh_rlhf_sample.jsonl",
        fixtures / "shp_sample.jsonl")] == ["pairs", "multi", "hh", "shp"]
    _, pairs = select(tmp_path, fixtures / "hh_rlhf_sample.jsonl", tiny_plain, "--fraction=1")
    assert sorted(p["prompt"] for p in pairs) == sorted(r["prompt"] for r in read_hh(fixtures / "hh_rlhf_sample.jsonl"))


def test_the_annotator_needs_no_scores_and_random_draws_a_pair_per_prompt(tmp_path, tiny_plain, multi):
    """Each prompt draws its own pair of list positions (one seed for all would give every prompt the same ones)."""
    unscored = [{k: v for k, v in r.items() if k != "scores"} for r in multi]
    _, pairs = select(tmp_path, write_jsonl(tmp_path / "unscored.jsonl", unscored), tiny_plain, "--label=annotator",
                      "--strategy=random")
    positions = {tuple(sorted((r["responses"].index(p["chosen"]), r["responses"].index(p["rejected"]))))
                 for p, r in zip(pairs, unscored)}
    assert len(pairs) == 6 and len(positions) > 1


def test_random_pairs_follow_the_seed(tmp_path, tiny_plain):
    data = write_jsonl(tmp_path / "pairs.jsonl", read_jsonl(DATA / "prefs_train.jsonl")[:12])
    picks = [[p["prompt"] + p["chosen"] for p in select(tmp_path, data, tiny_plain, "--strategy=random",
                                                         f"--seed={seed}", name=f"seed{seed}.jsonl")[1]]
             for seed in (0, 1)]
    assert picks[0] != picks[1]


def test_the_printed_quantiles_the_template_and_the_dtype(tmp_path, tiny_plain, multi, monkeypatch, capsys):
    loaded, load = [], select_pairs.load_pretrained
    monkeypatch.setattr(select_pairs, "load_pretrained", lambda path, device, dtype: loaded.append(dtype) or load(
        path, device=device, dtype=dtype))
    result, _ = select(tmp_path, write_jsonl(tmp_path / "multi.jsonl", multi), tiny_plain, "--template=plain",
                       "--dtype=bfloat16")
    out = capsys.readouterr().out
    assert loaded == [torch.bfloat16] and "(template 'plain')" in out

    def line(x):  # min, quartiles, max, by hand
        q = sorted(x.double().tolist())
        at = [(len(q) - 1) * f for f in (0, 0.25, 0.5, 0.75, 1)]
        return "".join(f"{q[int(a)] + (a - int(a)) * (q[min(int(a) + 1, len(q) - 1)] - q[int(a)]):8.3f}" for a in at)

    assert f"  all candidates{line(result['candidates'])}   (60 pairs)\n" in out  # 6 prompts, 10 pairs of 5 each
    assert f"  selected      {line(result['selected'])}   (5 pairs)\n" in out
