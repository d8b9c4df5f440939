"""DPO's pieces around the loss (losses.dpo_loss): response log-probs of pairs and the reference log-prob cache.

    response_logps(model, batch)        log p(response | prompt) of each row of a right-padded batch, (B,)
    reference_logps(ref_dir, splits)    the frozen reference's log-probs of every pair: computed once, cached
    with_reference(rows, logps)         the pairs with their reference log-probs attached, as the loss uses them

Why the reference log-probs can be computed before training: DPO's reference pi_ref is frozen, so
log pi_ref(y | x) of a pair never changes while the policy trains. Each pair needs two numbers (chosen,
rejected), computed in one pass over the data before training; the reference model is then freed, and
training holds one model, like SFT. This is exact only while the reference is frozen: a method whose
reference moves (Hbat's DPO stages use the model at the start of each stage) must recompute per stage.

The cache (out_dir/ref_logps.pt) is keyed by a fingerprint of everything the numbers depend on: the
tokenized pairs of every split (ids and response masks, in order), the reference checkpoint (the bytes of
its config.json and of every weight file) and the device and precision the reference runs at (not the --dtype
flag's text: bfloat16 on a CPU runs in float32, and a cache keyed "bfloat16" there was reused by a bf16 GPU run).
Changing the data, the tokenizer, the template, the truncation or the reference gives another fingerprint and
the log-probs are recomputed; otherwise they are reused. Hashing the weights reads the checkpoint once; the policy
is loaded from the same files right after, so they are then read from the page cache.
"""
from __future__ import annotations

import gc
import hashlib
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import dist, train
from .checkpoint import tensor_files
from .cli import InputError
from .data import IGNORE_INDEX, collate_pairs
from .losses import sequence_logps, shift_mask, token_logprobs


CACHE_VERSION = "nanoalign-ref-logps-v1"


# --- log-probs of responses


def response_logps(model, batch: dict, average: bool = False, amp=None) -> torch.Tensor:
    """A right-padded batch (collate_sft / collate_pairs) -> log p(response | prompt) per row, float32 (B,).

    Summed over the response tokens and their EOS; average=True divides by their count (IPO)."""
    device = next(model.parameters()).device
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    with amp or nullcontext():
        # right padding: a real token never attends to the pads after it, so no attention mask is needed
        # (and attention keeps its fast causal path); the entries that predict pads are masked below
        token_logps = token_logprobs(model, input_ids)  # (B, T - 1)
    return sequence_logps(token_logps, shift_mask(labels != IGNORE_INDEX), average)


def response_lengths(rows: list[dict]) -> torch.Tensor:
    """(N, 2) number of scored tokens of (chosen, rejected) of each pair: the count sequence_logps divides by."""
    return torch.tensor([[sum(r["chosen_mask"][1:]), sum(r["rejected_mask"][1:])] for r in rows])


def with_reference(rows: list[dict], logps: torch.Tensor, average: bool = False) -> list[dict]:
    """Copies of the pairs with "ref_chosen" / "ref_rejected" attached: the summed reference log-probs (N, 2),
    or their per-token average for IPO, computed exactly as sequence_logps(average=True) would."""
    values = logps / response_lengths(rows).clamp(min=1) if average else logps
    return [{**row, "ref_chosen": c, "ref_rejected": r} for row, (c, r) in zip(rows, values.tolist())]


# --- the reference cache


def _hash_file(h, path: Path) -> None:
    h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)


def fingerprint(splits: dict[str, list[dict]], ref_dir, dtype: str) -> str:
    """sha256 of the tokenized pairs of every split, the reference checkpoint's config and weights, and dtype: the
    device and precision the log-probs are computed at ("cpu float32")."""
    h = hashlib.sha256(f"{CACHE_VERSION}\0{dtype}\0".encode())
    for name, rows in splits.items():
        h.update(f"split {name} {len(rows)}\0".encode())
        for r in rows:
            for key in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"):
                values = np.asarray(r[key], dtype=np.int64)
                h.update(len(values).to_bytes(8, "little") + values.tobytes())
    ref_dir = Path(ref_dir)
    weights = sorted(set(tensor_files(ref_dir).values()))
    index = [ref_dir / "model.safetensors.index.json"] if (ref_dir / "model.safetensors.index.json").exists() else []
    for path in [ref_dir / "config.json", *index, *weights]:
        _hash_file(h, path)
    return h.hexdigest()


