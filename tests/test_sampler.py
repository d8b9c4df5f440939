"""The fast sampler (nanoalign/generate.py) against the plain loop it replaced, kept below as the reference.

The reference runs the model's forward through the KV cache one token at a time, concatenates the
attention mask every step, takes a full log_softmax for the log-probs and checks for stopped rows every
step. Greedy decoding must give the same tokens, masks, stop flags and log-probs on left-padded batches
whose rows stop at different steps, in both model families.

Sampling draws one uniform number per row and step and inverts the CDF, where torch.multinomial would
draw one exponential number per vocabulary entry: the random stream is consumed differently, so a seed
cannot reproduce a multinomial loop. Instead (1) the reference loop, given the same inverse-CDF draw written
out naively, reproduces the sampled tokens exactly (this checks the loop: cache, positions, masks, stops),
and (2) the distribution of the first sampled token over many rows matches softmax(logits / temperature)
from a full forward, by a chi-square test (this checks the draw itself).
"""
import itertools
import math
import platform

import pytest
import torch
import torch.nn.functional as F

import nanoalign.generate
from nanoalign.generate import (Generation, PackedLinear, PackedModel, can_prepack, decode_step, filter_logits,
                                generate, left_pad, prepacked, sample_next)
from nanoalign.model import KVCache, ModelConfig, Transformer, rope_cos_sin

FAMILIES = {
    "llama_gqa": dict(norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, rope_base=500.0),
    "neox": dict(norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, rotary_pct=0.25,
                 parallel_residual=True, model_type="gpt_neox"),
}
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22]]  # left-padded to 7


def tiny(family, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, dim=32, n_layer=2, n_head=4, hidden_dim=64, max_seq_len=64)
    model = Transformer(ModelConfig(**{**base, **FAMILIES[family], **kw}))
    model.init_weights(std=0.3)  # large weights: peaked, position-sensitive distributions
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm gains and biases
    return model.eval()


def naive_inverse_cdf(generator):
    """The sampler's draw written plainly: one float64 uniform per row, the first id whose running sum of
    probabilities reaches it."""
    def draw(probs):  # (B, V)
        cdf = probs.double().cumsum(-1)
        u = (1 - torch.rand((probs.shape[0], 1), dtype=torch.float64, generator=generator)) * cdf[:, -1:]
        return (cdf < u).sum(-1)
    return draw


