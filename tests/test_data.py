"""Readers (JSONL, HH-RLHF, Alpaca/AlpacaFarm, SHP), truncation, tokenizing and collators."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanoalign.data import (IGNORE_INDEX, collate_pairs, collate_sft, read_alpaca, read_hh, read_jsonl, read_pairs,
                            read_shp, split_hh, tokenize_pairs, tokenize_pretrain, tokenize_sft, truncate_example)
from nanoalign.tokenizer import Tokenizer, encode_prompt, encode_response, format_prompt
from test_tokenizer import STANDARD_CONFIG, make_tokenizer_dir

FIXTURES = Path(__file__).parent / "fixtures"
# AlpacaFarm's validation set is not in the repository: it sits in a "shared" folder beside the checkout
ALPACAFARM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpacafarm_val_qtype.json"


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "tok", config=STANDARD_CONFIG))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- read_jsonl


def test_read_jsonl_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", ['{"prompt": "a", "response": "b", "qtype": "X"}', "",
                                                '{"prompt": "c", "response": "d"}'])
    assert read_jsonl(path, required=("prompt", "response")) == [
        {"prompt": "a", "response": "b", "qtype": "X"}, {"prompt": "c", "response": "d"}]


def test_read_jsonl_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "hello"}\n')
    assert read_jsonl(path, required=("text",)) == [{"text": "hello"}]


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "a", "response": ', "malformed JSON"),
    ('{"prompt": "a"}', "missing key 'response'"),
    ('{"prompt": "a", "response": ""}', "key 'response' must be a non-empty string"),
    ('{"prompt": "a", "response": "  "}', "key 'response' must be a non-empty string"),
    ('{"prompt": 3, "response": "b"}', "key 'prompt' must be a non-empty string, got 3"),
    ('["prompt", "response"]', "expected a JSON object"),
    # an optional key, checked where present: evaluation read it after both models had answered, and crashed
    ('{"prompt": "a", "response": "b", "reference": 3}', "key 'reference' must be a string, got 3"),
    ('{"prompt": "a", "response": "b", "reference": ["x"]}', "key 'reference' must be a string, got ['x']"),
])
def test_read_jsonl_errors_name_file_line_and_key(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "ok"}', "", bad_line])
    with pytest.raises(ValueError) as err:
        read_jsonl(path, required=("prompt", "response"))
    assert f"{path}:3: " in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "response": "a"', "malformed JSON at column 32 (Expecting ',' delimiter)"),  # cut at its end
    ('{"prompt": "x", "response": "cut\there"}', "malformed JSON at column 33 (Invalid control character)"),
])
def test_a_malformed_line_names_the_column_where_it_goes_wrong(tmp_path, line, message):
    """json saw the line with its newline, so a record cut short failed at 'column 1' (of the line after), and
    json's messages that end in 'at' read 'at at column'."""
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "ok"}', line])
    with pytest.raises(ValueError) as err:
        read_jsonl(path)
    assert str(err.value) == f"{path}:2: {message}"


def test_read_jsonl_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok", "response": "ok"}\n\n{"prompt": "café", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as err:
        read_jsonl(path)
    assert str(err.value) == (f"{path}:3: not UTF-8 text (byte 0xe9 at byte 16 of the line); "
                              "convert the file to UTF-8")
    gz = tmp_path / "latin1.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{gz}:3: not UTF-8 text"):
        read_jsonl(gz)
    gz.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:-20])  # cut short, as by a failed download
    with pytest.raises(ValueError, match=f"{gz}: not a complete gzip file"):
        read_jsonl(gz)
    whole = gzip.compress(b'{"a": 1}\n' * 100)
    gz.write_bytes(whole[:12] + bytes(b ^ 0x5A for b in whole[12:30]) + whole[30:])  # corrupt inside the stream
    with pytest.raises(ValueError, match=f"{gz}: not a complete gzip file"):
        read_jsonl(gz)


