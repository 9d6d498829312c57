"""CAT pruning's token selection, vectorised over the batch: k-means, cluster pooling, selection with quotas.

Everything here works on whole tensors (no Python loop over tokens or clusters) and is deterministic: sorts are
stable, pooling uses ``amax`` (order-independent) or one-hot matmuls instead of atomic scatter-adds, and the
k-means draws its random numbers from its own CPU generator, so a seed gives the same clusters on every device
up to float rounding. Shapes: ``B`` samples, ``N = h * w`` tokens in row-major grid order, ``K`` clusters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Constants of the official selection rule (ada-cheng/CAT-Pruning, qcache/modules/proj_out.py).
FEATURE_SCALE = 0.05  # noise features are scaled by this before the [0, 1) position code is added
FIRST_QUOTA_DIVISOR = 10  # first selection: up to budget // 10 tokens from each cluster, best clusters first
CLUSTER_SHARE = 0.25  # later selections: this share of the budget comes from the clusters ...
QUOTA_PER_FIFTH = 0.25  # ... with a quota of int(budget // 5 * 0.25) tokens per cluster,
QUOTA_MULTIPLIERS = (3, 2)  # 3x and 2x for the two clusters with the largest change, 1x for the others;
STALE_IN_CLUSTER = 0.5  # clusters after the first also take their quota // 2 stalest tokens;
COUNT_DECAY = 0.5  # selection counts decay by this factor each pruned step (staleness = low count)


# --- clustering --------------------------------------------------------------------------------------------
def position_code(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """[h*w, dim]: the first ``dim // 2`` channels hold the row / h, the others the column / w (official code)."""
    rows = torch.arange(h, device=device, dtype=torch.float32) / h
    cols = torch.arange(w, device=device, dtype=torch.float32) / w
    half = dim // 2
    code = torch.empty(h, w, dim, device=device, dtype=torch.float32)
    code[..., :half] = rows[:, None, None]
    code[..., half:] = cols[None, :, None]
    return code.reshape(h * w, dim)