@torch.no_grad()
def reference_generate(model, prompts, max_new_tokens, *, stop_ids=(), pad_id=0, temperature=1.0,
                       vocab_size=None, draw=None):
    """The sampling loop as first written (greedy when temperature is 0, else `draw(probs)` picks the ids)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    B, P = prompt_ids.shape
    cache = KVCache(model.cfg, B, P + max_new_tokens, "cpu", torch.float32)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long)
    logprobs = torch.zeros((B, max_new_tokens))
    done = torch.zeros(B, dtype=torch.bool)
    stopped = torch.zeros(B, dtype=torch.bool)
    attn = prompt_mask if bool((prompt_mask == 0).any()) else None
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(prompt_ids, attention_mask=attn, position_ids=positions, cache=cache, start_pos=0)[:, -1]
    next_pos = positions[:, -1:] + 1
    for t in range(max_new_tokens):
        logits = logits.float().clone()
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        scaled = logits / temperature if temperature > 0 else logits
        logp = F.log_softmax(scaled, dim=-1)
        nxt = logits.argmax(-1) if temperature == 0 else draw(logp.exp())
        for i in range(B):
            if not done[i]:
                tokens[i, t], mask[i, t], logprobs[i, t] = nxt[i], 1, logp[i, nxt[i]]
                if int(nxt[i]) in stop_ids:
                    stopped[i] = done[i] = True
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if attn is not None:
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        logits = model(tokens[:, t:t + 1], attention_mask=attn, position_ids=next_pos, cache=cache,
                       start_pos=P + t)[:, -1]
        next_pos = next_pos + 1
    return tokens, mask, logprobs, stopped


def stop_steps(free, stops):
    """The step at which each row of a free (stop-less) run meets a stop id, None if it never does."""
    return [next((t for t, x in enumerate(row) if x in stops), None) for row in free.tolist()]


def stop_ids_for(model, N):
    """Two or three stop ids that end rows 0-2 of greedy decoding at three different steps (none at the
    first) and never occur in the last row, which runs to N: the cases the mask bookkeeping must tell apart."""
    free = reference_generate(model, ROWS, N, temperature=0.0)[0]
    candidates = sorted(set(free[:-1].flatten().tolist()) - set(free[-1].tolist()))
    for ids in itertools.chain(itertools.combinations(candidates, 2), itertools.combinations(candidates, 3)):
        steps = stop_steps(free, ids)[:-1]
        if None not in steps and len(set(steps)) == 3 and min(steps) > 0:
            return list(ids)
    raise AssertionError(f"no suitable stop ids in {free.tolist()}")


def assert_same(gen, ref):
    tokens, mask, logprobs, stopped = ref
    assert gen.tokens.tolist() == tokens.tolist()
    assert gen.mask.tolist() == mask.tolist()
    assert gen.stopped.tolist() == stopped.tolist()
    torch.testing.assert_close(gen.logprobs, logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_the_reference_loop_with_rows_stopping_at_different_steps(family):
    model = tiny(family)
    stops = stop_ids_for(model, 12)
    gen = generate(model, ROWS, 12, stop_ids=stops, pad_id=0, temperature=0.0)
    assert_same(gen, reference_generate(model, ROWS, 12, stop_ids=stops, pad_id=0, temperature=0.0))
    assert gen.stopped.tolist() == [True, True, True, False]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_without_padding_or_stop_ids_equals_the_reference_loop(family):
    model = tiny(family)
    rows = [[3, 4, 5, 6], [7, 8, 9, 10]]
    assert_same(generate(model, rows, 20, temperature=0.0), reference_generate(model, rows, 20, temperature=0.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_equals_the_reference_loop_drawing_the_same_way(family):
    model = tiny(family)
    stops = stop_ids_for(model, 12)
    gen = generate(model, ROWS, 12, stop_ids=stops, pad_id=0, temperature=0.7, vocab_size=90,
                   generator=torch.Generator().manual_seed(3))
    ref = reference_generate(model, ROWS, 12, stop_ids=stops, pad_id=0, temperature=0.7, vocab_size=90,
                             draw=naive_inverse_cdf(torch.Generator().manual_seed(3)))
    assert_same(gen, ref)
    assert len(set(gen.tokens[:, 0].tolist())) > 1  # sampled, not a constant


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_a_full_forward_at_temperature(family):
    model = tiny(family)
    gen = generate(model, ROWS, 10, stop_ids=stop_ids_for(model, 10), pad_id=0, temperature=0.7,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(gen.sequences, attention_mask=gen.attention_mask)
    P = gen.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1] / 0.7, -1).gather(-1, gen.tokens[..., None])[..., 0]
    torch.testing.assert_close(logp * gen.mask, gen.logprobs, atol=1e-5, rtol=0)


def test_mask_and_stop_semantics():
    model = tiny("neox")
    free = generate(model, ROWS, 12, temperature=0.0)
    stops = stop_ids_for(model, 12)
    gen = generate(model, ROWS, 12, stop_ids=stops, pad_id=0, temperature=0.0)
    for i, step in enumerate(stop_steps(free.tokens, stops)):
        n = 12 if step is None else step + 1  # the stop token itself is part of the response
        assert gen.stopped[i].item() == (step is not None)
        assert gen.mask[i].tolist() == [1] * n + [0] * (12 - n)
        assert gen.tokens[i, :n].tolist() == free.tokens[i, :n].tolist() == gen.response(i)
        assert gen.tokens[i, n:].eq(0).all() and gen.logprobs[i, n:].eq(0).all()
        torch.testing.assert_close(gen.logprobs[i, :n], free.logprobs[i, :n], atol=1e-6, rtol=0)


def record_decode_steps(monkeypatch) -> list:
    """Patch both decode step paths, the plain one and the one on prepacked weights that a CPU build with oneDNN
    runs instead, to record the positions each call is given; returns the list they are recorded into."""
    calls = []

    def recording(step):  # args: (model or PackedModel, ids, pos, ...); pos advances in place, so it is copied
        return lambda *args: calls.append(args[2].clone()) or step(*args)

    monkeypatch.setattr(nanoalign.generate, "decode_step", recording(decode_step))
    monkeypatch.setattr(PackedModel, "decode_step", recording(PackedModel.decode_step))
    return calls


def test_the_loop_ends_once_every_row_has_stopped(monkeypatch):
    model = tiny("llama_gqa")
    free = generate(model, [[5, 6, 7], [8, 9]], 12, temperature=0.0)
    stops = [free.tokens[0, 1].item(), free.tokens[1, 2].item()]  # every row is done by step 2
    calls = record_decode_steps(monkeypatch)
    for prepack in (True, False):
        calls.clear()
        gen = generate(model, [[5, 6, 7], [8, 9]], 12, stop_ids=stops, temperature=0.0, prepack=prepack)
        last = int(gen.mask.sum(1).max())
        assert gen.stopped.all() and last <= 3
        assert len(calls) == last - 1  # one forward per token after the first, none once all rows stopped


def test_rotary_positions_count_real_tokens_in_every_forward(monkeypatch):
    """Left pads take no position: a row's tokens sit at 0, 1, 2, ... whatever its padding, in the model's default
    forward, in the log-probs PPO and DPO recompute, and at every step of the sampler (both step paths). RoPE is
    relative, so positions shifted by a row's pad count would move the logits only by rounding (~1e-6, under
    the parity tests' tolerance): this test records the positions themselves."""
    from nanoalign import losses, ppo
    model, prompts, n = tiny("llama_gqa"), [[5, 6, 7], [8], [9, 10, 11, 12, 13]], 6
    real = torch.tensor([len(p) for p in prompts])
    ids, attn = left_pad(prompts, 0, "cpu")
    counted = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]])  # (cumsum(mask) - 1), pads at 0
    seen = []
    monkeypatch.setattr(nanoalign.model, "rope_cos_sin",
                        lambda pos, *a, _f=nanoalign.model.rope_cos_sin: seen.append(pos.clone()) or _f(pos, *a))
    for forward in (lambda: model(ids, attention_mask=attn), lambda: losses.token_logprobs(model, ids, attn),
                    lambda: ppo.response_logprobs(model, ids, attn, 2, 1.0)):
        seen.clear()
        forward()
        assert len(seen) == 1 and torch.equal(seen[0], counted)
    steps = record_decode_steps(monkeypatch)
    for prepack in (True, False):
        seen.clear(), steps.clear()
        generate(model, prompts, n, temperature=0.0, prepack=prepack)
        assert torch.equal(seen[0], counted)  # the prompt's forward
        assert len(steps) == n - 1
        for k, pos in enumerate(steps):  # the token sampled at step k sits right after the k before it
            assert torch.equal(pos[:, 0], real + k), (prepack, k)


