"""Datasets: reading, tokenizing, truncating and batching.

Internal formats (JSONL, one dict a line; extra keys such as qtype or reference ride along):
  SFT             {"prompt", "response"}
  preference      {"prompt", "chosen", "rejected"}
  multi-response  {"prompt", "responses", "scores"}
Prompts are raw text; a template (tokenizer.TEMPLATES) adds the "Human:/Assistant:" scaffolding at
tokenization time. Readers turn public formats (Anthropic HH-RLHF, Alpaca/AlpacaFarm, Stanford SHP)
into these dicts.

Gotchas:
- HH-RLHF transcripts are multi-turn. read_hh keeps the earlier turns inside the prompt verbatim,
  so format_prompt(prompt, "hh") + " " + response is exactly the original transcript.
- Truncation keeps the END of the prompt (the latest question) and caps the response; a capped
  response loses its EOS so the model is never taught to stop mid-sentence. An example whose
  response leaves no room for any prompt token is dropped; both are counted and printed.
- A preference pair whose two responses are the same tokens (the same text, or texts that differ only past
  the response cap) says nothing: every pairwise loss has zero gradient on it (the two log-probs or scores
  are equal), yet it counts in the batch mean, and an evaluation scores its tie as a wrong answer.
  tokenize_pairs drops such pairs, counted and printed.
- Labels are NOT shifted: labels[t] is the target for position t and the loss compares
  logits[:, :-1] with labels[:, 1:]. Padding is on the right and is never in the labels, even if
  pad_id happens to equal eos_id (labels come from the response mask, not from the ids).
"""

import gzip
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from nanoalign import dist
from nanoalign.cli import json_reason
from nanoalign.tokenizer import INPUT_MARKER, Tokenizer, encode_prompt, encode_response

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


# --- reading


def _lines(path: Path):
    """(line number, text) for each line of a UTF-8 file (.gz allowed). Bytes are decoded line by line, so
    a file in another encoding (Latin-1, UTF-16) fails naming the line instead of a bare UnicodeDecodeError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:  # utf-8-sig: drop the byte-order mark some editors put first
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at byte "
                                     f"{e.start + 1} of the line); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e})") from None


def _is_number(x) -> bool:  # JSON's NaN and Infinity parse to floats: not numbers here
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Keys whose values are not non-empty strings: (check, what the error says was expected).
_KEY_CHECKS = {
    "responses": (lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(s, str) and s.strip() for s in v),
                  "a list of at least 2 non-empty strings"),
    "scores": (lambda v: isinstance(v, list) and len(v) >= 2 and all(_is_number(s) for s in v),
               "a list of at least 2 finite numbers"),
    "labels": (lambda v: v in (0, 1) and not isinstance(v, bool), "0 or 1"),
    "score_A": (_is_number, "a finite number"),
    "score_B": (_is_number, "a finite number"),
    # R3's query type (AlpacaFarm's labels), read where the branching needs it: a typo would fail only mid-run
    "qtype": (lambda v: v in ("OPENENDED", "CONSTRAINED"), "OPENENDED or CONSTRAINED"),
}
_NON_EMPTY_STRING = (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")


def _check_record(record, required, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in required:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (has {sorted(record)})")
        check, expected = _KEY_CHECKS.get(key, _NON_EMPTY_STRING)
        if not check(record[key]):
            raise ValueError(f"{where}: key {key!r} must be {expected}, got {record[key]!r:.80}")
    # read where present (evaluation's ROUGE-L, R3): a number or a list there failed after the models had answered
    if (reference := record.get("reference")) is not None and not isinstance(reference, str):
        raise ValueError(f"{where}: key 'reference' must be a string, got {reference!r:.80}")
    for key, value in record.items():  # valid JSON ("\\ud800") but no text: the tokenizer would fail without a line
        if any(isinstance(v, str) and not _is_unicode_text(v) for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{where}: key {key!r} holds a lone surrogate escape (\\ud800-\\udfff), which is not "
                             f"text: {value!r:.80}")
    responses, scores = record.get("responses"), record.get("scores")
    if isinstance(responses, list) and isinstance(scores, list) and len(responses) != len(scores):
        raise ValueError(f"{where}: {len(responses)} responses but {len(scores)} scores")


def _is_unicode_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_jsonl(path: Path, lines=None):
    """(location, record) for each non-blank line; location is 'file:line' for error messages."""
    for lineno, line in _lines(path) if lines is None else lines:
        if not line.strip():
            continue
        try:  # without its newline: a line cut short fails at its end, not at "line 2 column 1"
            yield f"{path}:{lineno}", json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON at column {e.colno} ({json_reason(e)})") from None


def read_jsonl(path: str | Path, required: tuple[str, ...] | Callable[[object], tuple[str, ...]] = ()) -> list[dict]:
    """One dict a line (blank lines skipped, .gz allowed). Errors say file:line and the bad key. required: the keys
    every record must have, or a function of the record giving the keys that one must have."""
    records = []
    for where, record in _iter_jsonl(Path(path)):
        _check_record(record, required(record) if callable(required) else required, where)
        records.append(record)
    return records


def _read_json_or_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a JSON list ('file[index]') or a JSONL file ('file:line')."""
    lines = list(_lines(path))
    text = "".join(line for _, line in lines)
    if not text.lstrip().startswith("["):
        try:
            return list(_iter_jsonl(path, lines))
        except ValueError:
            if isinstance(_json_or_none(text), dict):  # a pretty-printed object, not JSONL: say so
                raise ValueError(f"{path}: holds a single JSON object; expected a JSON list of objects "
                                 "or JSONL (one object a line)") from None
            raise
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({json_reason(e)})") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}[{i}]: expected a JSON object, got {type(r).__name__} {r!r:.80}")
    return [(f"{path}[{i}]", r) for i, r in enumerate(records)]


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _report_skipped(reader: str, kept: int, skipped: dict[str, int]) -> None:
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.items())
        dist.print0(None, f"{reader}: kept {kept}, skipped {sum(skipped.values())} ({reasons})")


