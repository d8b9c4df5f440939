"""The reward model: the transformer with a scalar head instead of the LM head (Bradley-Terry, InstructGPT).

    rm = RewardModel.from_causal_lm("out/sft/model")      # the SFT model's trunk + a fresh N(0, 1/sqrt(d+1)) head
    rm = RewardModel.from_pretrained("out/rm/model")      # a trained one (ours, or a HF *ForSequenceClassification)
    scores = rm(input_ids, attention_mask)                # (B,) one score per sequence
    values = rm(input_ids, attention_mask, per_token=True)  # (B, T) the head at every position (PPO's critic)

r(x, y) = w . h_last + offset, where h_last is the final hidden state (after the final norm) at the last real
token of prompt + response: the EOS when the response ended. Trained on pairs with the Bradley-Terry loss
-log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback"; losses.bt_loss). The head starts as w ~ N(0, std = 1/sqrt(d + 1)): with
normalised hidden states the first scores are of order 1 whatever the width d.

Decisions and gotchas (docs/methods.md "## 2. Reward model"):
- The score is read at the last position where attention_mask == 1, so the same sequence scores the same
  right-padded, left-padded or alone (positions count real tokens, pads are hidden from attention). Never read
  it at the last column of a right-padded batch: that is a pad.
- The offset is a constant added to every score and never trained (the Bradley-Terry loss only sees
  differences, so it cannot learn one). After training it is set so that the mean score of the SFT reference
  answers is 0 ("normalise on demonstrations"): a score > 0 means "better than the average demonstration", and
  a fixed penalty for a response with no EOS (e.g. -1 in PPO) has a known scale. It is saved in config.json as
  "nanoalign_reward_offset"; transformers does not know it (its scores are ours minus the offset).
- transformers' *ForSequenceClassification finds "the last token" differently: the rightmost token that is not
  pad_token_id. A model we train from a causal LM reads the last ATTENDED token (the mask), and we save it with
  the tokenizer's pad id, which never sits on an attended token, so transformers reads the same one; a pad that
  text can contain (Tokenizer.pad_is_text, a filler for want of a special token) is left out of config.json
  rather than let transformers read a row ending in it one token early.
- A reward checkpoint loaded from disk is read where transformers reads it: the last attended token that is not
  its config's pad_token_id (`read_before`). That matters for the common TRL set-up pad = EOS: such a model was
  trained on the token before the trailing EOS, and reading the EOS would score a position it never learned.
  The id is saved back as pad_token_id, so the convention survives a fine-tune.
- The checkpoint is transformers' layout (model.* / gpt_neox.* tensors + score.weight of shape (1, dim)), so
  AutoModelForSequenceClassification loads it, and a HF reward model with num_labels = 1 loads here.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import (IGNORED_SUFFIXES, atomic_write_dir, config_from_hf, config_to_hf, copy_tensors, hf_names,
                         hf_state_dict, load_pretrained, model_config, open_tensors, read_config, resolve_dir,
                         tensor_files)
from .model import ModelConfig, Transformer

OFFSET_KEY = "nanoalign_reward_offset"  # config.json key of the offset (transformers ignores unknown keys)
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification"}
HEAD_INITS = ("normal", "zeros")


def trunk_names(cfg: ModelConfig) -> dict:
    """HF tensor name -> trunk parameter name, without any LM head (hf_names lists none for a tied config)."""
    return hf_names(replace(cfg, tie_embeddings=True))


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig, offset: float = 0.0, read_before: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.read_before = read_before  # a token id the score is never read at (a loaded config's pad_token_id)
        self.trunk = Transformer(cfg)
        # the scores come from self.score: a vocab x dim LM head would be dead weight (and dead optimizer state)
        self.trunk.lm_head = None
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        self.offset = float(offset)  # added to every score; set by set_offset_to_zero_mean, not trained
        self.init_head()

    @torch.no_grad()
    def init_head(self, head_init: str = "normal", generator: torch.Generator | None = None) -> None:
        """normal: w ~ N(0, 1/sqrt(d + 1)) (a reward model); zeros: w = 0 (a PPO critic with no reward model
        to start from: every value 0)."""
        if head_init == "normal":
            self.score.weight.normal_(0.0, 1.0 / math.sqrt(self.cfg.dim + 1), generator=generator)
        elif head_init == "zeros":
            self.score.weight.zero_()
        else:
            raise ValueError(f"head_init={head_init!r}: choose one of {', '.join(HEAD_INITS)}")

    def forward(self, input_ids, attention_mask=None, per_token: bool = False):
        """input_ids (B, T) -> scores (B,) read at each row's last real token, or with per_token=True the
        values (B, T) at every position. attention_mask (B, T): 1 for real tokens; without it every token is
        real, so the last column is read (the last one that is not read_before's token, when the model has one)."""
        h = self.trunk(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, C)
        values = self.score(h).squeeze(-1).float() + self.offset  # (B, T)
        if per_token:
            return values
        B, T = input_ids.shape
        if attention_mask is None and self.read_before is None:
            return values[:, -1]
        # the last attended position of each row, for right and left padding alike (and not read_before's token)
        readable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self.read_before is not None:
            readable = readable & (input_ids != self.read_before)
        last = (torch.arange(T, device=input_ids.device) * readable.long()).argmax(-1)  # (B,)
        return values.gather(1, last[:, None]).squeeze(1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- loading

    @classmethod
    def from_pretrained(cls, path_or_hub_id, device="cpu", dtype=torch.float32) -> "RewardModel":
        """A sequence-classification checkpoint with one label (ours, or transformers' Llama/GPTNeoX
        ...ForSequenceClassification), strictly: every tensor found once with its shape, nothing else."""
        ckpt = resolve_dir(path_or_hub_id)
        cfg, offset, names, files = _reward_layout(ckpt)
        with torch.device("meta"):
            # casting on meta costs nothing; to_empty then allocates once
            model = cls(cfg, offset, _read_before(ckpt)).to(dtype)
        model.to_empty(device=device)
        copy_tensors(dict(model.named_parameters()), names, files, cfg.n_head, ckpt, device, dtype)
        return model.eval()

    @classmethod
    def from_causal_lm(cls, path_or_hub_id, head_init: str = "normal", device="cpu", dtype=torch.float32,
                       generator: torch.Generator | None = None) -> "RewardModel":
        """The trunk of a causal LM checkpoint (the SFT model) with a new head: "normal" for a reward model,
        "zeros" for a PPO critic that has no reward model to start from. The LM head is dropped."""
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init={head_init!r}: choose one of {', '.join(HEAD_INITS)}")
        ckpt = resolve_dir(path_or_hub_id)
        if is_reward_checkpoint(ckpt):
            raise ValueError(f"{ckpt} is already a reward model (it has score.weight): load it with "
                             f"RewardModel.from_pretrained")
        trunk = load_pretrained(ckpt, device=device, dtype=dtype)  # strict loading of the causal LM
        with torch.device("meta"):
            model = cls(trunk.cfg)
        trunk.lm_head = None
        model.trunk = trunk
        model.score = nn.Linear(trunk.cfg.dim, 1, bias=False, device=device, dtype=dtype)
        model.init_head(head_init, generator)
        return model.eval()

    @classmethod
    def from_config(cls, path_or_hub_id) -> "RewardModel":
        """The model a checkpoint (a reward model, or a causal LM to start one from) would load into, with its
        offset, weights not read: build it under torch.device("meta") to allocate nothing."""
        ckpt = resolve_dir(path_or_hub_id)
        if is_reward_checkpoint(ckpt):
            cfg, offset, _, _ = _reward_layout(ckpt)
            return cls(cfg, offset, _read_before(ckpt))
        return cls(model_config(ckpt))

    # --- saving

    def write_pretrained(self, out_dir, tokenizer=None, state_dict: dict | None = None) -> Path:
        """config.json + model.safetensors (+ the tokenizer) in transformers' sequence-classification layout,
        into the existing directory out_dir, one safetensors file (not sharded). Not atomic: save_pretrained (or
        train.save_checkpoint) wraps it. state_dict: the full state to write instead (names as in
        self.state_dict()), e.g. gathered from FSDP shards."""
        out_dir = Path(out_dir)
        state = state_dict if state_dict is not None else self.state_dict()
        trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
        tensors = hf_state_dict(replace(self.cfg, tie_embeddings=True), trunk)  # the trunk only, no LM head
        tensors["score.weight"] = state["score.weight"].detach().contiguous().cpu()  # (1, dim)
        hf_config = config_to_hf(self.cfg, tensors["score.weight"].dtype)
        hf_config.update({"architectures": [ARCHITECTURES[self.cfg.model_type]],
                          "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})  # num_labels = 1
        if tokenizer is not None:  # pad_token_id: how transformers finds the last token of a padded row
            hf_config.update(tokenizer.special_ids())
            if tokenizer.pad_is_text:  # transformers would step over that token in text: name no pad at all
                hf_config["pad_token_id"] = None
        if self.read_before is not None:  # where this model was trained to be read, kept
            hf_config["pad_token_id"] = self.read_before
        hf_config[OFFSET_KEY] = self.offset
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(out_dir)
        return out_dir

    def save_pretrained(self, out_dir, tokenizer=None) -> Path:
        """write_pretrained into a temporary directory renamed into place (atomic)."""
        return atomic_write_dir(out_dir, lambda tmp: self.write_pretrained(tmp, tokenizer))


def set_offset_to_zero_mean(rm: RewardModel, score_sum: float, count: int) -> float:
    """Shift rm.offset so that responses whose current scores sum to score_sum over count responses (the SFT
    reference answers, scored with the current offset) get a mean score of 0. Returns the new offset."""
    if count < 1:
        raise ValueError("set_offset_to_zero_mean needs at least one scored response")
    rm.offset = float(rm.offset - float(score_sum) / count)
    return rm.offset


# --- checkpoint layout

def is_reward_checkpoint(path_or_hub_id) -> bool:
    """Does the checkpoint hold a scalar head (score.weight)? Otherwise it is a causal LM."""
    return "score.weight" in tensor_files(resolve_dir(path_or_hub_id))


def _read_before(ckpt: Path) -> int | None:
    """The token transformers never reads a reward checkpoint's score at: its config's pad_token_id."""
    pad = read_config(ckpt).get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)):
        raise ValueError(f"{ckpt / 'config.json'}: pad_token_id must be a token id, got {pad!r}")
    return pad


def _reward_layout(ckpt: Path):
    """(ModelConfig, offset, {HF name -> our parameter name(s)}, {HF name -> file}) of a reward checkpoint,
    checked: one label, every tensor present, nothing unknown."""
    hf = read_config(ckpt)
    where = ckpt / "config.json"
    files = tensor_files(ckpt)
    architectures = hf.get("architectures") or []
    if "score.weight" not in files:
        raise ValueError(f"{ckpt} has no score.weight, so it is not a reward model "
                         f"({', '.join(architectures) or 'a causal LM'}); start one from it with "
                         f"RewardModel.from_causal_lm (train_rm.py --init does)")
    if not all(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{where}: architectures {architectures} with a score.weight tensor; a reward model is "
                         f"a {' or '.join(ARCHITECTURES.values())}")
    # transformers counts the labels of id2label, and assumes 2 when config.json lists none
    num_labels = hf["num_labels"] if "num_labels" in hf else len(hf["id2label"]) if hf.get("id2label") else 2
    with open_tensors(files["score.weight"]) as f:
        head_shape = list(f.get_slice("score.weight").get_shape())
    if num_labels != 1 or head_shape[0] != 1:
        raise ValueError(f"{where}: num_labels is {num_labels} (score.weight {head_shape} in "
                         f"{files['score.weight'].name}); a reward model has num_labels 1, one score per sequence")
    emb = "model.embed_tokens.weight" if hf["model_type"] == "llama" else "gpt_neox.embed_in.weight"
    if emb not in files:
        raise KeyError(f"missing tensor {emb} in {ckpt}")
    with open_tensors(files[emb]) as f:
        rows = list(f.get_slice(emb).get_shape())[0]
    if hf.get("vocab_size") is not None and hf["vocab_size"] != rows:
        raise ValueError(f"{where}: vocab_size {hf['vocab_size']} disagrees with the {rows} rows of {emb} "
                         f"in {files[emb]}")
    cfg = config_from_hf(hf, vocab_size=rows, where=where)
    offset = hf.get(OFFSET_KEY, 0.0)
    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
        raise ValueError(f"{where}: {OFFSET_KEY} must be a finite number, got {offset!r}")

    names = {k: tuple(f"trunk.{n}" for n in v) if isinstance(v, tuple) else f"trunk.{v}"
             for k, v in trunk_names(cfg).items()}
    names["score.weight"] = "score.weight"
    missing = [k for k in names if k not in files]
    unexpected = [f"{k} (in {files[k].name})" for k in files if k not in names and not k.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise KeyError(f"reward checkpoint {ckpt} is missing tensors: {', '.join(missing)}")
    if unexpected:
        raise KeyError(f"reward checkpoint {ckpt} has unexpected tensors: {', '.join(unexpected)}")
    return cfg, float(offset), names, files
