"""Hbat (hybrid alignment training): alternate SFT and preference stages, and in each stage hold on, with EWC, to
what the stages of the other kind learned (docs/methods.md "## 5. Hbat"; the EWC formulas are in ewc.py).

    --schedule=alternating --splits=n     SFT_1, Pref_1, SFT_2, Pref_2, ..., SFT_n, Pref_n   (Hbat)
    --schedule=two_stage --sft_data=...   SFT on all of it, then Pref on all of the pairs   (the usual pipeline)
    --schedule=two_stage                  Pref alone, from --init                          (the plain script)

train_dpo.py and train_ppo.py run every schedule through run_schedule(), which calls the two stage functions a
script provides: sft_stage(stage, model, rows, penalty_fn), train_sft's loop, and pref_stage(...), the DPO or
PPO loop. A plain run is the schedule of one stage, so each kind of stage has exactly one loop.

Around each stage (run_schedule):
- data: a stage trains on split j of its kind's data, split j = rows[j::n]: disjoint, sizes within one of each
  other, every row in one split, and n = 1 leaves the data as it is. --sft_steps and --steps are the budgets
  of ALL stages of a kind (those of the plain runs), shared evenly.
- EWC (--ewc), from the second stage on (SFT_1 has nothing to protect), with θ* = the weights at the stage's start:
    modified  Ω = importance(S), penalty ewc_penalty(model, θ*, Ω), S = the delta scores of every earlier stage
              of the other kind, summed without decay
    fisher    F = fisher_diagonal over a sample of the previous stage's data (the log-likelihood of its
              sequences: SFT responses, DPO chosen responses, PPO answers sampled from the model), penalty
              fisher_penalty(model, θ*, F, λ_max)
    freeze    freeze_top(model, S, 0.2) for the stage, unfrozen after it
    none      nothing
  A stage backpropagates its task loss (scaled as train.accumulate_gradients scales it) and the penalty (weight 1:
  step_penalty) once per optimizer step and logs ewc/penalty, ewc/penalty_share = penalty / (|task loss| +
  penalty) and ewc/omega_entropy (0: Ω is one-hot, the authors' behaviour at T = 1).
- each stage starts a fresh optimizer and learning-rate schedule over its own steps (Adam's moments of the other
  loss would keep pushing its way). A DPO stage's reference is the model at its start (its log-probs computed
  then, cached per stage), and so is a PPO stage's KL reference; PPO's critic carries over from stage to stage.
- checkpoints: out_dir/model is the run's checkpoint, its step counted over the whole run, so --stop_at and
  --resume work anywhere in the schedule. The model at the end of every stage but the last is kept in
  out_dir/stage<k>_<kind> (HF layout): the next stage's start, so its θ*, its DPO reference, and what a resumed
  run reads θ* back from. Hbat's own state in a checkpoint is the accumulated scores; Ω, F and the frozen set
  are recomputed from them and from the stage-start checkpoint.
- one line per finished stage, printed and appended to out_dir/stages.jsonl: its final loss, the penalty's share,
  Ω's entropy, wall time, the EWC set-up's wall time (ewc/setup_s: Ω from the scores, or the Fisher's
  per-example gradients) and the memory EWC keeps (ewc/memory_mb, in MiB: 2**20 bytes).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from . import dist, ewc, train
from .cli import InputError, check_choice, check_learning_rates, check_positive
from .data import collate_sft
from .dpo import response_logps

SCHEDULES = ("two_stage", "alternating")
EWC_VARIANTS = ("modified", "fisher", "freeze", "none")
FREEZE_FRACTION = 0.2  # Hbat-Freeze: the top 20% of tensors by S
SFT_BATCH_SIZE = 32  # the SFT stages' sequences per step (train_sft.py's default; the scripts pass it)
BASE_INIT, SFT_INIT = "out/base/model", "out/sft/model"  # the tiny world's pretrained base and its SFT model
# the numbers of a stage's last record that its summary line repeats, when the stage logs them
SUMMARY = ("loss", "eval_loss", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "objective/scores",
           "ppo/policy_loss", "eval/mean_quality", "ewc/penalty", "ewc/penalty_share")


# --- the schedule

def check_config(cfg, pref_kind: str) -> None:
    """The Hbat flags the preference scripts share, checked before any work. Resolves the automatic values:
    --sft_data=auto (the tiny world's SFT data with alternating, none with two_stage), --init=auto (the tiny base
    model when there are SFT stages, else the tiny SFT model), --out_dir=auto (out/hbat_dpo with alternating, else
    out/dpo; likewise for ppo); two_stage is one split and no EWC."""
    check_choice(cfg, "schedule", SCHEDULES)
    check_choice(cfg, "ewc", EWC_VARIANTS)
    check_positive(cfg, "splits", "sft_steps", "sft_lr", "lambda_max", "ewc_temperature", "fisher_samples")
    check_learning_rates(cfg, "sft_lr")
    if cfg.sft_data == "auto":
        cfg.sft_data = "data/sft_train.jsonl" if cfg.schedule == "alternating" else ""
    if cfg.schedule == "alternating" and not cfg.sft_data:
        raise InputError("--sft_data=: --schedule=alternating needs SFT data to alternate with")
    if cfg.schedule == "two_stage":  # one SFT stage on all of --sft_data (if any), one preference stage, no EWC
        cfg.splits, cfg.ewc = 1, "none"
    for name in ("steps", "sft_steps") if cfg.sft_data else ("steps",):
        if getattr(cfg, name) < cfg.splits:
            raise InputError(f"--{name}={getattr(cfg, name)}: fewer than one step for each of the --splits="
                             f"{cfg.splits} stages")
    if cfg.sft_data and SFT_BATCH_SIZE % (world := train.launched_world_size()):
        raise InputError(f"--sft_data={cfg.sft_data}: the SFT stages train on batches of {SFT_BATCH_SIZE}, which the "
                         f"world size {world} does not divide")
    if cfg.init == "auto":  # Hbat does its own SFT, so it starts from the base model
        cfg.init = BASE_INIT if cfg.sft_data else SFT_INIT
    if cfg.out_dir == "auto":
        cfg.out_dir = f"out/hbat_{pref_kind}" if cfg.schedule == "alternating" else f"out/{pref_kind}"
    train.check_files(cfg, "sft_data")


@dataclass
class Stage:
    """One stage of a schedule, and what its loop needs to know about the run around it."""
    index: int                 # position in the schedule, from 0 (printed from 1)
    kind: str                  # "sft", or the preference method: "dpo", "ppo"
    split: int                 # the split of its kind's data it trains on
    steps: int                 # its optimizer steps
    offset: int = 0            # the run's steps before it: stage step s is the run's step offset + s
    # set by run_schedule (or by a plain script) before the stage's loop runs
    ckpt: Path | None = None   # the run's checkpoint directory
    log: train.MetricsLog | None = None  # the run's metrics.jsonl
    state: dict | None = None  # the train_state a resumed run continues this stage from
    stop_at: int = 0           # the run's --stop_at, counted over the whole run (0: none)
    start_dir: Path | None = None  # the checkpoint of the model at the stage's start: init, or the previous stage's
    config: object = None      # the run's config, saved with every checkpoint
    extra: dict = field(default_factory=dict)  # Hbat's state (and the script's), saved with every checkpoint
    carry: dict = field(default_factory=dict)  # {name: model} saved with every checkpoint though not trained here
    ewc_info: dict = field(default_factory=dict)  # per-stage EWC numbers added to each record (Ω's entropy)
    tagged: bool = False       # records carry the stage number (a schedule of several stages)

    @property
    def last(self) -> int:
        """The stage step to stop after: its end, or --stop_at when that falls inside the stage."""
        return min(self.steps, max(0, self.stop_at - self.offset)) if self.stop_at else self.steps

    def restore(self, models: dict, d: dist.Dist) -> int:
        """Optimizer states and RNG of a stage resumed mid-way (train.restore); the stage step to start from."""
        return train.restore(self.state, models, d) - self.offset if self.state else 0

    def record(self, step: int) -> dict:
        """The start of a metrics record for stage step `step`: the run's step (and the stage number)."""
        return {"step": self.offset + step, **({"stage": self.index + 1} if self.tagged else {})}

    def save(self, d: dist.Dist, step: int, models: dict, tokenizer=None, extra: dict | None = None):
        """train.save_checkpoint into the run's checkpoint at the run's step, with the carried models, the run's
        config and Hbat's state. Collective under torchrun."""
        models = {**models, **{name: (m, None) for name, m in self.carry.items() if name not in models}}
        return train.save_checkpoint(self.ckpt, d, self.offset + step, models, tokenizer=tokenizer,
                                     extra={**(extra or {}), **self.extra}, config=self.config)


