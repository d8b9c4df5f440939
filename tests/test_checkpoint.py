"""Strict loading and safe saving: each malformed checkpoint raises an error naming what is wrong."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import reference
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoalign.checkpoint import fuse_qkv, load_pretrained, save_pretrained, split_qkv, write_pretrained
from nanoalign.model import ModelConfig, Transformer


def saved(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, dim=32, n_layer=2, n_head=2, hidden_dim=48, max_seq_len=32), **kw})
    model = Transformer(cfg)
    model.init_weights()
    return model, save_pretrained(model, tmp_path / "ckpt")


def rewrite(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_save_load_round_trip_is_exact(tmp_path):
    model, d = saved(tmp_path, tie_embeddings=True)
    again = load_pretrained(d)
    assert again.lm_head.weight is again.tok_emb.weight
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_neox_qkv_split_is_per_head_interleaved():
    # rows of the fused matrix: h0q h0k h0v h1q h1k h1v, head dim 2 -> 12 rows tagged by their row index
    fused = torch.arange(12.0)[:, None]
    q, k, v = split_qkv(fused, n_head=2)
    assert q.flatten().tolist() == [0, 1, 6, 7]
    assert k.flatten().tolist() == [2, 3, 8, 9]
    assert v.flatten().tolist() == [4, 5, 10, 11]
    assert torch.equal(fuse_qkv(q, k, v, n_head=2), fused)


def test_missing_config(tmp_path):
    _, d = saved(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in .*ckpt"):
        load_pretrained(d)


def test_unknown_model_type(tmp_path):
    _, d = saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        load_pretrained(d)


def test_missing_tensor(tmp_path):
    _, d = saved(tmp_path)
    rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(d)


def test_unexpected_tensor(tmp_path):
    _, d = saved(tmp_path)
    rewrite(d, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(KeyError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight \(in model\.safetensors\)"):
        load_pretrained(d)


def test_wrong_shape(tmp_path):
    _, d = saved(tmp_path)
    rewrite(d, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 31)}))
    with pytest.raises(ValueError, match=r"o_proj\.weight in .*model\.safetensors has shape \[32, 31\], expected \[32, 32\]"):
        load_pretrained(d)


def test_norm_eps_and_rope_base_come_from_config_json(tmp_path):
    """Each value alone is read and used: weights large enough (std 0.2) that attention, and so the rotary base,
    moves the logits (at the default std 0.02 a changed eps alone would account for the whole difference)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=2, hidden_dim=48, max_seq_len=32))
    model.init_weights(std=0.2)
    d = save_pretrained(model, tmp_path / "ckpt")
    original = json.loads((d / "config.json").read_text())
    x = torch.randint(0, 50, (1, 12))
    for key, value, field in (("rms_norm_eps", 0.5, "norm_eps"), ("rope_theta", 37.0, "rope_base")):
        (d / "config.json").write_text(json.dumps({**original, key: value}))
        again = load_pretrained(d)
        assert getattr(again.cfg, field) == value
        with torch.no_grad():
            assert (again(x) - model(x)).abs().max() > 1e-2, key  # and the model uses it


def test_neox_layer_norm_eps_comes_from_config_json(tmp_path):
    model, d = saved(tmp_path, norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, rotary_pct=0.25,
                     parallel_residual=True, model_type="gpt_neox")
    path = d / "config.json"
    assert json.loads(path.read_text())["layer_norm_eps"] == model.cfg.norm_eps  # saved
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_norm_eps": 0.5}))
    again = load_pretrained(d)
    assert again.cfg.norm_eps == 0.5
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert not torch.allclose(again(x), model(x), atol=1e-3)  # and the model uses it


def test_no_weights(tmp_path):
    _, d = saved(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only PyTorch .bin"):
        load_pretrained(d)


def test_missing_local_dir_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model, d = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    class Boom:
        def special_ids(self):
            return {}

        def save(self, _dir):
            raise RuntimeError("disk full")

    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, d, tokenizer=Boom())
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    save_pretrained(model, d)  # a later good save replaces it
    assert torch.equal(load_pretrained(d).tok_emb.weight, model.tok_emb.weight)


