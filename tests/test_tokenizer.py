"""Tokenizer loading (special ids from every config source), round trips and prompt templates.

The tokenizer is a tiny byte-level BPE trained in tmp_path with the `tokenizers` library.
"""

import json
from pathlib import Path

import pytest
from conftest import reference
from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers

from nanoalign.tokenizer import (TEMPLATES, Tokenizer, encode_example, encode_prompt, encode_response,
                                 format_prompt)

CORPUS = [
    "Human: What is the capital of France?",
    "Assistant: The capital of France is Paris.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName a color.\n\n### Response:\nBlue.",
]
TEXTS = ["Paris is the capital.", "  two spaces, tabs\tand\nnewlines\n\n", "héllo wörld ✓ 123"]


def make_tokenizer_dir(path: Path, specials=("<s>", "</s>", "<pad>"), config=None, bos_post_processor=False,
                       unk_token=None) -> Path:
    """Train a tiny byte-level BPE, save tokenizer.json and (if given) tokenizer_config.json in path."""
    tok = RustTokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos_post_processor:  # LLaMA-3 style: BOS comes from the post-processor, no add_bos_token flag
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


STANDARD_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


@pytest.fixture
def tok(tmp_path) -> Tokenizer:
    return Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config=STANDARD_CONFIG))


# --- special ids


def test_tokenizer_config_string_form(tok):
    # special tokens are trained first, so they hold ids 0, 1, 2 in order
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids == [1]
    assert tok.add_bos is False
    assert tok.vocab_size == len(tok.tok.get_vocab(with_added_tokens=True)) > 3
    assert tok.template is None  # no nanoalign_template in the config


def test_tokenizer_config_content_form(tmp_path):
    config = {"bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"},
              "eos_token": {"content": "</s>"}, "pad_token": {"content": "<pad>"}, "add_bos_token": True}
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config=config))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 1, 2, True)


def test_special_tokens_map_used_and_tokenizer_config_wins(tmp_path):
    d = make_tokenizer_dir(tmp_path)
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<pad>",
                                                           "pad_token": {"content": "</s>"}}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 1)
    # tokenizer_config.json comes first: its eos wins, the map still supplies bos and pad
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_generation_config_eos_list_gives_stop_ids(tmp_path):
    d = make_tokenizer_dir(tmp_path, config={"eos_token": "</s>"})
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = Tokenizer.from_dir(d)
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert tok.stop_ids == [1, 2]
    # no pad anywhere: a filler that is neither eos nor bos
    assert tok.pad_id not in (0, 1)
    # the tokenizer's eos leads whatever the list's order (special_ids writes the list, transformers takes its first
    # entry as the eos)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert Tokenizer.from_dir(d).stop_ids == [1, 2]


def test_generation_config_eos_list_alone(tmp_path):
    d = make_tokenizer_dir(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "pad_token_id": 0}))
    tok = Tokenizer.from_dir(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 0, None)
    assert tok.stop_ids == [2, 1]


def test_config_json_ids(tmp_path):
    d = make_tokenizer_dir(tmp_path)
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "vocab_size": 50304}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == 2  # no unk in a byte-level BPE: the lowest id that is neither bos nor eos


def test_missing_tokenizer_json_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)


def test_no_eos_anywhere_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config={"bos_token": "<s>"}))


def test_config_token_missing_from_vocab_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="eos_token '<eos>' is not in"):
        Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config={"eos_token": "<eos>"}))


def test_config_token_that_is_not_a_string_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token must be a token string .*got 5 \(an id "
                                         r"goes in eos_token_id\)"):
        Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config={"eos_token": 5}))


def test_add_bos_from_post_processor(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config=STANDARD_CONFIG, bos_post_processor=True))
    assert tok.add_bos is True
    assert encode_prompt(tok, "Hi", "plain") == [0] + tok.encode("Hi")


