"""Load and save Hugging Face checkpoints (LLaMA and GPT-NeoX/Pythia) in nanoalign's one internal layout.

    load_pretrained(path_or_hub_id, device=..., dtype=...) -> Transformer
    save_pretrained(model, dir, tokenizer=None, max_shard_bytes=...)

A checkpoint directory is config.json + model.safetensors, or + model.safetensors.index.json and shards
(tensors of one layer may sit in different shards). Loading is strict: every expected tensor must be
found exactly once with the expected shape, and anything else is an error naming the tensor and its file.
A corrupt or truncated safetensors file, invalid JSON, a missing config key or a config vocab_size that
disagrees with the embedding is a one-line ValueError naming the file (and the line, key or tensor).

Gotchas:
- GPT-NeoX fuses q, k, v into one `query_key_value` matrix whose rows are interleaved per head
  ([h0:q, h0:k, h0:v, h1:q, ...]). `chunk(3)` on it runs and is wrong; we view it as (H, 3, D, C).
- HF LLaMA q/k are already in the rotate-half rotary layout nanoalign uses: no permutation.
- Pythia pads the embedding past its tokenizer, so the vocabulary size is read from the tensor.
- Tensors are read one at a time into a model allocated once (built on the meta device first), so peak
  memory is one model plus one tensor, not two models.
- Saving writes into a temporary directory and renames it into place: a crash mid-save never destroys
  the checkpoint that was there before.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cli import json_reason
from .model import ModelConfig, Transformer

SUPPORTED = ("llama", "gpt_neox")
# buffers some older checkpoints store that carry no weights (causal masks, rotary tables)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- config.json <-> ModelConfig

ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope(hf: dict, key_base: str, key_pct: str | None = None):
    """(base, partial-rotary fraction, scaling) from the classic keys (rope_theta, rope_scaling) or from
    transformers' newer rope_parameters. transformers' order: the parameters are rope_scaling, else
    rope_parameters, and a rope_theta / partial_rotary_factor in them wins over the top-level key (a config
    holding both, disagreeing, is read as transformers reads it)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type != "default" and rope_type not in ROPE_SCALING_KEYS:
        raise NotImplementedError(f"config.json asks for rope scaling {rope_type!r}; nanoalign implements "
                                  f"default, {', '.join(ROPE_SCALING_KEYS)}")
    rope_scaling = None
    if rope_type == "llama3":  # the pretraining length: a top-level key wins, else the context length (transformers)
        pretrained = hf.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings",
                                                                             hf.get("max_position_embeddings")))
        scaling = {**scaling, "original_max_position_embeddings": pretrained}
    if rope_type != "default":
        if missing := [k for k in ROPE_SCALING_KEYS[rope_type] if scaling.get(k) is None]:
            raise KeyError(f"rope_scaling.{missing[0]}")  # config_from_hf names the file
        rope_scaling = {"rope_type": rope_type, **{k: scaling[k] for k in ROPE_SCALING_KEYS[rope_type]}}
    base = scaling.get("rope_theta", hf.get(key_base, 10000.0))
    pct = scaling.get("partial_rotary_factor", hf.get(key_pct)) if key_pct else None
    return float(base), pct, rope_scaling


