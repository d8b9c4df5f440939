"""The tiny world: byte-for-byte rebuilds, an oracle that ranks the reference first, a calibrated annotator,
disjoint splits and a tokenizer that round-trips the world's text."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from nanoalign import world

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
SPLIT_FILES = ["sft_train", "sft_val", "prefs_train", "prefs_val", "multi_train", "prompts_test"]
KEYS = {
    "pretrain": {"text"},
    "sft_train": {"prompt", "response", "qtype", "family", "reference"},
    "sft_val": {"prompt", "response", "qtype", "family", "reference"},
    "prompts_test": {"prompt", "reference", "qtype", "family"},
    "prefs_train": {"prompt", "chosen", "rejected", "qtype", "family", "reference"},
    "prefs_val": {"prompt", "chosen", "rejected", "qtype", "family", "reference"},
    "multi_train": {"prompt", "responses", "scores", "qtype", "family", "reference"},
}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(root, name):
    return [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    world.build(out, seed=0)
    return out


@pytest.fixture(scope="module")
def ideal(tmp_path_factory):
    """The ideal writer's world: no filler in the demonstrations or in the compared answers."""
    out = tmp_path_factory.mktemp("ideal")
    world.build(out, seed=0, padded_demos=0.0, padded_prefs=0.0)
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
    world.build(tmp_path / "again", seed=0)
    world.build(tmp_path / "seed1", seed=1)
    first, again, other = _files(built), _files(tmp_path / "again"), _files(tmp_path / "seed1")
    assert set(first) == {f"{k}.jsonl" for k in KEYS} | {"world.json", "tokenizer/tokenizer.json",
                                                          "tokenizer/tokenizer_config.json"}
    assert first == again
    assert first["sft_train.jsonl"] != other["sft_train.jsonl"]


def test_committed_data_matches_a_rebuild(built):
    assert _files(REPO_DATA) == _files(built), "data/ is stale: run `python -m nanoalign.world`"


def test_files_have_the_interface_keys_and_counts(built):
    summary = json.loads((built / "world.json").read_text())
    assert summary["seed"] == 0 and summary["tau"] == world.TAU
    for name, keys in KEYS.items():
        records = _read(built, name)
        assert len(records) == summary["counts"][name] > 0
        assert all(set(r) == keys for r in records), name
    assert (built / "sft_train.jsonl").read_bytes().isascii()
    assert b"\r" not in (built / "sft_train.jsonl").read_bytes()


def test_splits_have_disjoint_prompts(built):
    prompts = {name: {r["prompt"] for r in _read(built, name)} for name in SPLIT_FILES}
    for i, a in enumerate(SPLIT_FILES):
        for b in SPLIT_FILES[i + 1:]:
            assert not prompts[a] & prompts[b], (a, b)
    # held-out prompts never reach the base model either
    pretrain = "".join(r["text"] for r in _read(built, "pretrain"))
    assert not any(f"Human: {p}\n" in pretrain for p in prompts["prompts_test"] | prompts["prefs_val"])
    assert len(prompts["prompts_test"]) == len(_read(built, "prompts_test"))  # test prompts are distinct


def test_qtypes_and_families(built):
    for name in SPLIT_FILES:
        records = _read(built, name)
        assert {r["qtype"] for r in records} == {"OPENENDED", "CONSTRAINED"}, name
        assert {r["family"] for r in records} == set(world.FAMILIES), name
        for r in records:
            assert (r["qtype"] == "OPENENDED") == (r["family"] == "facts")
            assert world.parse_prompt(r["prompt"])["family"] == r["family"]


def test_references_are_perfect_and_the_ideal_writers_sft_responses_are_references(built, ideal):
    for root in (built, ideal):
        for name in ["sft_train", "sft_val", "prompts_test"]:
            assert all(world.quality(r["prompt"], r["reference"]) == 1.0 for r in _read(root, name))
    for name in ["sft_train", "sft_val"]:
        assert all(r["response"] == r["reference"] for r in _read(ideal, name))
    assert all(r["response"] == r["reference"] for r in _read(built, "sft_val"))  # held out: the references