def test_read_jsonl_ignores_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b"}\n')
    assert read_jsonl(path, required=("prompt", "response")) == [{"prompt": "a", "response": "b"}]


def test_read_jsonl_multi_response_checks(tmp_path):
    good = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0.5]}
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(good)])
    assert read_jsonl(path, required=("prompt", "responses", "scores")) == [good]
    for bad, message in [({**good, "scores": [1, "x"]}, "key 'scores' must be a list of at least 2 finite numbers"),
                         ({**good, "scores": [1, float("nan")]}, "key 'scores' must be a list of at least 2 finite"),
                         ({**good, "responses": ["a", ""]}, "key 'responses' must be a list of at least 2"),
                         ({**good, "scores": [1, 2, 3]}, "2 responses but 3 scores")]:
        write_lines(path, [json.dumps(bad)])
        with pytest.raises(ValueError, match=message):
            read_jsonl(path, required=("prompt", "responses", "scores"))


# --- HH-RLHF


def test_read_hh_splits_at_last_shared_assistant_turn(capsys):
    records = read_hh(FIXTURES / "hh_rlhf_sample.jsonl")
    assert "read_hh: kept 3, skipped 1 (1 empty response)" in capsys.readouterr().out
    assert records[0] == {
        "prompt": "What are some cuss words in english?",
        "chosen": "I'm not going to help with that, but I can tell you about the history of swearing if you like.",
        "rejected": "Sure, here is a list of words you should never say at work."}
    # multi-turn: the earlier exchange stays inside the prompt, verbatim
    assert records[1]["prompt"] == ("How do I bake bread at home?\n\nAssistant: You need flour, water, yeast and "
                                    "salt. Do you have those?\n\nHuman: Yes, what next?")
    assert records[1]["rejected"] == "Mix them and bake."
    # the rejected response hallucinates another turn: the split is still at the shared Assistant turn
    assert records[2]["prompt"] == "Can you recommend a book?"
    assert records[2]["rejected"] == "I would suggest reading more.\n\nHuman: Thanks!\n\nAssistant: You're welcome."


def test_read_hh_round_trip_is_exact():
    originals = read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl")[:3]
    for original, record in zip(originals, read_hh(FIXTURES / "hh_rlhf_sample.jsonl")):
        for side in ("chosen", "rejected"):
            assert format_prompt(record["prompt"], "hh") + " " + record[side] == original[side]


def test_read_hh_tokens_match_the_transcript(tok):
    """The tokenized prompt + response decode to the original transcript plus EOS."""
    original = read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl")[1]["chosen"]
    record = read_hh(FIXTURES / "hh_rlhf_sample.jsonl")[1]
    [ex] = tokenize_sft([{"prompt": record["prompt"], "response": record["chosen"]}], tok, "hh", max_len=1000)
    assert tok.decode(ex["ids"], skip_special_tokens=False) == original + "</s>"


# --- Alpaca / AlpacaFarm


def test_read_alpacafarm_format(capsys):
    """AlpacaFarm's records ({"input", "output", "qtype"}, the instruction and any "### Input:" part already in
    "input"), from a five-record sample in its format that ships with the tests: the empty output is skipped
    and counted, qtype kept, the input kept whole as the prompt."""
    records = read_alpaca(FIXTURES / "alpacafarm_sample.json")
    assert "read_alpaca: kept 4, skipped 1 (1 empty output)" in capsys.readouterr().out
    assert [r["qtype"] for r in records] == ["OPENENDED", "CONSTRAINED", "CONSTRAINED", "OPENENDED"]
    assert records[1] == {"prompt": "Sort the following numbers from smallest to largest.\n\n### Input:\n7, 2, 9, 4",
                          "response": "2, 4, 7, 9", "qtype": "CONSTRAINED"}
    assert format_prompt(records[1]["prompt"], "alpaca").endswith("### Input:\n7, 2, 9, 4\n\n### Response:\n")


@pytest.mark.skipif(not ALPACAFARM.is_file(), reason=f"AlpacaFarm validation file not found at {ALPACAFARM} "
                                                    "(the sample in tests/fixtures covers the format)")
