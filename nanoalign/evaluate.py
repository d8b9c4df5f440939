"""Evaluation: metrics (ROUGE-L, win rate, reward accuracy, self-BLEU, a prompt-copy detector), the helpers
that answer held-out prompts with a model and judge the answers, and a command line comparing two models.

    python -m nanoalign.evaluate --model_a=out/dpo/model --model_b=out/sft/model            # judged by the oracle
    python -m nanoalign.evaluate --model_a=out/dpo/model --model_b=out/sft/model --judge=out/rm/model --out=eval.json
    python -m nanoalign.evaluate --model_a=out/sft/model --best_of=8 --best_of_rm=out/rm/model --model_b=out/sft/model

The metric functions are pure (strings and numbers in, a number out), so scripts can combine them with any
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

Model-side helpers (the command line is built from them; scripts reuse them):
  sample_answers     one answer per prompt, greedy by default, batched, decoded up to the stop token
  evaluate_answers   mean oracle quality, closed-ended accuracy, ROUGE-L against references, copy rate, length
  compare            win rate of A over B under a judge that scores a batch: oracle_judge or reward_judge
  best_of_n          per prompt, the sample a judge scores highest (best-of-n sampling against a reward model)
- A model answers well only in the template it was trained with: the command line formats each model's
  prompts with the template saved with its tokenizer (--template overrides).
- A reward model scores prompt + response + EOS, as it was trained: an answer cut by max_new_tokens is scored
  as if it had ended there.
- Best-of-n against a reward model (--best_of) is the cheapest test of whether that reward model can improve a
  policy: if its pick of n samples is no better than one sample under the oracle, no optimiser (PPO included)
  climbing that reward model will raise the oracle's quality. On the tiny world the command line also prints the
  oracle's own best of n (the room a perfect reward model would find) and the quality of one sample.
"""
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from nanoalign import world
from nanoalign.checkpoint import load_pretrained
from nanoalign.cli import (InputError, check_choice, check_device, check_non_negative, check_output, check_positive,
                           parse_config)
from nanoalign.data import collate_sft, fit_example, read_jsonl
from nanoalign.generate import generate, sampling_error
from nanoalign.tokenizer import TEMPLATES, Tokenizer, encode_prompt, encode_response
from nanoalign.train import check_files, checkpoint_dir, launched_world_size

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
    for k, (prompt, a, b) in enumerate(zip(prompts, answers_a, answers_b)):
        score_a, score_b = judge(prompt, a), judge(prompt, b)
        check_scores([score_a, score_b], 2, f"prompt {k}")
        points += 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0
    return points / len(prompts)