def test_the_default_world_is_the_chatty_writer(built, ideal):
    """The default world pads 90% of the demonstrations and half of the compared answers; it is the ideal
    writer's world in every other file, byte for byte."""
    default, plain = _files(built), _files(ideal)
    assert {k for k in plain if plain[k] != default[k]} == {"sft_train.jsonl", "prefs_train.jsonl",
                                                            "prefs_val.jsonl", "world.json"}
    summary = json.loads((built / "world.json").read_text())
    assert summary["padded_demos"]["fraction"] == world.PADDED_DEMOS == 0.9
    assert summary["padded_prefs"]["fraction"] == world.PADDED_PREFS == 0.5
    assert abs(summary["padded_demos"]["padded"] / summary["counts"]["sft_train"] - 0.9) < 0.02
    assert "padded_demos" not in json.loads((ideal / "world.json").read_text())


def _fillers_after(answer, original):
    """How many filler sentences answer adds to original (one to three distinct ones original lacks), or None
    when answer is not original, as it is or so padded."""
    if answer == original:
        return 0
    if not answer.startswith(original + " "):
        return None
    added = [f.strip() + "." for f in answer[len(original) + 1:].split(".")[:-1]]
    ok = (answer == " ".join([original] + added) and 1 <= len(added) <= 3 and len(set(added)) == len(added)
          and all(f in world.FILLERS and f not in original for f in added))
    return len(added) if ok else None


def test_padded_demos_change_only_the_sft_responses(ideal, tmp_path):
    """--padded_demos pads about that fraction of the SFT training answers, each the reference plus one to three
    distinct fillers scored 1 - 0.15 per filler; every other file is the ideal writer's, byte for byte."""
    summary = world.build(tmp_path, seed=0, padded_demos=0.5, padded_prefs=0.0)
    plain, padded = _files(ideal), _files(tmp_path)
    assert {k for k in plain if plain[k] != padded[k]} == {"sft_train.jsonl", "world.json"}
    rows, base = _read(tmp_path, "sft_train"), _read(ideal, "sft_train")
    assert [{**r, "response": None} for r in rows] == [{**r, "response": None} for r in base]
    n_padded = 0
    for r in rows:
        n_fillers = _fillers_after(r["response"], r["reference"])
        assert n_fillers is not None, r
        n_padded += n_fillers > 0
        assert world.quality(r["prompt"], r["response"]) == pytest.approx(1 - 0.15 * n_fillers)
    assert abs(n_padded / len(rows) - 0.5) < 0.03  # 4000 coin flips: 3% is ~4 standard deviations
    assert summary["padded_demos"]["padded"] == n_padded


def test_padded_prefs_pad_the_compared_answers_and_nothing_else(ideal, tmp_path):
    """--padded_prefs: only the preference files change; each pair holds the ideal writer's pair's two answers,
    each as it was or followed by one to three fillers it lacked, about that fraction of them padded."""
    summary = world.build(tmp_path, seed=0, padded_demos=0.0, padded_prefs=0.5)
    plain, padded = _files(ideal), _files(tmp_path)
    assert {k for k in plain if plain[k] != padded[k]} == {"prefs_train.jsonl", "prefs_val.jsonl", "world.json"}
    n_answers = n_padded = 0
    for split in ("prefs_train", "prefs_val"):
        for new, old in zip(_read(tmp_path, split), _read(ideal, split), strict=True):
            assert {**new, "chosen": 0, "rejected": 0} == {**old, "chosen": 0, "rejected": 0}
            kept = [_fillers_after(new["chosen"], old["chosen"]), _fillers_after(new["rejected"], old["rejected"])]
            swapped = [_fillers_after(new["chosen"], old["rejected"]), _fillers_after(new["rejected"], old["chosen"])]
            counts = kept if None not in kept else swapped
            assert None not in counts, (new, old)
            n_answers, n_padded = n_answers + 2, n_padded + sum(c > 0 for c in counts)
    assert abs(n_padded / n_answers - 0.5) < 0.03  # 6600 coin flips (a few equal pairs kept): ~5 std
    rows = _read(tmp_path, "prefs_train")
    assert summary["padded_prefs"] == {"fraction": 0.5, "padded_chosen": sum(world.is_padded(r["chosen"]) for r in rows),
                                       "padded_rejected": sum(world.is_padded(r["rejected"]) for r in rows)}


