"""Tokenizer wrapper and prompt templates.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust library, not transformers) and
resolves the special ids a model directory declares: BOS, EOS, PAD and the stop ids. The templates
turn a (prompt, response) pair into token ids plus a response mask: the tokens the SFT loss trains.

Gotchas:
- Pad != EOS. When padding is masked and pad == EOS, the EOS leaves the loss and the model never
  learns to stop. A tokenizer without a pad token (LLaMA, Pythia) gets a distinct filler id (unk,
  else a special token, else the lowest id that is neither a stop id nor BOS); it is never trained on
  because the collator masks it.
- The response mask covers the response tokens AND the EOS that ends them.
- A model answers well only in the template it was trained with. `tok.template` (a TEMPLATES name, or
  None) is saved as "nanoalign_template" in tokenizer_config.json (transformers ignores the key) and
  read back by from_dir, so `python -m nanoalign.generate` formats prompts the way training did.
- Prompt and response are tokenized separately, so the boundary is exact, and the response is encoded
  as a continuation (`encode_continuation`): SentencePiece-style tokenizers (LLaMA-2) prepend a "▁" to
  every text they encode, which would put a token at the start of each response that the model never
  sees after a prompt. Encoding after a newline anchor and dropping the anchor's ids gives the ids of
  the response as they appear inside the full text, for byte-level BPE (GPT-2, Pythia, LLaMA-3) and
  SentencePiece alike.
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import tokenizers.processors

from .checkpoint import read_json

# Where from_dir looks for special tokens, first match wins. The first two give token strings,
# the last two give ids.
_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_ID_FILES = ("generation_config.json", "config.json")


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, stop_ids: list[int] | None = None,
                 template: str | None = None, config: dict | None = None, chat_template: str | None = None):
        # text is only text: "</s>" written in a response is its characters, not the EOS id (tokenizers would read
        # a special token's text as the token, as transformers does unless split_special_tokens=True); the ids of
        # BOS, EOS and the pads are put in by hand (encode_prompt, encode_response, collate)
        tok.encode_special_tokens = True
        self.tok = tok
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        # eos first, then extra stop ids (LLaMA-3 instruct stops on <|eot_id|> as well)
        self.stop_ids = list(dict.fromkeys([eos_id] + list(stop_ids or [])))
        # a pad that is a stop id (pad = eos, common in fine-tunes) would read as the end of every padded row
        self.pad_id = pad_id if pad_id is not None and pad_id not in self.stop_ids else self._filler_pad_id()
        self.template = template  # the prompt template the model was trained with (saved with it), or None
        # what save() writes back beside the keys it manages: the source's tokenizer_config.json (its chat_template,
        # model_max_length, ...) and chat_template.jinja, so a fine-tune of an instruct model keeps its chat format
        self.config = dict(config or {})
        self.chat_template = chat_template

    def _filler_pad_id(self) -> int:
        """A pad id that is no stop id and not BOS: the unk token if there is one, else a special token of the
        vocabulary (LLaMA-3's reserved ones), which no text contains, else the lowest free id, an ordinary token
        (pad_is_text: a reward model's config must not name it, see reward.py)."""
        for i in self._non_text_ids() + list(range(self.vocab_size)):
            if i not in (*self.stop_ids, self.bos_id):
                return i
        raise ValueError(f"vocab of size {self.vocab_size} has no id left for padding besides eos/bos")

    def _non_text_ids(self) -> list[int]:
        """The ids no text is tokenized into: the unk token's (if any), then the special tokens', ascending."""
        unk = getattr(self.tok.model, "unk_token", None)
        unk_id = self.tok.token_to_id(unk) if unk else None
        special = sorted(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)
        return ([unk_id] if unk_id is not None else []) + special

    @property
    def pad_is_text(self) -> bool:
        """Is the pad id an ordinary token, one that text can contain (a filler chosen for want of another)?"""
        return self.pad_id not in self._non_text_ids()

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found: nanoalign needs a fast-tokenizer tokenizer.json "
                                    "(convert a sentencepiece model once with transformers and save it)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a bare Exception that does not name the file
            raise ValueError(f"{tok_file}: not a readable tokenizer.json ({e})") from None
        configs = {name: _read_json(path / name) for name in _TOKEN_FILES + _ID_FILES}
        ids = {}
        for kind in ("bos", "eos", "pad"):
            ids[kind] = _special_id(tok, configs, kind, path)
        if ids["eos"] is None:
            raise ValueError(f"no eos token found in {path} (looked in {', '.join(_TOKEN_FILES + _ID_FILES)})")
        add_bos = configs["tokenizer_config.json"].get("add_bos_token")
        if add_bos is None:
            # LLaMA-3 has no add_bos_token flag: its tokenizer.json post-processor prepends BOS instead
            add_bos = _post_processor_adds_bos(json.loads(tok_file.read_text()), ids["bos"], tok)
        stop_ids = [i for name in _ID_FILES for i in _as_list(configs[name].get("eos_token_id"))]
        template = configs["tokenizer_config.json"].get("nanoalign_template")
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"{path / 'tokenizer_config.json'}: nanoalign_template {template!r} is not a template; "
                             f"choose one of {sorted(TEMPLATES)}")
        jinja = path / "chat_template.jinja"
        made = cls(tok, ids["eos"], ids["bos"], ids["pad"], bool(add_bos), stop_ids, template,
                   config=configs["tokenizer_config.json"], chat_template=jinja.read_text() if jinja.is_file() else None)
        for kind, i in [(kind, ids[kind]) for kind in ("bos", "eos", "pad")] + [("eos", i) for i in stop_ids]:
            # an id past the vocabulary is never sampled (an EOS there never stops a row); a negative one fails
            # at the first padded batch. The pad may lie past it: a model may have more rows than the tokenizer ids
            if i is not None and not (type(i) is int and 0 <= i and (kind == "pad" or i < made.vocab_size)):
                raise ValueError(f"{path}: {kind}_token_id {i!r} is not an id of its tokenizer.json (0 .. "
                                 f"{made.vocab_size - 1}{' or a model row past them' if kind == 'pad' else ''})")
        return made

    @functools.cached_property
    def vocab_size(self) -> int:
        """One more than the largest id: the ids this tokenizer can produce are all below it, so the samplers draw
        from [0, vocab_size). Not the number of tokens: a vocabulary with gaps in its ids (converted from tiktoken,
        whose special tokens sit past a hole) has ids beyond its count, its EOS among them. Computed once (it reads
        the whole vocabulary; every sampling call asks for it)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """ids of `text` as it is tokenized when it follows other text (no dummy "▁" prefix)."""
        anchor = self.encode("\n")
        ids = self.encode("\n" + text)
        if ids[:len(anchor)] == anchor:
            return ids[len(anchor):]
        return self.encode(text)  # the anchor merged with the text's first characters

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def check_vocab(self, model_vocab_size: int) -> None:
        """A model may have MORE rows than the tokenizer has ids (Pythia pads to a multiple of 128), never fewer."""
        max_id = max(self.vocab_size - 1, self.pad_id)
        if max_id >= model_vocab_size:
            raise ValueError(f"tokenizer vocab size {max_id + 1} (ids up to {max_id}) does not fit the model's "
                             f"vocab size {model_vocab_size}: wrong tokenizer for this checkpoint?")

    def check_reads_the_same(self, model_dir, flag: str) -> None:
        """A second model that reads this tokenizer's ids (PPO's reward model reads the policy's rollouts) must have
        been trained with the same vocabulary, and on text in the same template (this one's .template) when both
        are known; one saved without a tokenizer.json is taken on trust. flag: the option that named model_dir,
        for the error (e.g. "--reward_model=out/rm/model")."""
        if not (Path(model_dir) / "tokenizer.json").exists():
            return
        other = Tokenizer.from_dir(model_dir)
        if other.tok.get_vocab() != self.tok.get_vocab():
            raise ValueError(f"{flag}: its tokenizer differs from the policy's, whose token ids it would read")
        mine, its = ((t.eos_id, t.bos_id, t.add_bos) for t in (self, other))
        if its != mine:  # it would score rollouts ending in another EOS, or starting with a BOS it never saw
            raise ValueError(f"{flag}: its tokenizer's (eos id, bos id, adds BOS) {its} differ from the policy's "
                             f"{mine}")
        if other.template and self.template and other.template != self.template:
            raise ValueError(f"{flag}: it was trained on {other.template!r}-formatted text and would read the policy's "
                             f"{self.template!r} prompts (pass --template={other.template}, or a reward model "
                             f"trained on {self.template!r})")

    def save(self, dir: str | Path) -> None:
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        tok, name = self.tok, self.tok.id_to_token
        if self.add_bos and not _post_processor_adds_bos(json.loads(tok.to_str()), self.bos_id, tok):
            # add_bos_token in tokenizer_config.json alone: transformers' PreTrainedTokenizerFast, the class written
            # below, would not add the BOS this model was trained after (LlamaTokenizerFast rebuilt the
            # post-processor from the flag). A post-processor that adds it makes the saved directory say so itself
            tok = tokenizers.Tokenizer.from_str(tok.to_str())
            bos = name(self.bos_id)
            template = tokenizers.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                special_tokens=[(bos, self.bos_id)])
            tok.post_processor = template if tok.post_processor is None else \
                tokenizers.processors.Sequence([tok.post_processor, template])
        tok.save(str(dir / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "nanoalign_template"}  # the source's other keys
        config |= {
            # lets transformers.AutoTokenizer load the same directory
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id) if self.bos_id is not None else None,
            "eos_token": name(self.eos_id),
            "pad_token": name(self.pad_id),
            "add_bos_token": self.add_bos,
        }
        if self.template is not None:
            _template(self.template)  # an unknown name fails now, not when the checkpoint is read back
            config["nanoalign_template"] = self.template
        (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.chat_template is not None:
            (dir / "chat_template.jinja").write_text(self.chat_template)
        (dir / "generation_config.json").write_text(json.dumps(self.special_ids(), indent=2) + "\n")

    def special_ids(self) -> dict:
        """The ids as config.json / generation_config.json state them (what transformers' generate stops on)."""
        eos = self.stop_ids if len(self.stop_ids) > 1 else self.eos_id
        return {"bos_token_id": self.bos_id, "eos_token_id": eos, "pad_token_id": self.pad_id}


def _read_json(path: Path) -> dict:
    """A config file's JSON object, {} when the file is absent; an error names the file, line and column."""
    return read_json(path) if path.is_file() else {}


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, list) else [x]


def _special_id(tok, configs: dict, kind: str, path: Path) -> int | None:
    """Id of the `kind` ("bos"/"eos"/"pad") token from the first config file that names it."""
    for name in _TOKEN_FILES:
        token = configs[name].get(f"{kind}_token")
        if isinstance(token, dict):  # {"content": "</s>", "lstrip": false, ...}
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"{path / name}: {kind}_token must be a token string (or {{\"content\": ...}}), got "
                             f"{token!r} (an id goes in {kind}_token_id)")
        if token:
            i = tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{path / name}: {kind}_token {token!r} is not in tokenizer.json's vocab")
            return i
    for name in _ID_FILES:
        ids = _as_list(configs[name].get(f"{kind}_token_id"))
        if ids:
            return ids[0]
    return None


def _post_processor_adds_bos(tok_json: dict, bos_id: int | None, tok) -> bool:
    if bos_id is None:
        return False
    procs = [tok_json.get("post_processor") or {}]
    procs += procs[0].get("processors", [])  # a "Sequence" post-processor (LLaMA-3: ByteLevel + Template)
    for proc in procs:
        first = (proc.get("single") or [{}])[0] if proc.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first and tok.token_to_id(first["SpecialToken"]["id"]) == bos_id:
            return True
    return False


# --- templates


@dataclass(frozen=True)
class Template:
    prompt_format: str                   # "{prompt}" is replaced by the prompt text
    response_prefix: str = ""            # text put before the response, tokenized with it
    prompt_format_with_input: str = ""   # used instead when the prompt contains INPUT_MARKER (Alpaca)


INPUT_MARKER = "\n\n### Input:\n"
_ALPACA_INSTRUCTION = "### Instruction:\n{prompt}\n\n### Response:\n"

TEMPLATES: dict[str, Template] = {
    "plain": Template("{prompt}"),
    # Anthropic HH-RLHF: a multi-turn prompt keeps its inner turns verbatim, see data.read_hh
    "hh": Template("\n\nHuman: {prompt}\n\nAssistant:", " "),
    # Stanford Alpaca's two preambles. Departs from stanford_alpaca in one way: "### Response:" is
    # followed by "\n" (as in alpaca-lora and most later Alpaca fine-tunes).
    "alpaca": Template(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n" + _ALPACA_INSTRUCTION,
        "",
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n" + _ALPACA_INSTRUCTION,
    ),
}


def _template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def format_prompt(prompt: str, template: str) -> str:
    t = _template(template)
    fmt = t.prompt_format_with_input if t.prompt_format_with_input and INPUT_MARKER in prompt else t.prompt_format
    return fmt.format(prompt=prompt)


def encode_prompt(tok: Tokenizer, prompt: str, template: str) -> list[int]:
    bos = [tok.bos_id] if tok.add_bos else []
    return bos + tok.encode(format_prompt(prompt, template))


def encode_response(tok: Tokenizer, response: str, template: str) -> list[int]:
    """The response's ids as the model must produce them: template prefix + response + EOS."""
    if not response.strip():
        raise ValueError("empty response: nothing to train on (drop the example instead)")
    return tok.encode_continuation(_template(template).response_prefix + response) + [tok.eos_id]


def encode_example(tok: Tokenizer, prompt: str, response: str, template: str) -> tuple[list[int], list[int]]:
    prompt_ids = encode_prompt(tok, prompt, template)
    response_ids = encode_response(tok, response, template)
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)