def plan(cfg, pref_kind: str) -> list[Stage]:
    """The stages of --schedule: SFT_1, Pref_1, ..., SFT_n, Pref_n (alternating), or SFT on all the data then Pref
    (two_stage with --sft_data), or Pref alone. Each kind's step budget is shared evenly, earlier stages taking
    the remainder."""
    n = cfg.splits  # 1 for two_stage (check_config)
    kinds = ("sft", pref_kind) if cfg.sft_data else (pref_kind,)
    stages, offset = [], 0
    for j in range(n):
        for kind in kinds:
            total = cfg.sft_steps if kind == "sft" else cfg.steps
            steps = total // n + (j < total % n)
            stages.append(Stage(len(stages), kind, j, steps, offset))
            offset += steps
    return stages


def train_init_first(init: str, device: str, train_sft_main: Callable[[list[str]], None]) -> None:
    """A preference script's default --init (SFT_INIT, or BASE_INIT for Hbat, which starts from the pretrained
    base and does the SFT itself), trained first with train_sft.py when it is missing (train.train_first)."""
    pretrain = ["--mode=pretrain"] if init == BASE_INIT else []
    train.train_first(init, f"the tiny {'base' if pretrain else 'SFT'} model", "train_sft.py", train_sft_main,
                      [f"--device={device}", *pretrain])