def check_scores(scores: Sequence[float], n: int, what: str) -> None:
    """A judge's scores: one finite number per answer. A NaN is neither above, below nor equal to anything, so it
    would count as a loss for whichever side it is on (and win_rate(A, B) + win_rate(B, A) would fall below 1);
    a judge returning too few scores would shorten a comparison silently."""
    if len(scores) != n:
        raise ValueError(f"the judge returned {len(scores)} scores for the {n} answers of {what}")
    for k, score in enumerate(scores):
        if not math.isfinite(score):
            raise ValueError(f"the judge scored answer {k} of {what} {score}: a score must be a finite number")


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

    1.0 when all samples are identical (empty ones included), 0.0 when no two share a word; needs k >= 2 samples of
    one prompt.
    """
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    tokens = [rouge_tokens(s) for s in samples]
    # a sample equal to another scores 1 (what BLEU gives a non-empty one; an empty one would score 0, so a policy
    # collapsed to empty answers would read as maximally diverse)
    scores = [1.0 if hyp in (others := tokens[:i] + tokens[i + 1:]) else sentence_bleu(hyp, others, max_n)
              for i, hyp in enumerate(tokens)]
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


# --- answering held-out prompts with a model


def _fit_prompt(ids: list[int], room: int, tok) -> list[int]:
    """Keep the END of a prompt too long for the context (it holds the question), and its BOS."""
    if len(ids) <= room:
        return ids
    bos = ids[:1] if tok.add_bos else []
    return bos + ids[len(ids) - (room - len(bos)):]


@torch.no_grad()
def sample_answers(model, tok, prompts: Sequence[str], template: str, max_new_tokens: int = 48,
                   temperature: float = 0.0, batch_size: int = 32, seed: int = 0) -> list[str]:
    """One answer per prompt, in order: batched generation (greedy when temperature is 0), each answer decoded
    up to its stop token (excluded) and stripped. A prompt longer than the context minus max_new_tokens keeps
    its end. With temperature > 0 the samples come from one generator seeded with `seed`."""
    room = model.cfg.max_seq_len - max_new_tokens
    if room < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of "
                         f"{model.cfg.max_seq_len} tokens")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [_fit_prompt(encode_prompt(tok, p, template), room, tok) for p in chunk]
        gen = generate(model, ids, max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=temperature,
                       vocab_size=tok.vocab_size, generator=generator)
        answers += [tok.decode(gen.answer(i)).strip() for i in range(len(chunk))]
    model.train(was_training)
    return answers


def evaluate_answers(records: Sequence[dict], answers: Sequence[str]) -> dict:
    """Metrics of one model's answers to held-out records {"prompt", "reference"?}.

    mean_quality and closed_accuracy (world.is_correct on the closed-ended prompts) need the tiny world's
    oracle: None when a prompt is not one of its own. rouge_l is the mean over the records that have a
    reference (None when none has). copy_rate: the fraction of answers that copy their prompt; mean_words: the
    mean answer length in ROUGE tokens. Both show reward hacking (copying, rambling) at a glance."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} prompts but {len(answers)} answers")
    if not records:
        raise ValueError("evaluate_answers of zero prompts is undefined")
    prompts = [r["prompt"] for r in records]
    out = {"n": len(records), "mean_quality": None, "closed_accuracy": None, "n_closed": 0}
    if all(world.is_world_prompt(p) for p in prompts):
        out["mean_quality"] = sum(world.quality(p, a) for p, a in zip(prompts, answers)) / len(prompts)
        closed = [(p, a) for p, a in zip(prompts, answers) if world.parse_prompt(p)["qtype"] == "CONSTRAINED"]
        out["n_closed"] = len(closed)
        out["closed_accuracy"] = sum(world.is_correct(p, a) for p, a in closed) / len(closed) if closed else None
    with_reference = [(a, r["reference"]) for r, a in zip(records, answers) if r.get("reference")]
    out["rouge_l"] = sum(rouge_l(a, ref) for a, ref in with_reference) / len(with_reference) if with_reference else None
    out["n_reference"] = len(with_reference)
    out["copy_rate"] = sum(copies_prompt(p, a) for p, a in zip(prompts, answers)) / len(prompts)
    out["mean_words"] = sum(len(rouge_tokens(a)) for a in answers) / len(answers)
    return out


# --- judging: A against B