def test_pad_never_equals_eos(tmp_path):
    # no pad token in the vocab at all
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "a", specials=("<s>", "</s>"),
                                                config={"bos_token": "<s>", "eos_token": "</s>"}))
    assert tok.pad_id not in (tok.eos_id, tok.bos_id)
    # a config that sets pad_token = eos_token (common in fine-tunes) is overridden
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "b", config={**STANDARD_CONFIG, "pad_token": "</s>"}))
    assert tok.eos_id == 1 and tok.pad_id != 1
    # a unk token is preferred as the filler over the lowest free id (2 here)
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "c", specials=("<s>", "</s>", "<mask>", "<unk>"),
                                                unk_token="<unk>", config={"eos_token": "</s>", "bos_token": "<s>"}))
    assert tok.pad_id == 3 and not tok.pad_is_text


def test_the_filler_pad_is_a_special_token_text_cannot_contain_when_there_is_one(tmp_path):
    """LLaMA-3 has no pad and no unk token but many reserved special ones: the filler is one of those, never an
    ordinary token such as '!' (id 0 of a byte-level vocabulary), which a reward model's config must not name as
    its pad (transformers would read a row ending in '!' one token early). A pad that is a stop id is replaced."""
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "a", specials=("<s>", "</s>", "<|reserved_0|>"),
                                                config={"bos_token": "<s>", "eos_token": "</s>"}))
    assert tok.pad_id == tok.tok.token_to_id("<|reserved_0|>") and not tok.pad_is_text
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "b", specials=("<s>", "</s>"),
                                                config={"bos_token": "<s>", "eos_token": "</s>"}))
    assert tok.pad_id == 2 and tok.pad_is_text  # nothing else: the lowest free id, an ordinary token
    (tmp_path / "b" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "pad_token_id": 3}))
    tok = Tokenizer.from_dir(tmp_path / "b")
    assert tok.stop_ids == [1, 3] and tok.pad_id not in (1, 3)  # pad = a stop id (<|eot_id|> as pad): replaced


# --- encode / decode / vocab / save


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_encode_adds_no_special_tokens_and_decode_skips_them(tok):
    ids = tok.encode("Paris")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "Paris"
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False) == "Paris</s>"


def test_check_vocab(tok):
    n = tok.vocab_size
    tok.check_vocab(n)
    tok.check_vocab(n + 128)  # Pythia-style padded embedding is fine
    with pytest.raises(ValueError, match=rf"vocab size {n}\b.*vocab size {n - 1}\b"):
        tok.check_vocab(n - 1)


