"""What every training script shares: schedule, data order, model placement, the optimizer step with its
non-finite guard, checkpoints with resume, and the metrics log. Plain functions; a script is the recipe.

    state = train.find_checkpoint(ckpt_dir, cfg.resume)          # None, or the saved train_state
    model = train.place(train.load_model(path, d), d)             # device, or FSDP2 shards
    opt = train.adamw(model, cfg.lr, cfg.weight_decay)
    step = train.restore(state, {"model": (model, opt)}, d)       # optimizer states, RNG; the step to start at
    log = train.MetricsLog(run_dir / "metrics.jsonl", d, step)
    for step in train.progress(range(step, total), "sft", d):
        train.set_lr(opt, train.lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
        ...backward...
        train.optimizer_step(model, opt, step=step + 1, loss=loss, grad_clip=cfg.grad_clip, d=d)
        train.save_checkpoint(ckpt_dir, d, step + 1, {"model": (model, opt)}, tokenizer=tok, extra={...})

Design:
- Everything the loop needs at step s is a pure function of s (learning rate, which examples, the seeds of
  any sampling), and a checkpoint holds the rest (weights, optimizer moments, RNG, extra state such as a KL
  controller or EWC anchors). So a run stopped anywhere and resumed makes the same updates as one that never
  stopped.
- A checkpoint is ONE directory written atomically (a temporary directory renamed into place, see
  checkpoint.atomic_write_dir). The first model sits at its root in Hugging Face layout, so
  `--init=out/sft/model` or transformers' from_pretrained read it directly; further models (PPO's critic)
  sit in sub-directories named after them. train_state.pt beside them holds the step, every optimizer
  state, the RNG of every rank, the run's config and the extra state.
- A resume with the flags that shape the updates changed (the data, the batch, the learning rates, the seed, the
  loss; and where the extra state replaces what flags would build, PPO's KL controller and Hbat's schedule) is
  refused (check_resumed_flags) rather than silently run as another run.
- The non-finite guard checks the loss AND the global gradient norm before the optimizer steps: a finite
  loss with an overflowing backward (or one bad example) otherwise steps the weights to NaN and the next save
  overwrites the last good checkpoint. It stops the run with the step (numbered as the logs number it), the
  loss, the norm and the parameters whose gradients are not finite.
- Under torchrun every function here is collective where it must be (placing, the guard, saving): call it
  on every rank. The loss backpropagated by each rank must be (its share of the global sum) / (the global
  normaliser) * world_size, because FSDP averages gradients over ranks (accumulate_gradients does this).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .checkpoint import (atomic_write_dir, load_pretrained, model_config, recover_interrupted_swap, resolve_dir,
                         write_pretrained)
from .cli import InputError, json_reason
from .data import read_jsonl
from .model import Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "train_state.pt"


# --- inputs

REQUIRED_PATHS = ("data", "prompts", "pretrain_data")  # the flags a run cannot do without; the others may be empty


def check_files(cfg, *names: str, directory: bool = False) -> None:
    """Each named path flag must be an existing file (directory=True: a directory); an empty one is skipped (off),
    unless it is one of REQUIRED_PATHS. A relative default such as data/sft_train.jsonl is relative to the
    directory the script runs in; say so when it is the repository's data/ that is meant."""
    for name in names:
        value = getattr(cfg, name)
        if not value:
            if name in REQUIRED_PATHS:
                raise InputError(f"--{name}=: this run needs a file here")
            continue
        if Path(value).exists():
            if Path(value).is_dir() != directory:
                raise InputError(f"--{name}={value}: expected a {'directory' if directory else 'file'}, "
                                 f"found a {'file' if directory else 'directory'}")
            continue
        hint = ""
        if not Path(value).is_absolute() and (REPO_ROOT / value).exists():
            hint = (f"; the default data/ paths are relative to the repository: run from {REPO_ROOT} "
                    f"or pass --{name}={REPO_ROOT / value}")
        raise InputError(f"--{name}={value}: not found (looked in {Path.cwd()}){hint}")