# --- Anthropic HH-RLHF

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) for the "hh" template; ValueError if malformed.

    The prompt ends at the last "\\n\\nAssistant:" inside the text both transcripts share (a
    response may itself hallucinate further "Assistant:" turns). The outer "\\n\\nHuman: " and
    "\\n\\nAssistant:" are stripped because the template adds them back; inner turns stay verbatim.
    """
    if not chosen.startswith(HUMAN):
        raise ValueError("transcript does not start with a Human turn")
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        raise ValueError("no shared Assistant turn")
    prompt = chosen[len(HUMAN):cut]
    # the template puts the space between "Assistant:" and the response
    responses = [text[cut + len(ASSISTANT):].removeprefix(" ") for text in (chosen, rejected)]
    if not all(r.strip() for r in responses):
        raise ValueError("empty response")
    return prompt, responses[0], responses[1]


def read_hh(path: str | Path) -> list[dict]:
    """HH-RLHF {"chosen","rejected"} transcripts -> preference dicts for the "hh" template.

    Malformed transcripts (empty response, no shared Assistant turn) are skipped and counted.
    """
    records, skipped = [], {}
    for record in read_jsonl(path, required=("chosen", "rejected")):
        try:
            prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        except ValueError as e:
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            continue
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    _report_skipped("read_hh", len(records), skipped)
    return records


def read_pairs(path: str | Path, fmt: str = "jsonl") -> list[dict]:
    """Preference pairs as the RM and DPO scripts read them: {"prompt","chosen","rejected"} JSONL, or HH-RLHF
    transcripts with fmt="hh". A JSONL without "prompt" hints at --format=hh."""
    if fmt == "hh":
        return read_hh(path)
    try:
        return read_jsonl(path, required=("prompt", "chosen", "rejected"))
    except ValueError as e:
        hint = "; HH-RLHF transcripts? pass --format=hh" if "missing key 'prompt'" in str(e) else ""
        raise ValueError(f"{e}{hint}") from None


# --- Alpaca / AlpacaFarm


def read_alpaca(path: str | Path) -> list[dict]:
    """Alpaca {"instruction","input","output"} (JSON list or JSONL) or AlpacaFarm {"input","output","qtype"}
    -> SFT dicts; extra keys such as qtype are kept.

    An Alpaca input becomes part of the prompt as "\\n\\n### Input:\\n{input}", the form AlpacaFarm
    already stores, and the "alpaca" template picks the matching preamble. Records with an empty
    output (AlpacaFarm's validation set has one) are skipped and counted.
    """
    records, skipped = [], 0
    for where, r in _read_json_or_jsonl(Path(path)):
        prompt = _alpaca_prompt(r, where)
        if "output" not in r:  # a mis-keyed file ("response", "outputs") must not read as empty outputs
            raise ValueError(f"{where}: missing key 'output' (has {sorted(r)})")
        output = r["output"]
        if not isinstance(output, str):
            raise ValueError(f"{where}: key 'output' must be a string, got {output!r:.80}")
        if not output.strip():
            skipped += 1
            continue
        extras = {k: v for k, v in r.items() if k not in ("instruction", "input", "output")}
        records.append({**extras, "prompt": prompt, "response": output})  # the Alpaca fields make the example
    _report_skipped("read_alpaca", len(records), {"empty output": skipped} if skipped else {})
    return records


def _alpaca_prompt(r: dict, where: str) -> str:
    if "instruction" not in r:  # AlpacaFarm: "input" already holds instruction (+ "### Input:" part)
        _check_record(r, ("input",), where)
        return r["input"]
    _check_record(r, ("instruction",), where)
    extra = "" if r.get("input") is None else r["input"]  # absent or null: no input (0, [] or false: refused)
    if not isinstance(extra, str):
        raise ValueError(f"{where}: key 'input' must be a string, got {extra!r:.80}")
    return r["instruction"] + (INPUT_MARKER + extra if extra.strip() else "")


# --- Stanford Human Preferences (SHP)


def read_shp(path: str | Path, multi: bool = False) -> list[dict]:
    """SHP rows (history, human_ref_A/B, labels, score_A/B) -> preference dicts, or with multi=True
    one multi-response dict per post (its distinct comments, scored by their upvotes).

    labels == 1 means comment A is preferred. SHP's preference is inferred from upvotes of comments
    posted after each other; upvote counts of different posts are not comparable.
    """
    required = ("post_id", "history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B")
    rows = read_jsonl(path, required=required)
    return _shp_multi(rows) if multi else [_shp_pair(r) for r in rows]


def _shp_pair(r: dict) -> dict:
    a, b = r["human_ref_A"], r["human_ref_B"]
    chosen, rejected = (a, b) if r["labels"] == 1 else (b, a)
    extras = {k: r[k] for k in ("post_id", "domain", "score_ratio") if k in r}
    return {"prompt": r["history"], "chosen": chosen, "rejected": rejected, **extras}


def _shp_multi(rows: list[dict]) -> list[dict]:
    posts: dict[str, dict] = {}
    for r in rows:
        post = posts.setdefault(r["post_id"], {"prompt": r["history"], "scores_by_response": {}})
        post["scores_by_response"][r["human_ref_A"]] = r["score_A"]
        post["scores_by_response"][r["human_ref_B"]] = r["score_B"]
    out = []
    for post_id, post in posts.items():
        by_response = post["scores_by_response"]
        if len(by_response) >= 2:
            out.append({"prompt": post["prompt"], "responses": list(by_response),
                        "scores": [float(s) for s in by_response.values()], "post_id": post_id})
    return out


# --- tokenizing


def truncate_example(prompt_ids: list[int], response_ids: list[int], max_len: int,
                     max_response_len: int | None = None) -> tuple[list[int], list[int]] | None:
    """Fit prompt + response into max_len tokens, or None when the example must be dropped.

    The response is capped at max_response_len first (None: no cap); then the prompt loses tokens
    from its START, since the end holds the question being answered. If the response leaves no room
    for even one prompt token there is nothing to condition on: None.
    """
    if max_response_len is not None:
        response_ids = response_ids[:max_response_len]
    room = max_len - len(response_ids)
    if room < 1:
        return None
    return prompt_ids[-room:], response_ids


def _report_cuts(fn: str, n: int, cut: int, dropped: int, max_len: int) -> None:
    if cut or dropped:
        dist.print0(None, f"{fn}: {cut}/{n} examples truncated to {max_len} tokens, "
                          f"{dropped} dropped (response left no room for the prompt)")


def _split_bos(tok: Tokenizer, prompt_ids: list[int]) -> tuple[list[int], list[int]]:
    """BOS is kept out of truncation: cutting the prompt's start must not cut the BOS."""
    n = 1 if tok.add_bos else 0
    return prompt_ids[:n], prompt_ids[n:]


def fit_example(tok: Tokenizer, prompt_ids: list[int], response_ids: list[int], max_len: int,
                max_response_len: int | None = None) -> tuple[list[int], list[int]] | None:
    """truncate_example for a prompt encoded with its BOS (encode_prompt): the BOS stays first, and the cut takes
    the tokens after it. Every reader of (prompt, response) text uses this, training and judging alike, so a
    long prompt is cut the same way wherever it is scored."""
    bos, prompt = _split_bos(tok, prompt_ids)
    fitted = truncate_example(prompt, response_ids, max_len - len(bos), max_response_len)
    return None if fitted is None else (bos + fitted[0], fitted[1])


def _join(prompt_ids: list[int], response_ids: list[int]) -> dict:
    return {"ids": prompt_ids + response_ids, "mask": [0] * len(prompt_ids) + [1] * len(response_ids)}


def tokenize_sft(examples: list[dict], tok: Tokenizer, template: str, max_len: int,
                 max_response_len: int | None = None) -> list[dict]:
    """{"prompt","response"} -> {"ids","mask"} with mask = 1 on the response tokens and its EOS."""
    out, cut, dropped = [], 0, 0
    for ex in examples:
        prompt = encode_prompt(tok, ex["prompt"], template)
        response = encode_response(tok, ex["response"], template)
        fitted = fit_example(tok, prompt, response, max_len, max_response_len)
        if fitted is None:
            dropped += 1
            continue
        cut += fitted != (prompt, response)
        out.append(_join(*fitted))
    _report_cuts("tokenize_sft", len(examples), cut, dropped, max_len)
    return out


def tokenize_pairs(examples: list[dict], tok: Tokenizer, template: str, max_len: int,
                   max_response_len: int | None = None) -> list[dict]:
    """{"prompt","chosen","rejected"} -> chosen_ids/chosen_mask/rejected_ids/rejected_mask.

    Both sides keep the same (identically truncated) prompt: DPO compares log-probs given one prompt. A pair whose
    responses are the same tokens once capped is dropped (counted and printed): it carries no preference.
    """
    out, cut, dropped, tied = [], 0, 0, 0
    for ex in examples:
        prompt = encode_prompt(tok, ex["prompt"], template)
        chosen = encode_response(tok, ex["chosen"], template)
        rejected = encode_response(tok, ex["rejected"], template)
        if chosen[:max_response_len] == rejected[:max_response_len]:  # no preference left to learn: skip before fitting
            tied += 1
            continue
        # the longer response decides how much prompt fits; both responses get the same cap
        fitted = fit_example(tok, prompt, max(chosen, rejected, key=len), max_len, max_response_len)
        if fitted is None:
            dropped += 1
            continue
        # [:None] keeps the whole response
        kept_prompt, kept_chosen, kept_rejected = fitted[0], chosen[:max_response_len], rejected[:max_response_len]
        cut += (kept_prompt, kept_chosen, kept_rejected) != (prompt, chosen, rejected)
        c, r = _join(kept_prompt, kept_chosen), _join(kept_prompt, kept_rejected)
        out.append({"chosen_ids": c["ids"], "chosen_mask": c["mask"], "rejected_ids": r["ids"], "rejected_mask": r["mask"]})
    _report_cuts("tokenize_pairs", len(examples), cut, dropped, max_len)
    where = f" within --max_response_len={max_response_len}" if max_response_len else ""
    _report_skipped("tokenize_pairs", len(out), {f"with chosen and rejected the same tokens{where}": tied} if tied else {})
    return out


def tokenize_pretrain(texts: list[str], tok: Tokenizer, block_size: int) -> list[dict]:
    """Documents joined into one stream ([bos]? doc eos [bos]? doc eos ...) cut into full blocks.

    The mask is all ones: pretraining trains every token. The incomplete last block is dropped.
    """
    bos = [tok.bos_id] if tok.add_bos else []
    stream = [i for text in texts for i in bos + tok.encode(text) + [tok.eos_id]]
    n_blocks = len(stream) // block_size
    if len(stream) % block_size:
        dist.print0(None, f"tokenize_pretrain: dropped the last {len(stream) % block_size} of {len(stream)} "
                          f"tokens (not a full block of {block_size})")
    return [{"ids": stream[i * block_size:(i + 1) * block_size], "mask": [1] * block_size}
            for i in range(n_blocks)]


# --- batching


def collate_sft(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """[{"ids","mask"}] -> input_ids, labels, attention_mask, all (B, T) long, right-padded."""
    T = max(len(ex["ids"]) for ex in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, ex in enumerate(batch):
        ids, mask = torch.tensor(ex["ids"]), torch.tensor(ex["mask"], dtype=torch.bool)
        n = len(ids)
        input_ids[row, :n] = ids
        labels[row, :n] = torch.where(mask, ids, IGNORE_INDEX)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_pairs(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows 0..B-1 then rejected rows B..2B-1, padded to one length: one forward for both."""
    rows = [{"ids": ex[f"{side}_ids"], "mask": ex[f"{side}_mask"]} for side in ("chosen", "rejected") for ex in batch]
    return collate_sft(rows, pad_id)
