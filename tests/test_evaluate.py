"""Metrics: ROUGE-L against rouge-score, BLEU against NLTK, and hand-worked numbers for every metric."""
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import reference
from nanoalign import world
from nanoalign.evaluate import (_fit_prompt, best_of_metrics, best_of_n, compare, copies_prompt, evaluate_answers, lcs_length, mean_self_bleu,
                                oracle_score, reward_accuracy, rouge_l, rouge_tokens, self_bleu, sentence_bleu,
                                win_rate)

DATA = Path(__file__).parent.parent / "data"

# --- ROUGE-L


def _varied_strings() -> list[str]:
    """Hand-picked edge cases (case, punctuation, digits, non-ASCII, blanks) and seeded random word strings."""
    strings = [
        "", "   ", "...!?", "The cat sat on the mat.", "the CAT sat on the MAT", "The cat is on the mat!",
        "don't stop-believing", "Don t stop believing", "e-mail me at foo@bar.com", "Café déjà vu, naïve résumé",
        "3.14 is pi; 2+2=4", "What is 17 plus 25?", "17 plus 25 is 42.",
        "tabs\tand\nnewlines  and   spaces",
        "Ünïcödé ÄÖÜ ß straße", "x", "a a a a a", "a b a b a b", "ÉCOLE école", "Hello, world! Hello, world!",
        "İstanbul KELVIN sign: \u212a", "under_score and hyphen-ated", "1st 2nd 3rd", "Mia lives in Oslo.",
    ]
    rng = random.Random(0)
    vocab = "the a cat dog sat on mat is 42 Bees make honey . , ! ? ran and".split()
    while len(strings) < 60:
        strings.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))))
    return strings


def test_rouge_tokens_match_rouge_score_tokenizer():
    tokenize = reference("rouge_score.tokenize")
    for s in _varied_strings():
        assert rouge_tokens(s) == tokenize.tokenize(s, None), s


def test_rouge_l_matches_rouge_score():
    rouge_scorer = reference("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    strings = _varied_strings()
    rng = random.Random(1)
    pairs = list(zip(strings, strings[1:] + strings[:1]))
    pairs += [(rng.choice(strings), rng.choice(strings)) for _ in range(40)]
    for candidate, ref in pairs:
        # rouge-score's argument order is (target, prediction)
        expected = scorer.score(ref, candidate)["rougeL"].fmeasure
        assert rouge_l(candidate, ref) == pytest.approx(expected, abs=1e-12), (candidate, ref)


def test_rouge_l_hand_worked():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: P = R = F1 = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d" = 2: P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert rouge_l("a b c d", "b d") == pytest.approx(2 / 3)
    assert rouge_l("a b c", "a b c") == 1.0
    assert rouge_l("a b c", "d e f") == 0.0


def test_rouge_l_empty_side_is_zero():
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0
    assert rouge_l("?!", "...") == 0.0  # no tokens left after tokenising


def test_lcs_length_is_not_contiguous():
    assert lcs_length("abcbdab", "bdcaba") == 4  # CLRS's example: "bcba"
    assert lcs_length([], [1, 2]) == 0


# --- win rate and reward accuracy


def test_win_rate_counts_ties_as_half():
    judge = lambda prompt, answer: len(answer)  # noqa: E731
    prompts = ["p1", "p2", "p3", "p4"]
    a = ["long answer", "xx", "same", "a"]
    b = ["short", "x", "same", "longer"]  # a wins, a wins, tie, a loses
    assert win_rate(judge, prompts, a, b) == pytest.approx((2 + 0.5) / 4)
    assert win_rate(judge, prompts, b, a) == pytest.approx(1 - 0.625)


def test_win_rate_passes_the_prompt_to_the_judge():
    judge = lambda prompt, answer: float(answer == prompt.upper())  # noqa: E731
    assert win_rate(judge, ["a", "b"], ["A", "B"], ["x", "y"]) == 1.0


def test_win_rate_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="3 prompts, 2 answers_a, 3 answers_b"):
        win_rate(oracle_score, ["a", "b", "c"], ["x", "y"], ["x", "y", "z"])
    with pytest.raises(ValueError, match="zero prompts"):
        win_rate(oracle_score, [], [], [])