def config_from_hf(hf: dict, vocab_size: int, where="config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json's dict (read_config checked its keys' types). A missing key or
    a value the model cannot be built with is a ValueError or KeyError naming `where` and the key."""
    try:
        return _config_from_hf(hf, vocab_size)
    except KeyError as e:
        raise KeyError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ValueError(f"{where}: {e}") from None


def _config_from_hf(hf: dict, vocab_size: int) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llama config with hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
        base, _, scaling = _rope(hf, "rope_theta")
        return ModelConfig(
            vocab_size=vocab_size, dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu", attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            rope_base=base, rope_scaling=scaling, rotary_pct=1.0, parallel_residual=False,
            tie_embeddings=hf.get("tie_word_embeddings", False), model_type="llama",
        )
    if kind == "gpt_neox":
        act = hf.get("hidden_act", "gelu")
        mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}.get(act)
        if mlp is None:
            raise ValueError(f"gpt_neox config with hidden_act={act!r} is not supported")
        base, pct, scaling = _rope(hf, "rotary_emb_base", "rotary_pct")
        return ModelConfig(
            vocab_size=vocab_size, dim=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], hidden_dim=hf.get("intermediate_size") or 4 * hf["hidden_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
            mlp=mlp, attn_bias=hf.get("attention_bias", True), mlp_bias=True,
            rope_base=base, rope_scaling=scaling, rotary_pct=0.25 if pct is None else float(pct),
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_embeddings=hf.get("tie_word_embeddings", False), model_type="gpt_neox",
        )
    raise ValueError(f"unknown model_type {kind!r} in config.json; nanoalign loads {', '.join(SUPPORTED)}")


def inexpressible(cfg: ModelConfig) -> list[str]:
    """The settings of cfg that its Hugging Face family (cfg.model_type) has no field for: saved anyway, they would
    be lost, and the checkpoint would reload as another function (a LLaMA with LayerNorm comes back with RMSNorm)
    or not at all. Empty when the config round-trips."""
    if cfg.model_type == "llama":  # RMSNorm, SwiGLU, every head dim rotated, sequential residual
        want = {"norm": "rmsnorm", "mlp": "swiglu", "rotary_pct": 1.0, "parallel_residual": False}
    elif cfg.model_type == "gpt_neox":  # LayerNorm with biases, a GELU MLP with biases, one k/v head per query head
        want = {"norm": "layernorm", "mlp_bias": True, "n_kv_head": cfg.n_head, "head_dim": cfg.dim // cfg.n_head}
        if cfg.mlp not in ("gelu", "gelu_tanh"):
            want["mlp"] = "gelu or gelu_tanh"
    else:
        return [f"model_type={cfg.model_type!r} (nanoalign saves {', '.join(SUPPORTED)})"]
    return [f"{k}={getattr(cfg, k)!r} (the {cfg.model_type} format has {v})" for k, v in want.items()
            if getattr(cfg, k) != v]


def check_expressible(cfg: ModelConfig) -> None:
    """Refuse to save a config its Hugging Face family cannot express (inexpressible), before anything is written,
    instead of writing a checkpoint that reloads as another model. Both halves of a save call it: config_to_hf and
    hf_state_dict."""
    if problems := inexpressible(cfg):
        raise ValueError(f"cannot save this model as {cfg.model_type}: {'; '.join(problems)}")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    check_expressible(cfg)
    common = {
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling:
        common["rope_scaling"] = cfg.rope_scaling
    if cfg.model_type == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base,
                "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias}
    if cfg.model_type == "gpt_neox":
        act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp]
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common,
                "hidden_act": act, "layer_norm_eps": cfg.norm_eps, "rotary_pct": cfg.rotary_pct,
                "rotary_emb_base": cfg.rope_base, "use_parallel_residual": cfg.parallel_residual,
                "attention_bias": cfg.attn_bias}


# --- tensor names: Hugging Face <-> nanoalign

def hf_names(cfg: ModelConfig) -> dict[str, str | tuple[str, str, str]]:
    """HF tensor name -> nanoalign parameter name (a (q, k, v) triple for NeoX's fused matrix)."""
    names: dict = {}
    if cfg.model_type == "llama":
        names["model.embed_tokens.weight"] = "tok_emb.weight"
        for i in range(cfg.n_layer):
            hf, me = f"model.layers.{i}.", f"layers.{i}."
            for proj, ours in [("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")]:
                names[f"{hf}self_attn.{proj}_proj.weight"] = f"{me}attn.{ours}.weight"
                if cfg.attn_bias:
                    names[f"{hf}self_attn.{proj}_proj.bias"] = f"{me}attn.{ours}.bias"
            for proj in ("gate", "up", "down"):
                names[f"{hf}mlp.{proj}_proj.weight"] = f"{me}mlp.{proj}.weight"
                if cfg.mlp_bias:
                    names[f"{hf}mlp.{proj}_proj.bias"] = f"{me}mlp.{proj}.bias"
            names[f"{hf}input_layernorm.weight"] = f"{me}attn_norm.weight"
            names[f"{hf}post_attention_layernorm.weight"] = f"{me}mlp_norm.weight"
        names["model.norm.weight"] = "norm.weight"
    else:
        names["gpt_neox.embed_in.weight"] = "tok_emb.weight"
        for i in range(cfg.n_layer):
            hf, me = f"gpt_neox.layers.{i}.", f"layers.{i}."
            for p in ("weight", "bias"):
                names[f"{hf}input_layernorm.{p}"] = f"{me}attn_norm.{p}"
                names[f"{hf}post_attention_layernorm.{p}"] = f"{me}mlp_norm.{p}"
                names[f"{hf}mlp.dense_h_to_4h.{p}"] = f"{me}mlp.up.{p}"
                names[f"{hf}mlp.dense_4h_to_h.{p}"] = f"{me}mlp.down.{p}"
                if cfg.attn_bias or p == "weight":
                    names[f"{hf}attention.query_key_value.{p}"] = tuple(f"{me}attn.{w}.{p}" for w in ("wq", "wk", "wv"))
                    names[f"{hf}attention.dense.{p}"] = f"{me}attn.wo.{p}"
        names["gpt_neox.final_layer_norm.weight"] = "norm.weight"
        names["gpt_neox.final_layer_norm.bias"] = "norm.bias"
    head = "lm_head.weight" if cfg.model_type == "llama" else "embed_out.weight"
    if not cfg.tie_embeddings:
        names[head] = "lm_head.weight"
    return names


def split_qkv(fused: torch.Tensor, n_head: int):
    """NeoX (H*3*D, ...) rows, interleaved per head, -> q, k, v each (H*D, ...)."""
    per_head = fused.view(n_head, 3, -1, *fused.shape[1:])  # (H, 3, D, ...)
    return [per_head[:, j].reshape(-1, *fused.shape[1:]) for j in range(3)]


def fuse_qkv(q, k, v, n_head: int):
    stacked = torch.stack([t.view(n_head, -1, *t.shape[1:]) for t in (q, k, v)], dim=1)  # (H, 3, D, ...)
    return stacked.reshape(-1, *q.shape[1:])


# --- loading

def resolve_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a hub id fetched into the HF cache (its json, safetensors,
    tokenizer .model / .txt and chat_template.jinja files only)."""
    if not str(path_or_hub_id).strip():  # Path("") is ".", a directory that exists: never a checkpoint meant
        raise FileNotFoundError("an empty path names no checkpoint directory or hub id")
    p = Path(path_or_hub_id)
    if p.parent.exists():
        recover_interrupted_swap(p)
    if p.exists():
        return p
    # "owner/name" whose owner is not a local directory is a hub id; "out/typo" is a missing local path
    local = str(path_or_hub_id).startswith((".", "/", "~")) or (p.parent != Path(".") and p.parent.exists())
    if local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path_or_hub_id)):
        raise FileNotFoundError(f"checkpoint directory {path_or_hub_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_hub_id),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, a repository that does not exist, a gated one: the hub's message, on one line
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FileNotFoundError(f"{path_or_hub_id}: neither a local directory nor a Hugging Face hub id that could be "
                                f"downloaded ({reason:.300})") from None


def read_json(path: Path) -> dict:
    """A JSON object from path; an error names the file (and the line and column of a syntax error)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({json_reason(e)})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


@contextmanager
def open_tensors(file: Path):
    """safe_open, with an error naming the file: safetensors' own says only e.g. 'incomplete metadata'."""
    try:
        f = safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None
    with f:
        yield f


def tensor_files(ckpt: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the safetensors file holding it."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected a 'weight_map' object (tensor name -> shard file)")
        if bad := next((k for k, f in weight_map.items() if not isinstance(f, str) or not f), None):
            raise ValueError(f"{index}: weight_map[{bad!r}] must name a shard file, got {weight_map[bad]!r}")
        for shard in sorted(set(weight_map.values())):
            if not (ckpt / shard).is_file():
                raise FileNotFoundError(f"{index} lists shard {shard}, which is not in {ckpt}")
            with open_tensors(ckpt / shard) as f:  # the header only: a tensor the index does not list is unknown
                held = set(f.keys())
                if unlisted := [k for k in f.keys() if weight_map.get(k) != shard]:
                    raise KeyError(f"{ckpt / shard} holds tensors {index.name} does not list there: "
                                   f"{', '.join(unlisted)}")
                if absent := [k for k, s in weight_map.items() if s == shard and k not in held]:
                    raise KeyError(f"{index} lists tensors in {shard} that it does not hold: {', '.join(absent)}")
        return {k: ckpt / f for k, f in weight_map.items()}
    single = ckpt / "model.safetensors"
    if single.exists():
        with open_tensors(single) as f:
            return {k: single for k in f.keys()}
    if any(ckpt.glob("*.bin")) or (ckpt / "pytorch_model.bin.index.json").exists():  # (a hub download has the index)
        raise FileNotFoundError(f"{ckpt} holds only PyTorch .bin weights; nanoalign reads safetensors "
                                "(convert once with transformers: model.save_pretrained(dir, safe_serialization=True))")
    hint = ""
    if len(ckpt.parts) >= 3 and ckpt.parts[-2] == "snapshots" and ckpt.parts[-3].startswith("models--"):
        # resolve_dir's hub download fetches no .bin: a repository holding one pytorch_model.bin arrives without it
        hint = (" (a hub download fetches safetensors weights only; if the repository has only pytorch_model.bin, "
                "convert once with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {ckpt}{hint}")


def _shape(file: Path, name: str) -> list[int]:
    with open_tensors(file) as f:  # tensor_files checked that the file holds it
        return list(f.get_slice(name).get_shape())


# config.json keys nanoalign cannot guess
REQUIRED_KEYS = {"llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
                 "gpt_neox": ("hidden_size", "num_hidden_layers", "num_attention_heads")}
# the values config_from_hf reads, when present: a string or a zero there would fail later, far from the file
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "intermediate_size", "max_position_embeddings")
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "rotary_emb_base", "rotary_pct")
BOOLEANS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_parallel_residual")