def chi_square(counts, probs, n):
    """Pearson's statistic and its degrees of freedom, bins with an expected count under 5 pooled."""
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def first_token_counts(model, n, **kw):
    gen = generate(model, [[5, 6, 7]] * n, 1, generator=torch.Generator().manual_seed(11), **kw)
    return torch.bincount(gen.tokens[:, 0], minlength=model.cfg.vocab_size).double(), gen


def reject_level(dof):
    return dof + 6 * math.sqrt(2 * dof)  # six standard deviations above the statistic's mean


@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_distribution_is_softmax_of_logits_over_temperature(family):
    model = tiny(family)
    n = 20000
    counts, gen = first_token_counts(model, n, temperature=0.7)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]]))[0, -1].double()
    probs = torch.softmax(logits / 0.7, -1)
    assert (probs > 1e-3).sum() >= 10  # a spread-out distribution, not a near-argmax
    stat, dof = chi_square(counts, probs, n)
    assert stat < reject_level(dof), (stat, dof)
    # the test has power: the same counts are rejected against the distribution at temperature 1
    wrong, dof_w = chi_square(counts, torch.softmax(logits, -1), n)
    assert wrong > reject_level(dof_w), (wrong, dof_w)
    # and every sampled id's log-prob is the one of that distribution
    torch.testing.assert_close(gen.logprobs[:, 0].double(), probs.log()[gen.tokens[:, 0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.6), dict(top_k=8, top_p=0.8)])
