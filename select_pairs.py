"""REAL: pick the preference pairs to train on by how similar their two responses look to the model.

"REAL: Response Embedding-based Alignment for LLMs" (2024). Every response is embedded by the model about to
be aligned (mean of its final hidden states over the response tokens, nanoalign/real.py), and pairs are chosen
by the cosine of their two embeddings (docs/methods.md, "## 7. REAL"). The paper's finding: dissimilar ("easy")
pairs align better than random or similar ("hard") ones and carry fewer label errors. This script writes the
selected pairs as a preference JSONL that `train_dpo.py --data=...` reads.

    python select_pairs.py                                      # data/multi_train.jsonl, easy, by the data's scores
    python select_pairs.py --strategy=centroid --label=annotator
    python select_pairs.py --data=data/prefs_train.jsonl --strategy=hard --fraction=0.5
    python select_pairs.py --model=meta-llama/Llama-2-7b-hf --data=shp_train.jsonl --format=shp --device=cuda
    python select_pairs.py --sample=8 --data=data/prefs_train.jsonl --strategy=random --label=annotator \
        --out=out/onpolicy/pairs.jsonl                          # on-policy pairs: the SFT model's own answers

Two kinds of input, detected from the records (or --format):
- pairs, one {prompt, chosen, rejected} per record (HH-style, or --format=hh transcripts): keep --fraction of
  them: easy = the least similar, hard = the most similar, random = a seeded sample. A pair keeps the
  chosen/rejected labels it came with: relabelling it would throw away the only preference the data states,
  so --label does not apply (only the default is accepted).
- several responses per prompt, {prompt, responses, scores} (SHP-style, or --format=shp): one pair per prompt,
  so --fraction does not apply (only the default is accepted); easy / hard = the least / most similar pair,
  centroid = the responses nearest the two k-means centroids, random = any pair. Which one is chosen is decided
  by --label: scores = the higher score (equal scores: the prompt is skipped and counted), annotator = the tiny
  world's noisy Bradley-Terry annotator, seeded per prompt. Never by the order of the list (the authors' script
  takes list order: a bug).
- --sample=K: the responses are not read but generated: K answers to each distinct prompt of --data (any JSONL
  with a "prompt"), sampled from --model at --temperature; their distinct non-empty texts are the prompt's
  responses, and the rest is the several-responses path above with --label=annotator (sampled answers carry
  no scores). A prompt with fewer than two distinct non-empty answers has no pair and is counted as skipped.
  These are on-policy pairs: the setting DPO's derivation assumes (pairs drawn from pi_ref = the SFT model)
  and the one InstructGPT's reward model was trained on (labellers ranking the SFT model's samples). Pairs
  written by the world (data/prefs_*.jsonl) are corruptions of the reference answer, mostly unlike anything
  the SFT model writes: on them DPO moves the model little (see the README's DPO section).

Printed: the counts, the quantiles of the cosine over every candidate pair and over the pairs written, and,
when every prompt belongs to the tiny world, the label-error rate against its oracle (the fraction of written
pairs whose chosen response has the LOWER true quality; equal quality is counted separately) and the mean
quality gap chosen - rejected.

One process: embedding is a batched forward with no gradients, so it needs no FSDP; run it with python (under
torchrun it refuses). A 7B model fits one GPU for this in bfloat16 (--dtype=bfloat16).
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoalign import real, train, world
from nanoalign.checkpoint import load_pretrained
from nanoalign.cli import (InputError, check_choice, check_device, check_non_negative, check_output, check_positive,
                           check_range, parse_config, run)
from nanoalign.data import read_hh, read_jsonl, read_shp
from nanoalign.evaluate import sample_answers
from nanoalign.tokenizer import TEMPLATES, Tokenizer


# --- config
@dataclass
class Config:
    data: str = "data/multi_train.jsonl"  # preference pairs or several scored responses per prompt (.jsonl)
    format: str = "auto"        # auto (from the records), pairs, multi, hh (HH-RLHF transcripts) or shp (SHP rows)
    strategy: str = "easy"      # easy / hard / random; several responses per prompt also: centroid
    fraction: float = 0.5       # pairs input: the fraction of pairs kept
    label: str = "scores"       # several responses: which is chosen, by the data's scores or the tiny world's annotator
    model: str = "out/sft/model"  # the model to align embeds the responses (dir or hub id), and samples them with --sample
    sample: int = 0             # K > 0: generate K answers per prompt of --data with --model instead of reading responses
    temperature: float = 1.0    # --sample: sampling temperature
    max_new_tokens: int = 48    # --sample: length cap of each sampled answer
    template: str = "auto"      # prompt template; auto: the one saved with the model, else hh
    out: str = ""               # output JSONL; empty: out/real/pairs_<strategy>.jsonl (--sample: onpolicy_<strategy>.jsonl)
    max_len: int = 256          # tokens per prompt + response (capped at the model's context)
    max_response_len: int = 128  # tokens of a response that enter its embedding
    batch_size: int = 32        # responses per forward
    seed: int = 0               # the random strategy, k-means seeding and the annotator
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "float32"      # weights: float32 or bfloat16 (the mean is taken in float32)


FORMATS = ("auto", "pairs", "multi", "hh", "shp")
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_config(cfg: Config) -> None:
    """Every flag checked before any work starts; each error names the flag and what is allowed."""
    if train.launched_world_size() > 1:
        raise InputError("select_pairs.py runs in one process (a forward with no gradients): "
                         "start it with python, not torchrun")
    check_choice(cfg, "format", FORMATS)
    check_choice(cfg, "strategy", real.STRATEGIES + ("centroid",))
    check_choice(cfg, "label", ("scores", "annotator"))
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    check_choice(cfg, "dtype", ("float32", "bfloat16"))
    check_range(cfg, "fraction", 0.0, 1.0, low_open=True)
    check_positive(cfg, "max_len", "max_response_len", "batch_size", "max_new_tokens")
    check_max_len(cfg, add_bos=False)  # again with the tokenizer's BOS once it is read
    check_non_negative(cfg, "sample")
    if cfg.sample:
        check_positive(cfg, "temperature")
        if cfg.sample < 2:
            raise InputError(f"--sample={cfg.sample}: a pair needs at least 2 answers per prompt")
        if cfg.label != "annotator":
            raise InputError(f"--label={cfg.label}: sampled answers have no scores; --sample needs --label=annotator")
        if cfg.fraction != Config.fraction:
            raise InputError(f"--fraction={cfg.fraction}: --sample writes one pair per prompt; --fraction applies to "
                             "pairs input")
        if cfg.format not in ("auto", "pairs", "multi"):
            raise InputError(f"--format={cfg.format}: --sample reads the prompts of a .jsonl with a \"prompt\" field")
    check_device(cfg)
    train.check_files(cfg, "data")
    if cfg.out:
        check_output(cfg.out, "out", directory=False)


def check_max_len(cfg: Config, add_bos: bool, ckpt: Path | None = None) -> None:
    """--max_len leaves room for one prompt token and one response token (and the BOS, where the tokenizer adds
    one): with less, every response is cut to nothing and the embedding has no token to average."""
    need = 2 + add_bos
    if cfg.max_len < need:
        bos = f", plus the BOS that the tokenizer of {ckpt} adds" if add_bos else ""
        raise InputError(f"--max_len={cfg.max_len}: needs room for one prompt token and one response token{bos}: "
                         f"at least {need}")


# --- data
def detect_format(path: str, fmt: str) -> str:
    """pairs / multi / hh / shp, from the keys of the first record when fmt is auto."""
    if fmt != "auto":
        return fmt
    first = next(iter(read_jsonl(path)), None)
    if first is None:
        raise InputError(f"--data={path}: no records")
    keys = set(first) if isinstance(first, dict) else set()
    if "responses" in keys:
        return "multi"
    if "human_ref_A" in keys:
        return "shp"
    if {"chosen", "rejected"} <= keys:
        return "pairs" if "prompt" in keys else "hh"
    raise InputError(f"--data={path}: cannot tell the format from the keys {sorted(keys)}; expected "
                     "{prompt, chosen, rejected} or {prompt, responses, scores}; or pass --format")


def load_records(cfg: Config) -> tuple[str, list[dict]]:
    """("pairs" or "multi", records); every record checked, errors name the file and line. With --sample: "sample"
    and one record per distinct prompt (its first record's fields; the responses are generated later)."""
    if cfg.sample:
        first = {}
        for r in read_jsonl(cfg.data, ("prompt",)):
            first.setdefault(r["prompt"], r)
        records = list(first.values())
        check_world_prompts(cfg, records)
        return "sample", records
    fmt = detect_format(cfg.data, cfg.format)
    if fmt in ("pairs", "hh"):
        if cfg.strategy == "centroid":
            raise InputError("--strategy=centroid: needs several responses per prompt; for pairs choose easy, hard "
                             "or random")
        if cfg.label != "scores":
            raise InputError(f"--label={cfg.label}: pairs keep the chosen/rejected labels they came with; --label "
                             "applies to several responses per prompt")
        return "pairs", read_hh(cfg.data) if fmt == "hh" else read_jsonl(cfg.data, ("prompt", "chosen", "rejected"))
    if cfg.fraction != Config.fraction:
        raise InputError(f"--fraction={cfg.fraction}: several responses per prompt give one pair per prompt; "
                         "--fraction applies to pairs input")
    required = ("prompt", "responses", "scores") if cfg.label == "scores" else ("prompt", "responses")
    records = read_shp(cfg.data, multi=True) if fmt == "shp" else read_jsonl(cfg.data, required)
    check_world_prompts(cfg, records)
    return "multi", records


def check_world_prompts(cfg: Config, records: list[dict]) -> None:
    outside = [r["prompt"] for r in records if not world.is_world_prompt(r["prompt"])]
    if cfg.label == "annotator" and outside:
        raise InputError(f"--label=annotator: the tiny world's annotator judges its own prompts only; {cfg.data} "
                         f"holds {outside[0]!r:.80}")


def sample_responses(model, tok, records: list[dict], template: str, cfg: Config) -> tuple[list[dict], int]:
    """(records with "responses": the distinct non-empty texts of cfg.sample answers to each prompt, the number of
    prompts dropped because fewer than two distinct non-empty answers came out). One seeded generator for all."""
    prompts = [r["prompt"] for r in records for _ in range(cfg.sample)]
    answers = sample_answers(model, tok, prompts, template, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                             seed=cfg.seed)
    out, dropped = [], 0
    for k, r in enumerate(records):
        responses = list(dict.fromkeys(a for a in answers[k * cfg.sample:(k + 1) * cfg.sample] if a))
        if len(responses) < 2:
            dropped += 1
            continue
        out.append({**r, "responses": responses})
    return out, dropped


def annotator_pair(record: dict, i: int, j: int, seed: int) -> dict | None:
    """The pair (i, j) labelled by the tiny world's Bradley-Terry annotator; None for two identical texts.

    The annotator sees the two texts in a fixed (sorted) order and draws from a generator seeded by (seed, prompt),
    so the label depends neither on the list order nor on which other prompts are in the file."""
    a, b = sorted((record["responses"][i], record["responses"][j]))
    if a == b:
        return None
    rng = random.Random(f"{seed}:{record['prompt']}")
    chosen, rejected = (a, b) if world.annotate(record["prompt"], a, b, rng) else (b, a)
    return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected}