def split(rows: list, n: int, flag: str) -> list[list]:
    """n disjoint splits of the rows that together hold every row: split j = rows[j::n]."""
    if n > len(rows):
        raise InputError(f"--splits={n}: more splits than the {len(rows)} examples of --{flag}")
    return [rows[j::n] for j in range(n)]


def stage_dir(run_dir, stage: Stage) -> Path:
    """Where the model at the end of a stage is kept: out_dir/stage<k>_<kind>, k from 1."""
    return Path(run_dir) / f"stage{stage.index + 1}_{stage.kind}"


# --- the penalty inside a stage's loop

def step_penalty(penalty_fn: Callable | None) -> float | None:
    """Backpropagate the stage's EWC penalty once for this optimizer step, with weight 1 (the task loss carries
    world_size, the penalty does not: see ewc.ewc_penalty), and return its value (None without a penalty).
    Call it between optimizer steps, never between a forward and its backward, on every rank."""
    if penalty_fn is None:
        return None
    penalty = penalty_fn()
    if penalty.requires_grad:  # False when every anchored tensor is frozen
        penalty.backward()
    return penalty.item()


def ewc_record(stage: Stage, penalty: float | None, task_loss: float) -> dict:
    """ewc/penalty, ewc/penalty_share = penalty / (|task loss| + penalty) (|.|: PPO's policy loss can be
    negative) and the stage's Ω entropy, for a step's record; {} without a penalty."""
    if penalty is None:
        return {}
    share = penalty / (abs(task_loss) + penalty) if penalty > 0 else 0.0
    return {"ewc/penalty": penalty, "ewc/penalty_share": share, **stage.ewc_info}