def clustering_features(noise: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The k-means input: ``FEATURE_SCALE * noise + position code``, [B, N, max(D, 2)] in float32.

    A single-channel noise output (pixel-space grey-scale models) is padded with a zero channel first, so that
    the position code still holds both the row and the column (the official code assumes 64 channels).
    """
    noise = noise.float()
    if noise.shape[-1] < 2:
        noise = F.pad(noise, (0, 2 - noise.shape[-1]))
    return noise * FEATURE_SCALE + position_code(h, w, noise.shape[-1], noise.device)


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [B, N, K] between rows of ``x`` [B, N, D] (squared norms ``x_sq`` [B, N, 1])
    and ``c`` [B, K, D]."""
    d = torch.baddbmm((c * c).sum(-1)[:, None, :], x, c.transpose(1, 2), alpha=-2.0)
    return d.add_(x_sq).clamp_min_(0)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Batched k-means: cluster labels [B, N] (int64) of the rows of ``x`` [B, N, D].

    scikit-learn's recipe for one run (``KMeans(n_clusters=k, random_state=seed, n_init=1)``): greedy
    k-means++ seeding with ``2 + log(k)`` candidates per centre, then Lloyd iterations until the labels stop
    changing or the centres move by less than ``tol`` times the mean feature variance. The random draws come
    from a CPU generator seeded with ``seed``; an empty cluster keeps its previous centre (scikit-learn would
    move it to a far point; it does not happen with the positional features CAT uses).
    """
    B, N, _ = x.shape
    k = min(k, N)
    x = x.float()
    x_sq = (x * x).sum(-1, keepdim=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = torch.arange(B, device=x.device)
    n_trials = 2 + int(math.log(k))

    # k-means++ (greedy): each new centre is the best of n_trials points drawn with probability ~ D(x)^2
    first = torch.randint(N, (B,), generator=gen).to(x.device)
    centers = [x[batch, first]]
    closest = _sq_dist(x, x_sq, centers[0][:, None])[..., 0]  # [B, N]
    for _ in range(1, k):
        potential = closest.sum(1, keepdim=True)
        draws = torch.rand(B, n_trials, generator=gen, dtype=torch.float64).to(x.device) * potential.double()
        cand = torch.searchsorted(closest.double().cumsum(1), draws).clamp_(max=N - 1)  # [B, T]
        cand_dist = _sq_dist(x, x_sq, x[batch[:, None], cand]).transpose(1, 2)  # [B, T, N]
        cand_dist = torch.minimum(cand_dist, closest[:, None, :])
        best = cand_dist.sum(-1).argmin(1)  # [B]
        centers.append(x[batch, cand[batch, best]])
        closest = cand_dist[batch, best]
    c = torch.stack(centers, 1)  # [B, K, D]

    threshold = tol * x.var(dim=1, unbiased=False).mean(-1)  # [B], scikit-learn's absolute tolerance
    labels = _sq_dist(x, x_sq, c).argmin(-1)
    for _ in range(max_iter):
        onehot = F.one_hot(labels, k).to(x.dtype)  # [B, N, K]; matmul sums are deterministic everywhere
        sizes = onehot.sum(1)[..., None]
        new_c = torch.where(sizes > 0, onehot.transpose(1, 2) @ x / sizes.clamp_min(1), c)
        shift = ((new_c - c) ** 2).sum((1, 2))
        c = new_c
        new_labels = _sq_dist(x, x_sq, c).argmin(-1)
        done = bool(torch.equal(new_labels, labels)) or bool((shift <= threshold).all())
        labels = new_labels
        if done:
            break
    return labels


# --- pooling over clusters ---------------------------------------------------------------------------------
def cluster_sizes(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens per cluster, [B, K] int64."""
    return torch.zeros(labels.shape[0], k, dtype=torch.int64, device=labels.device).scatter_add_(
        1, labels, torch.ones_like(labels)
    )


def cluster_max(values: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Channel-wise maximum of ``values`` [B, N, D] over each cluster: [B, K, D]; -inf for an empty cluster."""
    B, _, D = values.shape
    out = values.new_full((B, k, D), -math.inf)
    return out.scatter_reduce_(1, labels[..., None].expand(-1, -1, D), values, reduce="amax", include_self=True)


def cluster_adjacency(labels: torch.Tensor, h: int, w: int, k: int) -> torch.Tensor:
    """[B, K, K] bool: clusters that hold 4-neighbouring tokens on the h x w grid (no self loops)."""
    B = labels.shape[0]
    grid = labels.view(B, h, w)
    a = torch.cat([grid[:, :, :-1].reshape(B, -1), grid[:, :-1, :].reshape(B, -1)], 1)
    b = torch.cat([grid[:, :, 1:].reshape(B, -1), grid[:, 1:, :].reshape(B, -1)], 1)
    adj = torch.zeros(B, k * k, device=labels.device)
    adj.scatter_(1, a * k + b, 1.0).scatter_(1, b * k + a, 1.0)
    adj = adj.view(B, k, k) > 0
    return adj & ~torch.eye(k, dtype=torch.bool, device=labels.device)


def cluster_scores(pooled: torch.Tensor, adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cluster change score [B, K] from the pooled change ``pooled`` [B, K, D]; -inf for empty clusters.

    Without ``adjacency``: the L2 norm of the pooled vector. With it (the first selection), the pooled vectors
    are first smoothed over each cluster's closed neighbourhood on the grid as ``2 * mean + max`` (the official
    code's graph convolution with aggregators mean, mean and max summed, self loops included).
    """
    present = torch.isfinite(pooled).all(-1)  # [B, K]
    safe = pooled.masked_fill(~present[..., None], 0.0)
    if adjacency is not None:
        closed = adjacency | torch.diag_embed(present)
        weights = closed.to(safe.dtype)
        mean = weights @ safe / weights.sum(-1, keepdim=True).clamp_min(1)
        peak = safe[:, None, :, :].masked_fill(~closed[..., None], -math.inf).amax(2)
        peak = peak.masked_fill(~present[..., None], 0.0)
        safe = 2 * mean + peak
    return safe.norm(dim=-1).masked_fill(~present, -math.inf)


# --- ranks ----------------------------------------------------------------------------------------------------
def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of permutations [B, N]: position of each element in ``perm``."""
    pos = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, pos)


def change_order(change: torch.Tensor) -> torch.Tensor:
    """Tokens by decreasing change [B, N] (stable: ties by index)."""
    return torch.sort(change, dim=1, descending=True, stable=True).indices


def stale_order(counts: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Tokens stalest first: increasing selection count, ties by decreasing change, then by index."""
    by_change = change_order(change)
    by_count = torch.sort(counts.gather(1, by_change), dim=1, stable=True).indices
    return by_change.gather(1, by_count)


def rank_in_cluster(order: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[B, N]: each token's rank inside its own cluster when the tokens are taken in ``order``."""
    grouped = order.gather(1, torch.sort(labels.gather(1, order), dim=1, stable=True).indices)
    starts = sizes.cumsum(1) - sizes  # first position of each cluster in ``grouped``
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank_grouped = pos - starts.gather(1, labels.gather(1, grouped))
    return torch.empty_like(order).scatter_(1, grouped, rank_grouped)


# --- selection --------------------------------------------------------------------------------------------------
def select_tokens(
    change: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    counts: torch.Tensor,
    budget: int,
    first: bool,
) -> torch.Tensor:
    """The ``budget`` tokens to recompute at the next step, [B, budget] sorted ascending, per sample.

    ``change`` [B, N] is each token's ||n_t - n_t0||, ``labels`` [B, N] its cluster, ``scores`` [B, K] the
    cluster change scores, ``counts`` [B, N] the decayed selection counts (zeros before the first pruned step).

    * ``first`` (the selection at step t0): clusters by decreasing score, each gives its ``budget // 10``
      most-changed tokens, in that order, until the budget is full.
    * later: ``int(0.25 * budget)`` tokens come from the clusters by decreasing score, each giving its
      quota ``q = int(budget // 5 * 0.25)`` (3q and 2q for the first two) of most-changed tokens, and every
      cluster after the first also its ``q // 2`` stalest tokens (the official order inside a cluster: the
      first cluster by change, the others by token index); the rest of the budget is the stalest tokens.

    The set always has exactly ``budget`` tokens: where the official code's overlaps would leave it short,
    it is topped up with the next stalest tokens (as the official ``torch.compile`` variant does).
    """
    B, N = change.shape
    k = scores.shape[1]
    device = change.device
    sizes = cluster_sizes(labels, k)
    cluster_rank = _inverse(torch.sort(scores, dim=1, descending=True, stable=True).indices)  # [B, K]
    token_crank = cluster_rank.gather(1, labels)  # rank of each token's cluster
    token_size = sizes.gather(1, labels)
    by_change = change_order(change)
    change_rank = rank_in_cluster(by_change, labels, sizes)
    index = torch.arange(N, device=device).expand(B, N)

    if first:
        quota = torch.clamp(token_size, max=budget // FIRST_QUOTA_DIVISOR)
        candidate = change_rank < quota
        minor = change_rank
        from_clusters = budget
    else:
        base = int(budget // 5 * QUOTA_PER_FIFTH)
        multiplier = torch.ones_like(token_crank)
        for rank, mult in enumerate(QUOTA_MULTIPLIERS):
            multiplier = torch.where(token_crank == rank, mult, multiplier)
        quota = torch.minimum(base * multiplier, token_size)
        stale_rank = rank_in_cluster(stale_order(counts, change), labels, sizes)
        candidate = (change_rank < quota) | ((token_crank >= 1) & (stale_rank < (quota * STALE_IN_CLUSTER).long()))
        minor = torch.where(token_crank == 0, change_rank, index)
        from_clusters = int(budget * CLUSTER_SHARE)

    big = k * N + N
    key = torch.where(candidate, token_crank * N + minor, big)
    cand_rank = _inverse(torch.sort(key, dim=1, stable=True).indices)
    take = candidate & (cand_rank < from_clusters)
    stale_rank_all = _inverse(stale_order(counts, change))
    priority = torch.where(take, cand_rank, from_clusters + stale_rank_all)
    chosen = torch.sort(priority, dim=1, stable=True).indices[:, :budget]
    return torch.sort(chosen, dim=1).values


def update_counts(counts: torch.Tensor, computed: torch.Tensor, cluster_hits: torch.Tensor) -> torch.Tensor:
    """Decayed selection counts after a pruned step that computed the tokens marked in ``computed`` [B, N].

    As in the official code, the counts restart from the computed set while they are all zero or while no
    cluster has been selected in two selections yet (``cluster_hits`` [B, K]); afterwards they decay by half
    each step: ``f_t = 0.5 * f_(t-1) + [token computed at t]``.
    """
    fresh = computed.to(counts.dtype)
    restart = (counts.abs().sum(1) == 0) | (cluster_hits.amax(1) < 2)
    return torch.where(restart[:, None], fresh, COUNT_DECAY * counts + fresh)


def level_selection(
    selected: torch.Tensor, change: torch.Tensor, h: int, w: int, factor: int, budget: int
) -> torch.Tensor:
    """Pooled selection for a coarser token grid (U-Net levels with ``factor``-times downsampling).

    ``selected`` [B, h*w] bool marks the chosen fine tokens. A coarse token covers a ``factor x factor``
    window (windows round up at the edges as the U-Net's strided convolutions do); the ``budget`` coarse
    tokens with the largest share of selected fine tokens are chosen, ties by the largest change inside the
    window. Returns [B, budget] sorted ascending.
    """
    B = selected.shape[0]
    share = F.avg_pool2d(selected.view(B, 1, h, w).float(), factor, factor, ceil_mode=True).flatten(1)
    peak = F.max_pool2d(change.view(B, 1, h, w).float(), factor, factor, ceil_mode=True).flatten(1)
    by_peak = change_order(peak)
    by_share = torch.sort(share.gather(1, by_peak), dim=1, descending=True, stable=True).indices
    chosen = by_peak.gather(1, by_share)[:, :budget]
    return torch.sort(chosen, dim=1).values