SAVER = """
import sys, torch
from nanoalign.checkpoint import save_pretrained
from nanoalign.model import ModelConfig, Transformer
model = Transformer(ModelConfig(vocab_size=500, dim=64, n_layer=4, n_head=2, hidden_dim=256, max_seq_len=32))
i = 0
while True:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(i))
    save_pretrained(model, sys.argv[1], max_shard_bytes=100_000)
    print(i, flush=True)
    i += 1
"""


def test_killing_a_save_never_leaves_a_broken_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    d = tmp_path / "ckpt"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(d)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one complete save exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = load_pretrained(d)
        values = {v for p in model.parameters() for v in p.unique().tolist()}
        assert len(values) == 1  # every tensor from the same, complete save


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    model, d = saved(tmp_path)
    d.rename(tmp_path / ".ckpt.old-1234")  # the old checkpoint moved aside, the new one not yet in place
    again = load_pretrained(d)
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_crash_after_the_old_checkpoint_is_set_aside_loses_nothing(tmp_path, monkeypatch):
    """The previous checkpoint is renamed aside, not deleted, before the new one is renamed into place: a crash
    between the two renames leaves it to be put back. (The test above builds that state by hand; here save_pretrained
    makes it, so a save that deleted the old checkpoint instead would fail.)"""
    import nanoalign.checkpoint as ckpt_mod

    model, d = saved(tmp_path)
    real_replace = ckpt_mod.os.replace

    class Crash(Exception):
        pass

    def replace(a, b):
        if Path(a).name.startswith(".ckpt.tmp-"):
            raise Crash
        return real_replace(a, b)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(Crash):
        save_pretrained(Transformer(model.cfg), d)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert torch.equal(load_pretrained(d).tok_emb.weight, model.tok_emb.weight)


def test_the_newest_aside_checkpoint_is_recovered_and_stale_ones_cleared(tmp_path):
    import os
    import time

    model, d = saved(tmp_path)
    older = tmp_path / ".ckpt.old-ffff"  # an older crash's leftover, sorting after the newer one by name
    d.rename(older)
    old_time = time.time() - 100
    os.utime(older, (old_time, old_time))
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    # the newest, moved aside by a crash mid-swap (saved under its aside name directly: a save to ckpt would
    # clear the older leftover first)
    save_pretrained(model, tmp_path / ".ckpt.old-0000")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old-0000", ".ckpt.old-ffff"]  # both left over
    assert not torch.equal(load_pretrained(older).tok_emb.weight, model.tok_emb.weight)
    assert torch.equal(load_pretrained(d).tok_emb.weight, model.tok_emb.weight)  # the newest came back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.old-ffff", "ckpt"]
    save_pretrained(model, d)  # a later save clears what is left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("shard_bytes", [10**9, 5_000])