def test_pad_preferences_labels_each_pair_again_as_shown():
    """With a sharp annotator (tau near 0) the better answer of each pair, fillers counted, is the chosen one,
    whichever way the pair was labelled before; fraction 1 pads both answers."""
    pairs = [("What is 17 plus 25?", "17 plus 25 is 42.", "42."), ("What is 17 plus 25?", "42.", "17 plus 25 is 42."),
             ("Tell me two facts about bees.", "Bees make honey.", "Bees make honey. Bees visit flowers.")] * 20
    records = [{"prompt": p, "reference": "r", "qtype": "q", "family": "f", "chosen": c, "rejected": r}
               for p, c, r in pairs]
    for fraction in (0.0, 1.0):
        out = world.pad_preferences(records, fraction, random.Random(0), tau=1e-9)
        for r, before in zip(out, records):
            assert {k: r[k] for k in ("prompt", "reference", "qtype", "family")} == {
                k: before[k] for k in ("prompt", "reference", "qtype", "family")}
            assert world.quality(r["prompt"], r["chosen"]) >= world.quality(r["prompt"], r["rejected"])
            assert world.is_padded(r["chosen"]) == world.is_padded(r["rejected"]) == (fraction == 1.0)
        if fraction == 0.0:  # relabelled: the second kind of pair had the worse answer chosen
            assert [(r["chosen"], r["rejected"]) for r in out[:3]] == [pairs[0][1:], pairs[0][1:], pairs[2][2:0:-1]]


def test_oracle_ranks_the_reference_above_every_corruption():
    rng = random.Random(0)
    prompts = [world.sample_prompt(rng, f) for f in world.FAMILIES[:4] for _ in range(200)] + world._open_prompts()
    seen = set()
    for prompt in prompts:
        (kind, ref), *corrupted = world.candidates(prompt, rng)
        assert kind == "correct" and world.quality(prompt, ref) == 1.0
        for kind, response in corrupted:
            seen.add(kind)
            assert world.quality(prompt, response) < 1.0, (prompt, kind, response)
    assert seen == {"incorrect", "off_topic", "repetitive", "too_short", "too_long", "copy"}


def test_oracle_scores_worked_by_hand():
    q = world.quality
    p = "What is 17 plus 25?"
    assert q(p, "17 plus 25 is 42.") == 1.0
    assert q(p, " 17  PLUS 25 is 42.") == 1.0  # case and whitespace do not matter
    assert q(p, "42.") == 0.6  # bare answer
    assert q(p, "17 plus 25 is 45.") == pytest.approx(0.4 * 0.7)  # near miss: 3 off
    assert q(p, "17 plus 25 is 60.") == 0.0
    assert q(p, "17 plus 25 is 42. 17 plus 25 is 42.") == 0.85  # one repeat
    assert q(p, "17 plus 25 is 42. I hope this helps.") == 0.85  # one extra sentence
    assert q(p, "What is 17 plus 25?") == 0.0
    p = "Mia lives in Oslo. Tom lives in Rome. Where does Tom live?"
    assert (q(p, "Tom lives in Rome."), q(p, "Rome."), q(p, "Tom lives in Oslo."), q(p, "Tom lives in Lima.")) == (
        1.0, 0.6, 0.1, 0.0)
    assert q(p, p) == pytest.approx(1.0 - 0.15 * 2 - 0.3)  # copying the prompt: right, but two extras and the question
    # one word of three in place; scores are rounded to 4 decimals
    assert q("Sort the words: tiger, apple, lemon.", "The sorted list is apple, tiger, lemon.") == 0.1333
    p = "Tell me two facts about bees."
    assert q(p, "Bees make honey. Bees can sting.") == 1.0
    assert q(p, "Bees can sting. Bees make honey.") == 1.0  # any order, any subset
    assert q(p, "Bees make honey.") == 0.5
    assert q(p, "Bees make honey. Bees make honey.") == 0.35
    assert q(p, "Bees make honey. Bees can sting. Bees have a queen.") == 0.95  # one fact beyond the two asked
    assert q(p, "Bees make honey. Cats drink milk.") == 0.35  # off topic
    assert q(p, "Cats drink milk. Dogs like to run.") == 0.0
    assert q("Tell me about bees.", "Bees make honey. Bees can sting.") == 0.6667  # 2 of 3
    with pytest.raises(ValueError, match="not a prompt"):
        q("Tell me about dragons.", "Dragons fly.")