def read_train_and_val(cfg, read, what: str) -> dict[str, list]:
    """{"data": records, "val_data": records} of the two flags (none for an empty one), read(path) each, before any
    model is loaded or trained: a malformed record is named in seconds. A --val_data file that holds nothing is
    refused: the run would go on without a word of held-out evaluation (an empty flag is how to ask for that)."""
    records = {name: read(getattr(cfg, name)) if getattr(cfg, name) else [] for name in ("data", "val_data")}
    if cfg.val_data and not records["val_data"]:
        raise InputError(f"--val_data={cfg.val_data}: no {what} (pass --val_data= to skip the held-out evaluation)")
    return records


def check_prompt_file(cfg, name: str) -> None:
    """The held-out prompts the flag `name` names (skipped when empty), read before any work: a bad file, or one
    without a single prompt, fails now naming the flag, not at the evaluation after training."""
    if path := getattr(cfg, name):
        if not read_jsonl(path, required=("prompt",)):
            raise InputError(f"--{name}={path}: no prompts (pass --{name}= to skip the evaluation)")


# --- schedule and data order

def lr_at(step: int, total: int, peak: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to the peak, then cosine down to peak * min_lr_ratio at the last step (total - 1). The decay
    starts at the peak on the first step after the warmup, so a warmup that leaves a single step never reaches the
    floor: that last step runs at the peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - 1 - warmup_steps)  # 1.0 at the last step
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def derived_seed(purpose: str, seed: int, *keys: int) -> int:
    """The seed of one random stream, e.g. derived_seed("rollout", seed, step, chunk): a hash of the purpose, the
    run's seed and the keys, so two streams of different purposes never start from the same generator state,
    whatever their keys. (PPO's sampler for prompt chunk c and its minibatch order in epoch c once both used
    (seed * 1_000_003 + step) * 1009 + c: the uniforms that picked chunk c's tokens also drew epoch c's
    permutation.) 63 bits, which every torch and Python generator accepts."""
    text = ":".join([purpose, str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a global step: a fresh seeded permutation every epoch, read in order."""
    if n <= 0:
        raise InputError("no training examples (after reading, tokenizing and truncating the data)")
    perms = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out


def rank_share(items: list, d: dist.Dist) -> list:
    """This rank's share of a global batch (every world_size-th item)."""
    return items[d.rank::d.world_size]


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- the tiny defaults

def launched_world_size() -> int:
    """The number of ranks torchrun started (1 without torchrun: dist.launch), known before any work."""
    return (dist.launch() or (0, 1))[1]


def check_divides_world(cfg, *names: str, world: int | None = None) -> None:
    """Flags that must split evenly over the ranks, checked with the flags (not after a prerequisite has trained);
    world: the ranks when a Dist is at hand, else torchrun's launch."""
    world = world or launched_world_size()
    for name in names:
        if getattr(cfg, name) % world:
            raise InputError(f"--{name}={getattr(cfg, name)} must be divisible by the world size {world}")


def checkpoint_dir(cfg, name: str) -> Path:
    """The checkpoint a flag names (a directory, or a hub id downloaded once), or a one-line error naming the flag:
    missing, empty, or a hub id that could not be fetched."""
    try:
        return resolve_dir(getattr(cfg, name))
    except FileNotFoundError as e:
        raise InputError(f"--{name}={getattr(cfg, name)}: {e}") from None


def check_given(cfg, *names: str) -> None:
    """Checkpoint flags refused when empty before any work starts (checkpoint_dir's error, found before a script
    trains its missing default models for a run that cannot start)."""
    for name in names:
        if not str(getattr(cfg, name)).strip():
            checkpoint_dir(cfg, name)  # raises: an empty path names no checkpoint


def check_hh_template(cfg) -> None:
    """HH-RLHF transcripts (--format=hh) are split at their "Assistant:" turns and rebuilt with the hh template;
    another --template would wrap the transcripts' prompts in turns they were never written in."""
    if cfg.format == "hh" and cfg.template not in ("auto", "hh"):
        raise InputError(f"--template={cfg.template}: HH-RLHF transcripts (--format=hh) use the hh template")


def train_first(path, what: str, script: str, train_main: Callable[[list[str]], None], argv: list[str]) -> None:
    """Train a missing default model before a script reads it. With no arguments every script runs on the tiny
    world, whose models come from the scripts before it (out/sft/model from train_sft.py, out/rm/model from
    train_rm.py); a script calls this only for its DEFAULT paths, so a mistyped --init still fails as not found.
    `path` counts as present once it holds a config.json. Under torchrun every rank calls train_main (the ranks run
    it together, as one distributed job); rank 0 says so."""
    if (Path(path) / "config.json").exists():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{path} not found: training {what} first (python {' '.join([script, *argv])})", flush=True)
    train_main(argv)


# --- models: loading and placing

def load_model(path, d: dist.Dist, load: Callable = load_pretrained, build: Callable | None = None):
    """The checkpoint's weights on rank 0 (CPU, fp32); an empty model on the meta device on the other ranks,
    which receive their shards from rank 0 in place(). load(path) reads a checkpoint, build(path) makes the
    empty model (default: the causal LM of nanoalign.checkpoint)."""
    if d.is_main or not d.enabled:
        return load(path)
    with torch.device("meta"):
        return build(path) if build is not None else Transformer(model_config(path))


def place(model: torch.nn.Module, d: dist.Dist, trainable: bool = True) -> torch.nn.Module:
    """Put a model where it runs: on d.device, or sharded by FSDP2 under torchrun with rank 0's weights
    broadcast to every rank's shard. trainable=False: a frozen model (a reference, a reward model) for
    inference only: no gradients, eval mode (dropout off)."""
    if not trainable:
        model.requires_grad_(False)
    if d.enabled:
        full_state = model.state_dict() if d.is_main else {}
        dist.shard(model, d)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=d.device)
        dist.load_full_model_state(model, full_state, d)
        del full_state
    else:
        model.to(d.device)
    return model.train(trainable)


def compute_dtype(d: dist.Dist, dtype: str) -> str:
    """The precision a --dtype actually runs at on this device: bf16 autocast only on CUDA, float32 on a CPU."""
    return dtype if d.device.type == "cuda" else "float32"


def autocast(d: dist.Dist, dtype: str):
    """bf16 autocast on CUDA (weights stay fp32); a no-op context in fp32 or on CPU."""
    enabled = compute_dtype(d, dtype) != "float32"
    return torch.autocast(d.device.type, dtype=getattr(torch, dtype), enabled=enabled)


# --- optimizer

def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW over the trainable parameters; weight decay on matrices only, never on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def accumulate_gradients(models, micro: list, loss_fn: Callable, normaliser, d: dist.Dist) -> torch.Tensor:
    """Backward over this rank's micro-batches so that the gradients are those of
    (sum of the per-unit losses of the WHOLE global step) / normaliser, the same for any micro-batch size and
    any number of ranks. loss_fn(micro_batch) returns the SUM of the micro-batch's losses (per token or per
    pair); normaliser is the global count (tokens, pairs) of the step, already summed over ranks.
    Returns this rank's loss sum (detached)."""
    models = models if isinstance(models, (list, tuple)) else [models]
    total = torch.zeros((), device=d.device)
    for j, mb in enumerate(micro):
        if d.enabled:  # reduce-scatter gradients only after the last micro-batch
            for m in models:
                m.set_requires_gradient_sync(j == len(micro) - 1)
        loss = loss_fn(mb)
        # FSDP averages gradients over ranks; the loss is already normalised by the global count
        (loss / normaliser * d.world_size).backward()
        total += loss.detach().float()
    return total


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm is NaN/inf: the run stops before the optimizer step."""


def _grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.to_local() if hasattr(g, "to_local") else g


def nonfinite_gradients(model: torch.nn.Module, d: dist.Dist) -> list[str]:
    """Names of the parameters whose gradient has a NaN or inf on any rank (collective under torchrun)."""
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    flags = torch.tensor([float(not torch.isfinite(_grad(p)).all()) for _, p in named], device=d.device)
    flags = dist.all_reduce_sum(flags, d)
    return [n for (n, _), f in zip(named, flags.tolist()) if f > 0]


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, *, step: int, loss: float,
                   grad_clip: float, d: dist.Dist, what: str = "") -> float:
    """One optimizer step: global gradient norm, the non-finite guard, clipping, AdamW, zero the gradients.

    step: the step number as the logs print it; loss: the global loss of the step (the same on every rank).
    Returns the gradient norm before clipping. Raises NonFiniteError (and steps nothing) when the loss or
    the norm is not finite."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm_t = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    norm = float(norm_t.full_tensor() if hasattr(norm_t, "full_tensor") else norm_t)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        bad = nonfinite_gradients(model, d)
        opt.zero_grad(set_to_none=True)
        label = f"{what} " if what else ""
        raise NonFiniteError(f"{label}step {step}: loss {loss}, gradient norm {norm}, non-finite gradients in "
                             f"{', '.join(bad) if bad else 'no parameter'}; stopped before the optimizer step, "
                             f"the last checkpoint on disk is untouched")
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], grad_clip, norm_t)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# --- checkpoints