def test_a_vocabulary_with_a_gap_in_its_ids_samples_up_to_its_largest_id(tmp_path):
    """tiktoken conversions leave holes (cl100k's special tokens start past one): vocab_size, the bound every
    sampler draws below, is the largest id + 1, not the count, or an EOS past the count could never be sampled
    and no answer would stop."""
    import torch

    from nanoalign.generate import generate
    from nanoalign.model import ModelConfig, Transformer

    words = {"<s>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "</s>": 9}  # ids 5..8 unused
    rust = RustTokenizer(models.WordLevel(words, unk_token="a"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.tok.get_vocab_size(with_added_tokens=True) == 6 and tok.vocab_size == 10 and tok.eos_id == 9
    model = Transformer(ModelConfig(vocab_size=16, dim=16, n_layer=1, n_head=2, hidden_dim=32, max_seq_len=64))
    torch.nn.init.zeros_(model.lm_head.weight)  # every id equally likely: the bound alone decides what is drawn
    gen = generate(model, [[1, 2]] * 64, 8, stop_ids=tok.stop_ids, pad_id=tok.pad_id, temperature=1.0,
                   vocab_size=tok.vocab_size, generator=torch.Generator().manual_seed(0))
    assert gen.stopped.any() and int(gen.tokens.max()) <= 9  # EOS drawn; nothing at or past 10


def test_save_round_trip(tok, tmp_path):
    tok.add_bos = True
    tok.stop_ids = [tok.eos_id, 7]
    tok.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (0, 1, 2, True)
    assert again.stop_ids == [1, 7]
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_save_keeps_the_sources_chat_template_and_other_config_keys(tmp_path):
    """save() rewrote tokenizer_config.json from nothing: a fine-tune of an instruct model lost its chat_template
    (transformers' apply_chat_template then failed on it), model_max_length and the rest."""
    chat = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    src = make_tokenizer_dir(tmp_path / "src", config={**STANDARD_CONFIG, "chat_template": chat,
                                                       "model_max_length": 4096, "nanoalign_template": "hh"})
    (src / "chat_template.jinja").write_text(chat + "\n")
    tok = Tokenizer.from_dir(src)
    tok.template = None  # a template changed after loading: the source's is not written back
    tok.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat and config["model_max_length"] == 4096 and "nanoalign_template" not in config
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == chat + "\n"
    hf = reference("transformers").AutoTokenizer.from_pretrained(tmp_path / "saved")
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False) == "<|user|>hi</s>"
    assert hf.model_max_length == 4096


@pytest.mark.parametrize("template", [None, "plain", "hh", "alpaca"])
def test_save_records_the_template(tok, tmp_path, template):
    tok.template = template
    tok.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config.get("nanoalign_template") == template and ("nanoalign_template" in config) == (template is not None)
    assert Tokenizer.from_dir(tmp_path / "saved").template == template


def test_unknown_template_is_refused_on_save_and_on_load(tok, tmp_path):
    tok.template = "chatml"
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        tok.save(tmp_path / "a")
    d = make_tokenizer_dir(tmp_path / "b", config={**STANDARD_CONFIG, "nanoalign_template": "chatml"})
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer_config.json'}: nanoalign_template 'chatml' is not a template"):
        Tokenizer.from_dir(d)


def test_malformed_tokenizer_files_name_the_file(tmp_path):
    d = make_tokenizer_dir(tmp_path / "a")
    (d / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n "pad_token": }')
    with pytest.raises(ValueError) as err:
        Tokenizer.from_dir(d)
    assert str(err.value) == f"{d / 'tokenizer_config.json'}: invalid JSON at line 2 column 15 (Expecting value)"
    (d / "tokenizer_config.json").write_text('["</s>"]')
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object, got a list"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500])  # a download cut short
    with pytest.raises(ValueError) as err:
        Tokenizer.from_dir(d)
    assert str(err.value).startswith(f"{d / 'tokenizer.json'}: not a readable tokenizer.json (")
    assert "\n" not in str(err.value)


def test_save_round_trip_keeps_filler_pad(tmp_path):
    d = make_tokenizer_dir(tmp_path / "a", specials=("<s>", "</s>"), config={"bos_token": "<s>", "eos_token": "</s>"})
    tok = Tokenizer.from_dir(d)
    tok.save(tmp_path / "b")
    assert Tokenizer.from_dir(tmp_path / "b").pad_id == tok.pad_id != tok.eos_id


@pytest.mark.parametrize("post_processor", [False, True])
def test_a_bos_added_by_the_flag_alone_is_added_by_transformers_after_saving(tmp_path, post_processor):
    """add_bos_token in tokenizer_config.json and no post-processor adding it (LlamaTokenizerFast rebuilt one from
    the flag): nanoalign adds BOS, and its saved directory, read by transformers' PreTrainedTokenizerFast, did
    not. A byte-level post-processor already there stays."""
    transformers = reference("transformers")
    src = make_tokenizer_dir(tmp_path / "src", config={**STANDARD_CONFIG, "add_bos_token": True})
    if post_processor:
        raw = RustTokenizer.from_file(str(src / "tokenizer.json"))
        raw.post_processor = processors.ByteLevel(trim_offsets=True)
        raw.save(str(src / "tokenizer.json"))
    tok = Tokenizer.from_dir(src)
    tok.save(tmp_path / "saved")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    again = Tokenizer.from_dir(tmp_path / "saved")
    for text in TEXTS:
        assert auto(text).input_ids == encode_prompt(tok, text, "plain") == encode_prompt(again, text, "plain")
        assert encode_prompt(tok, text, "plain")[0] == tok.bos_id and again.encode(text) == tok.encode(text)
    assert again.add_bos


def test_transformers_loads_saved_tokenizer(tok, tmp_path):
    transformers = reference("transformers")
    tok.template = "hh"  # the extra nanoalign_template key must not disturb transformers
    tok.save(tmp_path / "saved")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "saved" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for text in TEXTS + [format_prompt("Name a color.", "hh")]:
        assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


# --- templates


def test_format_prompt_exact_strings():
    assert format_prompt("Hi there", "plain") == "Hi there"
    assert format_prompt("Hi there", "hh") == "\n\nHuman: Hi there\n\nAssistant:"
    assert format_prompt("Name a color.", "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    # an AlpacaFarm prompt carries its input inline: kept verbatim, with the "paired with an input" preamble
    assert format_prompt("Translate.\n\n### Input:\nbonjour", "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate."
        "\n\n### Input:\nbonjour\n\n### Response:\n")
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        format_prompt("Hi", "chatml")


@pytest.mark.parametrize("template,prefix", [("plain", ""), ("hh", " "), ("alpaca", "")])
@pytest.mark.parametrize("add_bos", [False, True])
def test_encode_example_mask_covers_response_and_eos(tok, template, prefix, add_bos):
    tok.add_bos = add_bos
    prompt, response = "What is the capital of France?", "The capital of France is Paris."
    ids, mask = encode_example(tok, prompt, response, template)
    assert len(ids) == len(mask)
    n_prompt = mask.index(1)
    assert set(mask[:n_prompt]) == {0} and set(mask[n_prompt:]) == {1}
    assert ids[:n_prompt] == encode_prompt(tok, prompt, template)
    assert (ids[0] == tok.bos_id) == add_bos
    assert tok.decode(ids[:n_prompt]) == format_prompt(prompt, template)
    response_ids = [i for i, m in zip(ids, mask) if m]
    assert response_ids[-1] == tok.eos_id
    assert tok.decode(response_ids, skip_special_tokens=False) == prefix + response + "</s>"
    # the whole sequence reads as prompt + response: no text lost or added at the boundary
    assert tok.decode(ids) == format_prompt(prompt, template) + prefix + response


def test_empty_response_is_an_error(tok):
    for response in ("", "  \n"):
        with pytest.raises(ValueError, match="empty response"):
            encode_example(tok, "Hi", response, "hh")


def _sentencepiece_style(kind: str) -> Tokenizer:
    """A toy LLaMA-2-style tokenizer: every encoded text gets a dummy "▁" prefix."""
    from tokenizers import normalizers

    t = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if kind == "legacy":  # LLaMA-2's original tokenizer.json: a normalizer prepends "▁" and replaces spaces
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        # sentencepiece pieces never span a "▁" in the middle; this split keeps the toy's merges the same way
        t.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    else:  # the newer Metaspace form
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["Human: what is 12 plus 30?\n\nAssistant: 42 is the answer.", "Paris is the capital of France."] * 50
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    return Tokenizer(t, eos_id=t.token_to_id("</s>"), bos_id=t.token_to_id("<s>"), add_bos=True)


@pytest.mark.parametrize("kind", ["legacy", "metaspace"])
@pytest.mark.parametrize("template,response", [("hh", "42 is the answer."), ("alpaca", "Paris."),
                                               ("plain", " Paris is the capital.")])
def test_response_ids_are_those_of_the_full_text_for_sentencepiece_style(kind, template, response):
    tok = _sentencepiece_style(kind)
    prompt = "what is 12 plus 30?"
    ids, mask = encode_example(tok, prompt, response, template)
    full_text = format_prompt(prompt, template) + TEMPLATES[template].response_prefix + response
    full = [tok.bos_id] + tok.encode(full_text)
    n_prompt = mask.index(1)
    assert ids[:-1] == full  # the response ids are exactly those the model reads inside the full text
    assert tok.decode(ids[n_prompt:-1]).strip() == response.strip()


def test_a_second_model_must_read_the_same_vocabulary_and_template(tmp_path, tok):
    """PPO's reward model reads the policy's token ids: a different tokenizer.json is refused, naming the flag, and
    so is one trained on another template; the same one, one without a template, or none at all (taken on trust)
    passes."""
    same = make_tokenizer_dir(tmp_path / "same", config=STANDARD_CONFIG)
    tok.template = "hh"
    tok.check_reads_the_same(same, "--reward_model=same")
    (tmp_path / "bare").mkdir()
    tok.check_reads_the_same(tmp_path / "bare", "--reward_model=bare")
    other = make_tokenizer_dir(tmp_path / "other", specials=("<s>", "</s>", "<pad>", "<sep>"), config=STANDARD_CONFIG)
    with pytest.raises(ValueError, match=r"^--reward_model=other: its tokenizer differs from the policy's"):
        tok.check_reads_the_same(other, "--reward_model=other")
    alpaca = make_tokenizer_dir(tmp_path / "alpaca", config={**STANDARD_CONFIG, "nanoalign_template": "alpaca"})
    with pytest.raises(ValueError, match=r"^--reward_model=alpaca: it was trained on 'alpaca'-formatted text and "
                                         r"would read the policy's 'hh' prompts \(pass --template=alpaca"):
        tok.check_reads_the_same(alpaca, "--reward_model=alpaca")
    tok.template = "alpaca"
    tok.check_reads_the_same(alpaca, "--reward_model=alpaca")
    # the same vocabulary with another EOS, or adding a BOS the policy's rollouts do not start with
    for name, config in [("eos", {**STANDARD_CONFIG, "eos_token": "<pad>", "pad_token": "</s>"}),
                         ("bos", {**STANDARD_CONFIG, "add_bos_token": True})]:
        d = make_tokenizer_dir(tmp_path / name, config=config)
        with pytest.raises(ValueError, match=rf"^--reward_model={name}: its tokenizer's \(eos id, bos id, adds BOS\) "
                                             r"\(\d, 0, (True|False)\) differ from the policy's \(1, 0, False\)$"):
            tok.check_reads_the_same(d, f"--reward_model={name}")


def test_text_that_spells_a_special_token_is_text(tok):
    """'</s>' written in a response must not become the EOS id mid-answer (nor '<pad>' the pad): the ids of
    the special tokens come only from where they are put by hand."""
    for text in ("a</s>b", "<s> x <pad>"):
        ids = tok.encode(text)
        assert not set(ids) & {tok.bos_id, tok.eos_id, tok.pad_id} and tok.decode(ids) == text
    assert encode_response(tok, "a</s>b", "hh").count(tok.eos_id) == 1  # the one at the end


@pytest.mark.parametrize("config, message", [
    ({"eos_token_id": 100000}, "eos_token_id 100000 is not an id of its tokenizer.json"),  # never sampled
    ({"eos_token_id": [1, -3]}, "eos_token_id -3 is not an id"),
    ({"eos_token_id": 1, "pad_token_id": -1}, "pad_token_id -1 is not an id"),  # failed at the first padded batch
    ({"eos_token_id": 1, "bos_token_id": "1"}, "bos_token_id '1' is not an id"),
])
def test_special_ids_of_config_json_must_be_ids_of_the_tokenizer(tmp_path, config, message):
    make_tokenizer_dir(tmp_path)  # no tokenizer_config.json: the ids come from config.json
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"^{tmp_path}: {message}"):
        Tokenizer.from_dir(tmp_path)


def test_the_last_id_of_the_vocabulary_is_an_eos_and_the_next_is_not(tmp_path):
    """The bound is vocab_size (one past the largest id), exclusive."""
    make_tokenizer_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    n = Tokenizer.from_dir(tmp_path).vocab_size
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": n - 1}))
    assert Tokenizer.from_dir(tmp_path).eos_id == n - 1
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": n}))
    with pytest.raises(ValueError, match=rf"^{tmp_path}: eos_token_id {n} is not an id of its tokenizer\.json "
                                         rf"\(0 \.\. {n - 1}\)$"):
        Tokenizer.from_dir(tmp_path)


# --- found by mutation testing: behaviours the tests above did not pin


def test_config_json_eos_list_gives_stop_ids_without_a_generation_config(tmp_path):
    d = make_tokenizer_dir(tmp_path, config=STANDARD_CONFIG)
    (d / "config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    tok = Tokenizer.from_dir(d)
    assert tok.stop_ids == [1, 5]
    assert tok.special_ids() == {"bos_token_id": 0, "eos_token_id": [1, 5], "pad_token_id": 2}


def test_special_ids_state_a_single_eos_as_an_int(tok):
    assert tok.special_ids() == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


@pytest.mark.parametrize("kind", ["legacy", "metaspace"])
def test_continuation_that_starts_with_a_newline_keeps_it(kind):
    """encode_continuation encodes after a "\\n" anchor; when the text's first characters merge with the anchor (the
    toy's trained "\\n\\n" token) the anchor's ids are not a prefix, and the text must be encoded on its own rather
    than have its first token cut off."""
    tok = _sentencepiece_style(kind)
    anchor = tok.encode("\n")
    for text in ("\n42", "\nAssistant: 42"):
        assert tok.encode("\n" + text)[:len(anchor)] != anchor  # the merge this test is about
        assert tok.decode(tok.encode_continuation(text)) == text


def test_check_vocab_refuses_a_configured_pad_id_past_the_model(tmp_path):
    # a pad_token_id from config.json past the tokenizer's ids: the model must have a row for it (prompts are
    # padded with it), or the embedding lookup fails mid-run
    d = make_tokenizer_dir(tmp_path, config={"bos_token": "<s>", "eos_token": "</s>"})
    tok0 = Tokenizer.from_dir(d)
    (d / "config.json").write_text(json.dumps({"pad_token_id": tok0.vocab_size + 10}))
    tok = Tokenizer.from_dir(d)
    assert tok.pad_id == tok0.vocab_size + 10
    tok.check_vocab(tok0.vocab_size + 11)
    with pytest.raises(ValueError, match=rf"ids up to {tok0.vocab_size + 10}\)"):
        tok.check_vocab(tok0.vocab_size + 10)


def test_add_bos_from_a_sequence_post_processor_and_only_for_the_bos_token(tmp_path):
    """LLaMA-3's tokenizer.json post-processor is a Sequence (ByteLevel, then TemplateProcessing "<|begin_of_text|>
    $A"); a template that starts with another special token does not add BOS."""
    d = make_tokenizer_dir(tmp_path, config=STANDARD_CONFIG)
    rust = RustTokenizer.from_file(str(d / "tokenizer.json"))
    rust.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])])
    rust.save(str(d / "tokenizer.json"))
    assert Tokenizer.from_dir(d).add_bos is True
    rust.post_processor = processors.TemplateProcessing(single="<pad> $A", special_tokens=[("<pad>", 2)])
    rust.save(str(d / "tokenizer.json"))
    assert Tokenizer.from_dir(d).add_bos is False


def test_add_bos_without_a_bos_token_adds_nothing(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, config={"eos_token": "</s>", "add_bos_token": True}))
    assert tok.bos_id is None and tok.add_bos is False
    assert encode_prompt(tok, "Hi", "plain") == tok.encode("Hi")


def test_an_input_marker_changes_only_the_alpaca_template():
    prompt = "Translate.\n\n### Input:\nbonjour"
    assert format_prompt(prompt, "hh") == f"\n\nHuman: {prompt}\n\nAssistant:"
    assert format_prompt(prompt, "plain") == prompt