def test_saved_checkpoint_follows_the_umask(tmp_path, shard_bytes):
    import os
    import stat

    from nanoalign.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(__file__).resolve().parents[1] / "data" / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layer=2, n_head=2, hidden_dim=32))
    old = os.umask(0o022)
    try:
        # extra: a file the training loop adds (torch.save, like train_state.pt)
        d = save_pretrained(model, tmp_path / "ckpt", tokenizer=tok, max_shard_bytes=shard_bytes,
                            extra=lambda tmp: torch.save({"step": 1}, tmp / "train_state.pt"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in d.iterdir()}
    assert "train_state.pt" in modes and "tokenizer.json" in modes
    assert any(name.endswith(".safetensors") for name in modes)  # safetensors writes 0600 on its own
    assert set(modes.values()) == {"0o644"}, modes


def test_a_checkpoint_with_a_sub_directory_follows_the_umask_all_the_way_down(tmp_path):
    """train.save_checkpoint writes a second model (PPO's critic) into a sub-directory: its files get the same
    permissions as the root's, not safetensors' private 0600."""
    import os
    import stat

    from nanoalign import dist, train
    from nanoalign.reward import RewardModel

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=16, n_layer=1, n_head=2, hidden_dim=32, max_seq_len=32)
    policy, critic = Transformer(cfg), RewardModel(cfg)
    old = os.umask(0o027)
    try:
        d = train.save_checkpoint(tmp_path / "ckpt", dist.Dist(), 3, {"policy": (policy, None),
                                                                      "critic": (critic, None)})
    finally:
        os.umask(old)
    mode = lambda p: oct(stat.S_IMODE(p.stat().st_mode))  # noqa: E731
    assert mode(d) == mode(d / "critic") == "0o750"
    root = {p.name: mode(p) for p in d.iterdir() if p.is_file()}
    sub = {p.name: mode(p) for p in (d / "critic").iterdir()}
    assert "model.safetensors" in root and "model.safetensors" in sub, (root, sub)
    assert set(root.values()) == set(sub.values()) == {"0o640"}, (root, sub)


# --- every malformed input: a one-line error naming the file and what is wrong


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    _, d = saved(tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"<html>404 Not Found</html>", "empty": b""}[damage])
    with pytest.raises(ValueError) as err:
        load_pretrained(d)
    assert f"{path}: not a readable safetensors file, truncated or corrupt" in one_line(err)


def test_corrupt_shard_names_the_shard(tmp_path):
    model, _ = saved(tmp_path)
    d = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=5_000)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard}: not a readable safetensors file"):
        load_pretrained(d)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {shard.name}, which is not in"):
        load_pretrained(d)


def test_invalid_config_json_names_file_line_and_column(tmp_path):
    _, d = saved(tmp_path)
    path = d / "config.json"
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"hidden_size"' in line)
    lines[i] = lines[i].rstrip(",")  # a missing comma: the parser stops on the next line
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError) as err:
        load_pretrained(d)
    assert f"{path}: invalid JSON at line {i + 2} column 3 (Expecting ',' delimiter)" in one_line(err)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: expected a JSON object, got a list"):
        load_pretrained(d)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"])
def test_config_missing_a_required_key_names_it(tmp_path, key):
    _, d = saved(tmp_path)
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k != key}))
    with pytest.raises(ValueError) as err:
        load_pretrained(d)
    assert f"{path}: missing key {key!r}" in one_line(err)
    path.write_text(json.dumps({**cfg, key: "32"}))
    with pytest.raises(ValueError, match=f"key {key!r} must be a positive integer, got '32'"):
        load_pretrained(d)


def test_config_vocab_size_must_match_the_embedding(tmp_path):
    model, d = saved(tmp_path)
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "vocab_size": 64}))
    with pytest.raises(ValueError) as err:
        load_pretrained(d)
    assert (f"{path}: vocab_size 64 disagrees with the 50 rows of model.embed_tokens.weight in "
            f"{d / 'model.safetensors'}") in one_line(err)
    # no vocab_size at all: the tensor decides
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}))
    assert load_pretrained(d).cfg.vocab_size == 50


def test_padded_embedding_with_matching_config_loads(tmp_path):
    """Pythia: embedding rows (and config vocab_size) past the tokenizer's vocabulary are accepted."""
    model, d = saved(tmp_path, vocab_size=128, norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True,
                     rotary_pct=0.25, parallel_residual=True, model_type="gpt_neox")
    assert json.loads((d / "config.json").read_text())["vocab_size"] == 128
    assert load_pretrained(d).tok_emb.weight.shape[0] == 128


