"""PPO on CPU, the tiny world: the share of a PPO step spent generating, rollout tokens/s against transformers'
generate, and one PPO iteration against TRL's PPOTrainer, on the same models in one run.

    python bench/bench_ppo.py --threads 1       # out/sft/model and out/rm/model (python train_sft.py, train_rm.py)
    python bench/bench_ppo.py --quick           # random tiny models, a smoke run of a few seconds (what the tests run)
    pip install --no-deps --target /tmp/trl112 trl==1.12.0       # (3) needs a TRL that still has a PPO trainer:
    PYTHONPATH=/tmp/trl112 python bench/bench_ppo.py --threads 1 # the benchmark-only extra, beside the project's TRL

(1) Generation share. train_ppo.main runs its default PPO (64 prompts, answers of at most 48 tokens sampled at
temperature 1, 4 epochs over minibatches of 16 in micro-batches of 16, reward model and critic from the reward
checkpoint) into a temporary directory, without held-out evaluation. Every step it logs time/generation
(ppo.sample_rollouts), time/forward (the no-grad forwards of policy, reference and critic, and the advantages),
time/scoring (the reward model) and time/update (the PPO epochs); together they are the whole step, the
interval train_ppo times from sampling to the last optimizer step (the learning-rate setting, the batch's
indices, the metrics record and the log line fall outside it: microseconds to milliseconds). The share is
generation over that sum (the no-grad forwards included), over every step after the --warmup ones.
Target: at most 50%.

(2) Rollout tokens/s. ppo.sample_rollouts, the function a PPO step calls (the KV-cache sampler at temperature 1,
which also returns each token's log-prob), against transformers' generate with do_sample=True, temperature 1,
top_k 0 and top_p 1 (pure sampling, the same distribution) and no scores (its cheapest), on the same weights
(nanoalign's checkpoint is transformers' layout; the logits are checked to agree), the same 64 left-padded
prompts (those of PPO's first step), max_new_tokens 48, both stopping when every row has produced EOS. A
token counts up to and including its row's EOS (48 for a row cut by the cap): that is what PPO trains on. The
two sides draw different samples (their random streams differ), so a batch's length differs between runs: the
rate is all counted tokens over all the time, over --gen-repeats runs of each side interleaved (A B, B A, ...).

(3) One PPO iteration against TRL's PPOTrainer. TRL removed its PPO trainer: the installed trl 1.16 has neither
trl.PPOTrainer nor trl.experimental.ppo (huggingface/trl pull request 7020); trl 1.12.0 is the last release
with trl.experimental.ppo, and it runs with this project's transformers and accelerate. This part runs when
such a TRL is importable (the commands above install it in its own directory, leaving the project's TRL in
place) and otherwise says why it was not measured. TRL is configured to the same batch: 64 prompts per
iteration (per_device_train_batch_size 16 x gradient_accumulation_steps 4), response_length 48, num_ppo_epochs 4,
num_mini_batches 4 (minibatches of 16), micro-batches of 16, generation 64 prompts at a time
(local_rollout_forward_batch_size 64, which also sets its no-grad forward batch: ours is 16), temperature 1,
stop at EOS, kl_coef 0.2, learning rate 2e-5, fp32 and no gradient checkpointing (PPOConfig defaults to bf16
and to checkpointing; nanoalign does neither on a CPU), no sample generations, no saving. Its models are the
same weights: policy and reference LlamaForCausalLM from the SFT checkpoint, reward and value models
LlamaForSequenceClassification from the reward checkpoint (nanoalign's critic starts from it too); its prompts
are the same tokenized prompts (data/sft_train.jsonl in the policy's template), both sides drawing each
iteration's 64 at random. An iteration of TRL is the interval between two of its on_step_end callbacks (the
first from on_train_begin): its whole loop body, including its metrics and the gc.collect it runs every
iteration. nanoalign's is the step of (1). The ratio is TRL's median seconds over nanoalign's.
The runs are interleaved by rounds (nanoalign then TRL, then TRL then nanoalign, ...); each run loads its
models and does --warmup untimed iterations first.

What still differs, and is printed or stated so the ratio can be read:
- The answers: each side samples its own, and a PPO iteration's cost grows with their length, so the mean
  answer length (tokens up to and including EOS) of each side is printed. TRL trains on the whole batch padded
  to its longest answer; nanoalign cuts each micro-batch to its own longest. That is implementation, measured.
- Optimizer steps: TRL steps one AdamW over policy and value together once per gradient_accumulation_steps
  micro-batches (accelerate's accumulation), i.e. once per epoch in this configuration, although its
  minibatches hold 16 rollouts; nanoalign steps its policy and critic optimizers after every minibatch (16 +
  16 steps per iteration), with gradient clipping, which TRL's PPO loop does not do. The counts are printed.
- TRL takes the rollout's "old" log-probs from generate's scores; nanoalign recomputes them with a forward
  (ppo.py: so that the first ratio is exactly 1), one more no-grad forward per iteration.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench_model, beside this file

import train_ppo  # noqa: E402
import train_sft  # noqa: E402
from bench_model import check_same_function  # noqa: E402
from nanoalign import dist, ppo, train  # noqa: E402
from nanoalign.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from nanoalign.cli import InputError, run  # noqa: E402
from nanoalign.data import read_jsonl  # noqa: E402
from nanoalign.generate import left_pad  # noqa: E402
from nanoalign.reward import RewardModel  # noqa: E402
from nanoalign.tokenizer import Tokenizer  # noqa: E402

TARGET_SHARE = 0.5
DATA = ROOT / "data" / "sft_train.jsonl"


def shape_of(quick: bool) -> dict:
    """The PPO batch both sides run: train_ppo's defaults, or a tiny one for --quick."""
    c = train_ppo.Config()
    if quick:
        return dict(rollout=8, gen=8, mini=4, micro=4, epochs=1, new_tokens=16, max_prompt_len=c.max_prompt_len)
    return dict(rollout=c.rollout_batch_size, gen=c.gen_batch_size, mini=c.mini_batch_size, micro=c.micro_batch_size,
                epochs=c.ppo_epochs, new_tokens=c.max_new_tokens, max_prompt_len=c.max_prompt_len)