def test_a_sharp_annotator_always_prefers_the_better_answer_without_overflowing():
    """tau near 0: the gap / tau of a clear pair overflows exp() when written naively; P is then 0 or 1."""
    p, better, worse = "What is 17 plus 25?", "17 plus 25 is 42.", "42."
    rng = random.Random(0)
    for tau in (1e-3, 1e-9):
        assert all(world.annotate(p, better, worse, rng, tau) for _ in range(50))
        assert not any(world.annotate(p, worse, better, rng, tau) for _ in range(50))


def test_annotator_error_shrinks_with_the_gap():
    p, ref = "What is 17 plus 25?", "17 plus 25 is 42."
    pairs = [("42.", ref + " I hope this helps. Thank you for asking. That is a good question."),  # 0.6 vs 0.55
             (" ".join([ref] * 3), "42."),  # 0.7 vs 0.6
             (" ".join([ref] * 2), " ".join([ref] * 3)),  # 0.85 vs 0.7
             (ref, " ".join([ref] * 3)),  # 1.0 vs 0.7
             (ref, "17 plus 25 is 45.")]  # 1.0 vs 0.28
    rng, n, gaps, errors = random.Random(0), 4000, [], []
    for better, worse in pairs:
        gaps.append(world.quality(p, better) - world.quality(p, worse))
        # both argument orders: the annotator must not favour the first one
        wrong = sum(not world.annotate(p, better, worse, rng, world.TAU) for _ in range(n))
        wrong += sum(world.annotate(p, worse, better, rng, world.TAU) for _ in range(n))
        errors.append(wrong / (2 * n))
        assert errors[-1] == pytest.approx(1 / (1 + math.exp(gaps[-1] / world.TAU)), abs=0.015), (gaps[-1], errors[-1])
    assert gaps == sorted(gaps) and gaps[0] == pytest.approx(0.05) and gaps[-1] > 0.7
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.35 and errors[-1] < 0.01
    # a numpy Generator works as the rng too
    assert sum(world.annotate(p, ref, "42.", np.random.default_rng(0)) for _ in range(100)) > 80


def test_recorded_error_by_gap_decreases_and_prefs_are_noisy(built):
    summary = json.loads((built / "world.json").read_text())
    errors = [row["error"] for row in summary["annotator_error_by_gap"]]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 and errors[-1] < 0.01
    prefs = _read(built, "prefs_train")
    q = [(world.quality(r["prompt"], r["chosen"]), world.quality(r["prompt"], r["rejected"])) for r in prefs]
    mislabelled = sum(c < r for c, r in q) / len(q)
    assert mislabelled == summary["prefs_train_mislabelled"] and 0.02 < mislabelled < 0.2
    near_ties = sum(abs(c - r) < 0.05 for c, r in q) / len(q)
    assert 0.01 < near_ties < 0.3  # some near-ties are kept, most pairs are decidable
    assert all(r["chosen"] != r["rejected"] for r in prefs)


def test_multi_response_scores_are_the_oracle(built):
    for r in _read(built, "multi_train"):
        assert len(r["responses"]) == world.RESPONSES_PER_PROMPT == len(set(r["responses"]))
        assert r["scores"] == [world.quality(r["prompt"], y) for y in r["responses"]]
        assert max(r["scores"]) > min(r["scores"])