def test_invalid_index_json_names_the_file(tmp_path):
    model, _ = saved(tmp_path)
    d = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=5_000)
    index = d / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-10])
    with pytest.raises(ValueError, match=f"{index}: invalid JSON at line"):
        load_pretrained(d)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=f"{index}: expected a 'weight_map' object"):
        load_pretrained(d)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download replaced by a recorder that "downloads" a saved tiny model: (calls, model, its directory),
    calls holding (repo_id, allow_patterns) of each download; the working directory is tmp_path."""
    import huggingface_hub

    model, d = saved(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    return calls, model, d


def test_a_mistyped_local_path_is_not_a_hub_id(tmp_path, fake_hub):
    from nanoalign.checkpoint import resolve_dir

    calls, _, _ = fake_hub
    (tmp_path / "out").mkdir()
    # "out/typo/model": two slashes, no hub id has them, whether or not its parents exist
    for name in ("out/typo", "./typo", str(tmp_path / "typo"), "out/typo/model", "missing/typo/model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_dir(name)
    assert calls == []  # none of them went to the hub


@pytest.mark.parametrize("hub_id", ["some-org/some-model", "gpt2"])  # a bare name (no owner) is a hub id too
def test_hub_id_goes_through_snapshot_download(fake_hub, hub_id):
    calls, model, _ = fake_hub
    again = load_pretrained(hub_id)
    assert [repo for repo, _ in calls] == [hub_id]
    # config.json and the weights, a sentencepiece tokenizer.model, a vocab .txt, chat_template.jinja; no .bin
    assert set(calls[0][1]) == {"*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"}
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)


# --- edge cases a mutation audit found untested

NEOX = dict(norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, rotary_pct=0.25, parallel_residual=True,
            model_type="gpt_neox")


def edit(d, fn):
    path = d / "config.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))
    return path


@pytest.mark.parametrize("kw", [dict(attn_bias=True, rope_base=500.0, norm_eps=0.05),
                                dict(NEOX, mlp="gelu_tanh", rotary_pct=1.0, parallel_residual=False, norm_eps=0.05)])
def test_the_config_round_trips(tmp_path, kw):
    """Every field, the norm's eps included (saved as rms_norm_eps or layer_norm_eps; not the 1e-5 default)."""
    model, d = saved(tmp_path, **kw)
    assert load_pretrained(d).cfg == model.cfg


def test_a_tied_checkpoint_may_also_store_the_head_and_rotary_buffers(tmp_path):
    model, d = saved(tmp_path, tie_embeddings=True)
    rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone(),
                                   "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    again = load_pretrained(d)
    # the stored head equals the embedding: still one tied matrix (read untied, the logits would be the same, but
    # training would update the two apart)
    assert again.cfg.tie_embeddings and again.lm_head.weight is again.tok_emb.weight
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_tied_config_storing_another_head_is_read_untied(tmp_path):
    """A fine-tune whose tooling untied the head but kept tie_word_embeddings: the stored head was ignored, and
    the logits differed from transformers' (which unties the two) by tens."""
    transformers = reference("transformers")
    _, d = saved(tmp_path, tie_embeddings=True)
    head = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    rewrite(d, lambda t: t.update({"lm_head.weight": head}))
    model = load_pretrained(d)
    assert not model.cfg.tie_embeddings and torch.equal(model.lm_head.weight, head)
    assert not torch.equal(model.tok_emb.weight, head)
    ids = torch.arange(30)[None] % 50
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=0)
    again = load_pretrained(save_pretrained(model, tmp_path / "again"))  # saved untied, read back the same
    assert not again.cfg.tie_embeddings and torch.equal(again.lm_head.weight, head)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_a_checkpoint_of_pytorch_bin_weights_says_how_to_convert_it(tmp_path, name):
    """A hub download fetches no .bin file, only the index of sharded ones: that index says it too."""
    _, d = saved(tmp_path)
    (d / "model.safetensors").unlink()
    (d / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(d))} holds only PyTorch .bin weights; nanoalign "
                                                r"reads safetensors \(convert once with transformers"):
        load_pretrained(d)


