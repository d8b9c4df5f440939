"""nanoalign/ppo.py: rollouts, recomputed log-probs, score shaping, running statistics, the minibatch loss.

The first two tests pin the PPO pitfall that runs silently: before any update the trainer's log-probs must equal
the sampler's and the reference's, so the first ratio is 1 and the KL is 0, on left-padded rollouts of different
lengths, at temperature 1 and not."""
import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nanoalign import dist, ppo, train, world
from nanoalign.data import read_jsonl
from nanoalign.evaluate import sample_answers
from nanoalign.losses import ppo_policy_loss, ppo_value_loss, token_logprobs
from nanoalign.model import ModelConfig, Transformer
from nanoalign.reward import RewardModel
from nanoalign.tokenizer import Tokenizer, encode_prompt

ROOT = Path(__file__).resolve().parents[1]
NO_AMP = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64,
                                    max_seq_len=128))
    model.init_weights(std=0.2)  # a peaked distribution: samples differ in log-prob by a lot
    return model.eval()


@pytest.fixture(scope="module")
def critic(policy):
    torch.manual_seed(1)
    rm = RewardModel(policy.cfg)
    rm.trunk.load_state_dict(policy.state_dict(), strict=False)
    return rm


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["What is 3 plus 4?", "Tell me two facts about bees and about the sea, please.", "Hi",
             "Reverse the list: stone, apple, piano, rabbit, cloud, mango.", "Sort the words: b, a.", "Describe rain."]
    return [encode_prompt(tok, t, "hh") for t in texts]


def stopping_tok(tok):
    """The tokenizer's ids, with 60 of the 1024 ids as stop tokens: a random model then stops in some rows and
    not in others, so the batch has responses of several lengths, with and without a stop token."""
    return SimpleNamespace(stop_ids=list(range(3, 63)), pad_id=tok.pad_id, vocab_size=tok.vocab_size)