def test_top_k_and_top_p_sample_the_filtered_distribution(kw):
    model = tiny("llama_gqa")
    n = 20000
    counts, gen = first_token_counts(model, n, temperature=0.7, **kw)
    with torch.no_grad():
        scaled = model(torch.tensor([[5, 6, 7]]))[0, -1].double() / 0.7
    kept = filter_logits(scaled[None], kw.get("top_k"), kw.get("top_p"))[0]
    allowed = torch.isfinite(kept)
    assert 1 < int(allowed.sum()) < 20
    assert counts[~allowed].sum() == 0  # nothing outside the filter, ever
    stat, dof = chi_square(counts, torch.softmax(kept, -1), n)
    assert stat < reject_level(dof), (stat, dof)
    # the log-probs stay those of the unfiltered distribution (what the PPO trainer recomputes)
    full = torch.log_softmax(scaled, -1)[gen.tokens[:, 0]]
    torch.testing.assert_close(gen.logprobs[:, 0].double(), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_vocab_limit_are_never_produced(temperature):
    model = tiny("neox")
    with torch.no_grad():  # the padded ids get logit 100 * 10, the others stay small
        model.norm.weight[0], model.norm.bias[0] = 0.0, 10.0
        model.lm_head.weight[90:] = 0.0
        model.lm_head.weight[90:, 0] = 100.0
        assert model(torch.tensor([[1, 2, 3]]))[0, -1].argmax() >= 90
    gen = generate(model, [[1, 2, 3]] * 16, 8, temperature=temperature, vocab_size=90,
                   generator=torch.Generator().manual_seed(0))
    assert gen.tokens.max() < 90
    ref = reference_generate(model, [[1, 2, 3]] * 16, 8, temperature=temperature, vocab_size=90,
                             draw=naive_inverse_cdf(torch.Generator().manual_seed(0)))
    assert_same(gen, ref)


def assert_steps_equal_the_forward(model, step):
    """Run ROWS (left-padded) through the model into a cache, then feed 4 more tokens one at a time through
    step(ids, pos, key_mask, cache, column, cos, sin), key_mask covering the whole cache; each step's logits must be
    those of the full forward over prompt and tokens."""
    ids, mask = left_pad(ROWS, pad_id=0)
    B, P = ids.shape
    new = torch.randint(1, 97, (B, 4), generator=torch.Generator().manual_seed(0))
    L = P + new.shape[1]
    cfg = model.cfg
    with torch.no_grad():
        full = model(torch.cat([ids, new], 1), attention_mask=torch.cat([mask, torch.ones_like(new)], 1))
        cache = KVCache(cfg, B, L, "cpu", torch.float32)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(ids, attention_mask=mask, position_ids=positions, cache=cache)
        key_mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
        key_mask[:, 0, 0, :P] = mask.bool()
        cos, sin = (t[0, 0] for t in rope_cos_sin(torch.arange(L)[None], cfg.rotary_dim, cfg.rope_base,
                                                  torch.float32, cfg.rope_scaling))
        pos = positions[:, -1:] + 1
        for t in range(new.shape[1]):
            key_mask[:, 0, 0, P + t] = True
            logits = step(new[:, t:t + 1], pos, key_mask, cache, P + t, cos, sin)
            torch.testing.assert_close(logits, full[:, P + t], atol=1e-5, rtol=1e-5)
            pos += 1


@pytest.mark.parametrize("family", FAMILIES)
def test_static_shape_step_equals_the_forward(family):
    # the step a CUDA graph captures, run eagerly: the write column is a tensor, the whole cache is attended
    # and the mask hides the columns not written yet; its logits must be the full forward's
    model = tiny(family)
    assert_steps_equal_the_forward(model, lambda ids, pos, key_mask, cache, column, cos, sin: decode_step(
        model, ids, pos, key_mask, cache, torch.tensor([column]), cos, sin))


@pytest.mark.parametrize("family,kw", [("llama_gqa", {}), ("neox", {}), ("llama_gqa", dict(mlp="gelu_tanh")),
                                       ("neox", dict(rotary_pct=1.0, parallel_residual=False))])
def test_packed_decode_step_equals_the_forward(family, kw):
    # the step generate() runs on a CPU: fused matmuls, q and k rotated together; GQA, partial rotary, parallel
    # residual, every MLP; the prompt's forward packed too, the cache and mask sliced up to the column written as
    # generate() does
    model = tiny(family, **kw)
    if not can_prepack(model):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    with torch.no_grad(), prepacked(model, rows=len(ROWS)) as packed:
        assert_steps_equal_the_forward(model, lambda ids, pos, key_mask, cache, column, cos, sin: packed.decode_step(
            ids, pos, key_mask[..., :column + 1], cache, column, cos, sin))


def patched_names(model):
    """The instance attributes prepacked() sets, present on the model right now."""
    modules = [model.lm_head] + [m for b in model.layers for m in (b.attn, b.mlp, b.attn.wo, b.mlp.down)]
    return [name for m in modules for name in ("forward", "project_qkv", "project_in") if name in m.__dict__]


def test_onednn_prepacking_is_available_on_x86():
    # the CPU sampler's speed rests on it; on an x86 build of torch its absence is a regression, not a skip
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN prepacking is only required of x86 builds of torch")
    assert can_prepack(tiny("llama_gqa"))


@pytest.mark.parametrize("family", FAMILIES)
def test_prepacked_projections_compute_the_models_forward_and_are_removed_after(family):
    model = tiny(family)
    if not can_prepack(model):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    ids, mask = left_pad(ROWS, pad_id=0)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask)
        with prepacked(model, rows=len(ROWS)):
            assert len(patched_names(model)) == 1 + 4 * model.cfg.n_layer  # every projection runs packed
            packed = model(ids, attention_mask=mask)
        after = model(ids, attention_mask=mask)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert patched_names(model) == [] and torch.equal(after, plain)