def test_a_hub_download_without_safetensors_says_it_may_hold_only_a_bin_file(tmp_path):
    """resolve_dir downloads no .bin: a hub repository of one pytorch_model.bin arrives as config and tokenizer
    only, in the cache's models--owner--name/snapshots/<revision> layout. A local directory keeps the plain message."""
    _, d = saved(tmp_path)
    (d / "model.safetensors").unlink()
    snapshot = tmp_path / "hub" / "models--owner--name" / "snapshots" / "0123abc"
    shutil.copytree(d, snapshot)
    with pytest.raises(FileNotFoundError, match=r"^no model\.safetensors or model\.safetensors\.index\.json in .*0123abc "
                                                r"\(a hub download fetches safetensors weights only; if the repository "
                                                r"has only pytorch_model\.bin, convert once with transformers"):
        load_pretrained(snapshot)
    with pytest.raises(FileNotFoundError, match=f"^no model\\.safetensors or model\\.safetensors\\.index\\.json in "
                                                f"{re.escape(str(d))}$"):
        load_pretrained(d)


def test_a_nan_weight_is_refused_naming_the_tensor(tmp_path):
    _, d = saved(tmp_path)
    rewrite(d, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=r"^tensor model\.norm\.weight in .*model\.safetensors holds NaN or inf"):
        load_pretrained(d)


@pytest.mark.parametrize("key, value", [("hidden_size", 0), ("num_hidden_layers", True),
                                        ("rms_norm_eps", 0), ("rope_theta", float("inf"))])
def test_config_values_must_be_positive(tmp_path, key, value):
    _, d = saved(tmp_path)
    path = edit(d, lambda c: {**c, key: value})
    with pytest.raises(ValueError, match=f"^{path}: key {key!r} must be a positive"):
        load_pretrained(d)


@pytest.mark.parametrize("key, value, message", [
    ("tie_word_embeddings", "false", "must be true or false, got 'false'"),  # a non-empty string would read as true
    ("attention_bias", "false", "must be true or false, got 'false'"),
    ("mlp_bias", "false", "must be true or false, got 'false'"),
    ("use_parallel_residual", "false", "must be true or false, got 'false'"),  # checked whatever the family
    ("rope_scaling", "linear", "must be an object or null, got 'linear'"),
    ("rope_parameters", 5, "must be an object or null, got 5"),
    ("rope_scaling", {"type": "linear", "factor": "x"}, "'factor' must be a positive number, got 'x'")])
def test_hand_edited_config_values_of_the_wrong_type_are_named(tmp_path, key, value, message):
    _, d = saved(tmp_path)
    path = edit(d, lambda c: {**c, key: value})
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: key {key!r}:? {re.escape(message)}"):
        load_pretrained(d)


def test_rope_parameters_of_newer_transformers_are_read(tmp_path):
    _, d = saved(tmp_path)
    edit(d, lambda c: {**{k: v for k, v in c.items() if k != "rope_theta"},
                       "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}})
    cfg = load_pretrained(d).cfg
    assert cfg.rope_base == 500.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "asks for rope scaling 'yarn'"),
    ({"hidden_act": "gelu"}, "llama config with hidden_act='gelu'"),
])
def test_unsupported_llama_configs_are_refused(tmp_path, change, message):
    _, d = saved(tmp_path)
    edit(d, lambda c: {**c, **change})
    with pytest.raises(ValueError, match=message):
        load_pretrained(d)


@pytest.mark.parametrize("kw, field", [
    (dict(rotary_pct=0.5), "rotary_pct=0.5"), (dict(parallel_residual=True), "parallel_residual=True"),
    (dict(norm="layernorm"), "norm='layernorm'"), (dict(mlp="gelu_tanh"), "mlp='gelu_tanh'"),
    (dict(NEOX, n_kv_head=1), "n_kv_head=1"), (dict(NEOX, head_dim=8), "head_dim=8"),
    (dict(NEOX, mlp="swiglu"), "mlp='swiglu'"), (dict(NEOX, mlp_bias=False), "mlp_bias=False")])