def clean_stale(ckpt_dir, d: dist.Dist) -> None:
    """Before a run starts: put back a checkpoint left aside by a crash between the two renames of a save,
    and remove temporary directories left by a save that was killed (the user is told)."""
    ckpt_dir = Path(ckpt_dir)
    if d.is_main and ckpt_dir.parent.exists():
        recover_interrupted_swap(ckpt_dir)
        for tmp in sorted(ckpt_dir.parent.glob(f".{ckpt_dir.name}.tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {tmp}, left by a save that was interrupted", flush=True)
    dist.barrier(d)


def _write_model(model, out_dir: Path, tokenizer, state_dict) -> None:
    # a model with a head (RewardModel) knows its own Hugging Face layout; the causal LM is checkpoint's
    writer = getattr(model, "write_pretrained", None)
    if writer is not None:
        writer(out_dir, tokenizer=tokenizer, state_dict=state_dict)
    else:
        write_pretrained(model, out_dir, tokenizer=tokenizer, state_dict=state_dict)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_dir(ckpt_dir, name: str, names: list[str]) -> Path:
    """Where model `name` of a checkpoint holding `names` lives: the first at the root, the others below it."""
    return Path(ckpt_dir) if name == names[0] else Path(ckpt_dir) / name


def save_checkpoint(ckpt_dir, d: dist.Dist, step: int, models: dict, tokenizer=None, extra: dict | None = None,
                    config=None) -> Path:
    """Write every model (HF layout), every optimizer, the step, the RNG of every rank, the config and
    `extra` (anything torch.save can pickle, the same on every rank or gathered to rank 0 by the caller)
    into ckpt_dir, atomically. models: {name: (model, optimizer or None)}, the first at the root.
    Collective under torchrun."""
    ckpt_dir = Path(ckpt_dir)
    gathered = {name: dist.full_state(model, opt) for name, (model, opt) in models.items()}
    # the guard checks the gradients, not what the step made of them: an update too large (an inf learning
    # rate, say) leaves finite gradients and NaN weights, which must not replace the last good checkpoint
    bad = [f"{name}: {key}" for name, (weights, _) in gathered.items() for key, t in (weights or {}).items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())] if d.is_main else []
    if dist.all_reduce_sum(torch.tensor([float(len(bad))], device=d.device), d).item() > 0:  # every rank stops
        raise NonFiniteError(f"step {step}: the weights are not finite after the optimizer step ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}); not saved, the last checkpoint on disk is "
                             f"untouched (a learning rate too large?)")
    rng = dist.all_gather_object(_rng_state(), d)
    if d.is_main:
        names = list(models)

        def write(tmp: Path):
            for name, (model, _) in models.items():
                target = model_dir(tmp, name, names)
                target.mkdir(parents=True, exist_ok=True)
                _write_model(model, target, tokenizer, gathered[name][0])
            state = {"step": step, "models": names, "rng": rng, "extra": extra or {},
                     "config": asdict(config) if is_dataclass(config) else config}
            for i, (name, (_, opt)) in enumerate(models.items()):
                if opt is not None:  # the first model's optimizer is "optimizer", the others "optimizer/<name>"
                    state["optimizer" if i == 0 else f"optimizer/{name}"] = gathered[name][1]
            torch.save(state, tmp / STATE_FILE)

        atomic_write_dir(ckpt_dir, write)
    dist.barrier(d)
    return ckpt_dir


