"""The transformer: one network that is LLaMA-2 or GPT-NeoX/Pythia depending on a few config flags.

    LLaMA   : RMSNorm (float32) -> attention with RoPE and grouped-query heads -> RMSNorm -> SwiGLU MLP
    Pythia  : LayerNorm (bias)  -> attention with partial RoPE, biased linears  -> LayerNorm -> GELU MLP,
              optionally with the "parallel residual"  x + attn(ln1(x)) + mlp(ln2(x))

Checkpoints of both families are normalised into this one layout at load time (nanoalign/checkpoint.py),
so forward() has no per-family branches beyond the norm, the MLP and the residual wiring.

Gotchas pinned by tests (tests/test_model.py, tests/test_hf_parity.py):
- Rotary uses the "rotate-half" layout (dim i pairs with dim i + R/2), which is how Hugging Face stores
  LLaMA q/k weights. Meta's original checkpoints are interleaved; loading those without a permutation
  runs and produces fluent-looking garbage.
- Partial rotary (Pythia): only the first R = int(D * rotary_pct) dims of each head rotate, and the
  frequencies are computed for that slice's size R, not for D.
- Left-padded batches are exact only if positions count real tokens (cumsum(mask) - 1) and pads are
  hidden from every query. A pad *query* would then see no key at all (NaN from softmax), so every query
  may always see itself; pad rows produce finite garbage that callers mask out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 2048        # rows of the embedding (Pythia pads this past the tokenizer's vocabulary)
    dim: int = 256                # residual stream width C
    n_layer: int = 4
    n_head: int = 4               # query heads H
    n_kv_head: int | None = None  # key/value heads (GQA when < n_head); None means n_head
    head_dim: int | None = None   # D; None means dim // n_head
    hidden_dim: int = 688         # MLP inner width
    max_seq_len: int = 512        # context length (positions beyond it are refused)
    norm: str = "rmsnorm"         # "rmsnorm" (LLaMA) or "layernorm" (GPT-NeoX)
    norm_eps: float = 1e-5
    mlp: str = "swiglu"           # "swiglu" (LLaMA), "gelu" (exact, Pythia) or "gelu_tanh"
    attn_bias: bool = False       # biases on wq/wk/wv/wo (GPT-NeoX: True)
    mlp_bias: bool = False        # biases on the MLP linears (GPT-NeoX: True)
    rope_base: float = 10000.0
    rotary_pct: float = 1.0       # fraction of each head's dims that rotate (Pythia: 0.25)
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or Llama-3.1's {"rope_type": "llama3", ...}
    parallel_residual: bool = False
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix
    model_type: str = "llama"     # Hugging Face family, used when saving back ("llama" or "gpt_neox")

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim={self.dim} must be a multiple of n_head={self.n_head} (or head_dim given)")
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.rotary_dim % 2:
            raise ValueError(f"the rotary dimensions of a head (head_dim={self.head_dim} x rotary_pct="
                             f"{self.rotary_pct}) must be even: they rotate in pairs")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"unknown norm {self.norm!r}")
        if self.mlp not in ("swiglu", "gelu", "gelu_tanh"):
            raise ValueError(f"unknown mlp {self.mlp!r}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), the statistics in float32 even under bf16 (a bf16 mean of squares loses
        # the small components); cast back before the gain, as the reference implementation does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


def scale_inv_freq(inv_freq, scaling: dict | None):
    """Context-extension rescaling of the rotary frequencies.
    linear: every frequency / factor. llama3 (Llama-3.1): long wavelengths (beyond the original context /
    low_freq_factor) / factor, short ones (below original / high_freq_factor) kept, a linear blend between."""
    if not scaling:
        return inv_freq
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: long wavelength, 1: short
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_cos_sin(position_ids, rotary_dim: int, base: float, dtype, scaling: dict | None = None):
    """cos/sin tables for the given positions: (B, T) -> two (B, 1, T, R) tensors, R = rotary_dim."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim))
    inv_freq = scale_inv_freq(inv_freq, scaling)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, R/2)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: dim i and i + R/2 share a frequency
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate the first R dims of each head of x (B, H, T, D); the remaining D - R pass through."""
    R = cos.shape[-1]
    x_rot = x[..., :R]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2 :]
    out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return out if R == x.shape[-1] else torch.cat([out, x[..., R:]], dim=-1)


class KVCache:
    """Preallocated keys and values for every layer: (B, KV, max_len, D) each, filled left to right."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len

    def update(self, layer: int, start, k, v):
        """Write k, v (B, KV, T, D) at positions [start, start + T) and return everything up to there.

        start may instead be a one-element tensor holding the position (T = 1): the write then happens on
        the device and the whole buffer is returned, the same shapes at every step, which is what a CUDA
        graph needs (nanoalign/generate.py); the caller's mask must hide the positions not written yet."""
        if isinstance(start, torch.Tensor):  # (under autocast k, v are bf16; the slice writes below cast implicitly)
            self.k[layer].index_copy_(2, start, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, start, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, H * D, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, KV * D, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, KV * D, bias=cfg.attn_bias)
        self.wo = nn.Linear(H * D, cfg.dim, bias=cfg.attn_bias)

    def project_qkv(self, x):
        """The three input projections, (B, T, C) -> q (B, T, H*D), k, v (B, T, KV*D). A method of its own so
        that the CPU sampler can run them as one matmul on prepacked weights (nanoalign/generate.py)."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start_pos: int):
        B, T, _ = x.shape
        H, KV, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)  # (B, KV, S, D), S = start_pos + T
        # mask None: plain causal attention over unpadded rows (the fast kernel); a single new token
        # needs no mask at all, it sees every cached position
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=KV != H
        )  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.gate = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def project_in(self, x):
        """(gate, up) projections of x, gate None for the GELU MLPs (a seam for the CPU sampler, as in Attention)."""
        return (self.gate(x) if self.kind == "swiglu" else None), self.up(x)

    def forward(self, x):
        gate, up = self.project_in(x)
        if self.kind == "swiglu":
            return self.down(F.silu(gate) * up)
        approximate = "tanh" if self.kind == "gelu_tanh" else "none"
        return self.down(F.gelu(up, approximate=approximate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, start_pos):
        attn_out = self.attn(self.attn_norm(x), cos, sin, mask, cache, start_pos)
        if self.parallel:
            return x + attn_out + self.mlp(self.mlp_norm(x))
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x))


def attention_mask_4d(attention_mask, T: int, start_pos: int):
    """Boolean SDPA mask (B, 1, T, S) from a key padding mask (B, S), S = start_pos + T, for queries at
    key positions start_pos .. start_pos + T - 1: causal, pads hidden, and each query always sees itself."""
    S = attention_mask.shape[1]
    q_idx = torch.arange(start_pos, start_pos + T, device=attention_mask.device)[:, None]
    k_idx = torch.arange(S, device=attention_mask.device)[None, :]
    causal = k_idx <= q_idx  # (T, S)
    visible = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    visible = visible | (k_idx == q_idx)[None]
    return visible[:, None]  # (B, 1, T, S)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        # the same Parameter object in both places; assigning a new Parameter to one side unties them
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (GPT-2 style: residual projections scaled by depth)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm gains
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "down.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                start_pos: int = 0, return_hidden: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or the final hidden states (B, T, C) after the final norm
        with return_hidden=True (for reward/value heads and embeddings).

        attention_mask (B, start_pos + T): 1 for real tokens, 0 for pads, covering the cached prefix too.
        position_ids (B, T): default counts real tokens (cumsum(mask) - 1), or start_pos.. without a mask.
        cache/start_pos: decode with a KVCache, the new tokens sitting at cache positions start_pos.. .
        """
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(start_pos, start_pos + T, device=input_ids.device).expand(B, T)
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than the context length {self.cfg.max_seq_len}")
        mask = None  # plain causal attention: no pads, and no cached prefix unless one token is decoded
        if attention_mask is not None or (start_pos > 0 and T > 1):
            if attention_mask is None:
                attention_mask = torch.ones(B, start_pos + T, dtype=torch.long, device=input_ids.device)
            mask = attention_mask_4d(attention_mask, T, start_pos)

        x = self.tok_emb(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_base, x.dtype, self.cfg.rope_scaling)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, start_pos)
        x = self.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