def test_a_config_its_format_cannot_express_is_refused_before_anything_is_written(tmp_path, kw, field):
    """Saved anyway, such a model would reload as another function (a LLaMA with LayerNorm comes back with RMSNorm
    and without its biases) or fail far from the cause."""
    model = Transformer(ModelConfig(**{**dict(vocab_size=50, dim=32, n_layer=2, n_head=2, hidden_dim=48,
                                              max_seq_len=32), **kw}))
    with pytest.raises(ValueError, match=rf"^cannot save this model as \w+: .*{re.escape(field)} \(the \w+ format has"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_tied_checkpoints_stored_head_must_be_this_models(tmp_path):
    _, d = saved(tmp_path, tie_embeddings=True)
    rewrite(d, lambda t: t.update({"lm_head.weight": torch.zeros(7, 3)}))
    with pytest.raises(ValueError, match=r"^tensor lm_head\.weight in .* has shape \[7, 3\], expected \[50, 32\]"):
        load_pretrained(d)
    rewrite(d, lambda t: (t.pop("lm_head.weight"), t.update({"embed_out.weight": torch.zeros(50, 32)})))
    with pytest.raises(KeyError, match=r"unexpected tensors: embed_out\.weight"):  # the other family's head
        load_pretrained(d)


def test_a_shard_holding_a_tensor_its_index_does_not_list_is_refused(tmp_path):
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=2, hidden_dim=48, max_seq_len=32))
    d = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=5_000)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=rf"{shard.name} holds tensors model\.safetensors\.index\.json does not list "
                                       r"there: model\.layers\.9\.mlp\.up_proj\.weight"):
        load_pretrained(d)


def test_an_index_listing_a_tensor_its_shard_lacks_is_one_line_naming_both(tmp_path):
    """It failed in the middle of the copy with safetensors' own error, naming neither the index nor the shard."""
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=2, hidden_dim=48, max_seq_len=32))
    d = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=5_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name, shard = next((k, f) for k, f in index["weight_map"].items() if "up_proj" in k)
    tensors = load_file(d / shard)
    del tensors[name]
    save_file(tensors, d / shard, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=rf"index\.json lists tensors in {shard} that it does not hold: "
                                       rf"{re.escape(name)}'$"):  # (a KeyError's str is quoted)
        load_pretrained(d)


def test_a_weight_past_the_load_dtypes_range_is_refused(tmp_path):
    """1e5 fits float32 and bfloat16 but is inf in float16: the check runs on what the model would hold."""
    model, d = saved(tmp_path)
    rewrite(d, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), 1e5))
    assert load_pretrained(d, dtype=torch.bfloat16).layers[0].mlp.down.weight[0, 0] == 99840.0  # bf16 keeps it
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight in .* holds values "
                                         r"past torch\.float16's range"):
        load_pretrained(d, dtype=torch.float16)


@pytest.mark.parametrize("kw, top, params, field, value", [
    ({}, {"rope_theta": 500.0}, {"rope_type": "default", "rope_theta": 10000.0}, "rope_base", 10000.0),
    (NEOX, {"rotary_emb_base": 50.0}, {"rope_type": "default", "rope_theta": 10000.0}, "rope_base", 10000.0),
    (NEOX, {"rotary_pct": 1.0}, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
     "rotary_pct", 0.25),
    (NEOX, {"rotary_pct": 0.5}, {"rope_type": "default", "rope_theta": 10000.0}, "rotary_pct", 0.5),  # a fallback
])
def test_rope_parameters_win_over_top_level_keys_as_in_transformers(tmp_path, kw, top, params, field, value):
    """transformers 5 fills rope_parameters from the top-level keys only where it lacks them (setdefault): a
    config holding both, disagreeing, was read the other way round (logits off by ~8 on a LLaMA); the reference
    comparison is tests/test_hf_parity.py's, this pins the order."""
    _, d = saved(tmp_path, **kw)
    edit(d, lambda c: {**c, **top, "rope_parameters": params})
    assert getattr(load_pretrained(d).cfg, field) == value