def find_checkpoint(ckpt_dir, resume: bool, required: bool = True) -> dict | None:
    """The train_state of ckpt_dir when resuming (None when not); with required, a missing checkpoint is an
    error saying where it looked. Memory-mapped: ranks that only need the step never read the optimizer."""
    if not resume:
        return None
    path = Path(ckpt_dir) / STATE_FILE
    if not path.exists():
        if required:
            raise InputError(f"--resume: no checkpoint to resume from (looked for {path})")
        return None
    try:
        state = torch.load(path, weights_only=False, mmap=True)
    except Exception as e:  # a file that is not a torch checkpoint (torch's own message advises on saving)
        raise InputError(f"--resume: cannot read {path}: not a torch checkpoint, or a truncated one "
                         f"({type(e).__name__})") from None
    expected = {"step": (lambda v: type(v) is int and v >= 0, "a step number"),
                "rng": (lambda v: isinstance(v, list) and len(v) > 0, "the RNG state of each rank"),
                "extra": (lambda v: isinstance(v, dict), "a dict")}
    if not isinstance(state, dict):
        raise InputError(f"--resume: {path} is not a train_state (a dict), it holds a {type(state).__name__}")
    for key, (ok, what) in expected.items():
        if key not in state or not ok(state[key]):
            raise InputError(f"--resume: {path}: key {key!r} must hold {what}, "
                             f"{'it is missing' if key not in state else f'got {type(state[key]).__name__}'}")
    return state


