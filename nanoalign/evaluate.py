"""Evaluation metrics: ROUGE-L, win rate, reward accuracy, self-BLEU and a prompt-copy detector.

Every function here is pure (strings and numbers in, a number out), so scripts can combine them with any
generator or judge. What each metric is for (see docs/methods.md, "## 8. Evaluation"):
  rouge_l          ROUGE-L F1 of a summary against its reference (Lin 2004), the Hbat summarisation metric
  win_rate         (#wins + 1/2 #ties) / #prompts of model A against model B under a judge (oracle, reward model)
  reward_accuracy  fraction of held-out pairs where the chosen response gets the higher reward (RM, DPO)
  self_bleu        diversity of k samples for one prompt (Zhu et al. 2018, "Texygen"); lower = more diverse
  copies_prompt    did the response copy the prompt? The reward hack a relevance-only reward invites (R3)
  oracle_score     the tiny world's exact quality, usable as a judge

Gotchas:
- Tokens are ROUGE's: lowercase, every run of characters outside [a-z0-9] is a separator (so "don't" is
  "don", "t" and accented letters split words), exactly like the rouge-score package without stemming.
  self_bleu and copies_prompt use the same tokens, so punctuation never counts as a match.
- reward_accuracy counts a tie as wrong (strictly greater), like TRL's rewards/accuracies; win_rate counts
  a tie as half a win. They answer different questions: "did the model rank the pair right" vs "which
  model is better".
"""
import math
import re
from collections import Counter
from typing import Callable, Sequence

import torch

from nanoalign import world

# --- tokens and ROUGE-L

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lowercase, non-[a-z0-9] runs -> spaces, split."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (not necessarily contiguous), O(len(a) * len(b)) DP."""
    # two rows of the DP table: row[j] = LCS(a[:i], b[:j]), prev the same for a[:i-1]
    row = [0] * (len(b) + 1)
    for x in a:
        prev = row[:]
        for j, y in enumerate(b, start=1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): P = LCS / len(candidate), R = LCS / len(reference), F1 = 2PR / (P + R).
    0.0 when either side has no tokens."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# --- comparisons


def win_rate(judge: Callable[[str, str], float], prompts: Sequence[str], answers_a: Sequence[str],
             answers_b: Sequence[str]) -> float:
    """(#prompts where judge(p, a) > judge(p, b) + 1/2 #exact ties) / #prompts: how often A beats B.

    0.5 means the judge cannot tell the models apart; 1 - win_rate(judge, P, A, B) = win_rate(judge, P, B, A).
    """
    if not len(prompts) == len(answers_a) == len(answers_b):
        raise ValueError(f"win_rate needs one answer per prompt from each model: {len(prompts)} prompts, "
                         f"{len(answers_a)} answers_a, {len(answers_b)} answers_b")
    if not prompts:
        raise ValueError("win_rate of zero prompts is undefined")
    points = 0.0
    for prompt, a, b in zip(prompts, answers_a, answers_b):
        score_a, score_b = judge(prompt, a), judge(prompt, b)
        points += 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0
    return points / len(prompts)


def reward_accuracy(chosen_rewards, rejected_rewards) -> float:
    """Fraction of pairs with r(chosen) > r(rejected), strictly: a tie is NOT correct.

    This is the Bradley-Terry accuracy: the model predicts P(chosen > rejected) = sigmoid(r_w - r_l) and is
    right when that probability exceeds 1/2; a tie (probability exactly 1/2) predicts nothing. It is also
    what TRL logs as rewards/accuracies, and it keeps an untrained model with constant rewards at 0, not 0.5.
    Inputs: two sequences or tensors of N rewards (or DPO implicit rewards).
    """
    chosen = torch.as_tensor(chosen_rewards, dtype=torch.float64).flatten()
    rejected = torch.as_tensor(rejected_rewards, dtype=torch.float64).flatten()
    if chosen.shape != rejected.shape:
        raise ValueError(f"{chosen.numel()} chosen rewards but {rejected.numel()} rejected rewards")
    if chosen.numel() == 0:
        raise ValueError("reward_accuracy of zero pairs is undefined")
    return (chosen > rejected).double().mean().item()