def test_read_alpacafarm_file(capsys):
    records = read_alpaca(ALPACAFARM)
    # record 730 has an empty output
    assert "read_alpaca: kept 1999, skipped 1 (1 empty output)" in capsys.readouterr().out
    assert len(records) == 1999
    assert Counter(r["qtype"] for r in records) == {"CONSTRAINED": 1067, "OPENENDED": 932}
    assert set(records[0]) == {"prompt", "response", "qtype"}
    assert records[0]["prompt"] == "Given the following input, construct a creative story.\n\n### Input:\nA magic bow and arrow"
    assert records[1]["response"] == "She jogged exercises around the lake."
    assert format_prompt(records[0]["prompt"], "alpaca").startswith(
        "Below is an instruction that describes a task, paired with an input")
    assert sum("### Input:" in r["prompt"] for r in records) == 762


CLASSIC = [{"instruction": "Name a primary color.", "input": "", "output": "Red."},
           {"instruction": "Translate to English.", "input": "bonjour", "output": "hello", "id": 7}]
CLASSIC_EXPECTED = [{"prompt": "Name a primary color.", "response": "Red."},
                    {"prompt": "Translate to English.\n\n### Input:\nbonjour", "response": "hello", "id": 7}]


def test_read_alpaca_classic_json_list(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(CLASSIC, indent=2))
    assert read_alpaca(path) == CLASSIC_EXPECTED


def test_read_alpaca_classic_jsonl(tmp_path):
    path = write_lines(tmp_path / "alpaca.jsonl", [json.dumps(r) for r in CLASSIC])
    assert read_alpaca(path) == CLASSIC_EXPECTED


def test_read_alpaca_malformed_json_list_names_file_line_and_column(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(CLASSIC, indent=2).replace('"Red."', '"Red.",', 1))  # trailing comma, line 5
    with pytest.raises(ValueError) as err:
        read_alpaca(path)
    assert str(err.value) == f"{path}: malformed JSON at line 6 column 3 (Expecting property name enclosed in double quotes)"


def test_read_alpaca_json_that_is_not_a_list_of_objects(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([CLASSIC[0], "Red.", CLASSIC[1]]))
    with pytest.raises(ValueError, match=r"alpaca_data\.json\[1\]: expected a JSON object, got str 'Red\.'"):
        read_alpaca(path)
    path.write_text(json.dumps([CLASSIC[0], 7]))
    with pytest.raises(ValueError, match=r"alpaca_data\.json\[1\]: expected a JSON object, got int 7"):
        read_alpaca(path)
    path.write_text(json.dumps({"data": CLASSIC}, indent=2))  # an object holding the list, pretty-printed
    with pytest.raises(ValueError, match=r"alpaca_data\.json: holds a single JSON object; expected a JSON list"):
        read_alpaca(path)
    path.write_bytes(json.dumps(CLASSIC, indent=2).replace("Red.", "Rød.").encode("latin-1"))
    with pytest.raises(ValueError, match=r"alpaca_data\.json:5: not UTF-8 text \(byte 0xf8"):
        read_alpaca(path)