def test_prepacked_restores_the_model_when_the_body_raises():
    model = tiny("llama_gqa")
    if not can_prepack(model):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with prepacked(model, rows=2):
            raise RuntimeError("boom")
    assert patched_names(model) == []


def test_prepacked_nests_keeps_earlier_overrides_and_refuses_gradients():
    model = tiny("llama_gqa")
    if not can_prepack(model):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    ids = torch.tensor([[3, 4, 5]])
    own_head = model.lm_head.forward  # a user's instance-level override must survive a generate() call
    model.lm_head.forward = lambda x: own_head(x) * 2
    with torch.no_grad():
        doubled = model(ids)
        with prepacked(model, rows=1):
            outer = model.layers[0].attn.project_qkv
            with prepacked(model, rows=1):
                pass
            assert model.layers[0].attn.project_qkv is outer  # the inner exit gave the outer packing back
            torch.testing.assert_close(model(ids), 0.5 * doubled, atol=1e-5, rtol=1e-5)  # packed head, not doubled
        assert patched_names(model) == ["forward"] and torch.equal(model(ids), doubled)
    with pytest.raises(RuntimeError, match="for inference"):
        with prepacked(model, rows=1):
            pass


def test_the_oneDNN_probe_leaves_the_global_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    nanoalign.generate._onednn_packing_works.cache_clear()  # the probe runs once a process: make it run here
    torch.manual_seed(0)
    nanoalign.generate._onednn_packing_works()
    assert torch.equal(torch.rand(3), expected)