def read_config(ckpt: Path) -> dict:
    path = ckpt / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {ckpt}")
    hf = read_json(path)
    if hf.get("model_type") not in SUPPORTED:
        raise ValueError(f"{path}: unknown model_type {hf.get('model_type')!r}; nanoalign loads {', '.join(SUPPORTED)}")
    for key in REQUIRED_KEYS[hf["model_type"]]:
        if key not in hf:
            raise ValueError(f"{path}: missing key {key!r} (required for model_type {hf['model_type']!r})")
    for key in POSITIVE_INTS:
        if hf.get(key) is not None and (type(hf[key]) is not int or hf[key] < 1):
            raise ValueError(f"{path}: key {key!r} must be a positive integer, got {hf[key]!r}")
    for key in POSITIVE_NUMBERS:
        if hf.get(key) is not None and (type(hf[key]) not in (int, float) or not 0 < hf[key] < float("inf")):
            raise ValueError(f"{path}: key {key!r} must be a positive number, got {hf[key]!r}")
    for key in BOOLEANS:  # JSON's "false" is a string, and a non-empty string is true
        if hf.get(key) is not None and type(hf[key]) is not bool:
            raise ValueError(f"{path}: key {key!r} must be true or false, got {hf[key]!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None:
            if not isinstance(hf[key], dict):
                raise ValueError(f"{path}: key {key!r} must be an object or null, got {hf[key]!r}")
            if (bad := next((k for k, v in hf[key].items() if k.endswith(("factor", "_embeddings", "rope_theta"))
                             and (type(v) not in (int, float) or not 0 < v < float("inf"))), None)):
                raise ValueError(f"{path}: key {key!r}: {bad!r} must be a positive number, got {hf[key][bad]!r}")
    return hf


def model_config(path_or_hub_id) -> ModelConfig:
    """The ModelConfig of a checkpoint without reading its weights (e.g. to build it on the meta device)."""
    return _checked_config(resolve_dir(path_or_hub_id))[0]


def _checked_config(ckpt: Path):
    hf_cfg = read_config(ckpt)
    files = tensor_files(ckpt)
    emb_name = "model.embed_tokens.weight" if hf_cfg["model_type"] == "llama" else "gpt_neox.embed_in.weight"
    if emb_name not in files:
        raise KeyError(f"missing tensor {emb_name} in {ckpt}")
    rows = _shape(files[emb_name], emb_name)[0]
    # the tensor decides (Pythia pads it past its tokenizer, and says so in config.json); a config that
    # disagrees with it belongs to another checkpoint or was edited by hand
    if hf_cfg.get("vocab_size") is not None and hf_cfg["vocab_size"] != rows:
        raise ValueError(f"{ckpt / 'config.json'}: vocab_size {hf_cfg['vocab_size']} disagrees with the {rows} rows "
                         f"of {emb_name} in {files[emb_name]}")
    cfg = config_from_hf(hf_cfg, vocab_size=rows, where=ckpt / "config.json")

    # a tied checkpoint may also store its head (transformers writes it): the head of this model, under this
    # family's name and in the embedding's shape. Equal to the embedding, it is not read; different (a fine-tune
    # whose tooling untied the head but kept the config), the model is read untied, with that head, as
    # transformers reads it
    head = "lm_head.weight" if cfg.model_type == "llama" else "embed_out.weight"
    if cfg.tie_embeddings and head in files:
        if (shape := _shape(files[head], head)) != [rows, cfg.dim]:
            raise ValueError(f"tensor {head} in {files[head]} has shape {shape}, expected [{rows}, {cfg.dim}] "
                             f"(the embedding's, to which the config ties it)")
        with open_tensors(files[head]) as f, open_tensors(files[emb_name]) as g:
            if not torch.equal(f.get_tensor(head), g.get_tensor(emb_name)):
                cfg = dataclasses.replace(cfg, tie_embeddings=False)
    names = hf_names(cfg)
    optional = {head} if cfg.tie_embeddings else set()
    if "score.weight" in files and head not in files:  # a reward model (or critic) where a language model is read
        kinds = ", ".join(hf_cfg.get("architectures") or []) or "a sequence classifier"
        raise ValueError(f"{ckpt} is a reward model ({kinds}: a score.weight head, no {head}), not a language model; "
                         f"pass a policy or SFT checkpoint here")
    missing = [k for k in names if k not in files]
    unexpected = [f"{k} (in {files[k].name})" for k in files
                  if k not in names and k not in optional and not k.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise KeyError(f"checkpoint {ckpt} is missing tensors: {', '.join(missing)}")
    if unexpected:
        raise KeyError(f"checkpoint {ckpt} has unexpected tensors: {', '.join(unexpected)}")
    return cfg, names, files


def copy_tensors(params: dict, names: dict, files: dict, n_head: int, ckpt: Path, device, dtype) -> None:
    """Copy each checkpoint tensor into its parameter(s), one file opened at a time. names maps a file's
    tensor to our parameter name, or to three (q, k, v) for NeoX's fused attention projection; every shape is
    checked against the config first, and every value for NaN and inf, with a one-line error naming the tensor
    and the file."""
    by_file: dict[Path, list[str]] = {}
    for k in names:
        by_file.setdefault(files[k], []).append(k)
    with torch.no_grad():
        for file, keys in by_file.items():
            with open_tensors(file) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    targets = names[k] if isinstance(names[k], tuple) else (names[k],)
                    expected = [params[n].shape for n in targets]
                    expected_shape = [sum(s[0] for s in expected), *expected[0][1:]]
                    if list(t.shape) != expected_shape:
                        raise ValueError(f"tensor {k} in {file} has shape {list(t.shape)}, expected {expected_shape} "
                                         f"for the config in {ckpt / 'config.json'}")
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # else it fails steps later
                        raise ValueError(f"tensor {k} in {file} holds NaN or inf values")
                    narrower = t.is_floating_point() and torch.finfo(dtype).max < torch.finfo(t.dtype).max
                    if narrower and not bool(torch.isfinite(t.to(dtype)).all()):  # 1e5 read into float16 is inf
                        raise ValueError(f"tensor {k} in {file} holds values past {dtype}'s range; load it in a "
                                         f"wider dtype")
                    parts = split_qkv(t, n_head) if len(targets) == 3 else [t]  # NeoX's fused q, k, v
                    for n, part in zip(targets, parts):
                        params[n].copy_(part.to(device=device, dtype=dtype))


def load_pretrained(path_or_hub_id, device="cpu", dtype=torch.float32) -> Transformer:
    ckpt = resolve_dir(path_or_hub_id)
    cfg, names, files = _checked_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # casting on meta costs nothing; to_empty then allocates once
    model.to_empty(device=device)
    model.tie_weights()
    copy_tensors(dict(model.named_parameters(remove_duplicate=False)), names, files, cfg.n_head, ckpt, device, dtype)
    return model.eval()


# --- saving

def recover_interrupted_swap(dst: Path):
    """A crash between the two renames of atomic_write_dir leaves the previous complete checkpoint under
    a hidden .old name and nothing at dst: put the newest one back (safe to call from several processes)."""
    if dst.exists():
        return
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        try:
            os.replace(olds[-1], dst)
        except FileNotFoundError:  # another process recovered it first
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(root: Path):
    """mkdtemp makes a private directory, and safetensors writes through a private temporary file (0600):
    give the checkpoint the permissions the umask gives any new file, so others can read it."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _sync(path: Path) -> None:
    """Flush a file's or a directory's contents to the disk (fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(dst: str | os.PathLike, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to dst. An existing dst is replaced only after the new one
    is complete, so a crash at any point leaves either the old or the new directory, never a half one.
    Every file is flushed to the disk before the renames, and the renames after them: without it, after a power
    loss (not a process crash) the file system may show the new names over data that never reached the disk,
    with the previous checkpoint already deleted."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write(tmp)
        _usual_permissions(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True) + [tmp]:  # files before the directories holding them
            _sync(path)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex}")
            os.replace(dst, old)
            os.replace(tmp, dst)
        else:
            os.replace(tmp, dst)
        _sync(dst.parent)  # the renames themselves, before the previous checkpoint is deleted
        # the previous checkpoint, and any left behind by an earlier crash
        for stale in dst.parent.glob(f".{dst.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoalign-named tensors (model.state_dict(), or a full state gathered from FSDP shards) -> the same
    weights under Hugging Face names, NeoX q, k, v fused back per head."""
    check_expressible(cfg)
    out = {}
    for hf, ours in hf_names(cfg).items():
        if isinstance(ours, tuple):
            out[hf] = fuse_qkv(*(state[n].detach() for n in ours), cfg.n_head)
        else:
            out[hf] = state[ours].detach()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def write_pretrained(model: Transformer, out_dir, tokenizer=None, max_shard_bytes: int = 5 * 1024**3,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json and safetensors (sharded above max_shard_bytes) into the existing directory out_dir,
    in the layout transformers loads as is. Not atomic: save_pretrained (or train.save_checkpoint) wraps it.

    state_dict: the model's full state to write instead of model.state_dict() (e.g. gathered from FSDP)."""
    out_dir = Path(out_dir)
    cfg = model.cfg
    state = hf_state_dict(cfg, state_dict if state_dict is not None else model.state_dict())
    dtype = next(iter(state.values())).dtype

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes

    hf_config = config_to_hf(cfg, dtype)
    if tokenizer is not None:  # without them transformers assumes its own defaults (LLaMA: eos 2)
        hf_config.update(tokenizer.special_ids())
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir


def save_pretrained(model: Transformer, out_dir, tokenizer=None, max_shard_bytes: int = 5 * 1024**3,
                    state_dict: dict[str, torch.Tensor] | None = None, extra=None) -> Path:
    """write_pretrained into a temporary directory renamed into place (atomic).

    extra(tmp_dir): writes more files (training state) into the same atomically renamed directory."""
    def write(tmp: Path):
        write_pretrained(model, tmp, tokenizer, max_shard_bytes, state_dict)
        if extra is not None:
            extra(tmp)

    return atomic_write_dir(out_dir, write)
