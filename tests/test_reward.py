"""nanoalign/reward.py: where the score is read, the head init, the offset, and the checkpoint layout against
transformers' LlamaForSequenceClassification / GPTNeoXForSequenceClassification (loaded both ways)."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import reference

from nanoalign.checkpoint import load_pretrained, save_pretrained
from nanoalign.model import ModelConfig, Transformer
from nanoalign.reward import RewardModel, is_reward_checkpoint, set_offset_to_zero_mean
from nanoalign.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(dim=32, n_layer=2, n_head=2, hidden_dim=64, max_seq_len=64)
NEOX = dict(dim=32, n_layer=2, n_head=4, hidden_dim=64, max_seq_len=64, norm="layernorm", mlp="gelu", attn_bias=True,
            mlp_bias=True, rotary_pct=0.25, parallel_residual=True, model_type="gpt_neox")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="module")
def transformers():
    return reference("transformers")  # skipped when missing, a failure under NANOALIGN_REQUIRE_REFERENCE=1


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (gains and biases too), so that a wrong position, layout or norm moves the scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((0.15 if p.dim() == 2 else 0.1) * torch.randn(p.shape, generator=g))
    return model.eval()


def rm_model(tok, seed=0, offset=0.0, **kw):
    return randomized(RewardModel(ModelConfig(vocab_size=tok.vocab_size, **(kw or LLAMA)), offset=offset), seed)


def sequences(tok, n=3):
    """Rows of different lengths, none containing the pad id."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, tok.vocab_size, (length,), generator=g) for length in (7, 12, 4)[:n]]


def padded(rows, pad_id, side):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


@torch.no_grad()
def test_score_is_read_at_the_last_real_token_for_any_padding(tok):
    rm = rm_model(tok, offset=0.25)
    rows = sequences(tok)
    alone = torch.cat([rm(r[None]) for r in rows])
    right, left = rm(*padded(rows, tok.pad_id, "right")), rm(*padded(rows, tok.pad_id, "left"))
    assert (right - alone).abs().max() <= 1e-5 and (left - alone).abs().max() <= 1e-5
    # the last column of a right-padded batch is a pad for the short rows: reading there gives another number
    ids, _ = padded(rows, tok.pad_id, "right")
    assert (rm(ids) - alone)[[0, 2]].abs().min() > 1e-3


@torch.no_grad()
def test_per_token_values_at_the_last_real_position_equal_the_score(tok):
    rm = rm_model(tok, offset=-0.5)
    ids, mask = padded(sequences(tok), tok.pad_id, "left")
    values = rm(ids, mask, per_token=True)
    assert values.shape == ids.shape
    assert torch.equal(values[:, -1], rm(ids, mask))
    ids, mask = padded(sequences(tok), tok.pad_id, "right")
    values, scores = rm(ids, mask, per_token=True), rm(ids, mask)
    assert torch.equal(torch.stack([values[i, int(mask[i].sum()) - 1] for i in range(3)]), scores)


@torch.no_grad()
def test_the_trunk_is_the_causal_lm_and_the_head_reads_its_final_hidden_state(tok, tmp_path):
    lm = randomized(Transformer(ModelConfig(vocab_size=tok.vocab_size, **LLAMA)))
    save_pretrained(lm, tmp_path / "lm", tokenizer=tok)
    rm = RewardModel.from_causal_lm(tmp_path / "lm")
    assert rm.trunk.lm_head is None and not any("lm_head" in k for k in rm.state_dict())
    ids = torch.randint(3, tok.vocab_size, (2, 9))
    h = lm(ids, return_hidden=True)[:, -1]  # (B, C) after the final norm
    assert (rm(ids) - h @ rm.score.weight[0]).abs().max() <= 1e-5
    critic = RewardModel.from_causal_lm(tmp_path / "lm", head_init="zeros")
    assert torch.equal(critic(ids, per_token=True), torch.zeros(2, 9))


def test_head_init_is_normal_with_std_one_over_sqrt_d_plus_one(tok, tmp_path):
    # exactly the generator's draw ...
    lm = Transformer(ModelConfig(vocab_size=tok.vocab_size, **LLAMA))
    save_pretrained(lm, tmp_path / "lm")
    rm = RewardModel.from_causal_lm(tmp_path / "lm", generator=torch.Generator().manual_seed(3))
    expected = torch.empty(1, 32).normal_(0.0, 1 / math.sqrt(33), generator=torch.Generator().manual_seed(3))
    assert torch.equal(rm.score.weight, expected)
    # ... and on a wide head the sample std is 1/sqrt(d + 1) (PyTorch's default Linear init would give 1/sqrt(3d))
    torch.manual_seed(0)
    wide = RewardModel(ModelConfig(vocab_size=4, dim=8192, n_layer=0, n_head=1, hidden_dim=8))
    w = wide.score.weight
    assert abs(w.mean().item()) < 3 / math.sqrt(8193 * 8192)
    assert abs(w.std().item() * math.sqrt(8193) - 1) < 0.05
    with pytest.raises(ValueError, match="head_init='uniform'"):
        RewardModel.from_causal_lm(tmp_path / "lm", head_init="uniform")