def rollouts(policy, prompts, tok, temperature, d=dist.Dist(), step=0, gen_batch_size=2):
    return ppo.sample_rollouts(policy, prompts, step=step, seed=0, gen_batch_size=gen_batch_size, max_new_tokens=12,
                               temperature=temperature, tok=stopping_tok(tok), d=d, amp=NO_AMP)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_first_ratio_is_one_and_kl_is_zero_on_left_padded_rollouts(policy, critic, prompts, tok, temperature):
    batch = rollouts(policy, prompts, tok, temperature)
    lengths = batch["mask"].sum(-1)
    assert len(set(len(p) for p in prompts)) > 1 and len(set(lengths.tolist())) > 1  # padding on both sides
    assert batch["stopped"].any() and not batch["stopped"].all()
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(batch, policy, ref, critic, micro_batch_size=4, temperature=temperature,
                                 vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    mask = batch["mask"].bool()
    # the trainer's recomputation (another padding, other batch-mates) equals the sampler's incremental forward
    gap = (batch["logprobs"] - batch["sampler_logprobs"]).abs()[mask].max().item()
    assert gap <= 1e-5
    assert batch["sampler_logprobs"][mask].std() > 0.5  # so a wrong temperature or shift could not hide
    # ... and the reference, same weights, same collation: exactly the same numbers, the KL is 0
    assert torch.equal(batch["logprobs"], batch["ref_logprobs"])
    assert (batch["logprobs"][~mask] == 0).all() and (batch["tokens"][~mask] == tok.pad_id).all()
    # the critic's rollout values, collated and padded, are its values of each row alone: V(x, y_<t) at each token
    for i, prompt in enumerate(prompts):
        n = int(lengths[i])
        alone = critic(torch.tensor([prompt + batch["tokens"][i, :n].tolist()]), per_token=True)[0]
        torch.testing.assert_close(batch["values"][i, :n], alone[len(prompt) - 1:-1], atol=1e-5, rtol=0)
    stats = ppo.advantages(batch, torch.randn(len(prompts)), kl_coef=0.2, gamma=1.0, lam=0.95)
    assert stats["kl"] == 0.0
    # the first minibatch, collated differently again: ratio 1, nothing clipped
    mb = ppo.select_rows(batch, [4, 0, 2])
    _, sums = ppo.minibatch_loss(mb, policy, critic, update_policy=True, temperature=temperature,
                                 vocab_size=tok.vocab_size, pad_id=tok.pad_id, cliprange=0.2, cliprange_value=0.2,
                                 vf_coef=1.0, amp=NO_AMP)
    means = dict(zip(ppo.STAT_NAMES, (sums / mb["mask"].sum()).tolist()))
    assert abs(means["ratio"] - 1) <= 1e-6 and means["approx_kl"] <= 1e-12 and means["clipfrac"] == 0


@pytest.mark.parametrize("kw", [{}, dict(norm="layernorm", mlp="gelu", attn_bias=True, parallel_residual=True,
                                          rotary_pct=0.25, model_type="gpt_neox")])
def test_no_model_has_dropout_so_train_mode_changes_nothing(kw):
    """train_ppo.py keeps the policy and the critic in train mode while it computes the rollouts' old log-probs and
    values. That is exact only because nothing in the models depends on the mode: with dropout, the trainer's old
    log-probs would be one random mask's, the first ratio would not be 1 and the KL to an identical reference would
    not be 0 (TRL removes dropout from every PPO model for this reason). Adding dropout, or batch statistics, to
    the transformer or the reward model must fail here."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layer=2, n_head=2, hidden_dim=64, max_seq_len=32, **kw)
    ids, attn = torch.randint(0, 64, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    attn[0, :4] = 0
    for model in (Transformer(cfg), RewardModel(cfg)):
        mode_dependent = [name for name, m in model.named_modules()
                          if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase))]
        assert not mode_dependent
        outs = []
        for training in (True, False):
            model.train(training)
            torch.manual_seed(1)  # the same random stream for both: only the mode differs
            outs.append(model(ids, attention_mask=attn))
        assert torch.equal(*outs)


def test_recomputed_logprobs_are_the_losses_token_logprobs_of_the_sampled_sequence(policy, prompts, tok):
    """response_logprobs is token_logprobs (losses.py) on prompt + response, read from position P - 1 on."""
    batch = rollouts(policy, prompts, tok, 0.8)
    ids, attn, P = ppo.collate(batch["prompt"], batch["tokens"], batch["mask"], tok.pad_id)
    ours = ppo.response_logprobs(policy, ids, attn, P, 0.8)
    theirs = token_logprobs(policy, ids, attn, temperature=0.8)[:, P - 1:]
    mask = batch["mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-6, rtol=0)
    # one position off would read the log-prob of the token before: far from the sampler's
    assert (theirs[:, :-1] - batch["sampler_logprobs"][:, 1:]).abs()[mask[:, 1:]].max() > 0.1
    # the entropy logged as objective/entropy: of softmax(logits / temperature) at the same positions
    _, entropy = ppo.response_logprobs(policy, ids, attn, P, 0.8, with_entropy=True)
    with torch.no_grad():
        logp = (policy(ids, attention_mask=attn)[:, P - 1:-1] / 0.8).log_softmax(-1)
    torch.testing.assert_close(entropy[mask], -(logp.exp() * logp).sum(-1)[mask], atol=1e-5, rtol=0)


def test_rollouts_are_the_same_for_any_number_of_ranks(policy, prompts, tok):
    """Chunk c is sampled by rank c % world with a generator of (seed, step, c): two ranks' shares, put together,
    are the one-process batch, token for token."""
    one = rollouts(policy, prompts, tok, 1.0, gen_batch_size=2)
    shares = [rollouts(policy, prompts, tok, 1.0, d=dist.Dist(rank=r, world_size=3), gen_batch_size=2)
              for r in range(3)]
    assert [s["index"].tolist() for s in shares] == [[0, 1], [2, 3], [4, 5]]
    two = ppo.select_rows(ppo.cat_rows(shares, tok.pad_id), torch.arange(6))
    for key in ("tokens", "mask", "stopped"):
        assert torch.equal(one[key], two[key]), key
    assert one["prompt"] == two["prompt"] == prompts
    # and the next step samples something else
    assert not torch.equal(rollouts(policy, prompts, tok, 1.0, step=1)["tokens"][:, :3], one["tokens"][:, :3])


def test_the_score_lands_on_the_last_response_token_and_nothing_after_it():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    torch.manual_seed(0)
    logprobs, ref = torch.randn(3, 5), torch.randn(3, 5)
    garbage = ~mask.bool()
    logprobs[garbage], ref[garbage] = 1e4, -1e4  # after EOS: must not leak into rewards
    batch = {"mask": mask, "logprobs": logprobs, "ref_logprobs": ref, "values": torch.zeros(3, 5)}
    scores, beta = torch.tensor([2.0, -1.0, 0.5]), 0.1
    ppo.advantages(batch, scores, kl_coef=beta, gamma=1.0, lam=1.0)
    returns = batch["returns"]  # with V = 0, gamma = lambda = 1: R_t = sum of the rewards from t on
    rewards = torch.cat([returns[:, :-1] - returns[:, 1:], returns[:, -1:]], dim=1)
    kl = logprobs - ref
    for b, last in enumerate([2, 4, 0]):
        expected = -beta * kl[b, :last + 1]
        expected[last] += scores[b]
        torch.testing.assert_close(rewards[b, :last + 1], expected)
        assert (returns[b, last + 1:] == 0).all() and (batch["advantages"][b, last + 1:] == 0).all()


def test_the_logged_kl_is_per_answer_and_a_lone_response_token_is_centred_not_whitened():
    """objective/kl (what the adaptive controller compares with its target, in nats per answer) is the mean over
    rollouts of each answer's summed KL, not a per-token mean. A batch of one response token has no variance to
    whiten by: its advantage is centred to 0 instead of raising."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 9.0, 9.0]])  # 9: garbage after the answers
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -9.0, -9.0]])
    batch = {"mask": mask, "logprobs": logprobs, "ref_logprobs": ref, "values": torch.zeros(2, 3)}
    stats = ppo.advantages(batch, torch.zeros(2), kl_coef=0.1, gamma=1.0, lam=0.95)
    assert stats["kl"] == pytest.approx(((0.5 - 1.0) + 1.5) / 2)  # per-token mean would be 1/3
    lone = {"mask": torch.tensor([[1, 0]]), "logprobs": torch.tensor([[-1.0, 0.0]]),
            "ref_logprobs": torch.tensor([[-1.5, 0.0]]), "values": torch.tensor([[0.25, 0.0]])}
    ppo.advantages(lone, torch.tensor([2.0]), kl_coef=0.1, gamma=1.0, lam=0.95)
    assert lone["advantages"].tolist() == [[0.0, 0.0]]
    assert lone["returns"][0, 0].item() == pytest.approx(2.0 - 0.1 * 0.5)  # the returns are not touched


def test_a_response_without_eos_gets_the_penalty_instead_of_its_score():
    raw = torch.tensor([3.0, 5.0, -2.0, 0.5])
    stopped = torch.tensor([True, False, True, False])
    shaped = ppo.shape_scores(raw, stopped, None, clip=10.0, missing_eos_penalty=-1.5)
    assert shaped.tolist() == [3.0, -1.5, -2.0, -1.5]
    shaped = ppo.shape_scores(torch.tensor([30.0, -30.0]), torch.tensor([True, True]), None, clip=10.0,
                              missing_eos_penalty=-1.0)
    assert shaped.tolist() == [10.0, -10.0]  # clipped


