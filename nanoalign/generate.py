"""Batched sampling with a preallocated KV cache, and a command line to try any checkpoint.

    python -m nanoalign.generate --init=DIR_OR_HUB_ID --prompt="The capital of France is" --temperature=0

The command line formats the prompt with the template saved with the checkpoint (tokenizer_config.json's
"nanoalign_template", written by training), else passes it verbatim; --template overrides both.

Prompts of different lengths are left-padded, so every row's next token sits in the same column. Positions
count real tokens only (cumsum(mask) - 1) and pads are masked from attention, which makes each row's
logits equal to those of the row run alone (tests/test_model.py pins this).

PPO spends most of its time here, so a decode step does the model's arithmetic and little else. The
outputs and the attention mask are allocated before the loop and a step fills one column of each; the
rotary angles of every position are computed once. Sampling inverts the CDF with one random
number per row, where torch.multinomial draws one per vocabulary entry (so a seed does not reproduce a
multinomial sampler's tokens, only its distribution). The host reads the stopped flags only to end the
loop early: every step on a CPU, every 16 steps on a GPU (where a read waits for the device), never
without stop ids. The step itself, decode_step, reads and writes fixed buffers, so on a GPU it can be
captured once as a CUDA graph and replayed (cuda_graph=True).

On a CPU a decode step is mostly matrix multiplication with few rows (the batch) against every weight matrix.
F.linear re-lays-out each weight into the kernel's blocked format on every call, which at a batch of 8 costs as
much as the multiplication itself; generate() instead packs every weight once per call with oneDNN
(prepacked(), PackedLinear), stacking q/k/v into one matrix, and the model's projections run on the packed copies
until the call returns (the prompt's forward). The decode steps run PackedModel.decode_step: the same function
on the packed weights with the small elementwise ops folded into the matmuls. At the benchmark's size that
halves the matmul time; what remains is the matmuls, attention over the cache, and a per-op dispatch cost of a
few microseconds (python bench/bench_model.py --profile).

For PPO the sampler returns the log-probability of each sampled token under softmax(logits / temperature)
with nothing filtered: that is the distribution the trainer recomputes later. top-k / top-p change the
sampling distribution, so a rollout that uses them no longer matches those log-probs
(docs/correctness.md, "Log-probabilities"): leave them off for PPO rollouts.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import KVCache, RMSNorm, Transformer, rope_cos_sin


@dataclass
class Generation:
    tokens: torch.Tensor          # (B, N) sampled ids; pad_id after a row stopped
    mask: torch.Tensor            # (B, N) 1 for generated tokens, the stop token included, 0 after it
    logprobs: torch.Tensor        # (B, N) log pi(token) under logits / temperature, 0 where mask is 0
    prompt_ids: torch.Tensor      # (B, P) left-padded prompts
    prompt_mask: torch.Tensor     # (B, P)
    stopped: torch.Tensor         # (B,) True where the row produced a stop id (False: cut by max_new_tokens)

    @property
    def sequences(self):  # (B, P + N) prompt and response, ready for a later forward
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    @property
    def attention_mask(self):  # (B, P + N)
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def response(self, i: int) -> list[int]:
        """Row i's generated ids up to and including its stop token."""
        return self.tokens[i, :int(self.mask[i].sum())].tolist()

    def answer(self, i: int) -> list[int]:
        """Row i's answer: its generated ids without the stop token (decoding drops a special EOS by itself, not a
        stop id that is an ordinary token, such as a checkpoint's extra eos_token_id)."""
        return self.response(i)[:-1] if bool(self.stopped[i]) else self.response(i)