@torch.no_grad()
def test_offset_normalisation_makes_the_mean_of_the_given_answers_zero(tok):
    rm = rm_model(tok, offset=3.0)
    ids, mask = padded(sequences(tok), tok.pad_id, "right")
    before = rm(ids, mask)
    offset = set_offset_to_zero_mean(rm, before.sum().item(), len(before))
    after = rm(ids, mask)
    assert offset == rm.offset and abs(after.mean().item()) <= 1e-6
    assert (after - (before - before.mean())).abs().max() <= 1e-6  # a shift: the differences are untouched
    with pytest.raises(ValueError, match="at least one"):
        set_offset_to_zero_mean(rm, 0.0, 0)


@pytest.mark.parametrize("kind", [LLAMA, NEOX], ids=["llama", "neox"])
def test_round_trip_is_exact(tok, tmp_path, kind):
    rm = rm_model(tok, offset=0.123456789, **kind)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    assert is_reward_checkpoint(tmp_path / "rm")
    back = RewardModel.from_pretrained(tmp_path / "rm")
    assert back.cfg == rm.cfg and back.offset == rm.offset
    a, b = rm.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.device("meta"):
        empty = RewardModel.from_config(tmp_path / "rm")
    assert empty.cfg == rm.cfg and empty.offset == rm.offset and empty.score.weight.is_meta


@pytest.mark.parametrize("kind", [LLAMA, NEOX], ids=["llama", "neox"])
def test_transformers_loads_the_saved_reward_model_and_scores_without_the_offset(tok, tmp_path, transformers, kind):
    rm = rm_model(tok, offset=0.75, **kind)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["pad_token_id"] == tok.pad_id != config["eos_token_id"] and config["nanoalign_reward_offset"] == 0.75
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    expected_class = "LlamaForSequenceClassification" if kind is LLAMA else "GPTNeoXForSequenceClassification"
    assert type(ref).__name__ == expected_class and ref.config.num_labels == 1
    # transformers reads the rightmost token that is not pad_token_id: right padding puts it at the last real one
    ids, mask = padded(sequences(tok), tok.pad_id, "right")
    with torch.no_grad():
        theirs, ours = ref(ids, attention_mask=mask).logits[:, 0], rm(ids, mask)
    assert (ours - theirs - 0.75).abs().max() <= 1e-4


def hf_reward_model(transformers, kind, num_labels=1):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=97,
                  max_position_embeddings=64, num_labels=num_labels, pad_token_id=0)
    if kind == "llama":
        model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(num_key_value_heads=2, **common))
    else:
        model = transformers.GPTNeoXForSequenceClassification(transformers.GPTNeoXConfig(rotary_pct=0.5, **common))
    return randomized(model)


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_a_transformers_reward_model_loads_and_scores_the_same(tmp_path, transformers, kind):
    ref = hf_reward_model(transformers, kind)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded: one layer across files
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    rm = RewardModel.from_pretrained(tmp_path / "hf")
    assert rm.offset == 0.0
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (11, 5, 8)]
    ids, mask = padded(rows, 0, "right")
    with torch.no_grad():
        assert (rm(ids, mask) - ref(ids, attention_mask=mask).logits[:, 0]).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_a_transformers_reward_model_with_pad_equal_to_eos_is_read_where_transformers_reads_it(tmp_path, transformers,
                                                                                            kind, tok):
    """TRL's usual set-up, pad = EOS: transformers reads such a model at the last token that is not EOS, the token
    before the trailing EOS, and it was trained there. Rows ending in EOS, right-padded with it: the same scores
    (reading the EOS itself was off by ~0.5 here), and saved back the convention stays in config.json."""
    ref = hf_reward_model(transformers, kind)
    ref.config.pad_token_id = ref.config.eos_token_id = 1
    ref.save_pretrained(tmp_path / "hf")
    rm = RewardModel.from_pretrained(tmp_path / "hf")
    assert rm.read_before == 1
    g = torch.Generator().manual_seed(3)
    rows = [torch.cat([torch.randint(2, 97, (n,), generator=g), torch.tensor([1])]) for n in (10, 4, 7)]
    ids, mask = padded(rows, 1, "right")
    with torch.no_grad():
        theirs = ref(ids, attention_mask=mask).logits[:, 0]
        assert (rm(ids, mask) - theirs).abs().max() <= 1e-4
        # without a mask (every token real), as transformers reads it without one: before the trailing EOS
        assert (rm(ids[:1]) - ref(ids[:1]).logits[:, 0]).abs().max() <= 1e-4
        rm.read_before = None  # the last attended token, the EOS: a position this model never learned
        assert (rm(ids, mask) - theirs).abs().max() > 1e-2
        rm.read_before = 1
    rm.save_pretrained(tmp_path / "again", tokenizer=tok)  # our tokenizer pads with 2; the model is read before 1
    assert json.loads((tmp_path / "again" / "config.json").read_text())["pad_token_id"] == 1
    assert RewardModel.from_pretrained(tmp_path / "again").read_before == 1