def test_running_statistics_match_numpy_over_every_score_seen():
    rng = np.random.default_rng(0)
    stats, seen = ppo.RunningMoments(), []
    for n in (7, 1, 16, 3):
        x = rng.normal(3.0, 2.0, size=n)
        seen += x.tolist()
        shaped = ppo.shape_scores(torch.tensor(x), torch.ones(n, dtype=torch.bool), stats, clip=100.0,
                                  missing_eos_penalty=-1.0)
        mean, std = np.mean(seen), np.std(seen, ddof=1)
        assert stats.count == len(seen) and abs(stats.mean - mean) < 1e-12 and abs(stats.std - std) < 1e-12
        np.testing.assert_allclose(shaped.numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)  # this batch included
    resumed = ppo.RunningMoments()
    resumed.load_state_dict(stats.state_dict())
    x = rng.normal(size=5)
    stats.update(torch.tensor(x))
    resumed.update(torch.tensor(x))
    assert (resumed.mean, resumed.std) == (stats.mean, stats.std)


def moved_copies(policy, critic):
    """Copies a small random step away from the rollouts' models, so that ratios and both clips are not trivial."""
    pol, cri = copy.deepcopy(policy).train(), copy.deepcopy(critic).train()
    with torch.no_grad():
        for p in list(pol.parameters()) + list(cri.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return pol, cri


def whole_batch_losses(batch, pol, cri, pad_id, cliprange=0.2, cliprange_value=0.2):
    """The definition: the two losses written directly on the whole padded batch -> (pg, pg stats, vf)."""
    ids, attn, P = ppo.collate(batch["prompt"], batch["tokens"], batch["mask"], pad_id)
    mask = batch["mask"].bool()
    pg, stats = ppo_policy_loss(token_logprobs(pol, ids, attn)[:, P - 1:], batch["logprobs"], batch["advantages"],
                                mask, cliprange)
    vf, _ = ppo_value_loss(cri(ids, attn, per_token=True)[:, P - 1:-1], batch["values"], batch["returns"], mask,
                           cliprange_value)
    return pg, stats, vf


def test_the_minibatch_gradient_is_the_token_mean_over_the_whole_minibatch(policy, critic, prompts, tok):
    """Micro-batches of 1, 2 or 6 rollouts give the gradient of ONE masked mean over every token of the
    minibatch (not a mean of per-micro-batch means), for the policy and the critic."""
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.randn(6, generator=torch.Generator().manual_seed(0)), 0.1, 1.0, 0.95)
    moved_policy, moved_critic = moved_copies(policy, critic)
    kw = dict(temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, cliprange=0.2, cliprange_value=0.2,
              vf_coef=0.5, amp=NO_AMP)

    def grads(micro):
        pol, cri = copy.deepcopy(moved_policy), copy.deepcopy(moved_critic)
        n = batch["mask"].sum().float()
        train.accumulate_gradients([pol, cri], train.micro_batches(list(range(6)), micro),
                                   lambda rows: ppo.minibatch_loss(ppo.select_rows(batch, rows), pol, cri,
                                                                   update_policy=True, **kw)[0], n, dist.Dist())
        return [p.grad.clone() for p in list(pol.parameters()) + list(cri.parameters())]

    # the definition, written with the losses directly on the whole padded batch
    pol, cri = copy.deepcopy(moved_policy), copy.deepcopy(moved_critic)
    pg, stats, vf = whole_batch_losses(batch, pol, cri, tok.pad_id)
    (pg + 0.5 * vf).backward()
    assert stats["clipfrac"] > 0  # the clip is exercised
    expected = [p.grad for p in list(pol.parameters()) + list(cri.parameters())]
    for micro in (1, 2, 6):
        for g, e in zip(grads(micro), expected):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)


def test_value_warmup_minibatch_leaves_the_policy_without_gradient(policy, critic, prompts, tok):
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.ones(6), 0.1, 1.0, 0.95)
    pol, cri = copy.deepcopy(policy).train(), copy.deepcopy(critic).train()
    p_opt, c_opt = train.adamw(pol, 1e-2), train.adamw(cri, 1e-2)
    before_p, before_c = copy.deepcopy(pol.state_dict()), copy.deepcopy(cri.state_dict())
    ppo.update(batch, pol, cri, p_opt, c_opt, step=0, seed=0, ppo_epochs=2, mini_batch_size=3, micro_batch_size=2,
               update_policy=False, grad_clip=1.0, d=dist.Dist(), temperature=1.0, vocab_size=tok.vocab_size,
               pad_id=tok.pad_id, cliprange=0.2, cliprange_value=0.2, vf_coef=1.0, amp=NO_AMP)
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in before_p.items())
    assert not p_opt.state  # the policy's optimizer never stepped
    # ... and no policy loss was backpropagated (its gradients would be computed for nothing, and left behind)
    assert all(p.grad is None for p in pol.parameters())
    assert not torch.equal(before_c["score.weight"], cri.state_dict()["score.weight"])


