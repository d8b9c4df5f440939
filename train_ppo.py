"""RLHF with PPO: sample answers, score them, and push the policy toward higher scores while a per-token KL penalty
keeps it near the SFT model (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

With no arguments it runs on the tiny world on CPU: the policy and the frozen reference start from the tiny SFT
model out/sft/model, the reward model and the critic from the tiny reward model out/rm/model (each trained first
when missing), prompts come from data/sft_train.jsonl (the SFT prompts: they carry the "qtype" and "reference" R3
needs, and data/prompts_test.jsonl shares none of them), and the oracle quality of greedy answers to the held-out
prompts is printed before training and every --eval_every steps. --reward picks another score: r3 (and its
ablations, with a sentence encoder as the relevance model) or the tiny world's oracle itself. --schedule=alternating is Hbat
(nanoalign/hbat.py): from the tiny base model, SFT_1, PPO_1, SFT_2, PPO_2 on halves of data/sft_train.jsonl and
of the prompts, with the modified EWC (--ewc) in every stage after the first.

    python train_ppo.py                                   # the tiny world against the tiny reward model
    python train_ppo.py --reward=r3                       # R3: no reward model, no preferences
    python train_ppo.py --resume                          # continue the last run from its checkpoint
    python train_ppo.py --schedule=alternating            # Hbat, into out/hbat_ppo; --ewc=none|freeze|fisher: ablations
    torchrun --nproc_per_node=2 train_ppo.py --gen_batch_size=32   # on two ranks (FSDP2, gloo): the same run as
                                                                   # python train_ppo.py --gen_batch_size=32
    torchrun --nproc_per_node=8 train_ppo.py --init=out/sft7b/model --reward_model=out/rm7b/model --device=cuda \\
        --data=prompts.jsonl --template=alpaca --lr=1e-6 --rollout_batch_size=512 --gen_batch_size=64 \\
        --mini_batch_size=64 --micro_batch_size=4 --max_prompt_len=512 --max_new_tokens=256 --value_warmup_steps=50

One step (docs/methods.md "## 3. PPO", docs/correctness.md): sample rollout_batch_size answers at --temperature;
recompute their log-probs with the trainer (the sampler's are only compared: ppo/logprob_gap), the reference's
and the critic's values; score each answer (a missing EOS gets --missing_eos_penalty instead); normalise the
scores by their running mean/std; per-token reward -beta KL, plus the score on the last token; GAE; then
--ppo_epochs passes of clipped policy and value losses over shuffled minibatches. beta adapts toward --kl_target.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import train_sft
from nanoalign import dist, hbat, ppo, train
from nanoalign.cli import (InputError, check_choice, check_device, check_learning_rates, check_non_negative,
                           check_output, check_positive, check_range, parse_config, run)
from nanoalign.data import tokenize_sft
from nanoalign.losses import AdaptiveKLController
from nanoalign.reward import RewardModel
from nanoalign.tokenizer import TEMPLATES, Tokenizer


# --- config
@dataclass
class Config:
    init: str = "auto"          # the policy's start and first reference (dir or hub id); auto: out/sft/model, or out/base/model for Hbat
    reward: str = "rm"          # rm (the reward model), r3, relevance, length, relevance_length, r3_no_branching, r3_random_qtype, oracle
    reward_model: str = "out/rm/model"  # --reward=rm: the reward model, also the critic's start (else: init + a zero head)
    relevance_model: str = "minilm"  # R3 rewards: the encoder (minilm = the packaged all-MiniLM-L6-v2, or e.g. facebook/contriever)
    out_dir: str = "auto"       # the run: model/ (policy, critic/), metrics.jsonl, eval.json; auto: out/ppo (out/hbat_ppo if alternating)
    data: str = "data/sft_train.jsonl"  # prompts: .jsonl {"prompt"} (+ "qtype", "reference" for R3)
    eval_data: str = "data/prompts_test.jsonl"  # held-out tiny-world prompts for the oracle quality ("" to skip)
    eval_prompts: int = 300     # how many of them (the first ones)
    template: str = "auto"      # prompt template: hh, alpaca, plain; auto: the one saved with --init, else hh
    # Hbat: alternating SFT and PPO stages with EWC (docs/methods.md "## 5. Hbat", nanoalign/hbat.py)
    schedule: str = "two_stage"  # two_stage: (all SFT, then) PPO, no EWC; alternating: SFT_1, PPO_1, ..., SFT_n, PPO_n
    splits: int = 2             # alternating: n, SFT/PPO stage pairs, each on its own split of both data sets
    sft_data: str = "auto"      # SFT examples (as train_sft reads them); auto: data/sft_train.jsonl if alternating, else none
    sft_steps: int = 1000       # steps of all SFT stages together (train_sft's; --steps: all PPO stages)
    sft_lr: float = 1e-3        # peak learning rate of each SFT stage (its other settings: train_sft's defaults)
    ewc: str = "modified"       # alternating: modified (Hbat's), fisher (Kirkpatrick's), freeze (Hbat-Freeze) or none
    lambda_max: float = 100.0   # EWC strength: Omega's total (modified), or the Fisher penalty's lambda_max
    ewc_temperature: float = 1.0  # T in Omega = lambda_max softmax(S / T): 1 is the authors' (one-hot); larger spreads it
    fisher_samples: int = 64    # --ewc=fisher: examples of the previous stage's data the Fisher averages over
    # rollouts
    steps: int = 60             # PPO steps (one batch of rollouts each)
    stop_at: int = 0            # stop after this step as if interrupted (0: run to the end); continue with --resume
    rollout_batch_size: int = 64  # prompts sampled per step, over all ranks
    gen_batch_size: int = 64    # prompts sampled together, one generator each: the rollouts depend on it, not on ranks
    max_prompt_len: int = 128   # prompt tokens; a longer prompt keeps its end
    max_new_tokens: int = 48    # response tokens; an answer cut here has no EOS
    temperature: float = 1.0    # sampling temperature (> 0; all log-probs are of logits / temperature)
    cuda_graph: bool = True     # on one GPU without torchrun, replay each decode step as a CUDA graph (0: eager loop)
    missing_eos_penalty: float = -1.0  # the score of an answer without EOS, in normalised units
    score_norm: bool = True     # normalise scores by the running mean/std of every score seen
    score_clip: float = 10.0    # then clip them to +-score_clip
    # KL penalty
    kl_coef: float = 0.2        # initial beta of the per-token KL penalty
    adaptive_kl: bool = True    # adapt beta toward kl_target (Ziegler et al.); 0: beta fixed at kl_coef
    kl_target: float = 6.0      # target KL per answer (nats)
    kl_horizon: int = 10000     # adaptation horizon, in rollouts
    # PPO update
    ppo_epochs: int = 4         # passes over each batch of rollouts
    mini_batch_size: int = 16   # rollouts per optimizer step, over all ranks
    micro_batch_size: int = 16  # rollouts per forward on one rank
    gamma: float = 1.0          # discount
    lam: float = 0.95           # GAE lambda
    cliprange: float = 0.2      # policy ratio clip epsilon
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 1.0        # value loss weight (R3's 1; the critic has its own optimizer)
    value_warmup_steps: int = 0  # first steps (of each PPO stage) update only the critic (Hbat: 50)
    lr: float = 2e-5            # policy learning rate (use ~1e-6 for a real 7B model)
    critic_lr: float = 1e-4     # critic learning rate
    warmup_steps: int = 0       # linear learning-rate warmup steps
    min_lr_ratio: float = 1.0   # cosine decay to lr * min_lr_ratio (1: constant)
    weight_decay: float = 0.0   # AdamW decay on matrices
    grad_clip: float = 1.0      # max global gradient norm, per model
    eval_every: int = 20        # steps between held-out evaluations (0: only before and after)
    save_every: int = 50        # 0: save only at the end
    seed: int = 0               # sampling, minibatch order
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cuda or cpu
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA: bfloat16 or float32
    resume: bool = False        # continue from out_dir/model/train_state.pt
    num_samples: int = 3        # held-out answers printed at the end


def check_config(cfg: Config) -> None:
    """Every flag checked before any work starts; each error names the flag and what is allowed."""
    check_choice(cfg, "reward", ppo.REWARDS)
    train.check_given(cfg, "init")  # before the default reward model is trained for a run that cannot start
    check_choice(cfg, "template", ("auto", *TEMPLATES))
    if cfg.dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype={cfg.dtype}: train in bfloat16 or float32")
    if not cfg.temperature > 0:
        raise InputError(f"--temperature={cfg.temperature}: PPO needs sampling, use a temperature > 0")
    check_positive(cfg, "steps", "rollout_batch_size", "gen_batch_size", "max_prompt_len", "max_new_tokens",
                   "ppo_epochs", "mini_batch_size", "micro_batch_size", "lr", "critic_lr", "kl_target", "kl_horizon",
                   "cliprange", "cliprange_value", "vf_coef", "score_clip")
    check_non_negative(cfg, "kl_coef", "value_warmup_steps", "warmup_steps", "weight_decay", "grad_clip",
                       "eval_every", "eval_prompts", "save_every", "stop_at", "num_samples")
    check_range(cfg, "gamma", 0.0, 1.0)
    check_range(cfg, "lam", 0.0, 1.0)
    check_range(cfg, "min_lr_ratio", 0.0, 1.0)
    check_learning_rates(cfg, "lr", "critic_lr")
    if cfg.adaptive_kl and cfg.kl_coef == 0:  # the controller scales beta: from 0 it never moves
        raise InputError(f"--kl_coef={cfg.kl_coef}: the adaptive KL controller (--adaptive_kl) only scales beta, which "
                         "would stay 0; use --kl_coef > 0, or --adaptive_kl=0 for no KL penalty")
    for name in ("mini_batch_size", "gen_batch_size"):
        if cfg.rollout_batch_size % getattr(cfg, name):
            raise InputError(f"--{name}={getattr(cfg, name)} must divide --rollout_batch_size={cfg.rollout_batch_size}")
    check_world(cfg, train.launched_world_size())  # before the default models are trained for a run refused anyway
    check_device(cfg)
    train.check_files(cfg, "data", "eval_data")
    train.check_prompt_file(cfg, "eval_data")
    if cfg.out_dir != "auto":
        check_output(cfg.out_dir, "out_dir", directory=True)
    hbat.check_config(cfg, "ppo")
    if cfg.value_warmup_steps >= (stage_steps := min(s.steps for s in hbat.plan(cfg, "ppo") if s.kind == "ppo")):
        per_stage = f" (--steps={cfg.steps} over --splits={cfg.splits} PPO stages)" if cfg.splits > 1 else ""
        raise InputError(f"--value_warmup_steps={cfg.value_warmup_steps}: a PPO stage of {stage_steps} steps{per_stage} "
                         "would never update the policy; warm up the critic for fewer steps")


def check_world(cfg: Config, world_size: int) -> None:
    n_chunks = cfg.rollout_batch_size // cfg.gen_batch_size
    if n_chunks % world_size or cfg.mini_batch_size % world_size:
        raise InputError(f"--rollout_batch_size / --gen_batch_size = {n_chunks} sampling chunks and "
                         f"--mini_batch_size={cfg.mini_batch_size} must both be divisible by the world size {world_size}")


def prerequisites(cfg: Config) -> None:
    """The tiny SFT model and the tiny reward model, trained first when a default path is missing."""
    import train_rm  # the repository's script, beside this one
    if cfg.init in (hbat.SFT_INIT, hbat.BASE_INIT) and not cfg.resume:
        hbat.train_init_first(cfg.init, cfg.device, train_sft.main)
    if cfg.reward == "rm" and cfg.reward_model == Config.reward_model:
        train.train_first(cfg.reward_model, "the tiny reward model", "train_rm.py", train_rm.main,
                          [f"--device={cfg.device}"])


def main(argv=None):
    t_start = time.time()
    cfg = parse_config(Config, argv, description=__doc__.split("\n")[0])
    check_config(cfg)
    stages = hbat.plan(cfg, "ppo")
    # the records are read first: a malformed one is named before minutes of training the default models
    rows, eval_rows = ppo.load_prompts(cfg.data, cfg.eval_data, cfg.eval_prompts, cfg.reward)
    sft_examples = train_sft.load_sft_examples(cfg.sft_data, "auto") if cfg.sft_data else []
    prerequisites(cfg)
    d = dist.init_dist(cfg.device)
    dist.seed_everything(cfg.seed)

    # --- models
    ckpt = Path(cfg.out_dir) / "model"
    train.clean_stale(ckpt, d)
    state = train.find_checkpoint(ckpt, cfg.resume)
    # the KL controller and the score statistics live across the whole run (all PPO stages); a checkpoint without
    # them is not a PPO run's, said before its flags are compared (a DPO run's differ from any PPO command)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    stats = ppo.RunningMoments()
    ppo.restore_run_state(state, kl_ctl, stats, ckpt / train.STATE_FILE)
    # the checkpoint's KL controller replaces the one built from the KL flags, so they must not change either
    # (--steps and Hbat's flags: hbat.run_schedule)
    train.check_resumed_flags(cfg, state, (
        "init", "reward", "reward_model", "relevance_model", "data", "seed", "rollout_batch_size", "gen_batch_size",
        "max_prompt_len", "max_new_tokens", "temperature", "missing_eos_penalty", "score_norm", "score_clip",
        "kl_coef", "adaptive_kl", "kl_target", "kl_horizon", "ppo_epochs", "mini_batch_size", "gamma", "lam",
        "cliprange", "cliprange_value", "vf_coef", "value_warmup_steps", "lr", "critic_lr", "warmup_steps",
        "min_lr_ratio", "weight_decay", "grad_clip"))
    init_dir = train.checkpoint_dir(cfg, "init")
    tok = Tokenizer.from_dir(init_dir)
    if cfg.template == "auto":
        cfg.template = tok.template or "hh"
    tok.template = cfg.template
    train.check_resumed_flags(cfg, state, ("template",))  # once resolved: the checkpoint holds the resolved one
    policy = train.place(train.load_model(ckpt if state else init_dir, d), d)
    tok.check_vocab(policy.cfg.vocab_size)
    if cfg.max_prompt_len + cfg.max_new_tokens > policy.cfg.max_seq_len:
        raise InputError(f"--max_prompt_len + --max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} exceeds "
                         f"the model's context length {policy.cfg.max_seq_len}")
    reward_model = None
    if cfg.reward == "rm":
        rm_dir = train.checkpoint_dir(cfg, "reward_model")
        tok.check_reads_the_same(rm_dir, f"--reward_model={cfg.reward_model}")
        reward_model = train.place(train.load_model(rm_dir, d, load=RewardModel.from_pretrained,
                                                    build=RewardModel.from_config), d, trainable=False)
        try:  # one saved without a tokenizer.json was taken on trust above: a smaller vocabulary would read the
            tok.check_vocab(reward_model.cfg.vocab_size)  # policy's ids out of range in the first rollouts' forward
        except ValueError as e:
            raise InputError(f"--reward_model={cfg.reward_model}: {e}") from None
        if (n := cfg.max_prompt_len + cfg.max_new_tokens) > reward_model.cfg.max_seq_len:  # it reads whole rollouts
            raise InputError(f"--reward_model={cfg.reward_model}: its context of {reward_model.cfg.max_seq_len} tokens "
                             f"is shorter than --max_prompt_len + --max_new_tokens = {n}")
    if state:
        critic_dir, load_critic = ckpt / "critic", RewardModel.from_pretrained
    elif reward_model is not None:
        critic_dir, load_critic = rm_dir, RewardModel.from_pretrained
    else:  # no reward model to start from: the SFT trunk with a zero value head (every value 0)
        critic_dir, load_critic = init_dir, lambda p: RewardModel.from_causal_lm(p, head_init="zeros")
    critic = train.place(train.load_model(critic_dir, d, load=load_critic, build=RewardModel.from_config), d)
    encoder = ppo.relevance_encoder(cfg.reward, cfg.relevance_model, d.device)  # None unless the reward needs one
    dist.print0(d, f"PPO of {init_dir} ({policy.num_params() / 1e6:.2f}M parameters), reward {cfg.reward}"
                   f"{f' ({cfg.reward_model})' if reward_model is not None else ''}, template {cfg.template!r}")

    # --- data: the prompts (and Hbat's SFT examples), each in --splits disjoint parts
    sft_cfg = train_sft.Config(lr=cfg.sft_lr, batch_size=hbat.SFT_BATCH_SIZE, micro_batch_size=cfg.micro_batch_size,
                               save_every=cfg.save_every, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)
    sft_rows = tokenize_sft(sft_examples, tok, cfg.template, min(sft_cfg.max_len, policy.cfg.max_seq_len),
                            sft_cfg.max_response_len)
    data = {"ppo": hbat.split(rows, cfg.splits, "data"),
            "sft": hbat.split(sft_rows, cfg.splits, "sft_data") if cfg.sft_data else []}
    dist.print0(d, f"{len(rows)} prompts from {cfg.data}; {len(eval_rows)} held out from {cfg.eval_data}"
                   + (f"; {len(sft_rows)} SFT examples from {cfg.sft_data}" if cfg.sft_data else ""))

    # --- loop
    amp = train.autocast(d, cfg.dtype)
    log = train.MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", d, state["step"] if state else 0)

    def evaluate(step):
        with amp:
            metrics, answers = ppo.held_out_quality(policy, tok, eval_rows, template=cfg.template,
                                                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, d=d,
                                                    reward_model=reward_model)
        reward = f", reward model {metrics['eval/reward']:+.3f}" if reward_model is not None else ""
        dist.print0(d, f"\nstep {step}: held-out oracle quality {metrics['eval/mean_quality']:.3f}, closed-ended "
                       f"accuracy {metrics['eval/closed_accuracy']:.1%}{reward} (greedy, {len(eval_rows)} prompts)")
        return metrics, answers

    def ppo_stage(stage: hbat.Stage, policy, rows, penalty_fn):
        """A PPO stage on the prompts `rows` (a plain run is one): the KL reference is the model at the stage's
        start; fresh optimizers; the critic, the KL coefficient and the score statistics carry over."""
        prompts = ppo.encode_prompts(tok, rows, cfg.template, cfg.max_prompt_len)
        ref = train.place(train.load_model(stage.start_dir, d), d, trainable=False)
        policy_opt = train.adamw(policy, cfg.lr, cfg.weight_decay)
        critic_opt = train.adamw(critic, cfg.critic_lr, cfg.weight_decay)
        # a policy optimizer that never stepped (value warm-up) is not saved: torch would initialise its state with
        # a dummy step, and Adam's bias correction would then be one step off after a resume
        models = lambda steps_done: {"policy": (policy, policy_opt if steps_done > cfg.value_warmup_steps else None),  # noqa: E731
                                     "critic": (critic, critic_opt)}
        start = stage.restore(models(stage.state["step"] - stage.offset if stage.state else 0), d)
        if start:
            dist.print0(d, f"resumed from {ckpt} at step {stage.offset + start}")
        if eval_rows and stage.offset + start == 0:
            log.log({"step": 0, **evaluate(0)[0]})
        bar = train.progress(range(start, stage.last), "ppo", d)
        record = {}
        for step in bar:
            run_step = stage.offset + step  # seeds the sampling and the minibatch order
            for opt, peak in ((policy_opt, cfg.lr), (critic_opt, cfg.critic_lr)):
                train.set_lr(opt, train.lr_at(step, stage.steps, peak, cfg.warmup_steps, cfg.min_lr_ratio))
            index = train.batch_indices(step, len(rows), cfg.rollout_batch_size, cfg.seed)
            t0 = time.time()
            batch = ppo.sample_rollouts(policy, [prompts[i] for i in index], step=run_step, seed=cfg.seed,
                                        gen_batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, tok=tok, d=d, amp=amp,
                                        cuda_graph=cfg.cuda_graph)
            t1 = time.time()
            batch = ppo.rollout_forwards(batch, policy, ref, critic, micro_batch_size=cfg.micro_batch_size,
                                         temperature=cfg.temperature, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                         amp=amp)
            t2 = time.time()
            batch["scores"] = ppo.score_rollouts(batch, cfg.reward, [rows[i] for i in index], tok=tok,
                                                 reward_model=reward_model, encoder=encoder,
                                                 micro_batch_size=cfg.micro_batch_size,
                                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, step=run_step,
                                                 amp=amp)
            t3 = time.time()
            batch = ppo.gather_rollouts(batch, d, tok.pad_id)
            scores = ppo.shape_scores(batch["scores"], batch["stopped"], stats if cfg.score_norm else None,
                                      cfg.score_clip, cfg.missing_eos_penalty)
            kl_coef = kl_ctl.value
            adv_stats = ppo.advantages(batch, scores, kl_coef, cfg.gamma, cfg.lam)
            # once per step, the value warm-up's steps included: their KL is 0 (the policy has not moved), so beta
            # shrinks there by the controller's largest factor, 1 - 0.2 rollouts / horizon, each step
            kl_ctl.update(adv_stats["kl"], cfg.rollout_batch_size)
            t4 = time.time()
            update_stats = ppo.update(batch, policy, critic, policy_opt, critic_opt, step=run_step, seed=cfg.seed,
                                      ppo_epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size,
                                      micro_batch_size=cfg.micro_batch_size,
                                      update_policy=step >= cfg.value_warmup_steps, grad_clip=cfg.grad_clip, d=d,
                                      penalty_fn=penalty_fn, temperature=cfg.temperature, vocab_size=tok.vocab_size,
                                      pad_id=tok.pad_id, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                                      vf_coef=cfg.vf_coef, amp=amp)
            t5 = time.time()

            penalty = update_stats.pop("penalty", None)
            record = {**stage.record(step + 1), **ppo.step_metrics(batch, adv_stats, update_stats, kl_coef),
                      **hbat.ewc_record(stage, penalty, update_stats.get("policy_loss", 0.0)),
                      "time/generation": t1 - t0, "time/scoring": t3 - t2, "time/forward": (t2 - t1) + (t4 - t3),
                      "time/update": t5 - t4}
            if eval_rows and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == stage.steps):
                metrics, answers = evaluate(stage.offset + step + 1)
                record.update(metrics)
                if stage.offset + step + 1 == stages[-1].offset + stages[-1].steps:
                    for prompt, answer in answers[:cfg.num_samples]:
                        dist.print0(d, f"> {prompt}\n  {answer}")
            log.log(record)
            bar.set_postfix(score=f"{record['objective/scores']:.3f}", kl=f"{record['objective/kl']:.2f}")
            # --- save
            if train.should_save(step + 1, cfg.save_every, stage.last):
                stage.save(d, step + 1, models(step + 1), tokenizer=tok, extra=ppo.run_state(kl_ctl, stats))
        bar.close()
        return record

    def sft_stage(stage: hbat.Stage, policy, rows, penalty_fn):
        # PPO's state does not change in an SFT stage, but a run resumed inside one needs it
        stage.extra.update(ppo.run_state(kl_ctl, stats))
        return train_sft.sft_stage(sft_cfg, d, "sft", policy, tok, rows, [], stage, cfg.sft_lr, penalty_fn)

    last = hbat.run_schedule(cfg, d, stages, policy, data, sft_stage=sft_stage, pref_stage=ppo_stage, init_dir=init_dir,
                      run_dir=Path(cfg.out_dir), state=state, log=log, tok=tok, carry={"critic": critic}, amp=amp,
                      # the Fisher's sequences (--ewc=fisher): SFT responses, or answers sampled to a PPO stage's prompts
                      sequences=lambda kind, rows, m: rows if kind == "sft" else ppo.answer_rows(
                          m, ppo.encode_prompts(tok, rows, cfg.template, cfg.max_prompt_len), tok=tok, d=d, amp=amp,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed))
    total = stages[-1].offset + stages[-1].steps
    dist.print0(d, f"saved {ckpt} (policy) and {ckpt / 'critic'} (step {min(cfg.stop_at or total, total)}/{total}); "
                   f"metrics in {log.path}")
    if d.is_main and (path := ppo.save_results(cfg.out_dir, last, log.path, time.time() - t_start)):
        print(f"wall time {time.time() - t_start:.0f} s; results in {path}")
    dist.close(d)


if __name__ == "__main__":
    run(main, sys.argv[1:])