@contextlib.contextmanager
def quiet():
    """Hide what a training run prints (progress bars, log lines); show it if the run fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except BaseException:
        print(out.getvalue()[-3000:], file=sys.stderr)
        raise


def answer_lengths(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """Generated tokens (B, N) -> each row's length up to and including its first stop id (N without one)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    first = is_stop.int().argmax(1) + 1
    return torch.where(is_stop.any(1), first, torch.full_like(first, tokens.shape[1]))


# --- (1) and (3): nanoalign's PPO steps

def run_ours(init: Path, rm_dir: Path, out_dir: Path, shape: dict, iterations: int, seed: int) -> list[dict]:
    """train_ppo.main for `iterations` steps; its per-step records (time/*, ppo/response_length)."""
    argv = [f"--init={init}", f"--reward_model={rm_dir}", f"--data={DATA}", "--eval_data=", f"--out_dir={out_dir}",
            f"--steps={iterations}", "--save_every=0", "--device=cpu", "--dtype=float32", f"--seed={seed}",
            f"--rollout_batch_size={shape['rollout']}", f"--gen_batch_size={shape['gen']}",
            f"--mini_batch_size={shape['mini']}", f"--micro_batch_size={shape['micro']}",
            f"--ppo_epochs={shape['epochs']}", f"--max_new_tokens={shape['new_tokens']}",
            f"--max_prompt_len={shape['max_prompt_len']}"]
    with quiet():
        train_ppo.main(argv)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "time/generation" in r]


PHASES = ("generation", "forward", "scoring", "update")


def step_seconds(record: dict) -> float:
    return sum(record[f"time/{p}"] for p in PHASES)


# --- (2): rollouts