def test_text_scores_oracle_and_r3_random_qtype_depend_on_the_row_not_the_split():
    rows = [{"prompt": "What is 3 plus 4?", "qtype": "CONSTRAINED", "reference": "3 plus 4 is 7."},
            {"prompt": "Tell me about bees.", "qtype": "OPENENDED", "reference": "Bees make honey."}] * 3
    answers = ["3 plus 4 is 7.", "Bees make honey. Bees can sting.", "7.", "Cats purr.", "3 plus 4 is 8.", "Hi."]
    oracle = ppo.text_scores("oracle", rows, answers, max_new_tokens=48, seed=0, step=0, index=list(range(6)))
    assert oracle.tolist() == [world.quality(r["prompt"], a) for r, a in zip(rows, answers)]

    class BagOfWords:  # a deterministic stand-in for the encoder
        def embed(self, texts):
            return torch.stack([torch.tensor([float(len(t)), float(t.count("e")), 1.0]) for t in texts])

    kw = dict(encoder=BagOfWords(), max_new_tokens=48, seed=0, step=3)
    whole = ppo.text_scores("r3_random_qtype", rows, answers, index=list(range(6)), **kw)
    halves = torch.cat([ppo.text_scores("r3_random_qtype", rows[i::2], answers[i::2], index=list(range(6))[i::2], **kw)
                        for i in (0, 1)])
    torch.testing.assert_close(halves, whole[[0, 2, 4, 1, 3, 5]])
    # the draw changes with the step (so it is not a fixed relabelling)
    assert any(not torch.equal(whole, ppo.text_scores("r3_random_qtype", rows, answers, index=list(range(6)),
                                                      **{**kw, "step": s})) for s in range(4, 10))


def test_long_prompts_keep_their_end_and_bos(tok):
    rows = [{"prompt": "Mia lives in Oslo. " * 20 + "Where does Mia live?"}]
    ids = ppo.encode_prompts(tok, rows, "hh", 16)[0]
    full = encode_prompt(tok, rows[0]["prompt"], "hh")
    assert len(ids) == 16 and ids == full[-16:]
    bos_tok = copy.copy(tok)
    bos_tok.add_bos = True
    ids = ppo.encode_prompts(bos_tok, rows, "hh", 16)[0]
    assert ids[0] == tok.bos_id and ids[1:] == full[-15:]


def test_each_epoch_visits_every_rollout_once_in_its_own_shuffled_order(policy, critic, prompts, tok, monkeypatch):
    """ppo_epochs passes over the batch, each a permutation of all rollouts cut into minibatches; the order changes
    from epoch to epoch and from step to step, and is the same when the same step is run again."""
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.ones(6), 0.1, 1.0, 0.95)
    seen, select = [], ppo.select_rows

    def spy(b, rows):
        seen.extend(rows.tolist() if torch.is_tensor(rows) else list(rows))
        return select(b, rows)

    monkeypatch.setattr(ppo, "select_rows", spy)

    def orders(step):
        seen.clear()
        cri = copy.deepcopy(critic).train()
        ppo.update(batch, policy, cri, None, train.adamw(cri, 1e-3), step=step, seed=0, ppo_epochs=3,
                   mini_batch_size=3, micro_batch_size=3, update_policy=False, grad_clip=1.0, d=dist.Dist(),
                   temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, cliprange=0.2,
                   cliprange_value=0.2, vf_coef=1.0, amp=NO_AMP)
        return [tuple(seen[6 * e:6 * e + 6]) for e in range(3)]

    first = orders(step=0)
    assert len(first) == 3 and all(sorted(o) == list(range(6)) for o in first)  # every rollout once per epoch
    assert len(set(first)) == 3 and tuple(range(6)) not in first  # shuffled, differently each epoch
    assert orders(step=0) == first and orders(step=1) != first


def test_every_epoch_trains_against_the_rollouts_old_values_log_probs_and_returns(policy, critic, prompts, tok,
                                                                                   monkeypatch):
    """The clipping anchors (old log-probs, old values) and the targets (advantages, returns) are fixed when the
    rollouts are made: the second epoch, after the models moved, must see the first epoch's numbers, not ones
    recomputed from the moved models."""
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.ones(6), 0.1, 1.0, 0.95)
    fixed = {k: batch[k].clone() for k in ("logprobs", "values", "advantages", "returns")}
    seen, select = [], ppo.select_rows

    def spy(b, rows):  # what each minibatch is given, and which rollouts those are
        mb = select(b, rows)
        seen.append((torch.as_tensor(rows), {k: mb[k].clone() for k in fixed}))
        return mb

    monkeypatch.setattr(ppo, "select_rows", spy)
    pol, cri = copy.deepcopy(policy).train(), copy.deepcopy(critic).train()
    ppo.update(batch, pol, cri, train.adamw(pol, 1e-2), train.adamw(cri, 1e-2), step=0, seed=0, ppo_epochs=2,
               mini_batch_size=6, micro_batch_size=6, update_policy=True, grad_clip=1.0, d=dist.Dist(),
               temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, cliprange=0.2, cliprange_value=0.2,
               vf_coef=1.0, amp=NO_AMP)
    assert len(seen) == 2  # one minibatch of all six rollouts per epoch
    assert not torch.equal(pol.tok_emb.weight, policy.tok_emb.weight)  # the models moved between the epochs
    for epoch, (rows, given) in enumerate(seen):
        for k, v in fixed.items():
            torch.testing.assert_close(given[k], v[rows], rtol=0, atol=0, msg=f"epoch {epoch}: {k}")