def check_resumed_flags(cfg, state: dict | None, names) -> None:
    """A resumed run continues the interrupted one, making the updates it would have made: the flags that shape
    those updates (names: the data, the number of steps, the batch, the learning rates, the seed, the loss, and
    those whose effect the checkpoint carries, such as PPO's KL controller) must be the ones the checkpoint was
    written with. Each one that differs is an error naming the flag. A fresh run (state None) and checkpoints
    written without a config pass."""
    written = (state.get("config") or {}) if state else {}
    for name in names:
        if name in written and written[name] != getattr(cfg, name):
            raise InputError(f"--{name}={getattr(cfg, name)}: the checkpoint to resume was written with "
                             f"--{name}={written[name]}; resume with the flags of the interrupted run")


def _check_optimizer_names(saved, key: str, model: torch.nn.Module) -> None:
    """The optimizer state of a checkpoint is keyed by parameter name. torch loads it silently when it holds
    moments for parameters the model lacks (a checkpoint of another model, or of another version of this one),
    so both directions are checked here, on every rank (each reads the same memory-mapped file), before loading."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise InputError(f"{STATE_FILE}: {key} is not an optimizer state (a dict with 'state'), "
                         f"it holds a {type(saved).__name__}")
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    unknown, missing = sorted(set(saved["state"]) - names), sorted(names - set(saved["state"]))
    for found, what in ((unknown, "parameters this model does not have"), (missing, "no moments for parameters")):
        if found:
            raise InputError(f"{STATE_FILE}: {key} holds {what}: {', '.join(found[:4])}"
                             f"{f' and {len(found) - 4} more' if len(found) > 4 else ''} (a checkpoint of "
                             f"another model?)")


def restore(state: dict | None, models: dict, d: dist.Dist) -> int:
    """Load the optimizer states (models: {name: (model, optimizer or None)}, as saved) and the RNG of this
    rank from a train_state; returns the step to continue from (0 without a state). The weights themselves
    are loaded with load_model(model_dir(...)) before placing. Collective under torchrun."""
    if state is None:
        return 0
    for i, (name, (model, opt)) in enumerate(models.items()):
        key = "optimizer" if i == 0 else f"optimizer/{name}"
        if opt is not None:
            if key not in state:
                raise InputError(f"checkpoint holds no optimizer state {key!r} (has {sorted(state)})")
            _check_optimizer_names(state[key], key, model)
            dist.load_full_optimizer_state(model, opt, state[key] if d.is_main else {}, d)
            for param_name, p in model.named_parameters():  # moments of another shape would fail inside AdamW
                for moment, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                        raise InputError(f"{STATE_FILE}: {key} holds {moment} of shape {tuple(value.shape)} for "
                                         f"{param_name}, whose shape is {tuple(p.shape)}")
    rng = state["rng"]
    _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    return int(state["step"])


# --- metrics and progress

class MetricsLog:
    """metrics.jsonl, one JSON record per line. A fresh run starts a new log with its first record (so a run that
    fails before logging anything leaves the previous run's log beside the previous run's checkpoint); a resumed
    one keeps what was logged up to its checkpoint's step and drops the rest (logged after the save, before the
    crash)."""

    def __init__(self, path, d: dist.Dist, resume_step: int = 0):
        self.path, self.d = Path(path), d
        self.mode = "a" if resume_step else "w"  # the first record of a fresh run replaces the old log
        if d.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step:
                self.path.write_text("".join(line + "\n" for line in self._records_up_to(resume_step)))
        self.t0 = time.time()

    def _records_up_to(self, step: int) -> list[str]:
        """The log's lines of the steps up to `step`. A last line cut short (the process killed, the disk full in the
        middle of a write) is dropped: a step is logged before it is saved, so that step is past the checkpoint."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines):
                    break
                raise InputError(f"--resume: {self.path}:{n}: not a JSON record ({json_reason(e)})") from None
            if record.get("step", 0) <= step:
                kept.append(line)
        return kept

    def log(self, record: dict) -> None:
        if self.d.is_main:
            with open(self.path, self.mode) as f:
                f.write(json.dumps(record) + "\n")
        self.mode = "a"