@pytest.mark.parametrize("kw, top, params", [
    ({}, {"rope_theta": 500.0}, {"rope_type": "default", "rope_theta": 10000.0}),
    (NEOX, {"rotary_pct": 1.0}, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
])
def test_a_config_with_both_rope_keys_gives_transformers_logits(tmp_path, kw, top, params):
    transformers = reference("transformers")
    _, d = saved(tmp_path, **kw)
    edit(d, lambda c: {**c, **top, "rope_parameters": params})
    ids = torch.arange(30)[None] % 50
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
        torch.testing.assert_close(load_pretrained(d)(ids), ref, atol=1e-4, rtol=0)


def test_every_file_reaches_the_disk_before_the_renames(tmp_path, monkeypatch):
    """A power loss must not find the new names over unwritten data: each file and directory of the new checkpoint
    is fsynced before it is renamed into place, those in a sub-directory too (train.save_checkpoint writes PPO's
    critic there), and the parent directory (the renames) before the old one goes."""
    import nanoalign.checkpoint as ckpt_mod

    events = []
    real_replace = ckpt_mod.os.replace
    monkeypatch.setattr(ckpt_mod, "_sync", lambda p: events.append(("sync", Path(p))))
    monkeypatch.setattr(ckpt_mod.os, "replace", lambda a, b: (events.append(("rename", Path(b))), real_replace(a, b)))
    model, d = saved(tmp_path)  # a first save, then one over it holding a second model in a sub-directory

    def critic(tmp):
        (tmp / "critic").mkdir()
        write_pretrained(model, tmp / "critic")

    events.clear()
    save_pretrained(model, d, extra=critic)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    synced = [p for kind, p in events[:renames[0]] if kind == "sync"]
    [tmp] = [p for p in synced if p.name.startswith(".ckpt.tmp-")]  # the directory itself
    on_disk = {p.relative_to(d) for p in d.rglob("*")}
    assert Path("critic", "model.safetensors") in on_disk and Path("critic", "config.json") in on_disk
    assert on_disk <= {p.relative_to(tmp) for p in synced if p != tmp} and len(renames) == 2
    assert events[renames[-1] + 1] == ("sync", d.parent)


# --- edge cases a second mutation audit found untested

@pytest.mark.parametrize("kw, keep", [
    (dict(norm_eps=1e-6),
     ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")),
    (dict(NEOX, hidden_dim=128), ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")),
])
def test_optional_config_keys_default_as_in_transformers(tmp_path, kw, keep):
    """Older checkpoints leave out keys transformers fills in with its defaults (a Llama-2 config has no head_dim,
    attention_bias or mlp_bias; a Pythia one no attention_bias): each missing key reads as transformers' default
    (LLaMA: rms_norm_eps 1e-6, no biases, untied, as many k/v heads as heads; GPT-NeoX: exact GELU, layer_norm_eps
    1e-5, a quarter of each head rotated, parallel residual, biased attention, an MLP 4x wide; both: rope base
    10000, 2048 positions)."""
    model, d = saved(tmp_path, **kw)
    edit(d, lambda c: {k: v for k, v in c.items() if k in keep})
    again = load_pretrained(d)
    assert again.cfg == dataclasses.replace(model.cfg, max_seq_len=2048)
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("act, mlp", [("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
                                      ("gelu_pytorch_tanh", "gelu_tanh")])
def test_neox_activation_names_read_as_the_exact_or_the_tanh_gelu(tmp_path, act, mlp):
    """transformers' gelu_new and gelu_fast are the tanh approximation, gelu the exact one."""
    _, d = saved(tmp_path, **NEOX)
    edit(d, lambda c: {**c, "hidden_act": act})
    assert load_pretrained(d).cfg.mlp == mlp


@pytest.mark.parametrize("kw", [dict(head_dim=8, n_kv_head=1, mlp_bias=True,
                                     rope_scaling={"rope_type": "linear", "factor": 2.0}),
                                dict(NEOX, attn_bias=False)])
def test_the_config_round_trips_with_non_default_values(tmp_path, kw):
    model, d = saved(tmp_path, **kw)
    assert load_pretrained(d).cfg == model.cfg


def test_legacy_and_newer_rope_scaling_keys(tmp_path):
    """Older configs spell rope_scaling's kind "type"; a config holding both rope_scaling and rope_parameters is
    read from rope_scaling, as transformers does (`rope_scaling or rope_parameters`)."""
    _, d = saved(tmp_path)
    edit(d, lambda c: {**c, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert load_pretrained(d).cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    edit(d, lambda c: {**c, "rope_parameters": {"rope_type": "linear", "factor": 8.0}})
    assert load_pretrained(d).cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_a_config_json_that_is_not_utf8_names_the_file(tmp_path):
    _, d = saved(tmp_path)
    path = d / "config.json"
    path.write_bytes(path.read_bytes().replace(b'"llama"', b'"ll\xe9ama"'))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not UTF-8 text \\(byte 0xe9 at offset \\d+\\)$"):
        load_pretrained(d)


def test_an_older_neox_checkpoints_attention_buffers_are_ignored(tmp_path):
    """transformers 4.x Pythia checkpoints store each layer's causal mask and masked_bias: buffers, no weights."""
    model, d = saved(tmp_path, **NEOX)
    rewrite(d, lambda t: t.update({"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                   "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9)}))
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(load_pretrained(d)(x), model(x))


def test_shards_are_packed_in_order_up_to_the_limit(tmp_path):
    """Greedy packing: no empty shard, no shard over the limit unless it holds one tensor alone (the embedding,
    6400 bytes, and each MLP matrix, 6144), two neighbouring shards never fit in one, and the index's total_size is
    the bytes of every tensor."""
    model, _ = saved(tmp_path)
    limit = 5_000
    d = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=limit)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) > 2

    def tensor_bytes(name):
        with safe_open(d / name, framework="pt") as f:
            return [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]

    shards = [tensor_bytes(name) for name in files]
    sizes = [sum(shard) for shard in shards]
    assert all(size <= limit or len(shard) == 1 for size, shard in zip(sizes, shards)), shards
    assert any(size > limit for size in sizes)  # the case the exception is for was met
    assert all(a + b > limit for a, b in zip(sizes, sizes[1:])), sizes
    assert index["metadata"]["total_size"] == sum(sizes) == sum(p.numel() * 4 for p in model.parameters())


def test_llama3_rope_defaults_its_pretraining_length_as_transformers(tmp_path):
    """rope_scaling of type llama3 without original_max_position_embeddings: transformers reads the top-level key
    of that name, else max_position_embeddings (it was refused here); a missing factor is named in rope_scaling."""
    transformers = reference("transformers")
    _, d = saved(tmp_path)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    ids = torch.arange(30)[None] % 50
    for top in ({}, {"original_max_position_embeddings": 8}):
        edit(d, lambda c: {**c, **top, "rope_scaling": llama3})
        model = load_pretrained(d)
        assert model.cfg.rope_scaling["original_max_position_embeddings"] == top.get(
            "original_max_position_embeddings", model.cfg.max_seq_len)
        with torch.no_grad():
            ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits
            torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=0)
    path = edit(d, lambda c: {**c, "rope_scaling": {k: v for k, v in llama3.items() if k != "low_freq_factor"}})
    with pytest.raises(KeyError, match=f"{re.escape(str(path))}: missing key 'rope_scaling.low_freq_factor'"):
        load_pretrained(d)


def test_a_non_numeric_llama3_rope_value_is_named(tmp_path):
    _, d = saved(tmp_path)
    path = edit(d, lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": "16"}})
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: key 'rope_scaling': "
                                         f"'original_max_position_embeddings' must be a positive number, got '16'$"):
        load_pretrained(d)
