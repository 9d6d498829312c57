"""Token-merging primitives shared by every method: one implementation each.

Vocabulary (ToMe's): tokens are split into a source set A and a destination set B; each source finds its
most similar destination (cosine similarity of a *metric*), and the ``r`` sources with the most similar
destinations are merged into them. The rest of A stays ("unmerged").

* :func:`best_destinations` - cosine scores and each source's best destination.
* :func:`select_pairs` - the ``r`` best (source, destination) pairs from those scores.
* :class:`AlternateMerge` - ViT-style split (even tokens -> A, odd -> B), protected prefix tokens kept in
  front, as in the official ToMe.
* :class:`GridMerge` - ToMe-for-SD split: one destination per ``sy x sx`` window of the token grid
  (:func:`grid_destinations`), with ``unmerge`` to give every original token its value back.
* :func:`merge_wavg` / :func:`merge_source` - size-weighted averaging and source tracing.
* :class:`TokenReduction` - what a ViT's after-attention point applies (:class:`tokred.reduction.TokenReduce`):
  a :class:`BipartiteMerge` (size-weighted mean), :class:`PruneSources` (the sources dropped instead of merged),
  :class:`NormMerge` (mean rescaled to the largest norm merged: MLERP), :class:`TokenSelect` (keep some tokens,
  optionally fuse the rest into one weighted token).
"""

from __future__ import annotations

import functools
import math

import torch