def test_a_pad_that_text_can_contain_is_not_named_in_a_saved_reward_models_config(tok, tmp_path):
    """A filler pad that is an ordinary token would make transformers read a row ending in it one token early."""
    rm = rm_model(tok, **LLAMA)
    text_pad = copy.copy(tok)
    text_pad.pad_id = 50  # an ordinary token of the vocabulary
    assert text_pad.pad_is_text and not tok.pad_is_text
    rm.save_pretrained(tmp_path / "rm", tokenizer=text_pad)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] is None
    assert RewardModel.from_pretrained(tmp_path / "rm").read_before is None


def test_loading_errors_name_the_problem(tok, tmp_path, transformers):
    lm = Transformer(ModelConfig(vocab_size=tok.vocab_size, **LLAMA))
    save_pretrained(lm, tmp_path / "lm")
    with pytest.raises(ValueError, match="no score.weight.*LlamaForCausalLM.*from_causal_lm"):
        RewardModel.from_pretrained(tmp_path / "lm")
    rm_model(tok).save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="already a reward model"):
        RewardModel.from_causal_lm(tmp_path / "rm")
    # and read where a language model is expected (--init, --model_a): it said "unexpected tensors: score.weight"
    with pytest.raises(ValueError, match=r"rm is a reward model \(LlamaForSequenceClassification: a score\.weight "
                                         r"head, no lm_head\.weight\), not a language model; pass a policy or SFT"):
        load_pretrained(tmp_path / "rm")
    hf_reward_model(transformers, "llama", num_labels=2).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="num_labels is 2"):
        RewardModel.from_pretrained(tmp_path / "two")

    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "rm" / "model.safetensors")
    save_file({**tensors, "lm_head.weight": torch.zeros(tok.vocab_size, 32)}, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(KeyError, match=r"unexpected tensors: lm_head.weight \(in model.safetensors\)"):
        RewardModel.from_pretrained(tmp_path / "rm")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "rm" / "model.safetensors")
    with pytest.raises(KeyError, match="missing tensors: model.norm.weight"):
        RewardModel.from_pretrained(tmp_path / "rm")


DROP = object()  # edited_config: remove the key


def edited_config(tmp_path, tok, **changes):
    """A saved reward model whose config.json has the given keys set (DROP: removed; None: null)."""
    rm_model(tok).save_pretrained(tmp_path / "rm", tokenizer=tok)
    path = tmp_path / "rm" / "config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))
    return tmp_path / "rm"


@pytest.mark.parametrize("changes, match", [
    # transformers assumes num_labels 2 when config.json lists no labels: it would not load one score
    ({"id2label": DROP, "label2id": DROP}, "num_labels is 2"),
    ({"vocab_size": DROP}, None),  # absent: taken from the embedding (the only case that loads)
    ({"vocab_size": 1}, "vocab_size 1 disagrees"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),  # a score.weight under a causal LM's name
    ({"nanoalign_reward_offset": float("nan")}, "finite number"),
    ({"nanoalign_reward_offset": float("inf")}, "finite number"),
    ({"nanoalign_reward_offset": "0.5"}, "finite number"),
    ({"nanoalign_reward_offset": True}, "finite number"),
    ({"nanoalign_reward_offset": None}, "finite number"),  # null, not absent (absent means 0)
    # the token the score is never read at: true would be id 1, "1" and 1.0 no id at all
    ({"pad_token_id": True}, "pad_token_id must be a token id, got True"),
    ({"pad_token_id": "1"}, "pad_token_id must be a token id, got '1'"),
    ({"pad_token_id": 1.0}, "pad_token_id must be a token id, got 1.0"),
], ids=["no_labels", "no_vocab_size", "vocab_size", "causal_lm", "nan", "inf", "string", "bool", "null", "pad_bool",
        "pad_string", "pad_float"])
def test_a_damaged_reward_config_is_one_error_naming_the_key(tok, tmp_path, changes, match):
    ckpt = edited_config(tmp_path, tok, **changes)
    if match is None:
        assert RewardModel.from_pretrained(ckpt).cfg.vocab_size == tok.vocab_size
        return
    with pytest.raises(ValueError, match=match):
        RewardModel.from_pretrained(ckpt)