def test_reward_model_scores_of_a_padded_batch_equal_each_rollout_scored_alone(policy, critic, prompts, tok):
    """reward_model_scores collates left-padded prompts with right-padded responses of different lengths: each
    score must be the one of prompt + response run alone (read at its stop token, pads hidden), not one read at
    a pad column or shifted by the pads."""
    batch = rollouts(policy, prompts, tok, 1.0)
    lengths = batch["mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1 and (lengths < batch["mask"].shape[1]).any()  # short rows end in pads
    scores = ppo.reward_model_scores(batch, critic, micro_batch_size=6, pad_id=tok.pad_id, amp=NO_AMP)
    with torch.no_grad():
        alone = torch.stack([critic(torch.tensor([p + batch["tokens"][i, :int(n)].tolist()])).float()[0]
                             for i, (p, n) in enumerate(zip(batch["prompt"], lengths))])
    assert alone.std() > 0.05  # the rows really score differently
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


def test_advantages_are_whitened_over_the_response_tokens_only(policy, critic, prompts, tok):
    """On rollouts of several lengths (pads after the short ones), the advantages PPO trains on have mean 0 and
    unbiased variance 1 over the response tokens, and are 0 on the pads: the pads take no part in whitening."""
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():  # a reference that differs, so the KL part of the rewards is not 0
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    mask = batch["mask"].bool()
    assert (~mask).sum() >= 6  # a good share of pads
    ppo.advantages(batch, torch.randn(6, generator=torch.Generator().manual_seed(0)) + 3.0, kl_coef=0.1,
                   gamma=1.0, lam=0.95)
    adv = batch["advantages"][mask].double()
    assert abs(adv.mean().item()) < 1e-5
    assert abs(adv.var(unbiased=True).item() - 1.0) < 1e-4
    assert (batch["advantages"][~mask] == 0).all()


def test_rollouts_sample_without_top_k_or_top_p_filtering(policy, prompts, tok, monkeypatch):
    """The trainer's log-probs are of the full softmax(logits / temperature): the sampler must not filter it
    (a top-k or top-p would make the first ratio differ from 1), and must cut ids past the tokenizer."""
    calls, real = [], ppo.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo, "generate", spy)
    rollouts(policy, prompts, tok, 1.0)
    assert len(calls) == 3  # one per chunk of 2 prompts
    for kw in calls:
        assert kw.get("top_k") in (None, 0) and kw.get("top_p") in (None, 1.0), kw
        assert kw["temperature"] == 1.0 and kw["vocab_size"] == tok.vocab_size


def test_rollouts_never_sample_ids_past_the_tokenizer(policy, prompts, tok):
    """An embedding padded past the tokenizer (Pythia): even with the padded rows overwhelmingly likely, no
    rollout holds an id the tokenizer cannot decode, and the trainer's log-probs still match the sampler's."""
    V = tok.vocab_size - 24  # a tokenizer 24 ids short of the model's 1024 embedding rows
    model = copy.deepcopy(policy)
    with torch.no_grad():
        h = model(torch.tensor(prompts[0])[None], return_hidden=True)[0].mean(0)
        model.lm_head.weight[V:] = 40.0 * h / h.norm()  # the rows past V aligned with the hidden states
    small = SimpleNamespace(stop_ids=list(range(3, 63)), pad_id=tok.pad_id, vocab_size=V)
    unlimited = SimpleNamespace(stop_ids=small.stop_ids, pad_id=tok.pad_id, vocab_size=None)
    kw = dict(step=0, seed=0, gen_batch_size=2, max_new_tokens=12, temperature=1.0, d=dist.Dist(), amp=NO_AMP)
    # without the limit the padded rows are what the model samples
    assert (ppo.sample_rollouts(model, prompts, tok=unlimited, **kw)["tokens"] >= V).float().mean() > 0.5
    batch = ppo.sample_rollouts(model, prompts, tok=small, **kw)
    assert batch["tokens"][batch["mask"].bool()].max() < V
    ids, attn, P = ppo.collate(batch["prompt"], batch["tokens"], batch["mask"], tok.pad_id)
    logps = ppo.response_logprobs(model, ids, attn, P, 1.0, V)
    mask = batch["mask"].bool()
    assert (logps - batch["sampler_logprobs"]).abs()[mask].max() <= 1e-4
    # the other samplers of training data pass the tokenizer's size too: Hbat's Fisher rows of a PPO stage, and
    # the answers evaluate.py samples (select_pairs.py --sample labels them into preference pairs)
    rows = ppo.answer_rows(model, prompts, tok=small, max_new_tokens=12, temperature=1.0, seed=0, d=dist.Dist(),
                           amp=NO_AMP)
    assert max(max(r["ids"][len(p):], default=0) for r, p in zip(rows, prompts)) < V
    decoded = []

    class Short:  # the tokenizer, 24 ids short of the model
        vocab_size = V

        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids):
            decoded.append(list(ids))
            return tok.decode(ids)

    answers = sample_answers(model, Short(), ["What is 3 plus 4?", "Describe rain.", "Hi"], "hh",
                             max_new_tokens=12, temperature=1.0)
    assert len(answers) == 3 and max(i for ids in decoded for i in ids) < V and sum(map(len, decoded)) > 10

def test_running_std_is_bessel_corrected_from_two_scores():
    # the first two scores already have a standard deviation (not 1 until a third arrives)
    stats = ppo.RunningMoments()
    shaped = ppo.shape_scores(torch.tensor([1.0, 3.0]), torch.tensor([True, True]), stats, clip=10.0,
                              missing_eos_penalty=-1.0)
    assert stats.std == pytest.approx(math.sqrt(2))  # var = ((1-2)^2 + (3-2)^2) / (2 - 1) = 2
    torch.testing.assert_close(shaped, torch.tensor([-1.0, 1.0]) / math.sqrt(2))


def test_statistics_absorb_the_raw_score_of_a_response_without_eos():
    # the running moments describe every score the scorer gave (shape_scores' docstring); the cut answer gets the
    # fixed penalty
    stats = ppo.RunningMoments()
    shaped = ppo.shape_scores(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([True, True, False]), stats, clip=10.0,
                              missing_eos_penalty=-1.0)
    assert (stats.count, stats.mean, stats.std) == (3, 3.0, 2.0)
    assert shaped.tolist() == [-1.0, 0.0, -1.0]


def test_each_chunk_has_its_own_generator():
    draw = lambda chunk: torch.rand(8, generator=ppo.rollout_generator(0, 0, chunk))  # noqa: E731
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(1), draw(1))