def test_a_judges_non_finite_or_missing_scores_are_refused():
    """A NaN compares false with everything, so it would count as a loss for whichever side it is on; a judge
    returning too few scores would shorten the comparison without a word."""
    nan_for_x = lambda prompt, answer: math.nan if answer == "x" else 1.0  # noqa: E731
    with pytest.raises(ValueError, match="answer 0 of prompt 1 nan"):
        win_rate(nan_for_x, ["p", "q"], ["a", "x"], ["b", "c"])
    with pytest.raises(ValueError, match="answer 1 of model B inf"):
        compare(["p", "q"], ["a", "b"], ["c", "d"], lambda ps, ans: [0.0, math.inf] if ans[0] == "c" else [0.0, 1.0])
    with pytest.raises(ValueError, match="returned 1 scores for the 2 answers of model A"):
        compare(["p", "q"], ["a", "b"], ["c", "d"], lambda ps, ans: [1.0])


def test_win_rate_with_the_oracle():
    prompts = [r["prompt"] for r in map(json.loads, (DATA / "prompts_test.jsonl").read_text().splitlines()[:20])]
    references = [world.reference(p) for p in prompts]
    assert win_rate(oracle_score, prompts, references, prompts) == 1.0  # answering beats copying the prompt
    assert win_rate(oracle_score, prompts, references, references) == 0.5


def test_reward_accuracy_ties_are_wrong():
    # 1 > 0 right, 2 = 2 tie (wrong), 3 < 5 wrong, 4 > 1 right
    assert reward_accuracy([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0]) == 0.5
    assert reward_accuracy(torch.zeros(8), torch.zeros(8)) == 0.0  # constant rewards predict nothing
    assert reward_accuracy(torch.tensor([[0.3], [0.1]]), torch.tensor([0.2, 0.0])) == 1.0


def test_reward_accuracy_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="3 chosen rewards but 2 rejected"):
        reward_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="zero pairs"):
        reward_accuracy([], [])


def test_oracle_score_is_world_quality():
    prompt = "What is 17 plus 25?"
    assert oracle_score(prompt, "17 plus 25 is 42.") == 1.0
    for response in ["42.", "17 plus 25 is 41.", prompt]:
        assert oracle_score(prompt, response) == world.quality(prompt, response) < 1.0


# --- BLEU and self-BLEU


def test_sentence_bleu_hand_worked():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    # unigrams 5/6; bigrams 3/5 -> (3+1)/(5+1); trigrams 1/4 -> 2/5; 4-grams 0/3 -> 1/4; equal lengths: BP = 1
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(expected)
    assert expected == pytest.approx((1 / 18) ** 0.25)


def test_sentence_bleu_brevity_penalty_and_short_hypothesis():
    # "the cat" has only orders 1 and 2: p1 = 2/2, p2 = (1+1)/(1+1); BP = exp(1 - 6/2)
    assert sentence_bleu("the cat".split(), ["the cat sat on the mat".split()]) == pytest.approx(math.exp(1 - 6 / 2))
    assert sentence_bleu([], ["the cat".split()]) == 0.0


def test_sentence_bleu_clips_by_the_best_reference():
    # "the the the" (orders 1..3): each reference holds "the" at most twice -> clipped unigram precision 2/3;
    # no bigram or trigram matches: (0+1)/(2+1), (0+1)/(1+1); closest reference length 3: BP = 1
    hyp = "the the the".split()
    refs = ["the cat the".split(), "the dog".split()]
    assert sentence_bleu(hyp, refs) == pytest.approx((2 / 3 * 1 / 3 * 1 / 2) ** (1 / 3))


