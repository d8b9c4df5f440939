"""Strict loading and safe saving: each malformed checkpoint raises an error naming what is wrong."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoalign.checkpoint import fuse_qkv, load_pretrained, save_pretrained, split_qkv
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


def test_the_newest_aside_checkpoint_is_recovered_and_stale_ones_cleared(tmp_path):
    import os
    import time

    model, d = saved(tmp_path)
    older = tmp_path / ".ckpt.old-ffff"  # an older crash's leftover, sorting after the newer one by name
    save_pretrained(model, older)
    old_time = time.time() - 100
    os.utime(older, (old_time, old_time))
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    save_pretrained(model, d)
    d.rename(tmp_path / ".ckpt.old-0000")  # the newest, moved aside by a crash mid-swap
    assert torch.equal(load_pretrained(d).tok_emb.weight, model.tok_emb.weight)
    save_pretrained(model, d)  # a later save clears what is left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saved_checkpoint_follows_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        _, d = saved(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_a_mistyped_local_path_is_not_a_hub_id(tmp_path, monkeypatch):
    from nanoalign.checkpoint import resolve_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("out/typo", "./typo", str(tmp_path / "typo")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_dir(name)


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    model, d = saved(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    again = load_pretrained("some-org/some-model")
    assert calls and calls[0][0] == "some-org/some-model" and "*.safetensors" in calls[0][1]
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)