def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """list of id lists -> ids (B, P) left-padded with pad_id, and mask (B, P)."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k (every logit tied with the k-th stays), then, of what is left
    (renormalised), outside the smallest set with probability >= top_p (the token that crosses top_p stays, and
    so does the top one): Hugging Face's order when both are given."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_error(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> str | None:
    """What is wrong with these sampling settings, naming the argument, or None when they are valid."""
    if max_new_tokens < 1:
        return f"max_new_tokens must be at least 1, got {max_new_tokens}"
    if not temperature >= 0:
        return f"temperature must be >= 0 (0 = greedy), got {temperature}"
    if temperature == float("inf"):
        return "temperature must be finite, got inf"
    if top_k is not None and top_k < 0:
        return f"top_k must be >= 0 (0 = off), got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        return f"top_p must be in (0, 1] (1 = off), got {top_p}"
    return None


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """logits (B, V) float -> next ids (B,) and their log-probs (B,) under softmax(logits / temperature); greedy
    (temperature 0) takes the argmax, with its log-prob under softmax(logits), the model's own distribution.

    Sampling is by inverse CDF: one uniform number per row, located in the running sums of the
    probabilities. torch.multinomial instead draws one exponential number per vocabulary entry and picks
    argmax p_i / q_i; those B x V draws cost more than the rest of a decode step on a CPU with a 50k
    vocabulary, and multinomial reads a validity check back to the host (a stall on a GPU, and not
    allowed inside a CUDA graph). So a seed gives other tokens than torch.multinomial would, drawn from
    the same distribution (tests/test_sampler.py tests the distribution)."""
    if temperature == 0:
        nxt = logits.argmax(-1)
        # log_softmax is one fused kernel, faster on a CPU than logit - logsumexp, which is several
        return nxt, logits.log_softmax(-1).gather(-1, nxt[:, None])[:, 0]
    scaled = logits / temperature
    filtering = (top_k is not None and top_k > 0) or (top_p is not None and top_p < 1.0)
    kept = filter_logits(scaled, top_k, top_p) if filtering else scaled
    top = kept.amax(-1, keepdim=True)  # (B, 1), also the max of scaled: every filter keeps the top id
    # weights exp(x - top) in [0, 1]; running sums in float64, so that even the least likely ids keep an
    # interval of their own width (float32 sums up to ~V would round away probabilities below ~1e-7)
    cdf = (kept - top).exp().cumsum(-1, dtype=torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1), >= 1: the top id weighs 1
    # u uniform in (0, total]: the first running sum >= u is id i with probability w_i / total, and never an
    # id of weight 0, whose running sum equals the one before it (so -inf logits are never drawn)
    u = (1 - torch.rand(total.shape, dtype=torch.float64, device=logits.device, generator=generator)) * total
    # the clamp only matters for NaN logits, which must not index out of range (generate refuses them later)
    nxt = torch.searchsorted(cdf, u).clamp_(max=logits.shape[-1] - 1)[:, 0]
    # log-prob = logit - logsumexp, the logsumexp of the unfiltered logits (the PPO ratio is taken against
    # them); unfiltered, it is already at hand: top + log(total)
    lse = scaled.logsumexp(-1, keepdim=True) if filtering else top + total.log()
    return nxt, (scaled.gather(-1, nxt[:, None]) - lse)[:, 0].float()


def decode_step(model: Transformer, ids, pos, key_mask, cache: KVCache, write_at, cos_table, sin_table):
    """Logits (B, V) for one new token per row: Transformer.forward for T = 1, with the per-step setup
    taken out (the rotary angles are looked up in a table, the mask is a preallocated buffer).

    ids, pos (B, 1): the tokens and their rotary positions. key_mask (B, 1, 1, S) bool, the cache columns
    each row may attend to (None: all of them). write_at: this token's cache column, an int, or a
    one-element tensor for the static-shape step of a CUDA graph (the cache is then attended whole).
    cos_table, sin_table (L, R): rope_cos_sin for positions 0 .. L - 1."""
    x = model.tok_emb(ids)  # (B, 1, C)
    cos, sin = cos_table[pos][:, None], sin_table[pos][:, None]  # (B, 1, 1, R), as rope_cos_sin returns them
    for block in model.layers:
        x = block(x, cos, sin, key_mask, cache, write_at)
    return model.lm_head(model.norm(x))[:, -1]  # (B, V)


# --- CPU: prepacked weights

@functools.cache
def _onednn_packing_works() -> bool:
    """Whether this torch build prepacks linear weights with oneDNN (x86 builds do); probed once, on a toy matmul."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w, x = torch.arange(24.0).view(6, 4) / 24, torch.arange(12.0).view(3, 4) / 12  # not the global RNG's draws
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3), None, "none", [], "")
        return bool(torch.allclose(y, x @ w.T, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def can_prepack(model) -> bool:
    """Prepacking applies to an fp32 model on the CPU, not under autocast (the packed matmul would ignore it),
    not while FSDP2 shards it (a shard is not the weight), and with oneDNN enabled."""
    plain_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 and type(p.data) is torch.Tensor
                     for p in model.parameters())
    return (plain_fp32 and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
            and _onednn_packing_works())


class PackedLinear:
    """y = x W^T + b for one or more nn.Linear layers that share their input, their weights stacked into one
    matrix and stored in oneDNN's blocked layout. A plain F.linear with a small batch of rows re-lays-out (packs)
    the weight on every call, which at decode batch sizes costs about as much as the multiplication; packing once
    per generate() call removes that, and stacking q/k/v makes one large matmul of three small ones (the output
    holds the layers' outputs side by side, `splits` wide).

    The matmul can also finish with an elementwise step applied to its output in the same pass, saving an op and
    a trip through memory: an activation (activation="swish" is SiLU, "gelu" with approximate "none" or "tanh"),
    or a product or sum with another tensor of the output's shape (mul=, add=; the sum is exact, the same bits as
    adding afterwards)."""

    def __init__(self, linears, rows: int):
        self.splits = [lin.out_features for lin in linears]
        weights = [lin.weight.detach() for lin in linears]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # one layer: no copy before the reorder
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])

    def __call__(self, x, activation: str = "none", approximate: str = "", mul=None, add=None):
        if (mul is not None) + (add is not None) + (activation != "none") > 1:
            raise ValueError("PackedLinear fuses one step into the matmul: an activation, mul= or add=")
        rows = x.reshape(-1, x.shape[-1])  # (B, C) as it is; a prompt's (B, T, C) as B * T rows
        if mul is None and add is None:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, activation, [], approximate)
        else:
            other, op = (add, "add") if mul is None else (mul, "mul")
            y = torch.ops.mkldnn._linear_pointwise.binary(rows, other.reshape(rows.shape[0], -1), self.weight,
                                                          self.bias, op)
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class PackedBlock:
    qkv: PackedLinear          # wq, wk, wv stacked: one matmul gives the three
    o: PackedLinear
    gate: PackedLinear | None  # None for the GELU MLPs
    up: PackedLinear
    down: PackedLinear