def quantiles(x: torch.Tensor) -> str:
    if x.numel() == 0:
        return "  (none)"
    return "".join(f"{v:8.3f}" for v in torch.quantile(x.double(), torch.tensor(QUANTILES, dtype=torch.float64)))


def oracle_report(pairs: list[dict]) -> dict | None:
    """Label errors against the tiny world's oracle, when every prompt is one of its own."""
    if not pairs or not all(world.is_world_prompt(p["prompt"]) for p in pairs):
        return None
    gaps = [world.quality(p["prompt"], p["chosen"]) - world.quality(p["prompt"], p["rejected"]) for p in pairs]
    return {"label_error": sum(g < 0 for g in gaps) / len(gaps), "equal_quality": sum(g == 0 for g in gaps) / len(gaps),
            "mean_quality_gap": sum(gaps) / len(gaps)}


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    t0 = time.time()

    # --- data (read first: a bad file or flag combination fails before any model is loaded)
    kind, records = load_records(cfg)
    if not records:
        raise InputError(f"--data={cfg.data}: no records")

    # --- models
    if cfg.model == Config.model:
        import train_sft  # the repository's SFT script, beside this one
        train.train_first(cfg.model, "the tiny SFT model", "train_sft.py", train_sft.main, [f"--device={cfg.device}"])
    ckpt = train.checkpoint_dir(cfg, "model")
    tok = Tokenizer.from_dir(ckpt)  # before the model: its BOS decides the smallest --max_len
    check_max_len(cfg, tok.add_bos, ckpt)
    model = load_pretrained(ckpt, device=cfg.device, dtype=getattr(torch, cfg.dtype)).eval()
    tok.check_vocab(model.cfg.vocab_size)
    template = (tok.template or "hh") if cfg.template == "auto" else cfg.template
    max_len = min(cfg.max_len, model.cfg.max_seq_len)
    max_response_len = min(cfg.max_response_len, max_len - 1 - tok.add_bos)  # room for one prompt token (+ BOS)
    if cfg.sample and cfg.max_new_tokens > model.cfg.max_seq_len - 2:
        raise InputError(f"--max_new_tokens={cfg.max_new_tokens}: leaves no room for a prompt in the context of "
                         f"{ckpt} ({model.cfg.max_seq_len} tokens)")

    def embed(examples):
        return real.embed_responses(model, tok, examples, template, max_len, cfg.batch_size, max_response_len)

    # --- loop: (sample,) embed, measure, select, label
    skipped_ties = 0
    if kind == "sample":
        t1, asked = time.time(), len(records)
        print(f"sampling {cfg.sample} answers to each of {asked} prompts ...", flush=True)
        records, skipped_ties = sample_responses(model, tok, records, template, cfg)
        kind = "multi"
        if not records:
            raise InputError(f"--sample={cfg.sample}: no prompt got two distinct non-empty answers, so there is no "
                             f"pair to label; raise --temperature (now {cfg.temperature}) or --max_new_tokens (now "
                             f"{cfg.max_new_tokens})")
        print(f"sampled {cfg.sample} answers to each of {asked} prompts at temperature {cfg.temperature} in "
              f"{time.time() - t1:.1f} s: {sum(len(r['responses']) for r in records)} distinct, "
              f"{skipped_ties} prompts with fewer than two distinct non-empty answers")
    # the records' other fields travel with their pairs, less those that describe responses (with --sample, the
    # input record's old ones, scores included)
    dropped = ("prompt", "chosen", "rejected", "responses", "scores") + (("chosen_score", "rejected_score")
                                                                        if cfg.sample else ())
    extras = [{k: v for k, v in r.items() if k not in dropped} for r in records]
    t_embed = time.time()  # (the sampling before is timed on its own line)
    if kind == "pairs":
        # a pair whose two texts are the same carries no preference, and "hard" (the most similar) would pick it first
        twins = {k for k, r in enumerate(records) if r["chosen"] == r["rejected"]}
        records, extras = ([x for k, x in enumerate(xs) if k not in twins] for xs in (records, extras))
        skipped_ties += len(twins)
        if not records:
            raise InputError(f"--data={cfg.data}: every pair's chosen and rejected are the same text: "
                             f"nothing to select")
        e = embed([{"prompt": r["prompt"], "response": r[side]} for side in ("chosen", "rejected") for r in records])
        candidates = real.pair_cosine(e[:len(records)], e[len(records):])  # (N,)
        keep = real.select_pairs(candidates, cfg.strategy, cfg.fraction, cfg.seed)
        if not keep:
            raise InputError(f"--fraction={cfg.fraction}: keeps none of the {len(records)} pairs")
        pairs = [{"prompt": records[k]["prompt"], "chosen": records[k]["chosen"], "rejected": records[k]["rejected"],
                  **extras[k], "cosine": candidates[k].item()} for k in keep]
        described = f"{len(records)} pairs"
    else:
        e = embed([{"prompt": r["prompt"], "response": text} for r in records for text in r["responses"]])
        starts = [0]
        for r in records:
            starts.append(starts[-1] + len(r["responses"]))
        candidates, pairs = [], []
        for k, r in enumerate(records):
            emb = e[starts[k]:starts[k + 1]]  # (R, C)
            rows, cols = torch.triu_indices(len(emb), len(emb), offset=1)
            cos = real.cosine_matrix(emb)
            candidates.append(cos[rows, cols])
            # a seed per prompt: the same seed everywhere would pick the same list positions for every prompt
            i, j = real.select_from_responses(emb, cfg.strategy, seed=cfg.seed * 1_000_003 + k)
            if cfg.label == "scores":
                pair = real.label_pair(r["prompt"], r["responses"], r["scores"], i, j)
            else:
                pair = annotator_pair(r, i, j, cfg.seed)
            if pair is None:
                skipped_ties += 1
                continue
            pairs.append({**extras[k], **pair, "cosine": cos[i, j].item()})  # the labels computed here win
        candidates = torch.cat(candidates)
        described = f"{len(records)} prompts with {len(e)} {'sampled ' if cfg.sample else ''}responses"
    print(f"embedded {len(e)} responses with {ckpt} (template {template!r}) in {time.time() - t_embed:.1f} s")
    if not pairs:  # an empty file would only fail later, in the script that trains on it
        raise InputError(f"--data={cfg.data}: no pair to write: all {skipped_ties} prompts were ties (equal scores or "
                         f"identical texts)")

    # --- save
    out = Path(cfg.out or f"out/real/{'onpolicy' if cfg.sample else 'pairs'}_{cfg.strategy}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)

    selected = torch.tensor([p["cosine"] for p in pairs])
    print(f"input: {described} ({cfg.data}); strategy {cfg.strategy}"
          + (f", fraction {cfg.fraction}" if kind == "pairs" else f", labelled by {cfg.label}"))
    print(f"pairs written: {len(pairs)}; prompts skipped as ties (equal scores / identical texts): {skipped_ties}")
    print("cosine          " + "".join(f"{q:>8}" for q in ("min", "25%", "50%", "75%", "max")))
    print(f"  all candidates{quantiles(candidates)}   ({len(candidates)} pairs)")
    print(f"  selected      {quantiles(selected)}   ({len(selected)} pairs)")
    if report := oracle_report(pairs):
        print(f"oracle: label errors (chosen worse than rejected) {report['label_error']:.1%}, equal quality "
              f"{report['equal_quality']:.1%}, mean quality gap chosen - rejected {report['mean_quality_gap']:+.3f}")
    print(f"saved {out} ({time.time() - t0:.1f} s)")
    return {"pairs": len(pairs), "skipped_ties": skipped_ties, "candidates": candidates, "selected": selected,
            "oracle": report, "out": out}


if __name__ == "__main__":
    run(main, sys.argv[1:])