def test_sentence_bleu_closest_reference_length_prefers_the_shorter():
    # hypothesis of 5 words, references of 4 and 6: both 1 away, r = 4 < c -> BP = 1 (r = 6 would penalise)
    hyp = "a b c d e".split()
    assert sentence_bleu(hyp, ["a b c d".split(), "x x x x x x".split()]) == pytest.approx(
        (4 / 5 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_sentence_bleu_matches_nltk_method2():
    bleu = reference("nltk.translate.bleu_score")
    smoothing = bleu.SmoothingFunction().method2
    rng = random.Random(0)
    vocab = "a b c d e f g".split()
    for _ in range(300):
        hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        refs = [[rng.choice(vocab) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 4))]
        expected = bleu.sentence_bleu(refs, hyp, smoothing_function=smoothing, auto_reweigh=True)
        assert sentence_bleu(hyp, refs) == pytest.approx(expected, abs=1e-12), (hyp, refs)


def test_self_bleu_identical_disjoint_and_partial():
    assert self_bleu(["Bees make honey.", "bees make honey", "Bees, make honey!"]) == pytest.approx(1.0)
    assert self_bleu(["cats purr", "dogs bark", "birds sing"]) == 0.0
    # both directions are the hand-worked case of test_sentence_bleu_hand_worked
    assert self_bleu(["the cat sat on the mat", "the cat is on the mat"]) == pytest.approx((1 / 18) ** 0.25)


def test_self_bleu_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_bleu(["only one"])


def test_mean_self_bleu_averages_prompts():
    groups = [["a b c d", "a b c d"], ["x y", "z w"]]
    assert mean_self_bleu(groups) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_self_bleu([])


# --- copying the prompt


@pytest.mark.parametrize("prompt, answer", [
    ("What is 17 plus 25?", "17 plus 25 is 42."),
    ("Reverse the list: lemon, tiger, cloud.", "The reversed list is cloud, tiger, lemon."),
    ("Sort the words: lemon, tiger, cloud.", "The sorted list is cloud, lemon, tiger."),
    ("Mia lives in Oslo. Tom lives in Rome. Where does Tom live?", "Tom lives in Rome."),
    ("Tell me two facts about bees.", "Bees make honey. Bees visit flowers."),
])
def test_copies_prompt_on_constructed_responses(prompt, answer):
    assert copies_prompt(prompt, prompt)  # verbatim copy
    assert copies_prompt(prompt, prompt + " " + answer)  # copy, then the answer
    assert copies_prompt(prompt, answer + " " + prompt.lower())  # answer, then a copy (case ignored)
    # the right answer echoes words of the question (ROUGE-L recall up to 0.6) but is not a copy
    assert not copies_prompt(prompt, answer)


def test_copies_prompt_catches_a_reasked_question_inside_a_long_prompt():
    prompt = "Mia lives in Oslo. Tom lives in Rome. Ana lives in Lima. Where does Tom live?"
    # the response holds 2 of the prompt's 13 word 4-grams: rule 1 alone would miss it
    assert copies_prompt(prompt, "Where does Tom live? Tom lives in Rome.")
    assert not copies_prompt(prompt, "Tom lives in Rome.")


def test_copies_prompt_ignores_short_questions_and_respects_the_threshold():
    prompt = "My cat keeps scratching the sofa every single night. Why?"
    assert not copies_prompt(prompt, "That is why cats scratch: they sharpen their claws.")
    # 4 of the prompt's 7 distinct 4-grams: "my cat keeps scratching the sofa every"
    half = "My cat keeps scratching the sofa every day, I know."
    assert copies_prompt(prompt, half, threshold=0.5)
    assert not copies_prompt(prompt, half, threshold=0.6)
    assert not copies_prompt("", "anything")


def test_copies_prompt_flags_exactly_the_worlds_copy_candidates():
    rng = random.Random(0)
    for row in map(json.loads, (DATA / "prompts_test.jsonl").read_text().splitlines()):
        for kind, response in world.candidates(row["prompt"], rng):
            assert copies_prompt(row["prompt"], response) == (kind == "copy"), (kind, row["prompt"], response)


def test_copying_at_exactly_the_threshold_counts():
    # the prompt's two distinct 4-grams, the response holds one: containment 0.5, at the threshold
    assert copies_prompt("one two three four five", "one two three four six", threshold=0.5)


def test_fit_prompt_keeps_the_bos_and_the_end():
    with_bos, without = SimpleNamespace(add_bos=True), SimpleNamespace(add_bos=False)
    assert _fit_prompt([1, 10, 11, 12, 13, 14], 4, with_bos) == [1, 12, 13, 14]
    assert _fit_prompt([10, 11, 12, 13, 14], 3, without) == [12, 13, 14]
    assert _fit_prompt([1, 10, 11], 3, with_bos) == [1, 10, 11]  # it fits: unchanged


def test_evaluate_answers_averages_rouge_over_the_referenced_records_and_counts_rouge_tokens():
    m = evaluate_answers([{"prompt": "Tell me a joke.", "reference": "a b"}, {"prompt": "Hi."}],
                         ["a b", "don't stop-believing"])
    assert m["rouge_l"] == 1.0 and m["n_reference"] == 1  # the record without a reference does not count
    assert m["mean_words"] == (2 + 4) / 2  # ROUGE tokens: don, t, stop, believing
    # one prompt from outside the tiny world: no oracle numbers for the set
    world_row = json.loads((DATA / "prompts_test.jsonl").read_text().splitlines()[0])
    mixed = evaluate_answers([world_row, {"prompt": "Tell me a joke."}], ["x", "y"])
    assert mixed["mean_quality"] is None and mixed["closed_accuracy"] is None


def test_compare_reports_each_sides_mean_judgement():
    def judge(prompts, answers):  # longer is better
        return [float(len(a)) for a in answers]

    c = compare(["p", "q"], ["aaa", "b"], ["a", "bb"], judge)
    assert (c["wins"], c["ties"], c["losses"], c["win_rate"]) == (1, 0, 1, 0.5)
    assert c["judge_a"] == 2.0 and c["judge_b"] == 1.5
    # the standard error over prompts: points 1, 1/2, 0 have mean 1/2 and sample variance 1/4, so sqrt(1/4 / 3)
    c = compare(["p", "q", "r"], ["aaa", "b", "c"], ["a", "d", "ccc"], judge)
    assert (c["win_rate"], c["ties"]) == (0.5, 1) and c["win_rate_se"] == pytest.approx((0.25 / 3) ** 0.5)


def test_compare_counts_two_identical_answers_as_a_tie_whatever_their_scores():
    """A reward model scores the same text a few ulps apart in batches padded to other lengths: identical answers
    must stay a tie, not become a random win or loss."""
    calls = []

    def noisy(prompts, answers):  # "same" drifts by an ulp or so from one batch to the next; "y" beats "x"
        calls.append(1)
        return [1.0 + 1e-7 * len(calls) if a == "same" else float(a == "y") for a in answers]

    c = compare(["p", "q"], ["same", "x"], ["same", "y"], noisy)
    assert (c["wins"], c["ties"], c["losses"]) == (0, 1, 1) and c["win_rate"] == 0.25


def test_best_of_n_picks_each_prompts_top_scored_sample_the_earliest_on_a_tie():
    calls = []

    def judge(prompts, answers):  # the score is the number in the answer; one call for every sample
        calls.append((list(prompts), list(answers)))
        return [float(a.split()[-1]) for a in answers]

    samples = [["p0 3", "p1 1", "p2 5"], ["p0 7", "p1 1", "p2 2"], ["p0 4", "p1 0", "p2 9"]]
    assert best_of_n(["x", "y", "z"], samples, judge) == ["p0 7", "p1 1", "p2 9"]
    assert best_of_n(["y"], [["first 2"], ["second 2"], ["third 1"]], judge) == ["first 2"]  # a tie: the earliest
    assert len(calls) == 2 and calls[0][0] == ["x", "y", "z"] * 3  # each sample scored with its own prompt
    with pytest.raises(ValueError, match="one sample per prompt in each of the 2 lists"):
        best_of_n(["x", "y"], [["a", "b"], ["c"]], judge)
    with pytest.raises(ValueError, match="zero samples"):
        best_of_n(["x"], [], judge)


def test_best_of_metrics_by_hand():
    p = "What is 2 plus 3?"
    samples = [[p.replace("?", "."), "2 plus 3 is 5."], ["5.", "2 plus 3 is 4."]]  # a copy, 1.0 / 0.6, 0.36
    q = [[world.quality(p, a) for a in s] for s in samples]
    assert q[0][1] == 1.0 and q[1][0] == 0.6
    m = best_of_metrics([p, p], samples, "oracle")
    assert m["n"] == 2 and m["chooser"] == "oracle"
    assert m["sample_quality"] == pytest.approx(sum(map(sum, q)) / 4)
    assert m["oracle_best_quality"] == pytest.approx((max(q[0][0], q[1][0]) + 1.0) / 2)
    outside = best_of_metrics(["Tell me a joke."], [["no"]], "rm")
    assert outside["sample_quality"] is None and outside["oracle_best_quality"] is None


def test_identical_samples_are_not_diverse_even_when_empty():
    """An empty sample scored BLEU 0 against its identical twin: a policy collapsed to empty answers read as
    maximally diverse."""
    assert self_bleu(["", "", ""]) == 1.0 and self_bleu([".", "."]) == 1.0  # (no ROUGE tokens in ".")
    assert self_bleu(["", "a cat sat"]) == 0.0  # different: the empty one shares nothing
    assert self_bleu(["a cat sat", "a cat sat"]) == 1.0


def test_one_prompts_comparison_has_no_standard_error_and_stays_valid_json():
    c = compare(["p"], ["a"], ["b"], lambda prompts, answers: [float(a == "a") for a in answers])
    assert c["win_rate"] == 1.0 and c["win_rate_se"] is None
    json.dumps(c, allow_nan=False)  # NaN is not JSON: --out wrote it


def test_evaluate_answers_counts_an_answer_quoting_its_prompt_as_a_copy():
    """copies_prompt(prompt, answer): the prompt's 4-grams are all in the answer, while the answer's are mostly
    not in the prompt (asked the other way round, it is no copy)."""
    prompt = "What is 17 plus 25?"
    answer = ("Let me think about this for a while before I answer. What is 17 plus 25? It is 42, because 17 and 25 "
              "make 42.")
    assert evaluate_answers([{"prompt": prompt}], [answer])["copy_rate"] == 1.0  # 1 copy of 1
    assert not copies_prompt(answer, prompt)


def test_closed_accuracy_is_over_the_closed_ended_prompts_only():
    # closed: right, wrong (6 for 5), right; open: right, not counted -> 2 of 3 (not 2 of 4, nor 3 of 4)
    records = [{"prompt": p} for p in ("What is 17 plus 25?", "What is 2 plus 3?",
                                       "Reverse the list: lemon, tiger, cloud.", "Tell me two facts about bees.")]
    answers = ["17 plus 25 is 42.", "2 plus 3 is 6.", "The reversed list is cloud, tiger, lemon.",
               "Bees make honey. Bees visit flowers."]
    m = evaluate_answers(records, answers)
    assert m["n_closed"] == 3 and m["closed_accuracy"] == pytest.approx(2 / 3)
    assert world.is_correct(records[3]["prompt"], answers[3])  # the open one is right: it would raise the count


def test_evaluate_answers_an_empty_reference_is_no_reference():
    m = evaluate_answers([{"prompt": "Hi.", "reference": ""}, {"prompt": "Yo.", "reference": "a b"}], ["a b", "a b"])
    assert m["rouge_l"] == 1.0 and m["n_reference"] == 1  # "" counted would halve the mean with a 0