def _read_cache(path: Path, key: str, splits: dict) -> tuple[dict | None, str]:
    """(the cached log-probs, "") when path holds this fingerprint's, else (None, why not)."""
    if not path.exists():
        return None, "no cache yet"
    try:
        cache = torch.load(path, weights_only=True)
    except Exception as e:  # an unreadable file is recomputed, not fatal
        return None, f"{path} is unreadable ({type(e).__name__})"
    if not isinstance(cache, dict) or not isinstance(cache.get("logps"), dict):  # not a cache this code wrote
        return None, f"{path} is not a reference log-prob cache"
    if cache.get("fingerprint") != key:
        return None, f"{path} was computed for other data or another reference"
    logps = cache["logps"]
    if set(logps) != set(splits) or any(not torch.is_tensor(logps[k]) or logps[k].shape != (len(rows), 2)
                                        for k, rows in splits.items()):
        return None, f"{path} holds other splits"
    return logps, ""


def check_resumed_reference(saved: dict | None, logps: torch.Tensor, stage: int) -> None:
    """A resumed DPO stage must go on against the reference log-probs it trained with. They are recomputed when
    the cache no longer matches (its file removed, or --init's weights or --data's pairs changed since): the same
    reference gives the same numbers, another one would silently swap the target of the remaining steps.
    logps: the training pairs' (N, 2) now; saved: what the checkpoint recorded ({"stage": index, "logps": (N, 2)}),
    None for a checkpoint written without them. The tolerance only admits float reordering (a GPU kernel)."""
    if not saved or saved.get("stage") != stage:
        return
    before = saved["logps"]
    if before.shape != logps.shape:
        detail = f"{before.shape[0]} pairs then, {logps.shape[0]} now"
    elif not torch.allclose(before, logps, rtol=1e-4, atol=1e-3):
        detail = f"by up to {(before - logps).abs().max().item():.3g} nats"
    else:
        return
    raise InputError(f"--init/--data: the reference log-probs of the training pairs differ from those the checkpoint "
                     f"to resume trained with ({detail}): the reference model or the pairs changed since; resume "
                     "with the interrupted run's inputs, or start a new run")


@torch.no_grad()
def _split_logps(model, rows: list[dict], pad_id: int, micro_batch_size: int, d: dist.Dist, amp) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected), the rows split over the ranks. Each micro-batch writes its
    rows into a zero (N, 2) tensor and train.eval_sums adds them up over batches and ranks: every row is
    written by exactly one of them, so the sum is exact."""
    indexed = list(enumerate(rows))

    def fn(chunk):
        out = torch.zeros(len(rows), 2, device=d.device)
        logps = response_logps(model, collate_pairs([r for _, r in chunk], pad_id), amp=amp)  # (2B,)
        out[[i for i, _ in chunk]] = torch.stack(logps.chunk(2), dim=1)
        return out

    return train.eval_sums(indexed, micro_batch_size, d, fn).cpu()


def reference_logps(ref_dir, splits: dict[str, list[dict]], pad_id: int, cache_path, d: dist.Dist,
                    micro_batch_size: int = 16, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """{split: (N, 2) summed log-probs of (chosen, rejected) under the frozen reference} for tokenized pairs
    (data.tokenize_pairs). Reused from cache_path when its fingerprint matches; otherwise the reference is
    loaded (sharded under torchrun), run over every split, freed, and the cache written atomically.
    Collective under torchrun; every rank gets the full tensors."""
    cache_path = Path(cache_path)
    cached, why = None, ""
    precision = f"{d.device.type} {train.compute_dtype(d, dtype)}"  # what the numbers were computed at
    if d.is_main:
        key = fingerprint(splits, ref_dir, precision)
        cached, why = _read_cache(cache_path, key, splits)
    cached = dist.all_gather_object(cached, d)[0]  # rank 0's answer
    sizes = " + ".join(f"{len(rows)} {name}" for name, rows in splits.items())
    if cached is not None:
        dist.print0(d, f"reference log-probs: reused {cache_path} ({sizes} pairs; same data and reference)")
        return cached
    dist.print0(d, f"reference log-probs: computing {sizes} pairs with the frozen {ref_dir} ({why})")
    model = train.place(train.load_model(ref_dir, d), d, trainable=False)
    amp = train.autocast(d, dtype)
    logps = {name: _split_logps(model, rows, pad_id, micro_batch_size, d, amp) for name, rows in splits.items()}
    del model  # no reference model in memory while the policy trains
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    if d.is_main:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
        torch.save({"fingerprint": key, "logps": logps, "reference": str(ref_dir), "dtype": precision}, tmp)
        os.replace(tmp, cache_path)  # a crash mid-write never leaves a half-written cache
        print(f"reference log-probs: saved {cache_path}; reference model freed", flush=True)
    dist.barrier(d)
    return logps