def best_destinations(
    a: torch.Tensor,
    b: torch.Tensor,
    protect_a: int = 0,
    protect_b: int = 0,
    normalized: bool = False,
    matmul: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source row of ``a`` [B, Na, C]: the best cosine similarity to ``b`` and its index.

    The first ``protect_a`` sources and ``protect_b`` destinations never take part (score -inf). ``normalized``:
    the rows of ``a`` and ``b`` already have unit norm (split from one normalized metric). ``matmul=False``: the
    dot products as a product and a sum instead of a batched matmul (the same values up to float rounding), for
    inductor on CPU, whose matmul lowering guards on token counts known only at run time.
    """
    if not normalized:
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
    scores = a @ b.transpose(-1, -2) if matmul else (a[..., :, None, :] * b[..., None, :, :]).sum(-1)
    if protect_a:
        scores[..., :protect_a, :] = -math.inf
    if protect_b:
        scores[..., :protect_b] = -math.inf
    return scores.max(dim=-1)


def select_pairs(
    node_max: torch.Tensor, node_idx: torch.Tensor, r: int, sort_unmerged: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` sources with the highest best-similarity, as (unmerged, source, destination) indices.

    Each index tensor is [B, n, 1]. ``sort_unmerged`` keeps the unmerged sources in their original order
    (needed where position matters, e.g. the ViT cls token at index 0).
    """
    return pairs_in_order(node_max.argsort(dim=-1, descending=True)[..., None], node_idx, r, sort_unmerged)


def pairs_in_order(
    order: torch.Tensor, node_idx: torch.Tensor, r: int, sort_unmerged: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_pairs` given the sources' ``order`` [B, Na, 1] (best similarity first): the first ``r`` are
    merged. A threshold merge cached under torch.compile keeps the order, so a later call takes its pairs from it
    with a count known only at run time."""
    unm_idx = order[..., r:, :]
    src_idx = order[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if sort_unmerged:
        unm_idx = unm_idx.sort(dim=1)[0]
    return unm_idx, src_idx, dst_idx


class TokenReduction:
    """Tokens reduced for the rest of a ViT: ``reduce(x [B, N, C], size [B, N, 1] | None) -> (x', size')`` and
    ``reduce_source(source [B, N, N_input]) -> source'`` (which input tokens each token covers, 0/1)."""

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reduce_attention(self, probs: torch.Tensor) -> torch.Tensor:
        """The attention probabilities [B, H, N, N] of the tokens before :meth:`reduce`, for the reduced tokens
        (only reductions made *before* attention need it: ``TokenReduce(before_attention=True)``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reduce an attention matrix")


class BipartiteMerge(TokenReduction):
    """Merges sources into destinations given fixed pairs; reusable on any tensor with the same tokens.

    Because it holds only indices it can be cached and applied again at a later step (CA-ToMe) with no
    similarity, sort or random work.
    """

    def __init__(self, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
        self.unm_idx = unm_idx
        self.src_idx = src_idx
        self.dst_idx = dst_idx
        self.r = src_idx.shape[-2]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def join(self, unm: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return torch.cat([unm, dst], dim=1)

    @property
    def joins_in_order(self) -> bool:
        """Whether :meth:`join` is ``cat([unm, dst])``, so a merge can write both parts into one buffer."""
        return type(self).join is BipartiteMerge.join

    def weighted_mean(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge ``x`` [B, N, C] by the size-weighted mean of each destination and its sources; returns the
        merged tokens [B, N - r, C] and their sizes [B, N - r, 1] (``size`` None: every token has size 1).

        Only the ``r`` sources and the destinations are weighted: unmerged sources pass through unchanged (the
        mean of one token is itself), and with ``size=None`` nothing is multiplied at all. The destinations are
        weighted straight into the output buffer and normalised in place, so the merge makes no full-size
        temporaries (the official ``merge(x * size) / merge(size)`` makes four).
        """
        if torch.is_grad_enabled() and (x.requires_grad or (size is not None and size.requires_grad)):
            # training: the out= and in-place writes below are not differentiable; the plain formula is
            ones = torch.ones_like(x[..., :1]) if size is None else size
            new_size = self(ones, mode="sum")
            return self(x * ones, mode="sum") / new_size, new_size
        src, dst = self.split(x)
        n, na, c = src.shape
        nu, nd, r = na - self.r, dst.shape[1], self.r
        if torch.compiler.is_compiling():
            # torch.compile: the same arithmetic without ``out=`` and in-place writes into views, which dynamo's
            # fake tensors cannot trace on the strided split (issue 20); inductor fuses the temporaries anyway
            return self._weighted_mean_functional(src, dst, size)
        src_idx, dst_idx, unm_idx = (i.expand(n, -1, -1) for i in (self.src_idx, self.dst_idx, self.unm_idx))
        merged = src.gather(1, src_idx.expand(n, r, c))
        if size is None:
            unm_size, src_size, dst_size = x.new_ones(n, nu, 1), x.new_ones(n, r, 1), x.new_ones(n, nd, 1)
        else:
            size_src, dst_size = self.split(size)
            unm_size, src_size = size_src.gather(1, unm_idx), size_src.gather(1, src_idx)
            merged.mul_(src_size)
        new_size = dst_size.scatter_add(1, dst_idx, src_size)
        if self.joins_in_order:
            out = x.new_empty(n, nu + nd, c)
            unm, dst_out = out[:, :nu], out[:, nu:]
            torch.gather(src, 1, unm_idx.expand(n, nu, c), out=unm)
        else:
            unm, dst_out = src.gather(1, unm_idx.expand(n, nu, c)), x.new_empty(n, nd, c)
        if size is None:
            dst_out.copy_(dst)
        else:
            torch.mul(dst, dst_size, out=dst_out)
        dst_out.scatter_add_(1, dst_idx.expand(n, r, c), merged).div_(new_size)
        sizes = self.join(unm_size, new_size)
        return (out if self.joins_in_order else self.join(unm, dst_out)), sizes

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weighted_mean(x, size)

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self(source, mode="amax")

    def _weighted_mean_functional(
        self, src: torch.Tensor, dst: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`weighted_mean`'s arithmetic, op for op, with out-of-place ops only (for torch.compile)."""
        n, na, c = src.shape
        nu, nd, r = na - self.r, dst.shape[1], self.r
        src_idx, dst_idx, unm_idx = (i.expand(n, -1, -1) for i in (self.src_idx, self.dst_idx, self.unm_idx))
        merged = src.gather(1, src_idx.expand(n, r, c))
        if size is None:
            unm_size, src_size, dst_size = src.new_ones(n, nu, 1), src.new_ones(n, r, 1), src.new_ones(n, nd, 1)
            weighted_dst = dst
        else:
            size_src, dst_size = self.split(size)
            unm_size, src_size = size_src.gather(1, unm_idx), size_src.gather(1, src_idx)
            merged = merged * src_size
            weighted_dst = dst * dst_size
        new_size = dst_size.scatter_add(1, dst_idx, src_size)
        dst_out = weighted_dst.scatter_add(1, dst_idx.expand(n, r, c), merged) / new_size
        unm = src.gather(1, unm_idx.expand(n, nu, c))
        return self.join(unm, dst_out), self.join(unm_size, new_size)

    def __call__(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Merge ``x`` [B, N, C] to [B, N - r, C]; ``mode`` is a ``scatter_reduce`` reduction."""
        src, dst = self.split(x)
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=self.unm_idx.expand(n, t1 - self.r, c))
        src = src.gather(dim=-2, index=self.src_idx.expand(n, self.r, c))
        dst = dst.scatter_reduce(-2, self.dst_idx.expand(n, self.r, c), src, reduce=mode)
        return self.join(unm, dst)


class AlternateMerge(BipartiteMerge):
    """ViT split: even positions are sources, odd are destinations; the first ``num_protected`` tokens
    (cls, distillation, registers) are never merged and stay at the front in their order."""

    def __init__(self, unm_idx, src_idx, dst_idx, num_protected: int) -> None:
        super().__init__(unm_idx, src_idx, dst_idx)
        self.num_protected = num_protected

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., ::2, :], x[..., 1::2, :]

    @property
    def joins_in_order(self) -> bool:
        return self.num_protected <= 1

    def join(self, unm: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        p = self.num_protected
        if p <= 1:  # a protected token 0 is the first unmerged source (unm is sorted)
            return torch.cat([unm, dst], dim=1)
        # Protected token k sits in A (k even) or B (k odd); put them back in their original order.
        front = [unm[:, k // 2 : k // 2 + 1] if k % 2 == 0 else dst[:, k // 2 : k // 2 + 1] for k in range(p)]
        return torch.cat([*front, unm[:, (p + 1) // 2 :], dst[:, p // 2 :]], dim=1)


class PruneSources(TokenReduction):
    """A bipartite ``merge``'s sources pruned instead of merged: the ``r`` chosen sources are dropped, the
    destinations stay as they are (ToFu's early layers). Sizes of the kept tokens are kept."""

    def __init__(self, merge: BipartiteMerge) -> None:
        self.merge = merge

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        m = self.merge
        src, dst = m.split(x)
        n, na, c = src.shape
        unm = src.gather(1, m.unm_idx.expand(n, na - m.r, c))
        return m.join(unm, dst)

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._keep(x), (None if size is None else self._keep(size))

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self._keep(source)


class NormMerge(TokenReduction):
    """A bipartite ``merge`` whose merged destinations are the plain mean of the destination and its sources,
    rescaled to the largest norm among them (ToFu's MLERP, "norm-preserving" merge). Destinations that took no
    source and the unmerged sources pass unchanged; sizes are summed (for source tracing and prop. attention);
    ``size_weighted=True`` averages by size instead of plainly."""

    def __init__(self, merge: BipartiteMerge, size_weighted: bool = False) -> None:
        self.merge = merge
        self.size_weighted = size_weighted

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, r = self.merge, self.merge.r
        ones = torch.ones_like(x[..., :1]) if size is None else size
        weight = ones if self.size_weighted else torch.ones_like(ones)
        src, dst = m.split(x)
        (w_src, w_dst), (s_src, s_dst) = m.split(weight), m.split(ones)
        n, na, c = src.shape
        src_idx, dst_idx, unm_idx = m.src_idx.expand(n, r, 1), m.dst_idx.expand(n, r, 1), m.unm_idx.expand(n, -1, 1)
        merged = src.gather(1, src_idx.expand(n, r, c))
        w_merged = w_src.gather(1, src_idx)
        total = (dst * w_dst).scatter_add(1, dst_idx.expand(n, r, c), merged * w_merged)
        mean = total / w_dst.scatter_add(1, dst_idx, w_merged)
        largest = dst.norm(dim=-1, keepdim=True).scatter_reduce(
            1, dst_idx, merged.norm(dim=-1, keepdim=True), reduce="amax"
        )
        received = torch.zeros_like(w_dst, dtype=torch.bool).scatter(1, dst_idx, True)
        new_dst = torch.where(received, mean * (largest / mean.norm(dim=-1, keepdim=True)), dst)
        unm = src.gather(1, unm_idx.expand(n, na - r, c))
        new_size = m.join(s_src.gather(1, unm_idx), s_dst.scatter_add(1, dst_idx, s_src.gather(1, src_idx)))
        return m.join(unm, new_dst), new_size

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self.merge(source, mode="amax")


class TwoWayMerge(TokenReduction):
    """MCTF's bidirectional bipartite merge with attention-weighted pooling.

    Stage 1: sources ``src1`` [B, r1, 1] of set A (even positions) merge into their destinations ``dst1`` in set B
    (odd positions); ``unm1`` are the A tokens left. Stage 2: tokens ``src2`` of the resulting B merge into
    ``dst2`` among the left A tokens; ``unm2`` are the B tokens left. Output: ``[A left, B left]``. Tokens are
    averaged with the weights ``weight * size / max(size)`` (``weight`` [B, N, 1], MCTF: the attention each token
    receives); :meth:`reduce_attention` sums the merged keys' probabilities and averages the merged queries' rows
    with the same weights (it uses the sizes of the last :meth:`reduce`, which it must follow)."""

    def __init__(self, unm1, src1, dst1, unm2, src2, dst2, weight: torch.Tensor) -> None:
        self.unm1, self.src1, self.dst1 = unm1, src1, dst1
        self.unm2, self.src2, self.dst2 = unm2, src2, dst2
        self.weight = weight
        self._pool: torch.Tensor | None = None

    def merge(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Both stages on ``x`` [B, N, C] with the ``scatter_reduce`` reduction ``mode``."""
        a, b = x[:, ::2], x[:, 1::2]
        n, _, c = a.shape
        unm = a.gather(1, self.unm1.expand(n, -1, c))
        b = b.scatter_reduce(1, self.dst1.expand(n, -1, c), a.gather(1, self.src1.expand(n, -1, c)), reduce=mode)
        unm = unm.scatter_reduce(1, self.dst2.expand(n, -1, c), b.gather(1, self.src2.expand(n, -1, c)), reduce=mode)
        return torch.cat([unm, b.gather(1, self.unm2.expand(n, -1, c))], dim=1)

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = torch.ones_like(x[..., :1]) if size is None else size
        pool = self.weight.to(x.dtype) * (size / size.amax(dim=1, keepdim=True))
        self._pool = pool
        return self.merge(x * pool, "sum") / self.merge(pool, "sum"), self.merge(size, "sum")

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self.merge(source, "amax")

    def reduce_attention(self, probs: torch.Tensor) -> torch.Tensor:
        if self._pool is None:
            raise RuntimeError("TwoWayMerge.reduce_attention before reduce: the pooling weights are not known yet")
        b, h, tq, tk = probs.shape
        keys = self.merge(probs.permute(0, 3, 1, 2).reshape(b, tk, h * tq), "sum")  # merged keys: summed
        tk = keys.shape[1]
        rows = keys.reshape(b, tk, h, tq).permute(0, 3, 2, 1).reshape(b, tq, h * tk)
        rows = self.merge(rows * self._pool, "sum") / self.merge(self._pool, "sum")  # merged queries: pooled
        return rows.reshape(b, -1, h, tk).permute(0, 2, 1, 3)


class TokenSelect(TokenReduction):
    """Keep the tokens ``keep`` [B, n] (in that order) and drop the rest; with ``fuse_index`` [B, m] and
    ``fuse_weight`` [B, m], append one token ``sum_j fuse_weight[j] * x[fuse_index[j]]`` (EViT's fused token;
    its size is the sum of the fused tokens' sizes, its source their union)."""

    def __init__(
        self, keep: torch.Tensor, fuse_index: torch.Tensor | None = None, fuse_weight: torch.Tensor | None = None
    ) -> None:
        self.keep = keep
        self.fuse_index = fuse_index
        self.fuse_weight = fuse_weight

    def _fused(self, x: torch.Tensor, weight: torch.Tensor | None, mode: str) -> torch.Tensor:
        rows = x.gather(1, self.fuse_index[..., None].expand(-1, -1, x.shape[-1]))
        if mode == "weighted":
            return (rows * weight[..., None]).sum(dim=1, keepdim=True)
        return rows.sum(dim=1, keepdim=True) if mode == "sum" else rows.amax(dim=1, keepdim=True)

    def _select(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        kept = x.gather(1, self.keep[..., None].expand(-1, -1, x.shape[-1]))
        if self.fuse_index is None or self.fuse_index.shape[1] == 0:
            return kept
        return torch.cat([kept, self._fused(x, self.fuse_weight.to(x.dtype), mode)], dim=1)

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        fused = self.fuse_index is not None and self.fuse_index.shape[1] > 0
        if size is None and fused:
            size = torch.ones_like(x[..., :1])
        return self._select(x, "weighted"), (None if size is None else self._select(size, "sum"))

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self._select(source, "amax")


def alternate_matching(
    metric: torch.Tensor, r: int | None = None, num_protected: int = 0, threshold: float | None = None
) -> AlternateMerge | EmptyMergeKeepsTokens | None:
    """ToMe's bipartite soft matching for ViTs, capped at half the unprotected tokens.

    Exactly one of ``r`` (a fixed count, ToMe) or ``threshold`` (every source whose best cosine similarity
    reaches it, counted as the maximum over the batch, CA-ToMe) is given. With ``threshold`` under torch.compile
    the count is known at run time only: the result is an :class:`EmptyMergeKeepsTokens`, never None.
    """
    t = metric.shape[1]
    limit = (t - num_protected) // 2
    if threshold is None and min(int(r or 0), limit) <= 0:
        return None  # nothing to merge: skip the similarity work
    with torch.no_grad():
        # one norm and one division of the whole metric, then the split (as the official ToMe): each row is
        # normalized by the same reduction as after the split, in half the small ops per block
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        # a compiled threshold merge leaves token counts known at run time only (see _run_time_count_merge)
        matmul = not (threshold is not None and torch.compiler.is_compiling() and metric.device.type == "cpu")
        protect_a, protect_b = (num_protected + 1) // 2, num_protected // 2
        node_max, node_idx = best_destinations(a, b, protect_a, protect_b, normalized=True, matmul=matmul)
        if threshold is not None:
            count = count_reaching(node_max, threshold)
            if torch.compiler.is_compiling():
                return _run_time_count_merge(node_max, node_idx, count, limit, num_protected, t)
            r = int(count.item())
        r = min(int(r or 0), limit)
        if r <= 0:
            return None
        pairs = select_pairs(node_max, node_idx, r, sort_unmerged=num_protected > 0)
    return AlternateMerge(*pairs, num_protected=num_protected)


def _run_time_count_merge(
    node_max: torch.Tensor, node_idx: torch.Tensor, count: torch.Tensor, limit: int, num_protected: int, t: int
) -> EmptyMergeKeepsTokens:
    """The threshold merge while torch.compile traces (issue 20): the count becomes a size known only at run time
    (an unbacked SymInt read by ``.item()`` in the graph), bounded for the compiler by ``torch._check``, so no
    guard is made on it: one graph serves every count, with no graph break and no recompilation."""
    capped = count.clamp(max=limit)
    r = run_time_count(capped, limit)
    pairs = select_pairs(node_max, node_idx, r, sort_unmerged=num_protected > 0)
    kept = (capped.neg() + t).item()
    torch._check(kept >= 1)
    torch._check(kept <= t)
    return EmptyMergeKeepsTokens(AlternateMerge(*pairs, num_protected=num_protected), count == 0, kept)


def count_reaching(node_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many sources reach ``threshold``, as a 0-d tensor: the maximum over the batch of each row's count
    (CA-ToMe's merge count, before any cap; nothing is read on the host)."""
    return (node_max >= threshold).sum(dim=-1).max()


def run_time_count(count: torch.Tensor, limit: int) -> int:
    """``count`` (a 0-d tensor) capped at ``limit``, read as a Python int; while torch.compile traces, a size known
    only at run time (an unbacked SymInt read in the graph), bounded for the compiler by ``torch._check`` to
    ``0 <= r <= limit`` so that no guard is made on its value (issue 20)."""
    r = count.clamp(max=limit).item()
    torch._check(r >= 0)
    torch._check(r <= limit)
    return r


class EmptyMergeKeepsTokens(TokenReduction):
    """A bipartite merge whose count ``r`` is known only at run time (compiled threshold merging): with ``r = 0``
    the tokens stay as they are, in their order, as when eager returns no merge at all (a merge of 0 pairs would
    reorder them: sources first). ``empty``: a 0-d bool tensor, whether ``r`` is 0; the choice is a ``where``, not
    a branch, so the compiled graph has no guard on it. With ``r = 0`` the sizes (and traced sources) become
    tensors where eager keeps None: ones (proportional attention then adds log(1) = 0) and the identity."""

    def __init__(self, merge: BipartiteMerge, empty: torch.Tensor, kept: int | None = None) -> None:
        self.merge = merge
        self.empty = empty
        # The kept token count as a size of its own (a fresh unbacked SymInt, >= 1): the merge's own expression of
        # it nests one floor division and one min per block, which the compiler cannot prove nonzero after a few
        # blocks (attention's check for empty sequences then fails on DeiT-S at 197 tokens); the tokens are
        # narrowed to it, a no-op view at run time. None: the merge's own count.
        self.kept = kept

    def _unless_empty(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        n = after.shape[1] if self.kept is None else self.kept
        return torch.where(self.empty, before.narrow(1, 0, n), after.narrow(1, 0, n))

    def reduce(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        merged, new_size = self.merge.weighted_mean(x, size)
        ones = torch.ones_like(x[..., :1]) if size is None else size
        return self._unless_empty(x, merged), self._unless_empty(ones, new_size)

    def reduce_source(self, source: torch.Tensor) -> torch.Tensor:
        return self._unless_empty(source, self.merge(source, mode="amax"))


def merge_wavg(
    merge: BipartiteMerge, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x``; returns the merged tokens and their new sizes [B, N', 1]
    (:meth:`BipartiteMerge.weighted_mean`)."""
    return merge.weighted_mean(x, size)


def merge_source(merge: BipartiteMerge, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """Track which input tokens each merged token covers: a [B, N', N_input] 0/1 matrix."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


# --- ToMe for Stable Diffusion: 2-D strided destinations ----------------------------------------------


@functools.lru_cache(maxsize=64)
def _top_left_destinations(h: int, w: int, sx: int, sy: int, device: torch.device):
    # Without randomness the split depends only on the grid, so it is built once per shape.
    return _grid_split(h, w, sx, sy, torch.zeros(h // sy, w // sx, 1, dtype=torch.int64, device=device))


def _grid_split(h: int, w: int, sx: int, sy: int, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources and destinations of an h x w grid given each window's destination ``offset`` in [0, sx*sy)."""
    hsy, wsx = h // sy, w // sx
    is_src = torch.ones(hsy, wsx, sy * sx, dtype=torch.int64, device=offset.device)
    is_src.scatter_(dim=2, index=offset, value=0)
    is_src = is_src.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    if hsy * sy < h or wsx * sx < w:  # rows/columns beyond the last full window are always sources
        full = torch.ones(h, w, dtype=torch.int64, device=offset.device)
        full[: hsy * sy, : wsx * sx] = is_src
        is_src = full
    # A stable sort puts destinations (0) first, each set in raster order, without a host sync.
    order = torch.argsort(is_src.reshape(1, -1, 1), dim=1, stable=True)
    num_dst = hsy * wsx
    return order[:, num_dst:, :], order[:, :num_dst, :]


def grid_destinations(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, destination) token indices [1, n, 1] with one destination per ``sy x sx`` window.

    The destination is random within each window when a ``generator`` is given (drawn exactly as tomesd
    draws it, so a generator in the same state picks the same tokens), else the top-left token.
    """
    if generator is None:
        return _top_left_destinations(h, w, sx, sy, torch.device(device))
    size = (h // sy, w // sx, 1)
    if not isinstance(generator, torch.Generator):  # a run state's draws inside a compiled forward
        return _grid_split(h, w, sx, sy, generator.randint(sy * sx, size, torch.empty(0, device=device)))
    offset = torch.randint(sy * sx, size=size, device=generator.device, generator=generator)
    return _grid_split(h, w, sx, sy, offset.to(device))


class GridMerge(BipartiteMerge):
    """Merge/unmerge over a fixed (source, destination) split of the token grid."""

    def __init__(self, unm_idx, src_idx, dst_idx, a_idx: torch.Tensor, b_idx: torch.Tensor) -> None:
        super().__init__(unm_idx, src_idx, dst_idx)
        self.a_idx = a_idx
        self.b_idx = b_idx

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, c = x.shape
        src = x.gather(dim=1, index=self.a_idx.expand(n, -1, c))
        dst = x.gather(dim=1, index=self.b_idx.expand(n, -1, c))
        return src, dst

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, C] at the tokens the merge keeps, in the merged order, without averaging: each merged
        token takes its destination's row (for per-token positions, e.g. rotary embeddings)."""
        src, dst = self.split(x)
        n, _, c = src.shape
        unm = src.gather(dim=1, index=self.unm_idx.expand(n, -1, c))
        return self.join(unm, dst)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Give each of the original N tokens the value of the token it was merged into."""
        unm_len = self.unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=self.dst_idx.expand(n, self.r, c))
        num_src, num_dst = self.a_idx.shape[1], self.b_idx.shape[1]
        out = torch.zeros(n, num_src + num_dst, c, device=x.device, dtype=x.dtype)
        a_idx = self.a_idx.expand(n, num_src, 1)
        out.scatter_(dim=-2, index=self.b_idx.expand(n, num_dst, c), src=dst)
        out.scatter_(dim=-2, index=a_idx.gather(dim=1, index=self.unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=a_idx.gather(dim=1, index=self.src_idx).expand(n, self.r, c), src=src)
        return out


def threshold_count(node_max: torch.Tensor, threshold: float) -> int:
    """How many sources reach ``threshold`` (the batch maximum): CA-ToMe's merge count, read on the host.

    The count sets the merged token count, a shape, so it cannot be traced: under ``torch.compile`` it is a
    deliberate :func:`torch.compiler.disable` island (a graph break, so ``fullgraph=True`` refuses it; see
    :func:`prepare_compile_island`); the graph resumes after it with the count as an input. (CA-ToMe no longer uses
    it: it reads the count in the graph as a run-time size, :func:`threshold_grid_matching`.)
    """
    if torch.compiler.is_compiling() and _ISLAND:
        return _ISLAND[0](node_max, threshold)
    return _count_reaching(node_max, threshold)


def _count_reaching(node_max: torch.Tensor, threshold: float) -> int:
    return int(count_reaching(node_max, threshold).item())


_ISLAND: list = []  # [torch.compiler.disable(_count_reaching)], made by prepare_compile_island


def prepare_compile_island() -> None:
    """Make :func:`threshold_count`'s ``torch.compiler.disable`` island (called by the methods that use it when they
    are applied; not at import, which would import dynamo for every user of tokred)."""
    if not _ISLAND:
        _ISLAND.append(torch.compiler.disable(_count_reaching))


def grid_matching(
    metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, r: int | None = None, threshold: float | None = None
) -> GridMerge | None:
    """Match each source of the split to its most similar destination and keep the best pairs.

    Exactly one of ``r`` (a fixed count, ToMe) or ``threshold`` (every source whose best cosine similarity
    reaches it, counted as the maximum over the batch, as the official CA-ToMe does) is given. With ``threshold``
    the matching is :func:`threshold_grid_matching`'s and the merge :func:`grid_merge_of`'s: under torch.compile
    the count is known at run time only, and the result is a merge of ``r >= 0`` pairs, never None.
    """
    if threshold is not None:
        return grid_merge_of(threshold_grid_matching(metric, a_idx, b_idx, threshold))
    with torch.no_grad():
        node_max, node_idx = _grid_best_destinations(metric, a_idx, b_idx)
        r = min(a_idx.shape[1], int(r or 0))
        if r <= 0:
            return None
        pairs = select_pairs(node_max, node_idx, r)
    return GridMerge(*pairs, a_idx=a_idx, b_idx=b_idx)


def _grid_best_destinations(
    metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each grid source's best cosine similarity to a destination and that destination's index."""
    n, _, c = metric.shape
    a = metric.gather(dim=1, index=a_idx.expand(n, -1, c))
    b = metric.gather(dim=1, index=b_idx.expand(n, -1, c))
    return best_destinations(a, b)


GridMatching = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""A threshold grid matching as fixed-shape tensors: (sources in merge order [B, Na, 1], each source's best
destination [B, Na], the merge count (0-d), source indices [1, Na, 1], destination indices [1, Nb, 1])."""


def threshold_grid_matching(
    metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, threshold: float
) -> GridMatching:
    """:func:`grid_matching` with ``threshold``, kept as tensors whose shapes do not depend on the count (a
    :data:`GridMatching`): what a compiled CA-ToMe caches between steps, so that neither the call that matches
    nor a later call that reuses the pairs has a guard on the count (:func:`grid_merge_of` makes the merge)."""
    with torch.no_grad():
        node_max, node_idx = _grid_best_destinations(metric, a_idx, b_idx)
        order = node_max.argsort(dim=-1, descending=True)[..., None]
        return order, node_idx, count_reaching(node_max, threshold), a_idx, b_idx


def grid_merge_of(matching: GridMatching) -> GridMerge | None:
    """The merge of a :data:`GridMatching`: its count's best sources merged, as :func:`grid_matching` merges them.

    Eager: None for a count of 0 (a host read of the count). While torch.compile traces: the count is a size known
    only at run time (:func:`run_time_count`) and a count of 0 is a merge of 0 pairs, which only reorders the tokens
    (sources first) until ``unmerge`` puts them back: a sublayer that treats tokens alike (attention without
    positions, cross-attention's queries, an MLP; rotary positions follow their tokens through ``kept``) gives the
    unmerged result up to float rounding."""
    order, node_idx, count, a_idx, b_idx = matching
    if torch.compiler.is_compiling():
        r = run_time_count(count, a_idx.shape[1])
    else:
        r = min(a_idx.shape[1], int(count.item()))
        if r <= 0:
            return None
    return GridMerge(*pairs_in_order(order, node_idx, r), a_idx=a_idx, b_idx=b_idx)
