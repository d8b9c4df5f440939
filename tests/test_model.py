"""The network's own invariants: KV-cache decoding == full forward, left padding == the row alone."""
import math

import pytest
import torch

from nanoalign.generate import filter_logits, generate, left_pad
from nanoalign.model import KVCache, ModelConfig, Transformer, apply_rope, attention_mask_4d, rope_cos_sin

FAMILIES = {
    "llama_gqa": dict(norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, rope_base=500.0),
    "pythia": dict(norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, rotary_pct=0.25,
                   parallel_residual=True, model_type="gpt_neox"),
}


def tiny(family, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, dim=64, n_layer=2, n_head=4, hidden_dim=96, max_seq_len=64)
    cfg = ModelConfig(**{**base, **FAMILIES[family], **kw})
    model = Transformer(cfg)
    model.init_weights(std=0.2)  # large weights: a wrong position or mask shows up in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm gains and biases
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(family):
    model = tiny(family)
    x = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 3, 20, "cpu", torch.float32)
        steps = [model(x[:, :8], cache=cache, start_pos=0)]
        for t in range(8, 20):
            steps.append(model(x[:, t:t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_row_alone(family):
    model = tiny(family)
    rows = [torch.randint(3, 97, (n,)).tolist() for n in (5, 12, 9)]
    ids, mask = left_pad(rows, pad_id=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))
            torch.testing.assert_close(batch[i, -len(r):], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batch).all()  # pad queries see themselves: finite, never NaN

    gen = generate(model, rows, 10, temperature=0.0, pad_id=0)
    for i, r in enumerate(rows):
        solo = generate(model, [r], 10, temperature=0.0, pad_id=0)
        assert gen.tokens[i].tolist() == solo.tokens[0].tolist()
        torch.testing.assert_close(gen.logprobs[i], solo.logprobs[0], atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    model = tiny("llama_gqa")
    mha = Transformer(ModelConfig(**{**model.cfg.__dict__, "n_kv_head": 4})).eval()
    sd = model.state_dict()
    D = model.cfg.head_dim
    for k in list(sd):
        if k.endswith(("attn.wk.weight", "attn.wv.weight")):
            # each of the 2 kv heads serves 2 consecutive query heads
            sd[k] = sd[k].view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(mha(x), model(x), atol=1e-5, rtol=1e-5)


def test_rope_rotate_half_by_hand():
    # one head of dim 4, all rotating: pairs are (0, 2) and (1, 3); frequencies 1 and 1/base^(1/2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos, sin = rope_cos_sin(torch.tensor([[3]]), rotary_dim=4, base=100.0, dtype=torch.float32)
    out = apply_rope(x, cos, sin).flatten()
    a0, a1 = 3.0, 3.0 / 10.0  # position 3 times the frequencies 1 and 100^(-1/2)
    c0, s0, c1, s1 = math.cos(a0), math.sin(a0), math.cos(a1), math.sin(a1)
    expected = torch.tensor([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])
    torch.testing.assert_close(out, expected)


def test_partial_rotary_leaves_the_tail_alone():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5)[None], rotary_dim=4, base=10000.0, dtype=torch.float32)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[..., 1:4], x[..., 1:4])


def test_partial_rotary_frequencies_use_the_rotated_slices_size(monkeypatch):
    """Pythia (rotary_pct 0.25, head_dim 16): the model rotates R = 4 dims of each head, at the frequencies
    base^(-2i / R) of a 4-dim rotary embedding (not of the head's 16 dims), by hand at base 7 for positions 0..5."""
    from nanoalign import model as model_module

    seen, real = [], model_module.apply_rope
    monkeypatch.setattr(model_module, "apply_rope", lambda x, cos, sin: seen.append((cos, sin)) or real(x, cos, sin))
    model = tiny("pythia", rope_base=7.0)
    assert (model.cfg.head_dim, model.cfg.rotary_dim) == (16, 4)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 6)))
    cos, sin = seen[0]
    inv_freq = [1.0, 7.0 ** (-2 / 4)]
    angles = torch.tensor([[p * f for f in inv_freq * 2] for p in range(6)])  # rotate-half layout: i and i + R/2
    torch.testing.assert_close(cos[0, 0], angles.cos())
    torch.testing.assert_close(sin[0, 0], angles.sin())


def test_tied_embeddings_share_one_parameter():
    model = tiny("llama_gqa", tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    # counted once: the untied model has exactly one more vocab x dim matrix
    assert tiny("llama_gqa").num_params() - model.num_params() == 97 * 64


def test_context_length_is_enforced():
    model = tiny("llama_gqa")
    with pytest.raises(ValueError, match="context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="context length"):
        generate(model, [[1] * 60], 10)


@pytest.mark.parametrize("kw,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0"),
    (dict(temperature=-1.0), r"temperature must be >= 0 \(0 = greedy\), got -1.0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite, got inf"),  # logits / inf: a uniform draw
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
    (dict(vocab_size=-8), r"vocab_size must be at least 1 \(None: the model's\), got -8"),  # cut 8 ids silently
    (dict(vocab_size=0), "vocab_size must be at least 1"),
])
def test_generate_refuses_bad_sampling_settings(kw, message):
    # without the check a negative temperature silently decodes greedily, max_new_tokens=0 returns nothing
    model = tiny("llama_gqa")
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3]], **{"max_new_tokens": 4, **kw})
    generate(model, [[1, 2, 3]], 4, top_k=0, top_p=1.0)  # the edges that mean "off" are fine