def rollouts_ours(policy, prompts, shape, tok, i: int) -> int:
    batch = ppo.sample_rollouts(policy, prompts, step=i, seed=0, gen_batch_size=shape["gen"],
                                max_new_tokens=shape["new_tokens"], temperature=1.0, tok=tok, d=dist.Dist(),
                                amp=contextlib.nullcontext())
    n = int(batch["mask"].sum())
    assert n == int(answer_lengths(batch["tokens"], tok.stop_ids).sum()), "the response mask stops at EOS"
    return n


def rollouts_hf(model, ids, attn, shape, tok, i: int) -> int:
    torch.manual_seed(i)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=shape["new_tokens"], eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    return int(answer_lengths(out[:, ids.shape[1]:], tok.stop_ids).sum())


def bench_rollouts(init: Path, prompts, shape: dict, tok, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    ours = load_pretrained(init).float().eval()
    hf = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, attn_implementation="sdpa").eval()
    diff = check_same_function(ours, hf, tok.vocab_size, 0)
    ids, attn = left_pad(prompts, tok.pad_id)
    run_side = {"nanoalign": lambda i: rollouts_ours(ours, prompts, shape, tok, i),
                "transformers": lambda i: rollouts_hf(hf, ids, attn, shape, tok, i)}
    for fn in run_side.values():  # warm-up
        fn(10_000)
    tokens = {k: 0 for k in run_side}
    seconds = {k: 0.0 for k in run_side}
    for i in range(repeats):
        for name in (list(run_side) if i % 2 == 0 else list(run_side)[::-1]):
            t0 = time.perf_counter()
            tokens[name] += run_side[name](i)
            seconds[name] += time.perf_counter() - t0
    out = {k: {"tokens_per_s": tokens[k] / seconds[k], "mean_answer_tokens": tokens[k] / (repeats * len(prompts)),
               "seconds": seconds[k], "tokens": tokens[k]} for k in run_side}
    return out | {"ratio": out["nanoalign"]["tokens_per_s"] / out["transformers"]["tokens_per_s"],
                  "logits_max_abs_diff": diff}


# --- (3): TRL's PPOTrainer

