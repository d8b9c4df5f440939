import importlib
import os
from pathlib import Path

import pytest
import torch

# the suite is sized for a 2-core CI machine; more threads than cores only adds contention
torch.set_num_threads(min(2, os.cpu_count() or 1))


def reference(module: str):
    """Import a reference implementation a test compares against (transformers, trl, ...).

    Missing, the test is skipped with the reason, except under NANOALIGN_REQUIRE_REFERENCE=1 (set by .ci/run),
    where a missing reference fails the test: a comparison must never vanish silently from CI."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("NANOALIGN_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference implementation {module!r} is required (NANOALIGN_REQUIRE_REFERENCE=1): {e}")
        pytest.skip(f"reference implementation {module!r} not installed ({e})")


# --- train_sft.py at a test's size (tests/test_sft.py, tests/test_train.py)

ROOT = Path(__file__).resolve().parents[1]


def sft_args(init, out, *extra):
    """Small, fast train_sft flags (the held-out examples as data, no checkpoints between steps); a flag
    repeated in extra wins (argparse keeps the last)."""
    return [f"--init={init}", f"--out_dir={out}", "--mode=sft", f"--data={ROOT}/data/sft_val.jsonl",
            f"--val_data={ROOT}/data/sft_val.jsonl", "--eval_data=", "--batch_size=8", "--micro_batch_size=4",
            "--max_len=128", "--warmup_steps=2", "--eval_every=3", "--save_every=0", "--device=cpu",
            "--dtype=float32", *extra]


def logged(out):
    """Every record a run logged to out/metrics.jsonl (read by the reader nanoalign.report draws from)."""
    from nanoalign.report import load_metrics

    return load_metrics(Path(out) / "metrics.jsonl")


def padded_answers(model):
    """How many of a model's greedy answers to the 300 held-out prompts of the repository's data/ contain a filler
    sentence (world.is_padded)."""
    from nanoalign import evaluate, world
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import read_jsonl
    from nanoalign.tokenizer import Tokenizer

    prompts = [r["prompt"] for r in read_jsonl(Path(__file__).resolve().parents[1] / "data" / "prompts_test.jsonl")]
    answers = evaluate.sample_answers(load_pretrained(model), Tokenizer.from_dir(model), prompts, "hh")
    return sum(map(world.is_padded, answers))


def logged_losses(out):
    """The training loss of every step a run logged to out/metrics.jsonl."""
    return [r["loss"] for r in logged(out)]


@pytest.fixture
def optimizer_groups(monkeypatch):
    """What each optimizer step of a run in this test was given: one list per step of (lr, weight_decay) for each
    parameter group (train.optimizer_step, which every script calls, spied on)."""
    from nanoalign import train

    seen, optimizer_step = [], train.optimizer_step

    def spy(model, opt, **kwargs):
        seen.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups])
        return optimizer_step(model, opt, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", spy)
    return seen


# --- tiny checkpoints shared by the script tests: a random 2-layer model, the same model ending about half its
# answers early (so rollouts have different lengths), and a reward model on its trunk with a seeded head


@pytest.fixture(scope="session")
def tiny_tok():
    from nanoalign.tokenizer import Tokenizer

    return Tokenizer.from_dir(os.path.join(os.path.dirname(__file__), "..", "data", "tokenizer"))


def _tiny_model(tok):
    from nanoalign.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                    max_seq_len=128))
    model.init_weights()
    return model


@pytest.fixture(scope="session")
def tiny_plain(tmp_path_factory, tiny_tok):
    """A random 2-layer model (seed 0) as initialised."""
    from nanoalign.checkpoint import save_pretrained

    return save_pretrained(_tiny_model(tiny_tok), tmp_path_factory.mktemp("tiny_plain") / "model", tokenizer=tiny_tok)


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory, tiny_tok):
    """The same model with EOS made likely (~50%), so answers end at different lengths, some cut by the cap."""
    from nanoalign.checkpoint import save_pretrained

    model = _tiny_model(tiny_tok)
    with torch.no_grad():
        h = model(torch.tensor([tiny_tok.encode("Human: hello")]), return_hidden=True)[0].mean(0)
        model.lm_head.weight[tiny_tok.eos_id] = 2.6 * h / h.norm()
    return save_pretrained(model, tmp_path_factory.mktemp("tiny_init") / "model", tokenizer=tiny_tok)


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory, tiny_init, tiny_tok):
    from nanoalign.reward import RewardModel

    rm = RewardModel.from_causal_lm(tiny_init, generator=torch.Generator().manual_seed(1))
    return rm.save_pretrained(tmp_path_factory.mktemp("tiny_rm") / "model", tokenizer=tiny_tok)


# --- torchrun: the same script on two CPU ranks (gloo), for the "two ranks equal one process" tests; on a machine
# with CUDA the same tests run again on the GPUs (NCCL), one rank per GPU, up to two: with a single GPU that is
# one rank, which still takes the distributed path (a process group, FSDP2 over a mesh of one)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def ranks(device: str) -> int:
    """The ranks a torchrun test starts on this device: 2 CPU processes, or one per GPU up to 2."""
    return 2 if device == "cpu" else min(2, torch.cuda.device_count())


def _torchrun(script, *argv, cwd, timeout=300, nproc=2):
    """Run `torchrun --standalone --nproc_per_node=nproc script argv...` in cwd with one thread per rank; fails
    the test with the end of stderr if it exits non-zero."""
    import subprocess

    cmd = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(script), *map(str, argv)]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def torchrun():
    return _torchrun