def oracle_score(prompt: str, response: str) -> float:
    """The tiny world's exact quality in [0, 1] (world.quality): a judge for win_rate on world prompts."""
    return world.quality(prompt, response)


# --- diversity: self-BLEU


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU of one tokenised hypothesis against tokenised references (Papineni et al. 2002), smoothed.

        p_n  = sum_g min(count_hyp(g), max_ref count_ref(g)) / #n-grams of hyp    (clipped precision)
        p_n  = (num + 1) / (den + 1) for n >= 2        (Lin & Och 2004 add-one; Chen & Cherry's "smoothing 2")
        BP   = 1 if c > r else exp(1 - r / c)           c = len(hyp), r = the closest reference length
        BLEU = BP * exp(mean_n log p_n)                 n = 1 .. N, N = min(max_n, len(hyp)), uniform weights

    Unigrams are not smoothed, so a hypothesis sharing no word with any reference scores 0.0. A hypothesis
    shorter than max_n words is scored on the orders it has (N = its length), so identical short samples
    still score 1.0. Equally close reference lengths pick the shorter; an empty hypothesis scores 0. For
    max_n = 4 this equals NLTK's sentence_bleu(smoothing_function=SmoothingFunction().method2,
    auto_reweigh=True).
    """
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    c = len(hypothesis)
    orders = min(max_n, c)
    log_precisions = []
    for n in range(1, orders + 1):
        counts = Counter(_ngrams(hypothesis, n))
        # clip each n-gram by the largest number of times any single reference contains it
        max_ref = Counter()
        for ref in references:
            max_ref |= Counter(_ngrams(ref, n))
        matches = sum(min(count, max_ref[g]) for g, count in counts.items())
        total = sum(counts.values())
        if n == 1 and matches == 0:
            return 0.0
        if n > 1:
            matches, total = matches + 1, total + 1
        log_precisions.append(math.log(matches / total))
    if not log_precisions:  # empty hypothesis
        return 0.0
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(sum(log_precisions) / orders)


def self_bleu(samples: Sequence[str], max_n: int = 4) -> float:
    """Mean over i of sentence_bleu(sample_i, references = every other sample), on ROUGE tokens.

    1.0 when all samples are identical, 0.0 when no two share a word; needs k >= 2 samples of one prompt.
    """
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    tokens = [rouge_tokens(s) for s in samples]
    scores = [sentence_bleu(hyp, tokens[:i] + tokens[i + 1:], max_n) for i, hyp in enumerate(tokens)]
    return sum(scores) / len(scores)


def mean_self_bleu(groups: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """self_bleu averaged over prompts: groups[p] holds the k samples for prompt p."""
    if not groups:
        raise ValueError("mean_self_bleu of zero prompts is undefined")
    return sum(self_bleu(g, max_n) for g in groups) / len(groups)


# --- reward hacking: copying the prompt


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def copies_prompt(prompt: str, response: str, threshold: float = 0.5, n: int = 4) -> bool:
    """True if the response copies the prompt, on ROUGE tokens, by either of two rules:

    1. containment (Broder 1997): at least `threshold` of the prompt's distinct word n-grams appear in the
       response (a prompt shorter than n words is one n-gram of its own length);
    2. the prompt's last sentence (its question), if it has at least n words, appears verbatim in the response.

    Why not ROUGE-L recall of the prompt: good answers echo the question ("What is 17 plus 25?" ->
    "17 plus 25 is 42." has recall 0.6), but they rarely repeat a run of 4 words. Rule 2 catches a re-asked
    question inside a long prompt (the tiny world's oracle penalises exactly that); questions shorter than
    n words ("Why?") are skipped, an answer may well contain them.
    """
    p, r = rouge_tokens(prompt), rouge_tokens(response)
    if not p:
        return False
    size = min(n, len(p))
    prompt_grams = set(_ngrams(p, size))
    containment = len(prompt_grams & set(_ngrams(r, size))) / len(prompt_grams)
    sentences = [s for s in re.findall(r"[^.?!]+", prompt) if rouge_tokens(s)]
    question = rouge_tokens(sentences[-1])
    return containment >= threshold or (len(question) >= n and _contains_run(r, question))