def test_tokenizer_round_trips_the_world(built):
    tok = Tokenizer.from_file(str(built / "tokenizer" / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ["<s>", "</s>", "<pad>"]] == [0, 1, 2]
    assert 900 <= tok.get_vocab_size() <= 2000
    config = json.loads((built / "tokenizer" / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}
    texts = [r["text"] for r in _read(built, "pretrain")[:300]]
    texts += [world.HH.format(prompt=r["prompt"], response=r["chosen"]) for r in _read(built, "prefs_val")]
    texts += ["Hello, wörld! 12345 \t tabs\n\nand émojis 🙂"]  # byte-level: even unseen text round-trips
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert not {0, 1, 2} & set(ids)  # encoding adds no special tokens
    # BPE learnt the world's words: a tiny model needs short sequences
    chars = sum(len(t) for t in texts[:300])
    assert chars / sum(len(tok.encode(t).ids) for t in texts[:300]) > 3.0


def test_nanoalign_tokenizer_loads_the_world(built):
    from nanoalign.tokenizer import Tokenizer as NanoTokenizer  # our own module: never skipped

    tok = NanoTokenizer.from_dir(built / "tokenizer")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 1, 2, False)
    text = "Tell me about cats."
    assert tok.decode(tok.encode(text)) == text


def test_a_response_that_states_two_answers_answers_nothing():
    """A hedge held the reference sentence, so it scored 1.0 less one extra sentence (0.85, above the bare right
    answer's 0.6) and counted as correct: PPO rewarded by the oracle is paid to state every answer it hesitates
    between. Now its correctness is 0. A copy of the question, a repeat, a filler or a sentence about something
    else is no second answer."""
    lookup = "Mia lives in Oslo. Tom lives in Rome. Where does Tom live?"
    cases = [  # (prompt, response, quality, is_correct)
        ("What is 17 plus 25?", "17 plus 25 is 41. 17 plus 25 is 42.", 0.0, False),
        ("What is 17 plus 25?", "42. 17 plus 25 is 43.", 0.0, False),
        (lookup, "Tom lives in Oslo. Tom lives in Rome.", 0.0, False),
        (lookup, "Oslo. Tom lives in Rome.", 0.0, False),
        ("Sort the words: lemon, tiger, cloud.",
         "The sorted list is cloud, tiger, lemon. The sorted list is cloud, lemon, tiger.", 0.0, False),
        # one answer with a copy of the question, a repeat, a filler or another question's sentence: as before
        ("What is 17 plus 25?", "What is 17 plus 25? 17 plus 25 is 42.", 0.55, False),  # a copy is never correct
        # the copy of a sort question holds its word list, a permutation of the words: still no second answer
        ("Sort the words: lemon, tiger, cloud.",
         "Sort the words: lemon, tiger, cloud. The sorted list is cloud, lemon, tiger.", 0.55, False),
        ("What is 17 plus 25?", "17 plus 25 is 42. 17 plus 25 is 42.", 0.85, True),
        ("What is 17 plus 25?", "42. 17 plus 25 is 42.", 0.85, True),
        ("What is 12 plus 27?", "12 plus 29 is 41. 17 plus 25 is 43.", 0.17, False),  # the near miss 41, one extra
        (lookup, "Mia lives in Oslo. Tom lives in Rome.", 0.85, True),
        (lookup, "Tom lives in Rome. Tom lives in an engine.", 0.85, True),  # sampled at temperature 1: no city
        ("Sort the words: lemon, tiger, cloud.", "The sorted list is cloud, lemon, tiger. I hope this helps.", 0.85,
         True),
        ("Sort the words: lemon, tiger, cloud.", "The sorted list is cloud, lemon, tiger. Cats, dogs.", 0.85, True)]
    for prompt, response, quality, correct in cases:
        assert (world.quality(prompt, response), world.is_correct(prompt, response)) == (quality, correct), response


def test_is_correct_by_hand():
    from nanoalign.world import is_correct

    assert is_correct("What is 17 plus 25?", "17 plus 25 is 42.")
    assert is_correct("What is 17 plus 25?", "42")
    assert not is_correct("What is 17 plus 25?", "17 plus 25 is 41.")
    q = "Mia lives in Oslo. Tom lives in Rome. Where does Tom live?"
    assert is_correct(q, "Tom lives in Rome.")
    assert not is_correct(q, "Tom lives in Oslo.")
    assert not is_correct(q, q)  # the copy contains "Tom lives in Rome." but answers nothing
    assert is_correct("Sort the words: lemon, tiger, cloud.", "The sorted list is cloud, lemon, tiger.")
    assert not is_correct("Sort the words: lemon, tiger, cloud.", "The sorted list is lemon, tiger, cloud.")


def test_is_world_prompt():
    from nanoalign.world import is_world_prompt

    assert is_world_prompt("What is 17 plus 25?")
    assert is_world_prompt("Sort the words: lemon, tiger, cloud.")
    assert not is_world_prompt("Name three primary colors.")


def test_near_miss_divides_by_the_longer_list():
    # 3 of the 3 right words in place, but a 4th word: 0.4 * 3 / max(4, 3) = 0.3 (not 0.4 * 3 / 3)
    assert world.quality("Sort the words: tiger, apple, lemon.", "The sorted list is apple, lemon, tiger, zebra.") == 0.3


def test_bare_list_answer_is_case_insensitive():
    assert world.quality("Sort the words: tiger, apple, lemon.", "Apple, Lemon, Tiger.") == 0.6
    assert world.is_correct("Sort the words: tiger, apple, lemon.", "Apple, Lemon, Tiger.")


def test_is_correct_open_ended_needs_exactly_n_facts():
    p = "Tell me two facts about bees."
    assert world.is_correct(p, "Bees make honey. Bees can sting.")
    assert not world.is_correct(p, "Bees make honey. Bees make honey.")  # one distinct fact
    assert not world.is_correct(p, "Bees make honey. Cats drink milk.")


def test_is_padded_finds_a_filler_sentence_anywhere():
    ref = "Tom lives in Rome."
    assert not world.is_padded(ref) and world.is_padded(ref + " I hope this helps.")
    assert world.is_padded("Thank you for asking. " + ref)
    assert all(world.is_padded(f) for f in world.FILLERS)
    padded = world.pad_demonstrations([{"prompt": "p", "reference": ref, "response": ref}] * 50, 0.5, random.Random(0))
    assert 0 < sum(world.is_padded(r["response"]) for r in padded) < 50  # what the padded demonstrator adds


def test_a_lookup_about_someone_not_in_the_prompt_is_not_a_world_prompt():
    """parse_prompt's promise: a ValueError (is_world_prompt False), not a KeyError from the missing person."""
    p = "Mia lives in Oslo. Tom lives in Rome. Where does Ana live?"
    assert not world.is_world_prompt(p)
    with pytest.raises(ValueError, match="not a prompt of the tiny world"):
        world.quality(p, "Ana lives in Oslo.")


@pytest.mark.parametrize("flag", ["padded_demos", "padded_prefs"])
def test_padding_fractions_accept_exactly_the_closed_unit_interval(tmp_path, monkeypatch, flag):
    for bad in (-0.1, 1.01, 1.5):
        with pytest.raises(ValueError, match=rf"--{flag}={bad} must be a fraction in \[0, 1\]"):
            world.build(tmp_path / "bad", **{flag: bad})

    class Checked(Exception):
        pass

    def past_the_check(*args, **kwargs):  # stop the build right after the check: no need to write a world
        raise Checked

    monkeypatch.setattr(world, "make_splits", past_the_check)
    for fraction in (0.0, 1.0):  # both ends are fractions: 1.0 pads every SFT answer
        with pytest.raises(Checked):
            world.build(tmp_path / "ok", **{flag: fraction})


def test_pad_demonstrations_adds_one_to_three_fillers_each_count_seen():
    ref = "Tom lives in Rome."
    padded = world.pad_demonstrations([{"prompt": "p", "reference": ref, "response": ref}] * 300, 1.0,
                                      random.Random(0))
    counts = {sum(f in r["response"] for f in world.FILLERS) for r in padded}
    assert counts == {1, 2, 3}  # fraction 1: every answer padded, with one, two or three distinct fillers


def test_world_command_builds_the_chatty_default_and_the_ideal_writer(built, ideal, tmp_path, capsys):
    """With no flags the command builds the default (chatty) world and says how many answers it padded; with
    --padded_demos=0 --padded_prefs=0 the ideal writer's world, and no padding to report."""
    world.main([f"--out={tmp_path / 'default'}"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "default" / "world.json").read_text())
    pads = summary["padded_prefs"]
    assert f"prefs_train: {pads['padded_chosen']} chosen and {pads['padded_rejected']} rejected answers padded" in out
    assert f"sft_train: {summary['padded_demos']['padded']} responses padded" in out
    assert pads["padded_chosen"] < pads["padded_rejected"]  # a filler costs: padded answers lose more often
    assert _files(tmp_path / "default") == _files(built)
    world.main([f"--out={tmp_path / 'ideal'}", "--padded_demos=0", "--padded_prefs=0"])
    assert "padded" not in capsys.readouterr().out
    assert _files(tmp_path / "ideal") == _files(ideal)
    with pytest.raises(ValueError, match=r"--padded_prefs=2.0 must be a fraction in \[0, 1\]"):
        world.main([f"--out={tmp_path / 'bad'}", "--padded_prefs=2"])
