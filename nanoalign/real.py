"""REAL: choose which preference pairs to train on from the base model's response embeddings.

"REAL: Response Embedding-based Alignment for LLMs" (2024): embed every response with the model about to be
aligned, then select pairs by how similar their two responses are (see docs/methods.md, "## 7. REAL").

  embedding   mean of the final hidden states (after the final norm) over the response tokens only
  similarity  cosine of the two responses' embeddings
  one pair per prompt (HH-style):       select_pairs keeps a fraction of the pairs:
      easy = the least similar, hard = the most similar, random = a seeded sample
  several responses per prompt (SHP-style), one pair chosen per prompt: select_from_responses
      hard = the most similar pair, easy = the least similar, random = any pair,
      centroid = k-means (k = 2) on the L2-normalised embeddings, then the response nearest each centroid

Gotchas:
- Prompt tokens are left out of the mean, but they still shape the response's hidden states through
  attention: the embedding is of the response *given* its prompt.
- The selected pair is labelled by the data's scores (higher = chosen), never by its order in the list;
  the authors' script takes list order, which mislabels every pair whose first response scored lower.
- Selection looks at embeddings only, not scores, as in the paper, so it may pick two responses with equal
  scores; label_pair then returns None and the prompt is skipped (a tie states no preference).
"""
import torch
import torch.nn.functional as F

from nanoalign.data import IGNORE_INDEX, collate_sft, tokenize_sft

STRATEGIES = ("easy", "hard", "random")  # select_pairs; select_from_responses adds "centroid"

# --- embeddings


@torch.no_grad()
def response_embeddings(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean final hidden state over each row's response tokens: (N, C) float32.

    batch is collate_sft's output: input_ids, attention_mask and labels, (N, T), right-padded; the response
    tokens are the positions where labels != IGNORE_INDEX (the response and its EOS). Runs in eval mode and
    restores the model's mode afterwards.
    """
    response = (batch["labels"] != IGNORE_INDEX).unsqueeze(-1)  # (N, T, 1)
    if not response.any(dim=1).all():
        raise ValueError("every row needs at least one response token (labels != IGNORE_INDEX)")
    was_training = model.training
    model.eval()
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)  # (N, T, C)
    model.train(was_training)
    # masked mean in float32: a bf16 sum over hundreds of tokens would lose the small components
    hidden = hidden.float() * response
    return hidden.sum(dim=1) / response.sum(dim=1)  # (N, C)


def embed_responses(model, tok, examples: list[dict], template: str, max_len: int, batch_size: int = 16,
                    max_response_len: int | None = None) -> torch.Tensor:
    """{"prompt","response"} dicts -> (N, C) response embeddings, one row per example, in order.

    Raises if truncation dropped an example (its response left no room for the prompt): the rows must stay
    aligned with the caller's list.
    """
    rows = tokenize_sft(examples, tok, template, max_len, max_response_len)
    if len(rows) != len(examples):
        raise ValueError(f"{len(examples) - len(rows)} of {len(examples)} examples did not fit in max_len={max_len}; "
                         "raise max_len or cap the response with max_response_len")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate_sft(rows[start:start + batch_size], tok.pad_id)
        out.append(response_embeddings(model, {k: v.to(device) for k, v in batch.items()}))
    return torch.cat(out).cpu()


# --- similarity


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, N) cosine of every pair of rows."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T


def pair_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C), (N, C) -> (N,) cosine of a[i] and b[i] (e.g. chosen and rejected embeddings)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


# --- k-means


def _sq_dist(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # the direct formula, not |x|^2 - 2 x.c + |c|^2: a point sitting on a centroid must get exactly 0
    return torch.cdist(x, centroids, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # (N, k)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007): (N, C) -> centroids (k, C),
    labels (N,) with labels[i] the index of the centroid nearest x[i].

    Seeding draws from a torch.Generator seeded with `seed`, so a seed gives the same result on any device:
    the first centroid is a uniform draw, each next one a point drawn with probability proportional to its
    squared distance to the nearest centroid so far (uniform if every point already sits on a centroid).
    Lloyd iterations (assign to the nearest centroid, move each centroid to its members' mean) run until the
    assignment stops changing or `iters` updates. A cluster left empty keeps its previous centroid (sklearn
    relocates it instead); with k-means++ seeding on distinct points this is rare. Ties go to the lower index.
    """
    x = x.float()
    N = x.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={N} points")
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(N, (1,), generator=g))]
    for _ in range(1, k):
        d2 = _sq_dist(x, x[chosen]).min(dim=1).values.double().cpu()  # (N,)
        weights = d2 if d2.sum() > 0 else torch.ones(N, dtype=torch.float64)
        chosen.append(int(torch.multinomial(weights, 1, generator=g)))
    centroids = x[chosen].clone()  # (k, C)

    labels = _sq_dist(x, centroids).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(-1)  # (k, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new_labels = _sq_dist(x, centroids).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels


# --- selection


def _check_strategy(strategy: str, allowed: tuple[str, ...]) -> None:
    if strategy not in allowed:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {allowed}")


def select_pairs(cosines: torch.Tensor, strategy: str, fraction: float = 0.5, seed: int = 0) -> list[int]:
    """One pair per prompt: which of the N pairs to keep, given each pair's cosine (N,).

    easy = the round(fraction * N) least similar pairs, hard = the most similar, random = a uniform sample
    drawn with `seed`. Returns the kept indices in ascending order (the data's order). Equal cosines are
    ranked by index (stable sort), so the result is deterministic. fraction * N is rounded half up.
    """
    _check_strategy(strategy, STRATEGIES)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    N = len(cosines)
    m = int(round(fraction * N, 9) + 0.5)  # round(): 0.7 * 45 is 31.499999999999996 in floating point
    if strategy == "random":
        keep = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:m]
    else:
        order = torch.sort(torch.as_tensor(cosines).cpu(), stable=True).indices  # least similar first
        keep = order[:m] if strategy == "easy" else order[N - m:]
    return sorted(keep.tolist())


def select_from_responses(embeddings: torch.Tensor, strategy: str, seed: int = 0) -> tuple[int, int]:
    """Several responses (R, C) to one prompt -> the indices (i, j) of the pair to train on.

    hard / easy: the pair with the largest / smallest cosine (i < j; ties go to the first in row-major order).
    centroid: k-means with k = 2 (seeded) on the L2-normalised embeddings; i is the response nearest the
    first centroid, j the one nearest the second; if that is i again (possible when the clusters are
    degenerate, e.g. duplicate responses), j is the second nearest to the second centroid.
    random: a uniform pair drawn with `seed`.
    Which of i, j is chosen is decided later, by label_pair.
    """
    _check_strategy(strategy, STRATEGIES + ("centroid",))
    R = embeddings.shape[0]
    if R < 2:
        raise ValueError(f"need at least 2 responses to make a pair, got {R}")
    if strategy == "random":
        i, j = torch.randperm(R, generator=torch.Generator().manual_seed(seed))[:2].tolist()
        return i, j
    if strategy == "centroid":
        x = F.normalize(embeddings.float(), dim=-1)
        centroids, _ = kmeans(x, 2, seed=seed)
        dist = _sq_dist(centroids, x)  # (2, R)
        i = int(dist[0].argmin())
        nearest_second = torch.sort(dist[1], stable=True).indices.tolist()
        j = nearest_second[0] if nearest_second[0] != i else nearest_second[1]
        return i, j
    rows, cols = torch.triu_indices(R, R, offset=1)
    cos = cosine_matrix(embeddings)[rows, cols]  # every pair i < j once
    best = int(cos.argmax() if strategy == "hard" else cos.argmin())
    return int(rows[best]), int(cols[best])


def label_pair(prompt: str, responses: list[str], scores: list[float], i: int, j: int) -> dict | None:
    """The pair (i, j) as a preference record, the higher-scored response chosen whatever the order of i, j.

    Returns {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}, or None when the scores are
    equal (a tie says nothing about which response is better, so the prompt is dropped rather than labelled
    by position) or the two texts are (a data set listing one response twice with two scores: the pair would
    teach nothing, and the most similar pair, "hard", picks exactly such a twin).
    """
    if i == j:
        raise ValueError(f"a pair needs two different responses, got i = j = {i}")
    if scores[i] == scores[j] or responses[i] == responses[j]:
        return None
    w, l = (i, j) if scores[i] > scores[j] else (j, i)
    return {"prompt": prompt, "chosen": responses[w], "rejected": responses[l],
            "chosen_score": scores[w], "rejected_score": scores[l]}