def test_the_sampler_and_the_minibatch_order_draw_from_different_streams():
    # chunk c's sampler and epoch c's shuffle once shared a seed: the permutation its generator would draw was
    # exactly the minibatch order
    for seed, step, c in [(0, 0, 0), (0, 3, 1), (5, 0, 2), (7, 11, 3)]:
        same_stream = torch.randperm(64, generator=ppo.rollout_generator(seed, step, c))
        assert not torch.equal(same_stream, ppo.minibatch_order(64, seed, step, c))
        assert torch.equal(ppo.minibatch_order(64, seed, step, c), ppo.minibatch_order(64, seed, step, c))
        assert sorted(ppo.minibatch_order(64, seed, step, c).tolist()) == list(range(64))


def test_identical_prompts_in_two_chunks_sample_different_answers(policy, prompts, tok):
    r = rollouts(policy, [prompts[1]] * 2, tok, 1.0, gen_batch_size=1)
    assert not torch.equal(r["tokens"][0], r["tokens"][1])


def test_cat_rows_pads_tokens_with_pad_and_everything_else_with_zero():
    a = {"prompt": [[7]], "tokens": torch.tensor([[5, 6, 7]]), "mask": torch.tensor([[1, 1, 1]]),
         "sampler_logprobs": torch.tensor([[-1.0, -2.0, -3.0]]), "stopped": torch.tensor([True])}
    b = {"prompt": [[8]], "tokens": torch.tensor([[9]]), "mask": torch.tensor([[1]]),
         "sampler_logprobs": torch.tensor([[-4.0]]), "stopped": torch.tensor([False])}
    out = ppo.cat_rows([a, b], pad_id=2)
    assert out["prompt"] == [[7], [8]]
    assert out["tokens"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert out["mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["sampler_logprobs"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert out["stopped"].tolist() == [True, False]


def test_update_stats_are_token_means_before_any_step(policy, critic, prompts, tok):
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.linspace(-1, 1, 6), 0.1, 1.0, 0.95)
    assert batch["mask"].sum() > 6  # more tokens than rollouts: a per-row normalisation would show
    pol, cri = copy.deepcopy(policy).train(), copy.deepcopy(critic).train()
    # the value targets differ from V_old: a non-zero value loss
    expected_vloss, _ = ppo_value_loss(batch["values"], batch["values"], batch["returns"], batch["mask"], 0.2)
    stats = ppo.update(batch, pol, cri, train.adamw(pol, 0.0), train.adamw(cri, 0.0), step=0, seed=0, ppo_epochs=1,
                       mini_batch_size=6, micro_batch_size=2, update_policy=True, grad_clip=1.0, d=dist.Dist(),
                       temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, cliprange=0.2,
                       cliprange_value=0.2, vf_coef=1.0, amp=NO_AMP)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)  # the first ratio is 1 on every token
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-8)
    assert stats["value_loss"] == pytest.approx(expected_vloss.item(), rel=1e-4)
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-5)  # -mean(A * 1) of whitened advantages


def test_held_out_quality_equals_evaluate_answers_on_the_same_answers(policy, tok, monkeypatch):
    rows = read_jsonl(ROOT / "data" / "prompts_test.jsonl")
    closed = [r for r in rows if r["qtype"] == "CONSTRAINED"][:2]
    opened = [r for r in rows if r["qtype"] == "OPENENDED"][:2]
    picked = closed + opened
    answers = [closed[0]["reference"], "I do not know.", opened[0]["prompt"], opened[1]["reference"]]
    monkeypatch.setattr(ppo, "sample_answers", lambda *a, **k: list(answers))
    metrics, pairs = ppo.held_out_quality(policy, tok, picked, template="hh", max_new_tokens=4, batch_size=4,
                                          d=dist.Dist())
    assert pairs == [(r["prompt"], a) for r, a in zip(picked, answers)]
    assert metrics["eval/closed_accuracy"] == 0.5  # 1 of the 2 closed-ended prompts, not 1 of 4
    assert metrics["eval/copy_rate"] == 0.25
    q = [world.quality(r["prompt"], a) for r, a in zip(picked, answers)]
    assert metrics["eval/mean_quality"] == pytest.approx(sum(q) / 4)


def test_score_rollouts_judges_each_decoded_answer_against_the_row_its_index_names(tok):
    """A text reward reads this rank's rollouts: row j is the prompt batch["index"][j] of the step's prompt list,
    its answer the tokens under its mask, decoded without the stop token."""
    rows = read_jsonl(ROOT / "data" / "prompts_test.jsonl")[:3]
    # right; right but said twice; right, cut by the length cap (no stop token: its last token is the answer's)
    answers = [rows[2]["reference"], rows[0]["reference"] + " " + rows[0]["reference"], rows[1]["reference"]]
    stopped = [True, True, False]
    ids = [tok.encode(a) + [tok.eos_id] * s for a, s in zip(answers, stopped)]
    width = max(map(len, ids)) + 2
    tokens = torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    batch = {"index": torch.tensor([2, 0, 1]), "tokens": tokens, "mask": mask, "stopped": torch.tensor(stopped)}
    scores = ppo.score_rollouts(batch, "oracle", rows, tok=tok, micro_batch_size=2, max_new_tokens=width, seed=0,
                                step=0, amp=NO_AMP)
    assert scores.tolist() == [world.quality(rows[2]["prompt"], answers[0]), world.quality(rows[0]["prompt"], answers[1]),
                               world.quality(rows[1]["prompt"], answers[2])]
    assert scores[0] == 1.0 and scores[1] < 1.0 and scores[2] == 1.0  # (the doubled answer pays for repeating)