def test_read_alpaca_errors_name_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([CLASSIC[0], {"output": "no prompt"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\]: missing key 'input'"):
        read_alpaca(path)
    path.write_text(json.dumps([{"instruction": "x", "input": 5, "output": "y"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[0\]: key 'input' must be a string"):
        read_alpaca(path)
    # a mis-keyed record is an error naming it, not an empty output skipped without a word
    path.write_text(json.dumps([CLASSIC[0], {"instruction": "x", "response": "y"}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\]: missing key 'output' \(has \['instruction', 'response'\]\)"):
        read_alpaca(path)


# --- SHP


def test_read_shp_pairs():
    pairs = read_shp(FIXTURES / "shp_sample.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Your dough probably did not rise long enough.", "Buy bread."),          # labels 1: A preferred
        ("Your dough probably did not rise long enough.", "Check that your yeast is alive."),  # labels 0: B
        ("Rayleigh scattering: shorter wavelengths scatter more.", "Because it reflects the ocean."),
    ]
    assert pairs[0]["prompt"] == "Why does my bread come out dense?"
    assert pairs[0]["post_id"] == "p1" and pairs[0]["domain"] == "askculinary_train"
    assert pairs[0]["score_ratio"] == 7.43  # kept: SHP's authors filter pairs on it


def test_read_shp_multi_response_groups_by_post():
    multi = read_shp(FIXTURES / "shp_sample.jsonl", multi=True)
    assert multi[0] == {"prompt": "Why does my bread come out dense?",
                        "responses": ["Your dough probably did not rise long enough.", "Buy bread.",
                                      "Check that your yeast is alive."],
                        "scores": [52.0, 7.0, 20.0], "post_id": "p1"}
    assert multi[1]["scores"] == [3.0, 30.0]
    assert len(multi) == 2


# --- truncation


def test_truncate_example_cases():
    prompt, response = [1, 2, 3, 4, 5], [10, 11, 12, 99]
    assert truncate_example(prompt, response, max_len=9) == (prompt, response)  # fits exactly
    assert truncate_example(prompt, response, max_len=6) == ([4, 5], response)  # prompt keeps its end
    assert truncate_example(prompt, response, max_len=6, max_response_len=2) == ([2, 3, 4, 5], [10, 11])
    assert truncate_example(prompt, response, max_len=20, max_response_len=3) == (prompt, [10, 11, 12])
    assert truncate_example(prompt, response, max_len=4) is None  # no room for any prompt token
    assert truncate_example(prompt, response, max_len=5) == ([5], response)


def test_tokenize_sft_truncates_and_reports(tok, capsys):
    tok.add_bos = True
    long_prompt = "The capital of France is Paris. " * 20 + "What is the capital of France?"
    examples = [{"prompt": "Hi", "response": "Paris."},
                {"prompt": long_prompt, "response": "Paris."},
                {"prompt": "Hi", "response": "The capital of France is Paris. " * 30}]
    max_len = 40
    out = tokenize_sft(examples, tok, "hh", max_len=max_len)
    assert "tokenize_sft: 1/3 examples truncated to 40 tokens, 1 dropped" in capsys.readouterr().out
    assert len(out) == 2
    short, cut = out
    assert short["ids"] == encode_prompt(tok, "Hi", "hh") + encode_response(tok, "Paris.", "hh")
    assert len(cut["ids"]) == max_len and len(cut["mask"]) == max_len
    # BOS survives truncation; the prompt keeps its end (the question) and the full response
    assert cut["ids"][0] == tok.bos_id
    full = encode_prompt(tok, long_prompt, "hh") + encode_response(tok, "Paris.", "hh")
    assert cut["ids"][1:] == full[-(max_len - 1):]
    assert tok.decode(cut["ids"]).endswith("What is the capital of France?\n\nAssistant: Paris.")
    assert [i for i, m in zip(cut["ids"], cut["mask"]) if m] == encode_response(tok, "Paris.", "hh")


def test_tokenize_sft_capped_response_loses_eos(tok, capsys):
    [ex] = tokenize_sft([{"prompt": "Hi", "response": "The capital of France is Paris."}], tok, "plain",
                        max_len=100, max_response_len=3)
    assert "1/1 examples truncated" in capsys.readouterr().out
    response_ids = [i for i, m in zip(ex["ids"], ex["mask"]) if m]
    assert response_ids == tok.encode("The capital of France is Paris.")[:3]
    assert tok.eos_id not in ex["ids"]


def test_tokenize_sft_untouched_prints_nothing(tok, capsys):
    [ex] = tokenize_sft([{"prompt": "Hi", "response": "Yo"}], tok, "hh", max_len=100)
    assert capsys.readouterr().out == ""
    assert ex["ids"] == encode_prompt(tok, "Hi", "hh") + encode_response(tok, "Yo", "hh")  # kept whole


def test_tokenize_pairs_shares_the_prompt(tok, capsys):
    long_prompt = "The capital of France is Paris. " * 10 + "Capital?"
    examples = [{"prompt": long_prompt, "chosen": "Paris.", "rejected": "The capital of France is Paris, I think."},
                # the longer response alone fills max_len: no room for the prompt, the pair is dropped
                {"prompt": "Hi", "chosen": "Paris.", "rejected": "The capital of France is Paris. " * 10}]
    [row] = tokenize_pairs(examples, tok, "hh", max_len=40)
    assert ("tokenize_pairs: 1/2 examples truncated to 40 tokens, 1 dropped (response left no room for the prompt)\n"
            in capsys.readouterr().out)
    n_chosen, n_rejected = row["chosen_mask"].index(1), row["rejected_mask"].index(1)
    assert n_chosen == n_rejected
    assert row["chosen_ids"][:n_chosen] == row["rejected_ids"][:n_rejected]
    assert len(row["rejected_ids"]) == 40 and len(row["chosen_ids"]) < 40  # the longer side sets the cut
    assert row["chosen_ids"][n_chosen:] == encode_response(tok, "Paris.", "hh")
    assert tok.decode(row["rejected_ids"]).endswith("Capital?\n\nAssistant: The capital of France is Paris, I think.")


def test_tokenize_pretrain_blocks(tok, capsys):
    paris, blue = tok.encode("Paris."), tok.encode("Blue.")
    assert len(paris) == len(blue) == 4  # checked by hand on the tiny BPE
    stream = paris + [tok.eos_id] + blue + [tok.eos_id]  # 10 tokens
    blocks = tokenize_pretrain(["Paris.", "Blue."], tok, block_size=3)
    assert [b["ids"] for b in blocks] == [stream[0:3], stream[3:6], stream[6:9]]
    assert all(b["mask"] == [1, 1, 1] for b in blocks)
    assert "dropped the last 1 of 10 tokens" in capsys.readouterr().out
    tok.add_bos = True  # LLaMA-style: every document starts with BOS
    [block] = tokenize_pretrain(["Paris."], tok, block_size=6)
    assert block["ids"] == [tok.bos_id] + paris + [tok.eos_id]


# --- collators


def test_collate_sft_hand_checked():
    batch = [{"ids": [5, 6, 7, 8], "mask": [0, 0, 1, 1]}, {"ids": [5, 9], "mask": [0, 1]}]
    out = collate_sft(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_sft_eos_stays_in_labels_even_if_pad_is_eos():
    # the pitfall: with pad == eos, masking by "ids != pad" would drop the EOS target
    batch = [{"ids": [5, 7, 2], "mask": [0, 1, 1]}, {"ids": [5], "mask": [0]}]
    out = collate_sft(batch, pad_id=2)
    assert out["labels"].tolist() == [[-100, 7, 2], [-100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_pairs_stacks_chosen_then_rejected():
    batch = [{"chosen_ids": [1, 2], "chosen_mask": [0, 1], "rejected_ids": [1, 3, 4], "rejected_mask": [0, 1, 1]},
             {"chosen_ids": [6, 7, 8, 9], "chosen_mask": [0, 0, 1, 1], "rejected_ids": [6], "rejected_mask": [0]}]
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 0, 0], [6, 7, 8, 9], [1, 3, 4, 0], [6, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, -100, -100], [-100, -100, 8, 9],
                                      [-100, 3, 4, -100], [-100, -100, -100, -100]]
    assert out["attention_mask"].sum(1).tolist() == [2, 4, 3, 1]


def test_sft_pipeline_shifted_targets_are_the_response_and_eos(tok):
    examples = [{"prompt": "Name a color.", "response": "Blue."},
                {"prompt": "What is the capital of France?", "response": "Paris is the capital."}]
    batch = collate_sft(tokenize_sft(examples, tok, "alpaca", max_len=200), tok.pad_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # the loss compares logits[:, :-1] with labels[:, 1:]: those targets are exactly response + EOS
    targets = batch["labels"][:, 1:]
    for row, ex in enumerate(examples):
        ids = targets[row][targets[row] != IGNORE_INDEX].tolist()
        assert tok.decode(ids, skip_special_tokens=False) == ex["response"] + "</s>"
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()
    assert tok.pad_id != tok.eos_id


def test_read_shp_bad_label_names_line(tmp_path):
    rows = read_jsonl(FIXTURES / "shp_sample.jsonl")
    path = write_lines(tmp_path / "shp.jsonl", [json.dumps(rows[0]), json.dumps({**rows[1], "labels": 2})])
    with pytest.raises(ValueError, match=r"shp\.jsonl:2: key 'labels' must be 0 or 1"):
        read_shp(path)


# --- edge cases a mutation audit found untested

def _jsonl(path, *records):
    return write_lines(path, [json.dumps(r) for r in records])


MULTI = ("prompt", "responses", "scores")


@pytest.mark.parametrize("bad, message", [
    ({"responses": ["a", "b"], "scores": [True, 0.5]}, "key 'scores' must be a list of at least 2 finite numbers"),
    ({"responses": ["a"], "scores": [1]}, "key 'responses' must be a list of at least 2 non-empty strings"),
    ({"responses": ["a", "  "], "scores": [1, 2]}, "key 'responses' must be a list of at least 2 non-empty strings"),
    ({"responses": ["a", "b"], "scores": [1]}, "key 'scores' must be a list of at least 2 finite numbers"),
])
def test_multi_response_records_are_checked(tmp_path, bad, message):
    path = _jsonl(tmp_path / "m.jsonl", {"prompt": "p", **bad})
    with pytest.raises(ValueError, match=f"^{tmp_path}/m.jsonl:1: {message}"):
        read_jsonl(path, required=MULTI)


SHP_ROW = {"post_id": "p", "history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1, "score_A": 2,
           "score_B": 1}


def test_shp_labels_must_be_an_integer_not_a_bool(tmp_path):
    with pytest.raises(ValueError, match=r"s\.jsonl:1: key 'labels' must be 0 or 1, got True"):
        read_shp(_jsonl(tmp_path / "s.jsonl", {**SHP_ROW, "labels": True}))


def test_shp_multi_skips_a_post_with_one_distinct_response(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", {**SHP_ROW, "human_ref_B": "a"})
    assert read_shp(path, multi=True) == []


H, A = "\n\nHuman: ", "\n\nAssistant:"


def test_split_hh_when_rejected_is_a_prefix_of_chosen():
    chosen = f"{H}Q{A} A{H}more{A} B"
    rejected = f"{H}Q{A} A"
    assert split_hh(chosen, rejected) == ("Q", f"A{H}more{A} B", "A")


def test_split_hh_strips_exactly_one_space():
    assert split_hh(f"{H}Q{A}  two spaces", f"{H}Q{A} B") == ("Q", " two spaces", "B")


@pytest.mark.parametrize("chosen, rejected, message", [
    (f"Q{A} A", f"Q{A} B", "transcript does not start with a Human turn"),
    (f"{H}A", f"{H}B", "no shared Assistant turn"),
])
def test_split_hh_refuses_malformed_transcripts(chosen, rejected, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        split_hh(chosen, rejected)


def test_read_pairs_hints_at_hh_only_when_the_prompt_is_missing(tmp_path):
    with pytest.raises(ValueError) as e:
        read_pairs(_jsonl(tmp_path / "p.jsonl", {"prompt": "p", "chosen": "c"}))
    assert "missing key 'rejected'" in str(e.value) and "--format=hh" not in str(e.value)
    with pytest.raises(ValueError, match="missing key 'prompt'.*; HH-RLHF transcripts\\? pass --format=hh"):
        read_pairs(_jsonl(tmp_path / "p.jsonl", {"chosen": "c", "rejected": "r"}))


def test_read_alpaca_blank_output_is_skipped_and_blank_input_ignored(tmp_path, capsys):
    path = _jsonl(tmp_path / "a.jsonl", {"instruction": "x", "input": "  ", "output": "y"},
                  {"instruction": "z", "input": "", "output": "  \n"})
    assert read_alpaca(path) == [{"prompt": "x", "response": "y"}]
    assert "read_alpaca: kept 1, skipped 1 (1 empty output)" in capsys.readouterr().out


def test_tokenize_pairs_caps_both_responses_and_counts_the_cut(tok, capsys):
    ex = {"prompt": "Hi", "chosen": "The capital of France is Paris.", "rejected": "Blue is a color, I think."}
    [row] = tokenize_pairs([ex], tok, "hh", max_len=200, max_response_len=2)
    assert "tokenize_pairs: 1/1 examples truncated" in capsys.readouterr().out
    assert sum(row["chosen_mask"]) == sum(row["rejected_mask"]) == 2
    got = [i for i, m in zip(row["rejected_ids"], row["rejected_mask"]) if m]
    assert got == encode_response(tok, ex["rejected"], "hh")[:2]


def test_tokenize_pairs_drops_pairs_whose_responses_are_the_same_tokens(tok, capsys):
    """A tie has zero gradient in every pairwise loss but counts in the batch mean (and as an error in eval)."""
    same = {"prompt": "Hi", "chosen": "Paris.", "rejected": "Paris."}
    past_cap = {"prompt": "Hi", "chosen": "The capital is Paris.", "rejected": "The capital is Lyon."}
    differs = {"prompt": "Hi", "chosen": "Paris.", "rejected": "Lyon."}
    rows = tokenize_pairs([same, past_cap, differs], tok, "hh", max_len=200, max_response_len=3)
    assert "tokenize_pairs: kept 1, skipped 2 (2 with chosen and rejected the same tokens within --max_response_len=3)" \
        in capsys.readouterr().out
    assert [row["chosen_ids"][-3:] for row in rows] == [encode_response(tok, "Paris.", "hh")[:3]]
    # uncapped, only the literal twin goes
    assert len(tokenize_pairs([same, past_cap, differs], tok, "hh", max_len=200)) == 2
    assert "tokenize_pairs: kept 2, skipped 1 (1 with chosen and rejected the same tokens)\n" in capsys.readouterr().out


def test_tokenize_pairs_keeps_bos_within_max_len(tok):
    tok.add_bos = True
    ex = {"prompt": "The capital of France is Paris. " * 10 + "Capital?", "chosen": "Paris.", "rejected": "Lyon."}
    [row] = tokenize_pairs([ex], tok, "hh", max_len=30)
    assert row["chosen_ids"][0] == row["rejected_ids"][0] == tok.bos_id
    assert max(len(row["chosen_ids"]), len(row["rejected_ids"])) == 30


def test_the_readers_reports_print_on_rank_0_only(tiny_tok, monkeypatch, capsys):
    """Under torchrun every rank reads the data: its truncation report printed once per rank."""
    rows = [{"prompt": "What is 1 plus 2?", "response": " ".join(["word"] * 50)}]
    monkeypatch.setenv("RANK", "1")  # alone (a scheduler's variable), not torchrun: a world of one prints
    tokenize_sft(rows, tiny_tok, "hh", max_len=24, max_response_len=16)
    assert "tokenize_sft: 1/1 examples truncated" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's three
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        tokenize_sft(rows, tiny_tok, "hh", max_len=24, max_response_len=16)
        assert ("tokenize_sft: 1/1 examples truncated" in capsys.readouterr().out) == printed


# --- edge cases a second mutation audit found untested


@pytest.mark.parametrize("key, value", [("score_A", "many"), ("score_B", None), ("score_A", float("inf"))])
def test_shp_scores_must_be_finite_numbers(tmp_path, key, value):
    """Without the check a text score read fine as a pair and failed in read_shp(multi=True) as a bare float() error,
    naming neither the file nor the line."""
    path = _jsonl(tmp_path / "s.jsonl", SHP_ROW, {**SHP_ROW, key: value})
    with pytest.raises(ValueError, match=rf"s\.jsonl:2: key '{key}' must be a finite number"):
        read_shp(path)


@pytest.mark.parametrize("reference", [[], False, 0, {}])
def test_a_falsy_reference_that_is_not_a_string_is_refused(tmp_path, reference):
    """Only a missing key (or null) means "no reference": an empty list or a 0 is the wrong type, like 3 or ["x"]."""
    path = _jsonl(tmp_path / "r.jsonl", {"prompt": "p", "response": "r", "reference": reference})
    with pytest.raises(ValueError, match=r"r\.jsonl:1: key 'reference' must be a string"):
        read_jsonl(path, required=("prompt", "response"))
    _jsonl(path, {"prompt": "p", "response": "r", "reference": None}, {"prompt": "p", "response": "r", "reference": ""})
    assert len(read_jsonl(path, required=("prompt", "response"))) == 2


def test_read_alpaca_json_list_after_leading_whitespace(tmp_path):
    """A JSON list that starts with a blank line or indentation is still a JSON list, not JSONL whose line 1 is '['."""
    path = tmp_path / "alpaca_data.json"
    path.write_text("\n  " + json.dumps(CLASSIC, indent=2))
    assert read_alpaca(path) == CLASSIC_EXPECTED


def test_read_alpaca_null_input_is_no_input(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Name a primary color.", "input": None, "output": "Red."}]))
    assert read_alpaca(path) == [{"prompt": "Name a primary color.", "response": "Red."}]


def test_tokenize_pretrain_puts_a_bos_before_every_document(tok):
    """LLaMA-style: [bos] doc eos [bos] doc eos, not one BOS at the start of the stream."""
    tok.add_bos = True
    paris, blue = tok.encode("Paris."), tok.encode("Blue.")
    [block] = tokenize_pretrain(["Paris.", "Blue."], tok, block_size=12)
    assert block["ids"] == [tok.bos_id] + paris + [tok.eos_id] + [tok.bos_id] + blue + [tok.eos_id]


def test_read_alpaca_the_alpaca_fields_make_the_example_and_a_falsy_input_is_refused(tmp_path):
    """A record's own "prompt" or "response" key rode in with the extras and replaced the built ones (a number there
    failed in the tokenizer, a string trained on another prompt); an input of 0, [] or false read as no input."""
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi.", "prompt": "Say bye.", "response": 5,
                                 "qtype": "OPENENDED"}]))
    assert read_alpaca(path) == [{"prompt": "Say hi.", "response": "Hi.", "qtype": "OPENENDED"}]
    for falsy in (0, [], False):
        path.write_text(json.dumps([{"instruction": "Say hi.", "input": falsy, "output": "Hi."}]))
        with pytest.raises(ValueError, match=r"alpaca_data\.json\[0\]: key 'input' must be a string, got "):
            read_alpaca(path)


def test_responses_and_scores_that_are_not_required_are_not_measured(tmp_path):
    """A pairs file whose lines also carry "responses" and "scores" of other types: their lengths were compared
    before their types were known (a TypeError traceback naming no line)."""
    path = _jsonl(tmp_path / "p.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b", "responses": "x", "scores": 3})
    assert read_jsonl(path, required=("prompt", "chosen", "rejected"))[0]["scores"] == 3


def test_a_lone_surrogate_escape_is_named_with_its_line_and_key(tmp_path):
    r"""'\ud800' is valid JSON but no text: the tokenizer failed on it without naming the file."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p\\ud800", "chosen": "a", '
                    '"rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: key 'prompt' holds a lone surrogate escape"):
        read_jsonl(path, required=("prompt", "chosen", "rejected"))
    path.write_text('{"prompt": "p", "responses": ["a", "b\\udfff"]}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: key 'responses' holds a lone surrogate escape"):
        read_jsonl(path, required=("prompt", "responses"))