def oracle_judge(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
    """The tiny world's quality of each answer: a batch judge for compare()."""
    return [world.quality(p, a) for p, a in zip(prompts, answers)]


def reward_judge(rm, tok, template: str, batch_size: int = 32) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """A batch judge scoring each (prompt, answer) with a reward model, as it was trained: the template's prompt
    + response + EOS, right-padded, the score read at the last real token (the EOS). An empty answer is scored
    as the EOS alone; a prompt too long for the context loses its start, not its BOS (as in training)."""
    device = next(rm.parameters()).device

    def row(prompt: str, answer: str) -> dict:
        response = encode_response(tok, answer, template) if answer.strip() else [tok.eos_id]
        fitted = fit_example(tok, encode_prompt(tok, prompt, template), response, rm.cfg.max_seq_len)
        if fitted is None:
            raise ValueError(f"an answer of {len(response)} tokens does not fit the reward model's context "
                             f"of {rm.cfg.max_seq_len}")
        return {"ids": fitted[0] + fitted[1], "mask": [0] * len(fitted[0]) + [1] * len(fitted[1])}

    @torch.no_grad()
    def judge(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        rows = [row(p, a) for p, a in zip(prompts, answers)]
        scores = []
        for start in range(0, len(rows), batch_size):
            batch = collate_sft(rows[start:start + batch_size], tok.pad_id)
            scores += rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().tolist()
        return scores

    return judge


def compare(prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
            judge: Callable[[Sequence[str], Sequence[str]], list[float]]) -> dict:
    """A against B under a batch judge (judge(prompts, answers) -> one score per answer): the win rate
    (#wins + 1/2 #ties) / #prompts as win_rate() defines it, its standard error over the prompts
    (win_rate_se: the sample std of the per-prompt points 1, 1/2, 0 over sqrt(#prompts); None for one prompt), the
    counts, and each
    side's mean score. Each answer is scored once, in batches (a reward model judge runs a forward per batch).
    Two identical answers are a tie whatever their scores: a reward model scores the same text a few ulps apart
    in batches padded to other lengths, which would turn the tie into a random win or loss."""
    if not len(prompts) == len(answers_a) == len(answers_b):
        raise ValueError(f"compare needs one answer per prompt from each model: {len(prompts)} prompts, "
                         f"{len(answers_a)} answers_a, {len(answers_b)} answers_b")
    if not prompts:
        raise ValueError("compare of zero prompts is undefined")
    a, b = judge(prompts, answers_a), judge(prompts, answers_b)
    check_scores(a, len(prompts), "model A")
    check_scores(b, len(prompts), "model B")
    points = [0.5 if x == y or ya == yb else float(x > y) for x, y, ya, yb in zip(a, b, answers_a, answers_b)]
    n, rate = len(points), sum(points) / len(points)
    se = (sum((q - rate) ** 2 for q in points) / (n - 1) / n) ** 0.5 if n > 1 else None  # JSON null, not NaN
    wins, ties = points.count(1.0), points.count(0.5)
    return {"win_rate": rate, "win_rate_se": se, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "judge_a": sum(a) / len(a), "judge_b": sum(b) / len(b)}


def best_of_n(prompts: Sequence[str], samples: Sequence[Sequence[str]],
              judge: Callable[[Sequence[str], Sequence[str]], list[float]]) -> list[str]:
    """Best-of-n sampling: samples[k][i] is the k-th sample for prompts[i]; returns, for each prompt, the sample
    the batch judge scores highest (the earliest on a tie). All n x len(prompts) samples are scored in one call."""
    if not samples:
        raise ValueError("best_of_n of zero samples per prompt is undefined")
    if any(len(s) != len(prompts) for s in samples):
        raise ValueError(f"best_of_n needs one sample per prompt in each of the {len(samples)} lists: "
                         f"{len(prompts)} prompts, lists of {sorted({len(s) for s in samples})}")
    scores = judge([p for _ in samples for p in prompts], [a for s in samples for a in s])
    n = len(prompts)
    best = [max(range(len(samples)), key=lambda k: (scores[k * n + i], -k)) for i in range(n)]
    return [samples[k][i] for i, k in enumerate(best)]


def best_of_metrics(prompts: Sequence[str], samples: Sequence[Sequence[str]], chooser: str) -> dict:
    """What a best-of-n pick is measured against, on the tiny world (None elsewhere): the mean oracle quality of
    one sample (sample_quality, over all n samples of every prompt) and of the oracle's own pick of the n
    (oracle_best_quality, the most a perfect reward model could get from them)."""
    out = {"n": len(samples), "chooser": chooser, "sample_quality": None, "oracle_best_quality": None}
    if all(world.is_world_prompt(p) for p in prompts):
        q = [[world.quality(p, a) for p, a in zip(prompts, s)] for s in samples]
        out["sample_quality"] = sum(map(sum, q)) / (len(q) * len(prompts))
        out["oracle_best_quality"] = sum(max(col) for col in zip(*q)) / len(prompts)
    return out


# --- the command line: python -m nanoalign.evaluate


@dataclass
class Config:
    model_a: str = ""           # the model evaluated (dir or hub id), required
    model_b: str = ""           # the model it is compared with, e.g. out/sft/model; empty: evaluate A alone
    judge: str = "oracle"       # oracle (the tiny world's quality) or a reward model directory
    prompts: str = "data/prompts_test.jsonl"  # held-out {"prompt", "reference"?, "qtype"?} records
    template: str = "auto"      # prompt template; auto: the one saved with each model's tokenizer, else hh
    max_new_tokens: int = 48    # tokens generated per answer at most
    temperature: float = 0.0    # 0 = greedy
    batch_size: int = 32        # prompts per generation batch (and answers per reward model forward)
    limit: int = 0              # evaluate the first N prompts only (0: all)
    seed: int = 0               # sampling seed when temperature > 0
    diversity_samples: int = 0  # also sample K answers per prompt at temperature 1 from each model: self-BLEU (0: off)
    best_of: int = 0            # N > 0: model A answers with the best of N samples at temperature 1 (0: off)
    best_of_rm: str = ""        # --best_of: what picks the best sample: a reward model directory, or oracle
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "float32"      # weights: float32 or bfloat16
    out: str = ""               # also write the metrics, the win rate and the answers to this JSON file


def _check_config(cfg: Config) -> None:
    if launched_world_size() > 1:
        raise InputError("nanoalign.evaluate runs in one process: start it with python, not torchrun")
    if not cfg.model_a:
        raise InputError("--model_a: required (a checkpoint directory or hub id)")
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    check_choice(cfg, "dtype", ("float32", "bfloat16"))
    check_positive(cfg, "batch_size")
    check_non_negative(cfg, "limit")
    check_non_negative(cfg, "diversity_samples")
    if cfg.diversity_samples == 1:
        raise InputError("--diversity_samples=1: self-BLEU needs at least 2 samples per prompt (or 0: off)")
    if problem := sampling_error(cfg.max_new_tokens, cfg.temperature, None, None):
        raise InputError("--" + problem)
    check_device(cfg)
    check_files(cfg, "prompts")
    if cfg.out:
        check_output(cfg.out, "out", directory=False)
    if cfg.judge != "oracle" and not cfg.model_b:
        raise InputError(f"--judge={cfg.judge}: pass --model_b (the judge compares two models' answers)")
    if cfg.judge != "oracle" and not Path(cfg.judge).is_dir():
        raise InputError(f"--judge={cfg.judge}: choose oracle or a reward model directory (no such directory)")
    check_non_negative(cfg, "best_of")
    if cfg.best_of and not cfg.best_of_rm:
        raise InputError(f"--best_of={cfg.best_of}: pass --best_of_rm (a reward model directory, or oracle) to pick "
                         "the best sample")
    if cfg.best_of_rm and not cfg.best_of:
        raise InputError(f"--best_of_rm={cfg.best_of_rm}: pass --best_of=N (the samples it picks from)")
    if cfg.best_of_rm not in ("", "oracle") and not Path(cfg.best_of_rm).is_dir():
        raise InputError(f"--best_of_rm={cfg.best_of_rm}: choose oracle or a reward model directory "
                         "(no such directory)")


def _reward_model_judge(cfg: Config, path: str, ckpt_a: Path) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """A batch judge from the reward model at `path`, reading with its own tokenizer and template when saved with
    it (it reads text as it was trained to, whatever --template the answering models use), else model A's
    tokenizer and --template."""
    from nanoalign.reward import RewardModel  # only a reward model judge needs it

    rm = RewardModel.from_pretrained(path, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    own = (Path(path) / "tokenizer.json").exists()
    tok = Tokenizer.from_dir(Path(path) if own else ckpt_a)
    tok.check_vocab(rm.cfg.vocab_size)
    answering = (tok.template or "hh") if cfg.template == "auto" else cfg.template  # as _answers resolves it for A
    return reward_judge(rm, tok, (tok.template or answering) if own else answering, cfg.batch_size)


def _answers(cfg: Config, ckpt: Path, prompts: list[str], chooser=None):
    """(answers, template, self-BLEU, samples). The answers follow --temperature; with a chooser (a batch judge)
    they are instead the best of --best_of samples at temperature 1 (sample k seeded with seed + 1 + k), all of
    which `samples` holds (else None). The self-BLEU is of --diversity_samples samples per prompt at temperature 1
    (the same seeds), None when off."""
    model = load_pretrained(ckpt, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    tok = Tokenizer.from_dir(ckpt)
    tok.check_vocab(model.cfg.vocab_size)
    template = (tok.template or "hh") if cfg.template == "auto" else cfg.template
    samples = None
    if chooser is None:
        answers = sample_answers(model, tok, prompts, template, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                 cfg.seed)
    else:
        samples = [sample_answers(model, tok, prompts, template, cfg.max_new_tokens, 1.0, cfg.batch_size,
                                  cfg.seed + 1 + k) for k in range(cfg.best_of)]
        answers = best_of_n(prompts, samples, chooser)
    diversity = None
    if cfg.diversity_samples:
        drawn = [sample_answers(model, tok, prompts, template, cfg.max_new_tokens, 1.0, cfg.batch_size,
                                cfg.seed + 1 + k) for k in range(cfg.diversity_samples)]
        diversity = mean_self_bleu(list(zip(*drawn)))
    return answers, template, diversity, samples


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv=None) -> dict:
    cfg = parse_config(Config, argv, description="Answer held-out prompts with two models and compare them.")
    _check_config(cfg)
    t0 = time.time()
    ckpt_a = checkpoint_dir(cfg, "model_a")
    ckpt_b = checkpoint_dir(cfg, "model_b") if cfg.model_b else None
    records = read_jsonl(cfg.prompts, required=("prompt",))
    records = records[:cfg.limit] if cfg.limit else records
    if not records:
        raise InputError(f"--prompts={cfg.prompts}: no prompts")
    prompts = [r["prompt"] for r in records]
    outside = next((p for p in prompts if not world.is_world_prompt(p)), None)
    for flag, needed in (("judge", bool(ckpt_b)), ("best_of_rm", bool(cfg.best_of))):
        if needed and getattr(cfg, flag) == "oracle" and outside is not None:
            raise InputError(f"--{flag}=oracle: the oracle judges the tiny world's prompts only; {cfg.prompts} "
                             f"holds {outside!r:.80}; pass --{flag}=REWARD_MODEL_DIR")
    judge = oracle_judge if cfg.judge == "oracle" or not ckpt_b else _reward_model_judge(cfg, cfg.judge, ckpt_a)
    chooser = None
    if cfg.best_of:
        chooser = oracle_judge if cfg.best_of_rm == "oracle" else _reward_model_judge(cfg, cfg.best_of_rm, ckpt_a)

    sides = {"A": ckpt_a, **({"B": ckpt_b} if ckpt_b else {})}
    answers, templates, metrics = {}, {}, {}
    for side, ckpt in sides.items():
        answers[side], templates[side], diversity, samples = _answers(cfg, ckpt, prompts,
                                                                      chooser if side == "A" else None)
        metrics[side] = evaluate_answers(records, answers[side])
        if diversity is not None:
            metrics[side]["self_bleu"] = diversity
        if samples is not None:
            metrics[side]["best_of"] = best_of_metrics(prompts, samples, cfg.best_of_rm)
    result = {"config": asdict(cfg), "n_prompts": len(records), "templates": templates, "metrics": metrics}
    if ckpt_b:
        result["comparison"] = compare(prompts, answers["A"], answers["B"], judge)

    decoding = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature}, seed {cfg.seed}"
    print(f"{len(records)} held-out prompts ({cfg.prompts}), {decoding}, at most {cfg.max_new_tokens} new tokens")
    if cfg.best_of:
        print(f"A answers with the best of {cfg.best_of} samples at temperature 1 (seeds {cfg.seed + 1}.."
              f"{cfg.seed + cfg.best_of}), picked by {cfg.best_of_rm}")
    print(f"{'':28s}" + "".join(f"{side:>14s}" for side in sides))
    rows = [("template", lambda m, s: templates[s]),
            ("mean oracle quality", lambda m, s: _cell(m["mean_quality"], ".3f")),
            ("closed-ended accuracy", lambda m, s: _cell(m["closed_accuracy"], ".1%")),
            ("ROUGE-L vs reference", lambda m, s: _cell(m["rouge_l"], ".3f")),
            ("copies the prompt", lambda m, s: _cell(m["copy_rate"], ".1%")),
            ("mean answer length (words)", lambda m, s: _cell(m["mean_words"], ".1f"))]
    if cfg.diversity_samples:
        rows.append((f"self-BLEU of {cfg.diversity_samples} samples", lambda m, s: _cell(m["self_bleu"], ".3f")))
    for label, cell in rows:
        print(f"{label:28s}" + "".join(f"{cell(metrics[s], s):>14s}" for s in sides))
    for side, ckpt in sides.items():
        print(f"{side}: {ckpt}")
    if cfg.best_of and (b := metrics["A"]["best_of"])["sample_quality"] is not None:
        print(f"A's best of {cfg.best_of} by {cfg.best_of_rm}: mean oracle quality {metrics['A']['mean_quality']:.3f}; "
              f"one sample {b['sample_quality']:.3f}; the oracle's own best of {cfg.best_of} "
              f"{b['oracle_best_quality']:.3f}")
    if ckpt_b:
        c = result["comparison"]
        print(f"judge {cfg.judge}: mean score A {c['judge_a']:.4f}, B {c['judge_b']:.4f}; A wins {c['wins']}, "
              f"ties {c['ties']}, loses {c['losses']}")
        print(f"win rate of A over B: {c['win_rate']:.4f} (standard error {_cell(c['win_rate_se'], '.4f')})")
    if cfg.out:
        result["answers"] = answers
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"saved {cfg.out}")
    print(f"({time.time() - t0:.1f} s)")
    return result


if __name__ == "__main__":
    from nanoalign.cli import run

    run(main)  # a bad flag, prompt file or checkpoint: one line naming it, no traceback