def save_eval(run_dir, result: dict) -> Path:
    """A finished run's final numbers, run_dir/eval.json (written whole or not at all: run_all.py skips a stage that
    has one, so a half-written file must never appear), with the step of the checkpoint they describe
    (checkpoint_step, from run_dir/model): a later run into the same directory, interrupted, leaves this file
    beside a checkpoint it does not describe, and run_all.py must see that."""
    path = Path(run_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if (state := find_checkpoint(Path(run_dir) / "model", resume=True, required=False)) is not None:
        result = {**result, "checkpoint_step": state["step"]}
    tmp = path.with_name(f".eval.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def progress(steps, desc: str, d: dist.Dist):
    return tqdm(steps, desc=desc, disable=not d.is_main, dynamic_ncols=True)


def should_save(step: int, save_every: int, last: int) -> bool:
    """step counts completed steps; always save at the last one."""
    return step == last or (save_every > 0 and step % save_every == 0)


@torch.no_grad()
def eval_sums(rows: list, micro_batch_size: int, d: dist.Dist, fn: Callable) -> torch.Tensor:
    """Sum fn(chunk) (a vector of sums, e.g. [loss sum, token count]) over held-out rows split across ranks.
    Every rank runs the same number of forwards (FSDP gathers weights collectively); a rank with fewer rows
    runs a dummy forward that is not counted."""
    mine = rank_share(rows, d)
    n_batches = math.ceil(math.ceil(len(rows) / d.world_size) / micro_batch_size)
    total = None
    for b in range(n_batches):
        chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        out = fn(chunk or rows[:1]).float()
        if not chunk:
            out = torch.zeros_like(out)
        total = out if total is None else total + out
    if total is None:
        raise InputError("no held-out examples to evaluate")
    return dist.all_reduce_sum(total, d)