def test_packed_linear_stacks_layers_and_adds_their_biases():
    if not can_prepack(tiny("neox")):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, n) for n in (5, 3)]
    x = torch.randn(2, 3, 8)
    packed = PackedLinear(layers, rows=6)
    out = packed(x)
    assert out.shape == (2, 3, 8) and packed.splits == [5, 3]
    for part, layer in zip(out.split(packed.splits, -1), layers):
        torch.testing.assert_close(part, x @ layer.weight.detach().T + layer.bias.detach(), atol=1e-6, rtol=1e-6)


def test_packed_linear_fuses_activations_products_and_sums():
    if not can_prepack(tiny("neox")):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6)
    packed = PackedLinear([layer], rows=4)
    x, other = torch.randn(4, 8), torch.randn(4, 6)
    with torch.no_grad():
        y = layer(x)
        for kw, expected in [(dict(activation="swish"), F.silu(y)),
                             (dict(activation="gelu", approximate="none"), F.gelu(y)),
                             (dict(activation="gelu", approximate="tanh"), F.gelu(y, approximate="tanh")),
                             (dict(mul=other), y * other), (dict(add=other), y + other)]:
            torch.testing.assert_close(packed(x, **kw), expected, atol=1e-5, rtol=1e-5)
        # the fused sum is exact: the same bits as the packed matmul's output plus the other tensor
        assert torch.equal(packed(x, add=other), packed(x) + other)
        assert packed(x[None], add=other[None]).shape == (1, 4, 6)  # (B, T, C) inputs run as rows
        with pytest.raises(ValueError, match="one step"):
            packed(x, activation="swish", add=other)  # oneDNN would apply only one of them