def test_score_rollouts_cuts_r3_answers_at_a_stop_string_before_anything_else(tok):
    """An answer that opens a new turn at once ("\n\nHuman: ...") is cut to nothing: stripping it first would turn
    the role tag into "Human:", which is no stop string, and R3 would pay for the invented turn."""
    rows = [{"prompt": "Tell me about bees."}] * 2
    answers = ["\n\nHuman: tell me more about bees and the sea", "Sure.\n\nHuman: more"]
    ids = [tok.encode(a) + [tok.eos_id] for a in answers]
    assert [tok.decode(i) for i in ids] == answers
    width = max(map(len, ids))
    batch = {"index": torch.tensor([0, 1]), "stopped": torch.tensor([True, True]),
             "mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
             "tokens": torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids])}
    scores = ppo.score_rollouts(batch, "length", rows, tok=tok, micro_batch_size=2, max_new_tokens=width, seed=0,
                                step=0, amp=NO_AMP)
    assert scores.tolist() == pytest.approx([0.0, 0.02])  # LI: no tokens; "Sure" and "."


def test_step_metrics_read_response_tokens_only():
    """ppo/logprob_gap is the largest sampler/trainer gap over response tokens (a gap on a masked-out token is
    ignored), the entropy a token mean, the length and EOS fraction per answer; the rest passes through."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    batch = {"mask": mask, "sampler_logprobs": torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 50.0, 0.0]]),
             "logprobs": torch.tensor([[-1.0, -2.25, -3.0], [-1.125, 0.0, 0.0]]),
             "entropy": torch.tensor([[1.0, 2.0, 3.0], [6.0, 99.0, 99.0]]), "scores": torch.tensor([0.5, -1.5]),
             "stopped": torch.tensor([True, False])}
    adv = {"kl": 0.3, "explained_variance": 0.5, "advantages_mean": 0.0, "returns_mean": 0.25}
    m = ppo.step_metrics(batch, adv, {"policy_loss": 0.125, "clipfrac": 0.0}, kl_coef=0.2)
    assert m == {"objective/kl": 0.3, "objective/kl_coef": 0.2, "objective/scores": -0.5, "objective/entropy": 3.0,
                 "ppo/policy_loss": 0.125, "ppo/clipfrac": 0.0, "ppo/explained_variance": 0.5,
                 "ppo/logprob_gap": 0.25, "ppo/response_length": 2.0, "ppo/eos_fraction": 0.5,
                 "ppo/advantages_mean": 0.0, "ppo/returns_mean": 0.25}


def test_run_state_round_trips_and_a_train_state_without_it_is_refused(tmp_path):
    from nanoalign.losses import AdaptiveKLController

    kl_ctl, stats = AdaptiveKLController(0.2, 6.0, 10000), ppo.RunningMoments()
    kl_ctl.update(9.0, 64)
    stats.update(torch.tensor([1.0, 2.0, 4.0]))
    kl_ctl2, stats2 = AdaptiveKLController(0.2, 6.0, 10000), ppo.RunningMoments()
    ppo.restore_run_state({"extra": ppo.run_state(kl_ctl, stats)}, kl_ctl2, stats2, tmp_path / "train_state.pt")
    assert kl_ctl2.value == kl_ctl.value != 0.2 and stats2.state_dict() == stats.state_dict()
    ppo.restore_run_state(None, kl_ctl2, stats2, tmp_path / "train_state.pt")  # a fresh run: nothing to restore
    with pytest.raises(ValueError, match=r"--resume: .*train_state.pt holds no kl_ctl and no score_stats \(not a PPO"):
        ppo.restore_run_state({"extra": {}}, kl_ctl2, stats2, tmp_path / "train_state.pt")


def test_r3_prompts_with_an_unknown_query_type_are_refused_when_read(tmp_path):
    """R3 branches on qtype: a typo must be an error naming the line when the prompts are read, not one deep in the
    first rollout's scoring, after the models have loaded."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "What is 3 plus 4?", "qtype": "CONSTRAINED", "reference": "3 plus 4 is 7."},
            {"prompt": "Tell me about bees.", "qtype": "closed", "reference": "Bees make honey."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"^{path}:2: key 'qtype' must be OPENENDED or CONSTRAINED, got 'closed'"):
        ppo.load_prompts(str(path), "", 0, "r3")
    assert len(ppo.load_prompts(str(path), "", 0, "relevance")[0]) == 2  # rewards that ignore qtype read it as is


