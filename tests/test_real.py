"""REAL: response embeddings on a tiny random Transformer, k-means, pair selection and score labelling."""
import json
import math
from pathlib import Path

import pytest
import torch

from nanoalign.data import collate_sft
from nanoalign.model import ModelConfig, Transformer
from nanoalign.real import (cosine_matrix, embed_responses, kmeans, label_pair, pair_cosine, response_embeddings,
                            select_from_responses, select_pairs)
from nanoalign.tokenizer import Tokenizer

DATA = Path(__file__).parent.parent / "data"


def tiny_model(vocab_size: int = 64) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layer=2, n_head=2, hidden_dim=64))
    model.init_weights()
    return model


# rows of different lengths, so the batch is right-padded; mask = 1 on the response (and its EOS)
ROWS = [
    {"ids": [5, 6, 7, 8, 9, 10], "mask": [0, 0, 0, 1, 1, 1]},
    {"ids": [11, 12, 13], "mask": [0, 0, 1]},
    {"ids": [14, 15, 16, 17, 18, 19, 20, 21, 22], "mask": [0, 0, 1, 1, 1, 1, 1, 1, 1]},
]

# --- embeddings


def test_response_embeddings_equal_a_hand_loop_over_unpadded_rows():
    model = tiny_model()
    emb = response_embeddings(model, collate_sft(ROWS, pad_id=0))
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    for row, got in zip(ROWS, emb):
        # each row alone, no padding: average the final hidden states at the response positions only
        hidden = model(torch.tensor([row["ids"]]), return_hidden=True)[0]  # (T, C)
        expected = hidden[torch.tensor(row["mask"], dtype=torch.bool)].mean(dim=0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_response_embeddings_are_the_final_norms_output():
    model = tiny_model()
    captured = []
    model.norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
    emb = response_embeddings(model, collate_sft([{"ids": [3, 4, 5], "mask": [0, 0, 1]}], pad_id=0))
    torch.testing.assert_close(emb[0], captured[0][0, 2])  # the one response token, as the norm returned it


def test_response_embeddings_ignore_the_pad_id_and_keep_the_mode():
    model = tiny_model()
    model.train()
    a = response_embeddings(model, collate_sft(ROWS, pad_id=0))
    b = response_embeddings(model, collate_sft(ROWS, pad_id=63))
    torch.testing.assert_close(a, b)
    assert model.training and not a.requires_grad
    model.eval()  # and an eval-mode model stays in eval mode
    response_embeddings(model, collate_sft(ROWS, pad_id=0))
    assert not model.training


def test_response_embeddings_need_a_response_token():
    with pytest.raises(ValueError, match="at least one response token"):
        response_embeddings(tiny_model(), collate_sft([{"ids": [1, 2], "mask": [0, 0]}], pad_id=0))
    with pytest.raises(ValueError, match="at least one response token"):  # one such row among good ones is enough
        response_embeddings(tiny_model(), collate_sft(ROWS[:1] + [{"ids": [1, 2], "mask": [0, 0]}], pad_id=0))


def test_embed_responses_batches_like_one_batch():
    tok = Tokenizer.from_dir(DATA / "tokenizer")
    model = tiny_model(vocab_size=tok.vocab_size)
    record = json.loads((DATA / "multi_train.jsonl").read_text().splitlines()[0])
    examples = [{"prompt": record["prompt"], "response": r} for r in record["responses"]]
    emb = embed_responses(model, tok, examples, "hh", max_len=128, batch_size=2)
    assert emb.shape == (len(examples), 32)
    for example, got in zip(examples, emb):
        alone = embed_responses(model, tok, [example], "hh", max_len=128)[0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="did not fit"):
        embed_responses(model, tok, examples, "hh", max_len=4)


# --- similarity and k-means


def test_cosines_hand_worked():
    x = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, -3.0]])
    expected = torch.tensor([[1.0, 1 / math.sqrt(2), 0.0],
                             [1 / math.sqrt(2), 1.0, -1 / math.sqrt(2)],
                             [0.0, -1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(cosine_matrix(x), expected)
    # rows paired with the previous row: (x0, x2), (x1, x0), (x2, x1)
    torch.testing.assert_close(pair_cosine(x, x.roll(1, dims=0)),
                               torch.tensor([0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)]))


def blobs(seed: int = 0):
    """90 points around three far-apart centres, shuffled: (points (90, 2), true blob of each point (90,))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(30)
    points = centres[truth] + 0.3 * torch.randn(90, 2, generator=g)
    perm = torch.randperm(90, generator=g)
    return points[perm], truth[perm], centres


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_well_separated_blobs(seed):
    points, truth, centres = blobs()
    centroids, labels = kmeans(points, 3, seed=seed)
    # the same partition up to renaming: each blob maps to one cluster, different blobs to different clusters
    mapping = {int(t): int(l) for t, l in zip(truth, labels)}
    assert sorted(mapping.values()) == [0, 1, 2]
    assert all(mapping[int(t)] == int(l) for t, l in zip(truth, labels))
    for blob, cluster in mapping.items():
        torch.testing.assert_close(centroids[cluster], points[truth == blob].mean(dim=0))
        assert (centroids[cluster] - centres[blob]).norm() < 0.2


def test_kmeans_is_deterministic_for_a_seed():
    points = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))  # no structure: seeds matter
    c1, l1 = kmeans(points, 5, seed=7)
    c2, l2 = kmeans(points, 5, seed=7)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    # labels are the nearest centroid of each point
    assert torch.equal(l1, torch.cdist(points, c1).argmin(dim=1))


def test_kmeans_runs_lloyd_to_a_fixed_point():
    # each centroid is its members' mean and each label the nearest centroid: a run cut after one update is not
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        centroids, labels = kmeans(points, 5, seed=seed)
        for k in range(5):
            torch.testing.assert_close(centroids[k], points[labels == k].mean(dim=0))
        assert torch.equal(labels, torch.cdist(points, centroids).argmin(dim=1))


def test_kmeans_plus_plus_seeding_is_uniform_then_by_squared_distance():
    # with no Lloyd update (iters=0) the centroids are the seeds: the first is a uniform draw over the points
    firsts = {int(kmeans(torch.arange(5.0).unsqueeze(1), 1, seed=s, iters=0)[0]) for s in range(40)}
    assert firsts == {0, 1, 2, 3, 4}
    # 98 points at 0, one at 1, one at 3: after a first seed at 0, the second is 3 with probability 9 / (1 + 9)
    # by squared distance (3/4 by plain distance)
    x = torch.tensor([[0.0]] * 98 + [[1.0], [3.0]])
    second_is_3 = [float(c[1, 0]) == 3.0 for c, _ in (kmeans(x, 2, seed=s, iters=0) for s in range(600))
                   if c[0, 0] == 0]
    assert len(second_is_3) > 500 and 0.86 < sum(second_is_3) / len(second_is_3) < 0.94


def test_kmeans_with_as_many_clusters_as_points():
    centroids, labels = kmeans(torch.tensor([[0.0], [1.0], [5.0]]), 3)
    assert sorted(centroids[:, 0].tolist()) == [0.0, 1.0, 5.0] and sorted(labels.tolist()) == [0, 1, 2]


def test_kmeans_with_fewer_distinct_points_than_clusters():
    points = torch.tensor([[1.0, 1.0]] * 3)
    centroids, labels = kmeans(points, 2)
    assert torch.equal(centroids, points[:2]) and torch.equal(labels, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="k=4 for N=3"):
        kmeans(points, 4)


# --- one pair per prompt


def test_select_pairs_easy_hard_random():
    cosines = torch.tensor([0.9, 0.1, 0.5, 0.3])
    assert select_pairs(cosines, "easy") == [1, 3]  # the two least similar
    assert select_pairs(cosines, "hard") == [0, 2]  # the two most similar
    picked = select_pairs(cosines, "random", seed=3)
    assert len(picked) == 2 and picked == sorted(set(picked)) and picked == select_pairs(cosines, "random", seed=3)
    assert select_pairs(cosines, "hard", fraction=1.0) == [0, 1, 2, 3]
    assert select_pairs(cosines.tolist(), "hard", fraction=0.25) == [0]
    assert select_pairs(torch.tensor([0.1, 0.2, 0.3, 0.4]), "hard", fraction=0.1) == []  # 0.4 rounds to none


def test_select_pairs_random_is_a_seeded_uniform_sample():
    cosines = torch.linspace(0, 1, 100)
    picks = [tuple(select_pairs(cosines, "random", seed=s)) for s in range(5)]
    assert all(len(p) == 50 for p in picks) and len(set(picks)) == 5  # five seeds, five different samples
    assert tuple(range(50)) not in picks and tuple(range(50, 100)) not in picks  # not the first / last half


def test_select_pairs_rounds_half_up_and_breaks_ties_by_index():
    assert select_pairs(torch.tensor([0.5, 0.5, 0.5, 0.2, 0.9]), "easy") == [0, 1, 3]  # 2.5 -> 3
    assert select_pairs(torch.tensor([0.5, 0.5, 0.5, 0.2]), "hard") == [1, 2]
    # 0.7 * 45 = 31.5 is 31.499999999999996 in floating point: still rounded up to 32
    assert len(select_pairs(torch.arange(45.0), "easy", fraction=0.7)) == 32
    # past 16 values torch's default (unstable) CPU sort no longer keeps equal values in index order
    assert select_pairs(torch.zeros(40), "easy") == list(range(20))
    assert select_pairs(torch.zeros(40), "hard") == list(range(20, 40))


def test_select_pairs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown strategy"):
        select_pairs(torch.zeros(4), "centroid")
    with pytest.raises(ValueError, match="fraction"):
        select_pairs(torch.zeros(4), "easy", fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        select_pairs(torch.zeros(4), "easy", fraction=1.5)


# --- several responses per prompt


def test_hard_and_easy_pick_the_most_and_least_similar_pair():
    emb = torch.tensor([[1.0, 0.0, 0.0],
                        [0.9, 0.1, 0.0],    # nearly the direction of 0: the most similar pair is (0, 1)
                        [0.0, 1.0, 0.0],
                        [-1.0, 0.0, 0.1]])  # nearly opposite 0: the least similar pair is (0, 3)
    assert select_from_responses(emb, "hard") == (0, 1)
    assert select_from_responses(emb, "easy") == (0, 3)
    # the hand-made set says what it claims: brute force over the 6 pairs
    cos = cosine_matrix(emb)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert max(pairs, key=lambda p: cos[p]) == (0, 1) and min(pairs, key=lambda p: cos[p]) == (0, 3)


def test_centroid_picks_the_response_nearest_each_cluster_centre():
    # two clusters of directions (norms differ: only direction counts after L2 normalisation);
    # the direction nearest each cluster's mean direction: [1, 0] (index 3) and [0, 1] (index 0)
    emb = torch.tensor([[0.0, 1.0], [10.0, 1.0], [0.1, 2.0], [1.0, 0.0], [5.0, -0.5], [-0.1, 3.0]])
    for seed in range(4):
        i, j = select_from_responses(emb, "centroid", seed=seed)
        assert {i, j} == {0, 3}


def test_centroid_never_returns_the_same_response_twice():
    emb = torch.ones(3, 4)  # identical responses: both centroids coincide
    i, j = select_from_responses(emb, "centroid")
    assert i != j


def test_random_pair_is_seeded_and_distinct():
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    pairs = {select_from_responses(emb, "random", seed=s) for s in range(20)}
    assert all(i != j for i, j in pairs) and len(pairs) > 1
    assert select_from_responses(emb, "random", seed=5) == select_from_responses(emb, "random", seed=5)
    with pytest.raises(ValueError, match="at least 2 responses"):
        select_from_responses(emb[:1], "hard")


# --- labelling


def test_label_pair_uses_scores_not_order():
    responses, scores = ["bad", "good", "ok"], [0.1, 0.9, 0.5]
    expected = {"prompt": "p", "chosen": "good", "rejected": "bad", "chosen_score": 0.9, "rejected_score": 0.1}
    assert label_pair("p", responses, scores, 0, 1) == expected
    assert label_pair("p", responses, scores, 1, 0) == expected


def test_label_pair_drops_ties():
    assert label_pair("p", ["a", "b"], [0.5, 0.5], 0, 1) is None
    assert label_pair("p", ["a", "b", "a"], [0.1, 0.5, 0.9], 0, 2) is None  # one text listed twice: no preference
    with pytest.raises(ValueError, match="two different responses"):
        label_pair("p", ["a", "b"], [0.1, 0.5], 1, 1)


def test_end_to_end_on_multi_response_data():
    tok = Tokenizer.from_dir(DATA / "tokenizer")
    model = tiny_model(vocab_size=tok.vocab_size)
    records = [json.loads(line) for line in (DATA / "multi_train.jsonl").read_text().splitlines()[:3]]
    labelled = 0
    for record in records:
        examples = [{"prompt": record["prompt"], "response": r} for r in record["responses"]]
        emb = embed_responses(model, tok, examples, "hh", max_len=128)
        assert emb.shape == (len(examples), model.cfg.dim)
        torch.testing.assert_close(emb[1], embed_responses(model, tok, examples[1:2], "hh", max_len=128)[0])
        cos = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
        pairs = [(a, b) for a in range(len(examples)) for b in range(a + 1, len(examples))]
        assert set(select_from_responses(emb, "hard")) == set(max(pairs, key=lambda ab: cos[ab].item()))
        for strategy in ("hard", "easy", "centroid", "random"):
            i, j = select_from_responses(emb, strategy)
            pair = label_pair(record["prompt"], record["responses"], record["scores"], i, j)
            if pair is not None:
                labelled += 1
                assert pair["chosen_score"] > pair["rejected_score"]
                assert {pair["chosen"], pair["rejected"]} == {record["responses"][i], record["responses"][j]}
    assert labelled >= 6  # most of the 12 picks have two different scores: the checks above ran