def test_prepacking_is_refused_where_it_would_change_the_arithmetic(monkeypatch):
    model = tiny("llama_gqa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_prepack(model)  # the packed fp32 matmul would ignore autocast
    assert not can_prepack(tiny("llama_gqa").bfloat16())
    if not can_prepack(model):  # each refusal above only means something where the plain model is packed
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    # oneDNN switched off by the user (what torch.backends.mkldnn.flags(enabled=False) does): its packed kernels
    # must not run
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not can_prepack(model)


@pytest.mark.parametrize("family,tied", [("llama_gqa", False), ("neox", False), ("llama_gqa", True)])
def test_generate_with_and_without_prepacking_gives_the_same_tokens(family, tied, monkeypatch):
    model = tiny(family, tie_embeddings=tied)
    if not can_prepack(model):
        pytest.skip("this torch build cannot prepack weights with oneDNN")
    calls = []
    original = PackedLinear.__call__
    monkeypatch.setattr(PackedLinear, "__call__", lambda self, x, **kw: calls.append(1) or original(self, x, **kw))
    stops = stop_ids_for(model, 12)
    for rows in (ROWS, [[7]], [[7], [8, 9]]):  # left-padded rows, and one-token prompts
        for temperature in (0.0, 0.8):
            kw = dict(stop_ids=stops, pad_id=0, temperature=temperature)
            calls.clear()
            packed = generate(model, rows, 12, generator=torch.Generator().manual_seed(3), **kw)
            # the prompt's forward and every decode step but the last token's (never fed back) ran packed: q/k/v
            # stacked, o, gate (SwiGLU), up and down in every layer, and the head
            per_layer = 5 if model.cfg.mlp == "swiglu" else 4
            assert len(calls) == int(packed.mask.sum(1).max()) * (per_layer * model.cfg.n_layer + 1)
            calls.clear()
            plain = generate(model, rows, 12, generator=torch.Generator().manual_seed(3), prepack=False, **kw)
            assert calls == []
            assert packed.tokens.tolist() == plain.tokens.tolist() and packed.mask.tolist() == plain.mask.tolist()
            torch.testing.assert_close(packed.logprobs, plain.logprobs, atol=1e-5, rtol=0)


def test_both_cache_writes_cast_to_the_cache_dtype():
    # under autocast the keys and values arrive in bf16 while the cache holds the weights' fp32: the graph's
    # tensor-position write must store what the eager loop's slice write stores (it once raised instead)
    cfg = tiny("llama_gqa").cfg
    k, v = (torch.randn(2, cfg.n_kv_head, 1, cfg.head_dim).bfloat16() for _ in range(2))
    by_slice, by_index = (KVCache(cfg, 2, 6, "cpu", torch.float32) for _ in range(2))
    by_slice.update(0, 3, k, v)
    by_index.update(0, torch.tensor([3]), k, v)
    for a, b in ((by_slice.k[0], by_index.k[0]), (by_slice.v[0], by_index.v[0])):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and a.abs().sum() > 0


def test_non_finite_logits_are_refused():
    model = tiny("llama_gqa")
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="non-finite logits \\(NaN or inf\\) while sampling$"):
            generate(model, [[1, 2, 3]], 4, temperature=temperature, generator=torch.Generator().manual_seed(0))
    # a finite model at a temperature so small that logits / temperature overflow: the message says so
    with pytest.raises(ValueError, match="or temperature 1e-300 is small enough for logits / temperature to overflow"):
        generate(tiny("llama_gqa"), [[1, 2, 3]], 4, temperature=1e-300, generator=torch.Generator().manual_seed(0))


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(tiny("llama_gqa"), [[1, 2, 3]], 4, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_replay_equals_the_eager_loop(family):
    model = tiny(family).cuda()
    stops = stop_ids_for(model.cpu(), 12)
    model.cuda()
    kw = dict(stop_ids=stops, pad_id=0, temperature=0.0)
    eager, graphed = generate(model, ROWS, 12, **kw), generate(model, ROWS, 12, cuda_graph=True, **kw)
    assert graphed.tokens.tolist() == eager.tokens.tolist() and graphed.mask.tolist() == eager.mask.tolist()
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_sampling_draws_the_eager_loops_tokens(family):
    """Seeded sampling (T = 0.7) on left-padded rows: the replayed graph computes the eager step's logits and
    consumes the CUDA generator the same way, so one seed gives the same tokens and log-probs."""
    model = tiny(family).cuda()

    def draw(**kw):
        g = torch.Generator("cuda").manual_seed(3)
        return generate(model, ROWS, 12, pad_id=0, temperature=0.7, generator=g, **kw)

    eager, graphed = draw(), draw(cuda_graph=True)
    assert graphed.tokens.tolist() == eager.tokens.tolist()
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, atol=1e-4, rtol=0)
    assert eager.logprobs.sum() < 0  # something was sampled, not all pads


# --- behaviours the parity tests above cannot see (found by mutation testing)