def _norm(norm, x):
    """A norm layer on fp32 x: RMSNorm as one F.rms_norm call with its gain (the same bits as RMSNorm.forward, whose
    casts are no-ops in fp32, in one Python call instead of four), LayerNorm as it is."""
    if isinstance(norm, RMSNorm):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


class PackedModel:
    """A model's projections packed once (PackedLinear), and the decode step that runs on them.

    decode_step computes what the module function of the same name computes, the model's forward for one token, in
    fewer ops. Besides the matmuls and attention a step runs a few hundred small ops, each a few microseconds of
    dispatch; here there are about a quarter fewer (~490 torch calls a step at the benchmark's size, against ~670):
    - the query and key heads of the token are rotated together, as one tensor, in four ops: rotate_half(x) =
      cat(-x2, x1) is x.roll(R/2) with the sign of the first half moved into the sine (the same bits);
    - SiLU runs inside the gate's matmul, the product with the up projection inside the up matmul, and each
      residual sum inside the matmul that produces it (o, down);
    - the residual stream stays (B, C), with no module calls around it.
    At the benchmark's size (bench/bench_model.py) that takes 4-6% off a 128-token generate() call at two threads."""

    def __init__(self, model: Transformer, rows: int):
        self.model = model
        self.blocks = []
        for block in model.layers:
            attn, mlp = block.attn, block.mlp
            self.blocks.append(PackedBlock(
                qkv=PackedLinear([attn.wq, attn.wk, attn.wv], rows), o=PackedLinear([attn.wo], rows),
                gate=PackedLinear([mlp.gate], rows) if mlp.kind == "swiglu" else None,
                up=PackedLinear([mlp.up], rows), down=PackedLinear([mlp.down], rows)))
        self.head = PackedLinear([model.lm_head], rows)
        half = model.cfg.rotary_dim // 2
        p = next(model.parameters())
        self.sin_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(p.device, p.dtype)  # (R,)

    def decode_step(self, ids, pos, key_mask, cache: KVCache, write_at, cos_table, sin_table):
        """decode_step(model, ...) on the packed weights: the same arguments after the model, the same logits up to
        float rounding (tests/test_sampler.py)."""
        model, cfg = self.model, self.model.cfg
        B = ids.shape[0]
        H, KV, D, R = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.rotary_dim
        x = model.tok_emb(ids[:, 0])  # (B, C)
        cos = cos_table[pos[:, 0]][:, None]  # (B, 1, R), broadcast over the heads
        sin = sin_table[pos[:, 0]][:, None] * self.sin_sign
        gelu = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        for layer, (block, packed) in enumerate(zip(model.layers, self.blocks)):
            qkv = packed.qkv(_norm(block.attn_norm, x))  # (B, (H + 2 KV) D): q, k, v side by side
            qk = qkv[:, :(H + KV) * D].view(B, H + KV, D)  # the H query heads, then the KV key heads
            rot = qk[..., :R]
            rot = rot * cos + rot.roll(R // 2, -1) * sin
            qk = rot if R == D else torch.cat([rot, qk[..., R:]], -1)  # partial rotary: the rest passes
            k, v = cache.update(layer, write_at, qk[:, H:, None], qkv[:, (H + KV) * D:].view(B, KV, 1, D))
            y = F.scaled_dot_product_attention(qk[:, :H, None], k, v, attn_mask=key_mask, enable_gqa=KV != H)
            y = y.transpose(1, 2).reshape(B, H * D)
            if cfg.parallel_residual:  # x + attn(norm1(x)) + mlp(norm2(x)): the MLP reads the block's input
                mlp_in, x = _norm(block.mlp_norm, x), packed.o(y, add=x)
            else:  # x + attn(...), then + mlp(norm2(x + attn(...)))
                x = packed.o(y, add=x)
                mlp_in = _norm(block.mlp_norm, x)
            if packed.gate is not None:  # SwiGLU: up(h) * silu(gate(h))
                hidden = packed.up(mlp_in, mul=packed.gate(mlp_in, activation="swish"))
            else:
                hidden = packed.up(mlp_in, activation="gelu", approximate=gelu)
            x = packed.down(hidden, add=x)  # x + MLP
        return self.head(_norm(model.norm, x))  # (B, V)


@contextmanager
def prepacked(model: Transformer, rows: int):
    """Pack every projection of the model once (q/k/v stacked into one matrix, o, gate, up, down, the LM head) and
    yield the PackedModel; for the duration the model's own forward runs on the packed weights too (the prompt's
    forward in generate()). Whatever the modules had before is restored on exit, error or not (so it nests).
    Same function as the model's forward up to float rounding order (tests/test_sampler.py). rows: the batch the
    packing is tuned for.

    Inference only: the packed matmul has no backward, so it refuses to run with gradients on. While it is active
    the model holds a second copy of its projection weights, its weights must not change, forward hooks do not fire
    in decode steps (PackedModel.decode_step calls the packed weights, not the modules) nor on wq/wk/wv/gate/up in
    the prompt's forward, and the model must not be used from another thread."""
    if torch.is_grad_enabled():
        raise RuntimeError("prepacked() is for inference: the packed matmul has no backward (use torch.no_grad())")
    packed = PackedModel(model, rows)
    missing = object()
    patched = []

    def patch(module, name, fn):
        patched.append((module, name, module.__dict__.get(name, missing)))
        setattr(module, name, fn)  # an instance attribute shadows the class's method

    try:
        for block, p in zip(model.layers, packed.blocks):
            patch(block.attn, "project_qkv", lambda x, qkv=p.qkv: qkv(x).split(qkv.splits, dim=-1))
            patch(block.mlp, "project_in", lambda x, p=p: (None if p.gate is None else p.gate(x), p.up(x)))
            patch(block.attn.wo, "forward", p.o)
            patch(block.mlp.down, "forward", p.down)
        patch(model.lm_head, "forward", packed.head)
        yield packed
    finally:
        for module, name, before in reversed(patched):
            if before is missing:
                delattr(module, name)
            else:
                setattr(module, name, before)


class GraphedDecodeStep:
    """decode_step captured once as a CUDA graph and replayed at every step: one launch instead of a few
    hundred small kernels, whose launch overhead dominates small-batch GPU decoding. Capture needs fixed
    shapes and no host reads, so every input lives in a buffer updated in place between replays (ids,
    pos, key_mask), the cache is attended whole with key_mask hiding the columns not written yet, and the
    write column is a device tensor. tests/test_sampler.py runs the same static-shape step eagerly on the CPU,
    and, where CUDA exists, checks that the graph gives the eager loop's tokens, greedy and seeded
    (bench/cuda_checks.sh; 4.4-6.4x transformers' generate on an H200, see the README)."""

    def __init__(self, model, ids, pos, key_mask, cache, cos_table, sin_table, first_column: int):
        self.write_at = torch.full((1,), first_column, dtype=torch.long, device=ids.device)
        args = (model, ids, pos, key_mask, cache, self.write_at, cos_table, sin_table)
        # warm up on a side stream before capturing (lazy initialisations must not happen during capture), as
        # the torch.cuda.graph docs do; the warm-ups write the cache column that the first real step overwrites
        # before anything attends to it. Streams and capture belong to the model's GPU, which need not be the
        # current one (--device=cuda:1 without torchrun)
        with torch.cuda.device(ids.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    decode_step(*args)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode_step(*args)  # a static output buffer, refilled by every replay

    def __call__(self, column: int):
        self.write_at.fill_(column)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, stop_ids=(),
             pad_id: int = 0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             vocab_size: int | None = None, generator: torch.Generator | None = None,
             cuda_graph: bool = False, prepack: bool = True) -> Generation:
    """Sample up to max_new_tokens for each prompt (lists of token ids); temperature 0 means greedy.

    vocab_size: ids >= vocab_size are never sampled (Pythia's embedding is padded past its tokenizer).
    cuda_graph: on a CUDA device, replay each decode step as a captured CUDA graph (GraphedDecodeStep).
    prepack: on a CPU (fp32, no autocast, not sharded), run the projections on weights packed once for this call
    (prepacked; False: the model's own nn.Linear calls)."""
    if problem := sampling_error(max_new_tokens, temperature, top_k, top_p):
        raise ValueError(problem)
    if vocab_size is not None and vocab_size < 1:  # a negative one would cut the top of the vocabulary silently
        raise ValueError(f"vocab_size must be at least 1 (None: the model's), got {vocab_size}")
    param = next(model.parameters())
    device, cfg = param.device, model.cfg
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device, the model is on {device}")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = prompt_ids.shape
    N = max_new_tokens
    L = P + N  # cache columns: the prompt, then one per generated token
    if L > cfg.max_seq_len:
        raise ValueError(f"prompt of {P} tokens + {N} new tokens exceeds the context length {cfg.max_seq_len}")
    cache = KVCache(cfg, B, L, device, param.dtype)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    V = cfg.vocab_size if vocab_size is None else min(vocab_size, cfg.vocab_size)  # ids >= V are never looked at

    # everything the loop writes is allocated once, here
    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, N), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    ids = torch.zeros((B, 1), dtype=torch.long, device=device)  # the decode step's input
    # which cache columns each row attends to: its prompt tokens (not its pads), then every generated column,
    # switched on one per step instead of concatenating a new mask every step
    key_mask = torch.zeros((B, 1, 1, L), dtype=torch.bool, device=device)
    key_mask[:, 0, 0, :P] = prompt_mask.bool()
    # one host read before the loop: without padding no mask is needed, and attention takes its fast path
    padded = bool((prompt_mask == 0).any())
    # the rotary angles of every position this call can reach, computed once and looked up at each step
    cos_table, sin_table = (t[0, 0] for t in rope_cos_sin(torch.arange(L, device=device)[None], cfg.rotary_dim,
                                                          cfg.rope_base, param.dtype, cfg.rope_scaling))

    # on a CPU the projections run on weights packed once here, for the prompt's forward and every decode step
    packing = prepacked(model, B) if prepack and can_prepack(model) else nullcontext()
    with packing as packed:
        # the eager step: on the packed weights (PackedModel.decode_step), else the model's own modules
        eager_step = packed.decode_step if packed is not None else functools.partial(decode_step, model)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): real tokens count from 0
        hidden = model(prompt_ids, attention_mask=prompt_mask if padded else None, position_ids=positions,
                       cache=cache, start_pos=0, return_hidden=True)
        logits = model.lm_head(hidden[:, -1])  # (B, V): only the last prompt position predicts the first token
        pos = positions[:, -1:] + 1  # (B, 1), advanced in place
        step = GraphedDecodeStep(model, ids, pos, key_mask, cache, cos_table, sin_table, P) if cuda_graph else None
        # reading `done` back stops the loop once every row has stopped; on a GPU that read waits for the device,
        # so it happens every 16 steps there (the extra steps only write pads), and never without stop ids
        check_every = 1 if device.type == "cpu" else 16
        for t in range(N):
            nxt, logp = sample_next(logits.float()[:, :V], temperature, top_k, top_p, generator)
            live = ~done
            tokens[:, t] = nxt.masked_fill(done, pad_id)
            mask[:, t] = live
            logprobs[:, t] = logp.masked_fill(done, 0.0)
            if len(stop):
                hit = live & (nxt[:, None] == stop).any(-1)
                stopped |= hit
                done |= hit
            if t == N - 1 or (len(stop) and t % check_every == 0 and bool(done.all())):
                break
            # the token just sampled sits at cache column P + t: visible from now on, for every row (a stopped
            # row keeps decoding pads, whose outputs are masked)
            key_mask[:, 0, 0, P + t] = True
            ids.copy_(tokens[:, t:t + 1])
            if step is not None:
                logits = step(P + t)
            else:  # the cache and the mask up to this column only: no work for the columns still empty
                logits = eager_step(ids, pos, key_mask[..., :P + t + 1] if padded else None, cache, P + t,
                                    cos_table, sin_table)
            pos += 1
    # a model that produced NaN or inf logits sampled garbage: refuse it (one host read, after the loop)
    if not bool(logprobs.isfinite().all()):
        small = f", or temperature {temperature} is small enough for logits / temperature to overflow (use 0 for " \
                f"greedy)" if 0 < temperature < 1 else ""
        raise ValueError(f"the model produced non-finite logits (NaN or inf) while sampling{small}")
    return Generation(tokens, mask, logprobs, prompt_ids, prompt_mask, stopped)