def trl_ppo():
    """(PPOConfig, PPOTrainer, version) of the importable TRL, or (None, why not)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
    except ImportError as e:
        return None, f"trl is not installed ({e})"
    for name in ("trl.experimental.ppo", "trl"):
        try:
            module = importlib.import_module(name)
            return (module.PPOConfig, module.PPOTrainer, trl.__version__), None
        except (ImportError, AttributeError):
            continue
    return None, (f"trl {trl.__version__} has no PPO trainer (neither trl.PPOTrainer nor trl.experimental.ppo: "
                  f"huggingface/trl pull request 7020 removed it; 1.12.0 is the last release with it). Install it "
                  f"beside: pip install --no-deps --target DIR trl==1.12.0, then run with PYTHONPATH=DIR")


def run_trl(classes, init: Path, rm_dir: Path, prompts, shape: dict, iterations: int, out_dir: Path, tok,
            seed: int) -> dict:
    """TRL's PPOTrainer.train for `iterations` iterations; the seconds of each, its generation seconds, its answer
    lengths and its optimizer steps."""
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)

    PPOConfig, PPOTrainer, _ = classes
    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy, ref = (AutoModelForCausalLM.from_pretrained(init, **kw) for _ in range(2))
    reward, value = (AutoModelForSequenceClassification.from_pretrained(rm_dir, **kw) for _ in range(2))
    hf_tok = PreTrainedTokenizerFast.from_pretrained(init)
    hf_tok.padding_side = "left"
    args = PPOConfig(output_dir=str(out_dir), per_device_train_batch_size=shape["micro"],
                     gradient_accumulation_steps=shape["rollout"] // shape["micro"],
                     num_mini_batches=shape["rollout"] // shape["mini"], num_ppo_epochs=shape["epochs"],
                     local_rollout_forward_batch_size=shape["gen"], response_length=shape["new_tokens"],
                     temperature=1.0, stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.2, learning_rate=2e-5,
                     total_episodes=shape["rollout"] * iterations, num_sample_generations=0, bf16=False,
                     gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                     seed=seed)
    trainer = PPOTrainer(args=args, processing_class=hf_tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list([{"input_ids": p} for p in prompts]))
    marks, gen_s, lengths, steps = [], [], [], [0]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.optimizer.optimizer.register_step_post_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
    module = sys.modules[PPOTrainer.__module__]
    generate = module.batch_generation

    def timed_generation(model, queries, *a, **k):
        t0 = time.perf_counter()
        out = generate(model, queries, *a, **k)
        gen_s.append(time.perf_counter() - t0)
        lengths.append(answer_lengths(out[0][:, queries.shape[1]:], tok.stop_ids).float().mean().item())
        return out

    module.batch_generation = timed_generation
    try:
        with quiet():
            trainer.train()
    finally:
        module.batch_generation = generate
    return {"iteration_s": [b - a for a, b in zip(marks, marks[1:])], "generation_s": gen_s,
            "answer_tokens": lengths, "optimizer_steps": steps[0] / iterations}


# --- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed PPO iterations per run and side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations at the start of each run")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved (A B, B A, ...)")
    ap.add_argument("--gen-repeats", type=int, default=10, help="timed rollout batches per side")
    ap.add_argument("--init", default=str(ROOT / "out" / "sft" / "model"), help="the policy (python train_sft.py)")
    ap.add_argument("--reward-model", default=str(ROOT / "out" / "rm" / "model"), help="(python train_rm.py)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="random tiny models, a batch of 8, 1 timed step: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.gen_repeats = 1, 1, 1, 2
    for name in ("steps", "rounds", "gen_repeats"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        raise InputError(f"--warmup={args.warmup}: must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    shape = shape_of(args.quick)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    if args.quick:  # the size of the model `python train_sft.py` trains, random, and a reward model on its trunk
        tok = Tokenizer.from_dir(ROOT / "data" / "tokenizer")
        torch.manual_seed(0)
        init, rm_dir = work / "sft", work / "rm"
        save_pretrained(train_sft.tiny_model(train_sft.Config(), tok), init, tokenizer=tok)
        rm = RewardModel.from_causal_lm(init, generator=torch.Generator().manual_seed(0))
        rm.save_pretrained(rm_dir, tokenizer=tok)
    else:
        init, rm_dir = Path(args.init), Path(args.reward_model)
        for flag, path, script in (("--init", init, "train_sft.py"), ("--reward-model", rm_dir, "train_rm.py")):
            if not (path / "config.json").is_file():
                raise InputError(f"{flag}={path}: no checkpoint there (python {script} trains the default one, "
                                 f"or pass --quick)")
        tok = Tokenizer.from_dir(init)
    template = tok.template or "hh"
    rows = read_jsonl(DATA, required=("prompt",))
    prompts = ppo.encode_prompts(tok, rows, template, shape["max_prompt_len"])
    first_batch = [prompts[i] for i in train.batch_indices(0, len(prompts), shape["rollout"], 0)]  # PPO's first step
    classes, trl_reason = trl_ppo()
    n_params = load_pretrained(init).num_params()
    shown = lambda p: p.relative_to(ROOT) if p.is_relative_to(ROOT) else p  # noqa: E731
    print(f"tiny-world PPO on CPU: policy {'random (quick)' if args.quick else shown(init)} "
          f"({n_params / 1e6:.2f}M parameters), reward model {'random head (quick)' if args.quick else shown(rm_dir)}; "
          f"{shape['rollout']} prompts x <= {shape['new_tokens']} tokens, {shape['epochs']} "
          f"epoch{'s' * (shape['epochs'] != 1)} of minibatches of {shape['mini']} (micro {shape['micro']}); "
          f"torch threads {torch.get_num_threads()}, "
          f"trl {classes[2] if classes else '(no PPO trainer)'}", flush=True)

    # (1) and (3): rounds of nanoalign and TRL runs, interleaved
    iterations = args.warmup + args.steps
    ours, theirs = [], []
    for r in range(args.rounds):
        sides = ["nanoalign", "trl"] if r % 2 == 0 else ["trl", "nanoalign"]
        for side in sides:
            t0 = time.perf_counter()
            if side == "nanoalign":
                ours += run_ours(init, rm_dir, work / f"ours{r}", shape, iterations, seed=r)[args.warmup:]
            elif classes:
                got = run_trl(classes, init, rm_dir, prompts, shape, iterations, work / f"trl{r}", tok, seed=r)
                theirs.append({k: v[args.warmup:] if isinstance(v, list) else v for k, v in got.items()})
            else:
                continue
            print(f"round {r + 1}/{args.rounds}: {side} {iterations} iterations in {time.perf_counter() - t0:.1f} s "
                  f"(load included)", flush=True)

    phase = {p: statistics.mean(rec[f"time/{p}"] for rec in ours) for p in PHASES}
    step_s = sum(phase.values())
    share = phase["generation"] / step_s
    answer = statistics.mean(rec["ppo/response_length"] for rec in ours)
    print(f"\n(1) nanoalign PPO step, mean of {len(ours)}: generation {phase['generation']:.2f} s, no-grad forwards "
          f"and advantages {phase['forward']:.2f} s, reward model {phase['scoring']:.2f} s, update "
          f"{phase['update']:.2f} s = {step_s:.2f} s; answers {answer:.1f} tokens on average")
    print(f"generation share of PPO wall time: {share:.0%} (target <= {TARGET_SHARE:.0%})")

    # (2) rollout tokens/s
    gen = bench_rollouts(init, first_batch, shape, tok, args.gen_repeats)
    a, b = gen["nanoalign"], gen["transformers"]
    print(f"\n(2) rollouts, {len(first_batch)} prompts, <= {shape['new_tokens']} new tokens at temperature 1, "
          f"{args.gen_repeats} batches per side interleaved (logits max |diff| {gen['logits_max_abs_diff']:.1e}): "
          f"nanoalign {a['tokens_per_s']:.0f} tok/s ({a['mean_answer_tokens']:.1f} tokens per answer), "
          f"transformers {b['tokens_per_s']:.0f} tok/s ({b['mean_answer_tokens']:.1f})")
    print(f"rollout tokens/s ratio nanoalign/transformers = {gen['ratio']:.2f}x")

    # (3) one PPO iteration vs TRL
    result = {"shape": shape, "threads": torch.get_num_threads(), "phase_s": phase, "step_s": step_s,
              "generation_share": share, "answer_tokens": answer, "rollouts": gen,
              "nanoalign_iteration_s": [step_seconds(rec) for rec in ours]}
    print()
    if classes:
        trl_s = [s for t in theirs for s in t["iteration_s"]]
        trl_gen = [s for t in theirs for s in t["generation_s"]]
        trl_len = statistics.mean(x for t in theirs for x in t["answer_tokens"])
        ours_med, trl_med = statistics.median(result["nanoalign_iteration_s"]), statistics.median(trl_s)
        ratio = trl_med / ours_med
        print(f"(3) one PPO iteration, median of {len(trl_s)} per side: nanoalign {ours_med:.2f} s, trl {classes[2]} "
              f"PPOTrainer {trl_med:.2f} s (its generation {statistics.mean(trl_gen) / statistics.mean(trl_s):.0%} of "
              f"it); answers {answer:.1f} vs {trl_len:.1f} tokens on average; optimizer steps per iteration "
              f"{shape['rollout'] // shape['mini'] * shape['epochs']} policy + as many critic vs "
              f"{theirs[0]['optimizer_steps']:.0f} (policy and value together)")
        print(f"PPO iteration speed ratio nanoalign/trl = {ratio:.2f}x")
        result |= {"trl": classes[2], "trl_iteration_s": trl_s, "trl_generation_s": trl_gen,
                   "trl_answer_tokens": trl_len, "trl_optimizer_steps": theirs[0]["optimizer_steps"],
                   "iteration_ratio": ratio}
    else:
        print(f"(3) one PPO iteration vs TRL: not measured: {trl_reason}")
        result["trl_not_measured"] = trl_reason
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    tmp.cleanup()
    return result


if __name__ == "__main__":
    run(main, sys.argv[1:])