def test_response_and_answer_of_stopped_and_cut_rows_by_hand():
    """answer() drops the stop token of a row that stopped, and nothing of a row cut by max_new_tokens (dropping
    its last token, or keeping a stop id that is an ordinary token, would change every evaluated answer)."""
    gen = Generation(tokens=torch.tensor([[4, 9, 3], [5, 6, 7]]), mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
                     logprobs=torch.zeros(2, 3), prompt_ids=torch.tensor([[3, 1], [2, 8]]),
                     prompt_mask=torch.tensor([[0, 1], [1, 1]]), stopped=torch.tensor([True, False]))
    assert (gen.response(0), gen.answer(0)) == ([4, 9], [4])
    assert (gen.response(1), gen.answer(1)) == ([5, 6, 7], [5, 6, 7])
    assert gen.sequences.tolist() == [[3, 1, 4, 9, 3], [2, 8, 5, 6, 7]]
    assert gen.attention_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_a_nonzero_pad_id_fills_the_prompts_pads_and_every_column_after_a_stop():
    """Every other test pads with 0, the value a zero-initialised buffer holds anyway: with pad_id 3 the prompt's
    left pads and every response column after a row's stop (the columns the early exit never visits included)
    must read 3."""
    model, prompts = tiny("llama_gqa"), [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, 12, temperature=0.0)
    stops = [free.tokens[0, 1].item(), free.tokens[1, 2].item()]  # every row is done by step 2
    assert 3 not in stops
    gen = generate(model, prompts, 12, stop_ids=stops, pad_id=3, temperature=0.0)
    assert gen.stopped.all() and int(gen.mask.sum(1).max()) < 12  # the loop ended early
    assert gen.prompt_ids[1, 0].item() == 3 and gen.prompt_mask[1, 0].item() == 0
    assert gen.tokens[gen.mask == 0].eq(3).all() and (gen.mask == 0).sum() > 12


def test_filter_logits_on_unsorted_logits_by_hand():
    # the hand test in test_model.py gives its logits sorted, where forgetting to scatter the sorted drop mask back
    # to vocabulary order changes nothing; here the most likely ids sit in the middle
    logits = torch.log(torch.tensor([[0.05, 0.3, 0.5, 0.15]]))
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[True, False, False, False]]
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_it_exactly():
    """Four equally likely ids (probability 0.25 each, exact in float): the smallest set with probability >= 0.5
    is two ids, not three (a token is dropped once the ones above it *reach* top_p, not exceed it)."""
    flat = torch.zeros(1, 4)
    assert int(torch.isfinite(filter_logits(flat, top_p=0.5)).sum()) == 2
    assert int(torch.isfinite(filter_logits(flat, top_p=0.25)).sum()) == 1
    assert int(torch.isfinite(filter_logits(flat, top_p=0.75)).sum()) == 3


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    # top_k is a user's number and a vocabulary may be smaller (a padded model's vocab_size cut): no error, no-op
    logits = torch.log(torch.tensor([[0.05, 0.3, 0.5, 0.15]]))
    assert torch.equal(filter_logits(logits, top_k=50), logits)
    gen = generate(tiny("llama_gqa"), [[5, 6, 7]], 3, temperature=1.0, top_k=500, vocab_size=90,
                   generator=torch.Generator().manual_seed(0))
    assert gen.mask.sum() == 3


def test_inverse_cdf_keeps_an_interval_for_ids_below_float32_resolution(monkeypatch):
    """The running sums are float64 so that an id far less likely than the top one keeps its own interval: here id 1
    weighs e^-20 ~ 2e-9 of the top id, below float32's resolution at 1 (1.2e-7), so in float32 sums it would never be
    drawn. The uniform draw is pinned to land inside id 1's interval (1, 1 + w]."""
    logits = torch.tensor([[0.0, -20.0, 0.0]])
    w = math.exp(-20.0)
    total = 2.0 + w
    r = 1 - (1 + w / 2) / total  # u = (1 - r) * total = 1 + w / 2: the middle of id 1's interval
    monkeypatch.setattr(torch, "rand", lambda shape, dtype=None, device=None, generator=None:
                        torch.full(shape, r, dtype=dtype, device=device))
    nxt, logp = sample_next(logits, 1.0, None, None)
    assert nxt.tolist() == [1]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[:, 1])