def main(argv=None):
    from .checkpoint import load_pretrained, resolve_dir
    from .cli import ArgumentParser, InputError, check_device, finite_float, seed_int
    from .tokenizer import TEMPLATES, Tokenizer, encode_prompt

    ap = ArgumentParser(description="Sample a completion from a checkpoint (local dir or hub id).")
    ap.add_argument("--init", required=True, help="checkpoint directory or Hugging Face hub id")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                    help="prompt template; default: the checkpoint's own (saved by training), else plain (verbatim)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top_p", type=finite_float, default=None, help="nucleus sampling, in (0, 1] (1 = off)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if problem := sampling_error(args.max_new_tokens, args.temperature, args.top_k, args.top_p):
        raise InputError("--" + problem)  # before loading a model that may take minutes
    check_device(args)

    ckpt = resolve_dir(args.init)
    model = load_pretrained(ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    tok = Tokenizer.from_dir(ckpt)
    tok.check_vocab(model.cfg.vocab_size)
    ids = encode_prompt(tok, args.prompt, args.template or tok.template or "plain")
    gen = generate(model, [ids], args.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, vocab_size=tok.vocab_size,
                   generator=torch.Generator(args.device).manual_seed(args.seed))
    print(tok.decode(gen.answer(0)))


if __name__ == "__main__":
    from .cli import run

    run(main)  # a bad checkpoint or prompt: one line naming it, no traceback