def evenly_spaced(rows: list, k: int) -> list:
    """The Fisher's sample of a stage's data: k rows at a stride of len(rows) // k from the first (all the rows when
    there are fewer). With many rows per sample that spans nearly the whole list (64 of 2000 rows: rows 0, 31, ...,
    1953); with fewer than 2k rows the stride is 1 and the sample is the first k."""
    step = max(1, len(rows) // k)
    return rows[::step][:k]


def _local_bytes(tensors: dict | None) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in (tensors or {}).values())


# --- the schedule's loop

def run_schedule(cfg, d: dist.Dist, stages: list[Stage], model, data: dict, *, sft_stage: Callable,
                 pref_stage: Callable, init_dir, run_dir, state: dict | None, log: train.MetricsLog, tok,
                 carry: dict | None = None, sequences: Callable | None = None, amp=None) -> dict | None:
    """Run the stages in order on `model` (placed; loaded from the run's checkpoint when resuming). data:
    {kind: [split 0 rows, split 1 rows, ...]}. sft_stage / pref_stage(stage, model, rows, penalty_fn) train one
    stage (stage.start .. stage.last, saving with stage.save) and return its last metrics record.
    sequences(kind, rows, model) -> SFT-style rows {"ids", "mask"}: what the Fisher's log-likelihood scores for
    a stage of that kind (--ewc=fisher). carry: models saved with every checkpoint (PPO's critic).
    Returns the last stage's last record ({} when a resumed run had nothing left to train), None when --stop_at
    stopped the run. Collective under torchrun."""
    run_dir = Path(run_dir)
    resume_step = state["step"] if state else 0
    # kind -> S: the delta scores of the finished stages of that kind, summed (saved with every checkpoint)
    scores = dict(((state.get("extra") or {}).get("hbat") or {}).get("scores", {})) if state else {}
    # another schedule would mean other stages, and other delta scores than the checkpoint holds; another
    # --steps, even of one stage, another learning-rate schedule from the resumed step on
    # (and Ω or the Fisher is rebuilt from the saved scores with the resumed run's EWC flags: they must not change)
    train.check_resumed_flags(cfg, state, ("schedule", "splits", "sft_data", "sft_steps", "steps", "ewc", "sft_lr",
                                           "lambda_max", "ewc_temperature", "fisher_samples")
                              if len(stages) > 1 else ("sft_data", "steps"))
    stage_log = train.MetricsLog(run_dir / "stages.jsonl", d, resume_step)
    params = dict(model.named_parameters())
    for stage in stages:
        end = stage.offset + stage.steps
        if end < resume_step:
            continue  # finished before the checkpoint was written: its scores are in the checkpoint
        if cfg.stop_at and stage.offset >= cfg.stop_at:
            return None
        resumed = resume_step > stage.offset  # the checkpoint was written inside this stage, or at its end
        t0 = time.time()
        previous = stages[stage.index - 1] if stage.index > 0 else None
        stage.start_dir = stage_dir(run_dir, previous) if previous else Path(init_dir)
        stage.ckpt, stage.log, stage.stop_at, stage.config = run_dir / "model", log, cfg.stop_at, cfg
        stage.carry = carry or {}
        stage.state, stage.tagged = (state if resumed else None), len(stages) > 1
        stage.extra = {"hbat": {"stage": stage.index, "scores": scores}}

        # θ* = the weights at the stage's start; a resumed run reads them back from the previous stage's checkpoint
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated() if d.device.type == "cuda" else 0
        if resumed and previous is not None:  # a save of it interrupted between its two renames: put it back
            train.clean_stale(stage.start_dir, d)
        start_model = train.place(train.load_model(stage.start_dir, d), d) if resumed else model
        anchor = ewc.snapshot(start_model) if cfg.ewc != "none" else None
        penalty_fn, frozen, fisher, info = None, [], None, {}
        t_ewc = time.time()
        if previous is not None and cfg.ewc != "none" and resume_step < end:
            if cfg.ewc == "modified":  # Ω from the accumulated scores of the other kind's stages
                omega = ewc.importance(scores[previous.kind], cfg.lambda_max, cfg.ewc_temperature)
                info["ewc/omega_entropy"] = ewc.omega_entropy(omega)
                penalty_fn = partial(ewc.ewc_penalty, model, anchor, omega)
            elif cfg.ewc == "fisher":  # F on the stage-start weights, over the previous stage's data
                rows = sequences(previous.kind, evenly_spaced(data[previous.kind][previous.split],
                                                              cfg.fisher_samples), start_model)
                rows = dist.all_gather_object(rows, d)[0]  # ewc.fisher_diagonal: the same examples on every rank
                batches = [collate_sft(chunk, tok.pad_id) for chunk in train.micro_batches(rows, 16)]
                fisher = ewc.fisher_diagonal(start_model, batches, lambda m, b: response_logps(m, b, amp=amp))
                penalty_fn = partial(ewc.fisher_penalty, model, anchor, fisher, cfg.lambda_max)
            else:  # freeze: the most changed tensors get no gradient for the whole stage
                frozen = ewc.freeze_top(model, scores[previous.kind], FREEZE_FRACTION)
                info["ewc/frozen"] = len(frozen)
        del start_model
        if anchor is not None:  # the set-up's wall time: Ω from the scores, or the Fisher's per-example gradients
            info["ewc/setup_s"] = time.time() - t_ewc
        if anchor is not None and d.device.type == "cuda":  # the allocator's peak over the set-up, above the start
            info["ewc/memory_mb"] = (torch.cuda.max_memory_allocated() - allocated) / 2**20
        elif anchor is not None:  # on CPU: the tensors EWC keeps for the stage, θ* and F
            info["ewc/memory_mb"] = (_local_bytes(anchor) + _local_bytes(fisher)) / 2**20
        stage.ewc_info = {k: v for k, v in info.items() if k == "ewc/omega_entropy"}

        last = {}
        if resume_step < end:  # (a run resumed at the stage's very end has nothing left to train in it)
            train_stage = sft_stage if stage.kind == "sft" else pref_stage
            last = train_stage(stage, model, data[stage.kind][stage.split], penalty_fn)
        for name in frozen:
            params[name].requires_grad_(True)
        if stage.offset + stage.last < end:
            return None  # --stop_at fell inside the stage
        if anchor is not None:  # this stage's s_u, for the stages of the other kind still to come
            scores[stage.kind] = ewc.accumulate(scores.get(stage.kind), ewc.delta_scores(anchor, ewc.snapshot(model)))
        del anchor, fisher, penalty_fn
        if stage.index < len(stages) - 1:  # the next stage starts from here
            models = {"model": (model, None), **{name: (m, None) for name, m in (carry or {}).items()}}
            train.save_checkpoint(stage_dir(run_dir, stage), d, end, models, tokenizer=tok, config=cfg,
                                  extra={"hbat": {"stage": stage.index, "scores": scores}})
        if resume_step == end:
            continue  # its line was printed and logged before the run was stopped
        summary = {"step": end, "stage": stage.index + 1, "kind": stage.kind, "split": stage.split + 1,
                   "steps": stage.steps, **{k: last[k] for k in SUMMARY if k in last}, **info,
                   "wall_s": time.time() - t0}
        if d.device.type == "cuda":
            summary["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        stage_log.log(summary)
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k in SUMMARY or k.startswith("ewc/"))
        dist.print0(d, f"[stage {stage.index + 1}/{len(stages)} {stage.kind}, split {stage.split + 1}, "
                       f"{stage.steps} steps, {summary['wall_s']:.0f} s] {numbers}")
    return last