def test_generation_stops_per_row_and_masks_after_stop():
    model = tiny("pythia")
    rows = [[5, 6, 7], [8, 9]]
    free = generate(model, rows, 12, temperature=0.0, pad_id=0)
    stop = free.tokens[0, 3].item()  # row 0's 4th greedy token becomes a stop id
    gen = generate(model, rows, 12, temperature=0.0, pad_id=0, stop_ids=[stop])
    n0 = gen.mask[0].sum().item()
    first = (free.tokens[0] == stop).nonzero()[0].item()
    assert n0 == first + 1 and gen.stopped[0]
    assert gen.tokens[0, n0:].eq(0).all() and gen.logprobs[0, n0:].eq(0).all()
    # the other row is unaffected up to its own stop
    m1 = gen.mask[1].sum().item()
    assert gen.tokens[1, :m1].tolist() == free.tokens[1, :m1].tolist()
    # and it runs to its own stop (or the cap), not to row 0's
    hits = (free.tokens[1] == stop).nonzero()
    assert m1 == (hits[0].item() + 1 if len(hits) else 12) and bool(gen.stopped[1]) == bool(len(hits))
    assert m1 != n0


def test_sampled_logprobs_match_a_full_forward_at_temperature():
    model = tiny("llama_gqa")
    rows = [[5, 6, 7, 8], [9, 10]]
    gen = generate(model, rows, 8, temperature=0.7, pad_id=0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(gen.sequences, attention_mask=gen.attention_mask)
    P = gen.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1].float() / 0.7, -1).gather(-1, gen.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(logp * gen.mask, gen.logprobs, atol=1e-5, rtol=1e-5)


def test_vocab_limit_is_never_sampled():
    model = tiny("pythia")
    with torch.no_grad():
        model.lm_head.weight[90:] += 100.0  # make the padded rows overwhelmingly likely
    gen = generate(model, [[1, 2, 3]] * 4, 16, temperature=1.0, vocab_size=90,
                   generator=torch.Generator().manual_seed(0))
    assert gen.tokens.max() < 90


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 < 0.7 so 0.3 is needed; 0.8 >= 0.7 so 0.15 and 0.05 are dropped
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.0)).tolist() == [[False, True, True, True]]  # top token stays
    # ties with the k-th logit all stay; top-p then applies to what top-k left, renormalised ([0.4, 0.3] of
    # [0.4, 0.3, 0.2, 0.1] become [4/7, 3/7]: 4/7 >= 0.5, so 0.3 goes, where over the whole distribution it would stay)
    tied = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert torch.isinf(filter_logits(tied, top_k=2)).tolist() == [[False, False, False, False]]
    both = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert torch.isinf(filter_logits(both, top_k=2, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_logits(both, top_p=0.5)).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_after_the_final_norm(family):
    model = tiny(family)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        h = model(x, return_hidden=True)
        assert h.shape == (2, 9, 64)
        torch.testing.assert_close(model.lm_head(h), model(x))
        # after the final norm: unit RMS (LLaMA) or zero mean (LayerNorm) before the gain
        pre_gain = (h - (model.norm.bias if family == "pythia" else 0)) / model.norm.weight
        if family == "pythia":
            torch.testing.assert_close(pre_gain.mean(-1), torch.zeros(2, 9), atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(pre_gain.pow(2).mean(-1), torch.ones(2, 9), atol=1e-3, rtol=0)


def test_rmsnorm_statistics_are_computed_in_float32():
    from nanoalign.model import RMSNorm

    # in float16, 300^2 = 90000 overflows (max 65504): a half-precision mean of squares gives inf, and x / inf = 0
    x = 300.0 + 10.0 * torch.randn(2, 3, 64)
    norm = RMSNorm(64, eps=1e-6)
    expected = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    out = norm.half()(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


def test_llama3_rope_scaling_by_hand():
    from nanoalign.model import scale_inv_freq

    # original context 64, low/high factors 1 and 4: wavelengths > 64 are divided by 8, < 16 kept,
    # in between blended with weight (64 / wavelength - 1) / 3 on the unscaled frequency
    inv = 2 * math.pi / torch.tensor([8.0, 32.0, 128.0])  # wavelengths 8, 32, 128
    out = scale_inv_freq(inv, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    blend = (64 / 32 - 1) / 3
    expected = torch.stack([inv[0], (1 - blend) * inv[1] / 8 + blend * inv[1], inv[2] / 8])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(scale_inv_freq(inv, {"rope_type": "linear", "factor": 2.0}), inv / 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_multi_token_chunk_after_a_cached_prefix_equals_the_full_forward(family):
    """forward() with a cache at start_pos > 0 and T > 1 (a prompt fed in chunks): the chunk's queries sit at
    positions start_pos.. and see the whole cached prefix (the causal mask is not SDPA's top-left is_causal), and
    with a left-padding mask and no position_ids, positions are the mask's real-token count for the new columns."""
    model = tiny(family)
    x = torch.randint(3, 97, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 3, 20, "cpu", torch.float32)
        chunks = [model(x[:, :8], cache=cache, start_pos=0), model(x[:, 8:14], cache=cache, start_pos=8),
                  model(x[:, 14:], cache=cache, start_pos=14)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)

        rows = [x[0, :20].tolist(), x[1, :13].tolist(), x[2, :7].tolist()]
        ids, mask = left_pad(rows, pad_id=0)
        padded = model(ids, attention_mask=mask)
        cache = KVCache(model.cfg, 3, 20, "cpu", torch.float32)
        parts = [model(ids[:, :10], attention_mask=mask[:, :10], cache=cache, start_pos=0)]
        parts += [model(ids[:, 10:15], attention_mask=mask[:, :15], cache=cache, start_pos=10)]
        parts += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, start_pos=t) for t in range(15, 20)]
        got = torch.cat(parts, dim=1)
        for i, r in enumerate(rows):  # pad positions are garbage by design: compare the real tokens only
            torch.testing.assert_close(got[i, -len(r):], padded[i, -len(r):], atol=1e-5, rtol=1e-5)


def test_context_length_counts_the_cached_prefix_and_the_cache_refuses_overflow():
    model = tiny("llama_gqa")
    cache = KVCache(model.cfg, 1, 70, "cpu", torch.float32)  # a cache larger than the model's context
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than the context length 64"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache, start_pos=64)
    small = KVCache(model.cfg, 1, 6, "cpu", torch.float32)
    k = torch.zeros(1, model.cfg.n_kv_head, 2, model.cfg.head_dim)
    with pytest.raises(ValueError, match="KV cache holds 6 positions, asked to write up to 7"):
        small.update(0, 5, k, k)


def test_init_weights_by_hand():
    """GPT-2 init: norm gains 1, biases 0, the residual projections (wo, down) at std / sqrt(2 n_layer), every other
    matrix at std."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**dict(vocab_size=97, dim=64, n_layer=4, n_head=4, hidden_dim=96),
                                       **FAMILIES["pythia"]}))
    model.init_weights(std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.eq(0).all(), name
        elif p.dim() == 1:
            assert p.eq(1).all(), name
        else:
            expected = 0.02 / math.sqrt(8) if name.endswith(("wo.weight", "down.weight")) else 0.02
            assert abs(p.std().item() / expected - 1) < 0.1, (name, p.std().item(), expected)


@pytest.mark.parametrize("kw,message", [
    (dict(dim=64, n_head=4, n_kv_head=3), "n_head=4 must be a multiple of n_kv_head=3"),
    (dict(dim=60, n_head=4), r"rotary dimensions of a head \(head_dim=15 x rotary_pct=1.0\) must be even"),
    (dict(dim=64, n_head=4, rotary_pct=0.5, head_dim=10), "must be even"),
    (dict(dim=60, n_head=8), "dim=60 must be a multiple of n_head=8"),
    (dict(norm="rms_norm"), "^unknown norm 'rms_norm'$"),  # else built as a LayerNorm (anything but "rmsnorm" is)
    (dict(mlp="gelu_new"), "^unknown mlp 'gelu_new'$"),  # else the exact GELU, and HF's gelu_new is the tanh one
])
def test_model_config_refuses_impossible_shapes(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_attention_mask_4d_by_hand():
    """Causal, pads hidden, and every query sees itself, pads included: a pad query that saw no key at all would
    get NaN from the softmax on backends that do not zero fully masked rows, and NaN times a zero attention weight
    is NaN in every real token after it. Queries at start_pos.. for a chunk after a cached prefix."""
    pad_first = torch.tensor([[0, 1, 1]])
    assert attention_mask_4d(pad_first, 3, 0)[0, 0].tolist() == [[True, False, False],
                                                                 [False, True, False],
                                                                 [False, True, True]]
    two_pads = torch.tensor([[0, 0, 1, 1]])  # a chunk of 2 queries at cache positions 2, 3
    assert attention_mask_4d(two_pads, 2, 2)[0, 0].tolist() == [[False, False, True, False],
                                                                [False, False, True, True]]
    assert attention_mask_4d(two_pads[:, :2], 1, 1)[0, 0].tolist() == [[False, True]]  # a pad query: itself only


def test_generate_fits_prompt_and_new_tokens_in_the_context_exactly():
    """The sequences generate() returns go through a later forward (PPO's log-probs): prompt + max_new_tokens may
    reach the context length, not pass it, and an empty prompt is refused (it would sample from pads)."""
    model = tiny("llama_gqa")
    gen = generate(model, [[1] * 60], 4, temperature=0.0)
    assert gen.sequences.shape == (1, 64)
    with torch.no_grad():
        model(gen.sequences)
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ 5 new tokens exceeds the context length 64"):
        generate(model, [[1] * 60], 5, temperature=0.0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 4, temperature=0.0)