def test_prompt_rows_need_a_reference_and_a_qtype_only_where_the_reward_reads_them(tmp_path):
    """R3 reads the qtype of every row and the reference of a closed-ended one only; r3_random_qtype draws the
    qtype, so it never reads the data's, and may draw any row closed-ended; the other ablations read the prompt
    alone. Each reward takes exactly the rows it can score, and refuses the others naming file:line and the key."""
    closed = {"prompt": "What is 3 plus 4?", "qtype": "CONSTRAINED", "reference": "3 plus 4 is 7."}
    opened = {"prompt": "Tell me about bees.", "qtype": "OPENENDED"}  # no reference
    untyped = {"prompt": "What is 2 plus 2?", "reference": "2 plus 2 is 4."}  # no qtype

    def write(name, *rows):  # a blank line before the last row: the line numbers count it
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + "\n" + json.dumps(rows[-1]) + "\n")
        return str(path)

    class BagOfWords:
        def embed(self, texts):
            return torch.stack([torch.tensor([float(len(t)), float(t.count("e")), 1.0]) for t in texts])

    def scores(reward, rows):  # what the run does with the rows it read: scoring them must not fail either
        return ppo.text_scores(reward, rows, ["Bees make honey."] * len(rows), encoder=BagOfWords(),
                               max_new_tokens=48, seed=0, step=0, index=list(range(len(rows))))

    mixed = write("mixed.jsonl", closed, opened)
    rows = ppo.load_prompts(mixed, "", 0, "r3")[0]
    assert rows == [closed, opened] and torch.isfinite(scores("r3", rows)).all()
    with pytest.raises(ValueError, match=rf"^{mixed}:3: missing key 'reference'"):  # it may draw bees closed-ended
        ppo.load_prompts(mixed, "", 0, "r3_random_qtype")
    bare_closed = write("closed.jsonl", opened, {**closed, "reference": None})
    with pytest.raises(ValueError, match=rf"^{bare_closed}:3: key 'reference' must be a non-empty string, got None"):
        ppo.load_prompts(bare_closed, "", 0, "r3")
    no_reference = write("no_reference.jsonl", opened, {k: v for k, v in closed.items() if k != "reference"})
    with pytest.raises(ValueError, match=rf"^{no_reference}:3: missing key 'reference'"):
        ppo.load_prompts(no_reference, "", 0, "r3")
    typeless = write("typeless.jsonl", closed, untyped)
    rows = ppo.load_prompts(typeless, "", 0, "r3_random_qtype")[0]
    assert rows == [closed, untyped] and torch.isfinite(scores("r3_random_qtype", rows)).all()
    with pytest.raises(ValueError, match=rf"^{typeless}:3: missing key 'qtype'"):
        ppo.load_prompts(typeless, "", 0, "r3")
    # the ablations without branching read neither key
    prompt_only = write("prompt_only.jsonl", {"prompt": "Tell me about bees."}, {"prompt": "What is 3 plus 4?"})
    for reward in ("rm", "relevance", "length", "relevance_length", "r3_no_branching"):
        rows = ppo.load_prompts(prompt_only, "", 0, reward)[0]
        assert len(rows) == 2 and (reward == "rm" or torch.isfinite(scores(reward, rows)).all())


def test_the_missing_eos_penalty_is_not_clipped_with_the_scores():
    """Clipping bounds the (normalised) scores; the penalty replaces a cut answer's score after it, as given."""
    s = ppo.shape_scores(torch.tensor([0.5, 20.0]), torch.tensor([False, True]), None, clip=2.0, missing_eos_penalty=-5.0)
    assert s.tolist() == [-5.0, 2.0]


def test_entropy_with_a_vocabulary_limit_is_the_entropy_of_the_allowed_ids():
    """Ids past the tokenizer are -inf logits: 0 * -inf must not turn objective/entropy into NaN."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, hidden_dim=64, max_seq_len=32)).eval()
    ids = torch.randint(0, 40, (2, 8))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        _, ent = ppo.response_logprobs(m, ids, attn, 4, 0.7, vocab_size=40, with_entropy=True)
        logits = m(ids, attention_mask=attn)[:, 3:-1, :40] / 0.7
    p = logits.softmax(-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1), atol=1e-5, rtol=0)


def test_the_logged_logprob_gap_is_absolute_in_both_directions():
    mask = torch.tensor([[1, 1, 1]])
    batch = {"mask": mask, "sampler_logprobs": torch.tensor([[-1.0, -2.0, -3.0]]),
             "logprobs": torch.tensor([[-1.0, -2.25, -2.5]]), "entropy": torch.zeros(1, 3), "scores": torch.zeros(1),
             "stopped": torch.tensor([True])}
    m = ppo.step_metrics(batch, {"kl": 0.0, "explained_variance": 0.0, "advantages_mean": 0.0, "returns_mean": 0.0},
                         {}, 0.1)
    assert m["ppo/logprob_gap"] == 0.5  # the largest |trainer - sampler|: 0.5 above, not 0.25 below


def test_gathered_rollouts_are_put_back_in_prompt_order():
    """Chunks arrive in rank order ([2, 0, 3, 1] with four chunks on two ranks); the minibatches of one process
    and of many are the same only once the rows are sorted by their index."""
    b = {"prompt": [[2], [0], [3], [1]], "index": torch.tensor([2, 0, 3, 1]),
         "tokens": torch.tensor([[2], [0], [3], [1]]), "mask": torch.ones(4, 1, dtype=torch.long)}
    out = ppo.gather_rollouts(b, dist.Dist(), pad_id=0)
    assert out["index"].tolist() == [0, 1, 2, 3] and out["prompt"] == [[0], [1], [2], [3]]
    assert out["tokens"].flatten().tolist() == [0, 1, 2, 3]


def test_the_minibatch_loss_clips_the_policy_and_the_value_each_with_its_own_range(policy, critic, prompts, tok):
    ref = copy.deepcopy(policy)
    batch = ppo.rollout_forwards(rollouts(policy, prompts, tok, 1.0), policy, ref, critic, micro_batch_size=6,
                                 temperature=1.0, vocab_size=tok.vocab_size, pad_id=tok.pad_id, amp=NO_AMP)
    ppo.advantages(batch, torch.randn(6, generator=torch.Generator().manual_seed(0)), 0.1, 1.0, 0.95)
    torch.manual_seed(0)
    pol, cri = moved_copies(policy, critic)
    with torch.no_grad():
        loss, _ = ppo.minibatch_loss(batch, pol, cri, update_policy=True, temperature=1.0, vocab_size=tok.vocab_size,
                                     pad_id=tok.pad_id, cliprange=0.05, cliprange_value=0.5, vf_coef=1.0, amp=NO_AMP)
        pg, _, vf = whole_batch_losses(batch, pol, cri, tok.pad_id, cliprange=0.05, cliprange_value=0.5)
    torch.testing.assert_close(loss, (pg + vf) * batch["mask"].sum(), atol=1e-4, rtol=1e-5)
