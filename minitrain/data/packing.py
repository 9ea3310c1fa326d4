"""Minibatch planning: split one global batch into the fewest packed minibatches, balanced across ranks.

Owns `plan_minibatches`, a pure deterministic function of the sample lengths (no torch, no randomness).
Each minibatch costs a full round of FSDP all-gathers and reduce-scatters, and in each one every rank
waits for the busiest, so the plan aims at two things at once:

- count: M equals the lower bound `max(ceil(sum / (budget * world)), ceil(#(len > budget/2) / world))`
  as often as possible, and is never more than first-fit-decreasing (FFD) bin packing needs;
- balance: within every minibatch the ranks' loads are nearly equal, so that the sum over minibatches
  of the busiest rank's load is close to its floor `max(sum / world, longest)`.

How (for M = lower bound, M + 1, ...; K = M * world bins of `budget` tokens):

1. Pack the samples into K bins with several fast strategies, all on integer-encoded heaps or sorted
   lists (about 0.3 us per sample): LPT (largest first into the least loaded bin; balanced by
   construction), best-fit decreasing (tight; fits when LPT does not), and "BFD for the large samples,
   LPT for the rest". FFD itself runs only when all of these fail, so M never exceeds FFD's count.
2. Even out a tight packing: take the smallest samples off every bin above the mean load and put them
   back, largest first, into the least loaded bin that has room (capacity is checked on tokens).
3. Group the K bins into M minibatches of `world` bins by sorting them by load (heavy with heavy), then
   polish each minibatch with moves and swaps between its busiest and idlest rank; a move or swap that
   lowers the busier of the two never breaks the budget.
The best balanced of the feasible candidates at the smallest feasible M is returned.

Balancing by compute instead of tokens (`cost="compute"`) weighs a sample as `a * len + b * len**2`
(attention is quadratic); `compute_coeffs=(a, b)` defaults to (1, 1/8192), i.e. the quadratic term
equals the linear one at 8192 tokens, about right for a ~1B model (crossover ~ params / (layers *
hidden)). The budget is always in tokens: it bounds activation memory.

Trade-off: a handful of greedy strategies plus local repair instead of an exact solver; this reaches the
lower bound in the large majority of batches within milliseconds (see benchmarks/bench_packing.py for the
measured rates, balance and time) and costs O(n log n) time and O(n) memory.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

from minitrain.errors import UserError

Plan = list[list[list[int]]]  # plan[m][r] = sample indices of rank r in minibatch m


def lower_bound(lengths: Sequence[int] | np.ndarray, max_tokens_per_rank: int, world_size: int) -> int:
    """Fewest minibatches any plan can use for the samples that fit (0 when none fits)."""
    lens = np.asarray(lengths, dtype=np.int64)
    lens = lens[lens <= max_tokens_per_rank]
    if lens.size == 0:
        return 0
    by_tokens = -(-int(lens.sum()) // (max_tokens_per_rank * world_size))
    by_halves = -(-int((2 * lens > max_tokens_per_rank).sum()) // world_size)
    return max(1, by_tokens, by_halves)


def sample_costs(
    lengths: np.ndarray, cost: str = "tokens", compute_coeffs: tuple[float, float] = (1.0, 1.0 / 8192)
) -> np.ndarray:
    """Per-sample load used for balancing: tokens, or estimated compute `a * len + b * len**2`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if cost == "tokens":
        return lengths
    if cost == "compute":
        a, b = compute_coeffs
        return a * lengths.astype(np.float64) + b * lengths.astype(np.float64) ** 2
    raise UserError(f"unknown packing cost {cost!r}; use 'tokens' or 'compute'")


# ---------------------------------------------------------------------------------------------------------
# Packing into K bins. Every strategy takes the samples sorted by decreasing weight (`order`) and returns
# bin[i] for each position of `order`, or None when it cannot fit everything within the token budget.


def _lpt(tok: list[int], wt: list[int], K: int, budget: int) -> np.ndarray | None:
    """Largest weight first into the least loaded bin (weights are non-negative ints)."""
    # heap entries are load * K + bin: one int per bin, so ties break by bin index without tuples
    heap = list(range(K))
    room = [budget] * K
    out = np.empty(len(tok), dtype=np.int64)
    replace = heapq.heapreplace
    for j, (t, w) in enumerate(zip(tok, wt, strict=True)):
        b = heap[0] % K
        if t > room[b]:
            return None
        room[b] -= t
        replace(heap, heap[0] + w * K)
        out[j] = b
    return out


def _bfd(tok: list[int], K: int, budget: int, first_bins: np.ndarray | None = None) -> np.ndarray | None:
    """Best-fit decreasing on tokens: each sample into the fullest bin that still has room."""
    # sorted list of room * K + bin: bisect finds the tightest bin with room >= t
    rooms = [budget * K + b for b in range(K)]
    out = np.empty(len(tok), dtype=np.int64)
    find, insert = bisect.bisect_left, bisect.insort
    for j, t in enumerate(tok):
        k = find(rooms, t * K)
        if k == len(rooms):
            return None
        v = rooms.pop(k)
        insert(rooms, v - t * K)
        out[j] = v % K
    return out


def _ffd(tok: list[int], K: int, budget: int) -> np.ndarray | None:
    """First-fit decreasing on tokens: each sample into the lowest-numbered bin with room (segment tree)."""
    size = 1
    while size < K:
        size *= 2
    tree = [0] * (2 * size)  # tree[node] = largest room below node
    for b in range(K):
        tree[size + b] = budget
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    out = np.empty(len(tok), dtype=np.int64)
    for j, t in enumerate(tok):
        if tree[1] < t:
            return None
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= t else 2 * node + 1
        out[j] = node - size
        tree[node] -= t
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return out


def ffd_bins(lengths: Sequence[int] | np.ndarray, budget: int) -> int:
    """Bins plain first-fit decreasing opens for the samples that fit (the reference count)."""
    lens = np.asarray(lengths, dtype=np.int64)
    lens = np.sort(lens[lens <= budget])[::-1]
    if lens.size == 0:
        return 0
    # FFD never opens more bins than samples; restricted to K bins it places items exactly as unlimited
    used = _ffd(lens.tolist(), int(lens.size), budget)
    assert used is not None
    return int(used.max()) + 1


def _split(tok: list[int], wt: list[int], K: int, budget: int, threshold: int) -> np.ndarray | None:
    """BFD for samples longer than `threshold` tokens, then LPT (with room check) for the rest."""
    n_large = bisect.bisect_left([-t for t in tok], -threshold)  # tok is sorted decreasing
    large = _bfd(tok[:n_large], K, budget)
    if large is None:
        return None
    loads = [0] * K
    room = [budget] * K
    for j in range(n_large):
        b = int(large[j])
        loads[b] += wt[j]
        room[b] -= tok[j]
    heap = sorted(loads[b] * K + b for b in range(K))
    out = np.empty(len(tok), dtype=np.int64)
    out[:n_large] = large
    replace = heapq.heapreplace
    for j in range(n_large, len(tok)):
        b = heap[0] % K
        if tok[j] > room[b]:
            return None
        room[b] -= tok[j]
        replace(heap, heap[0] + wt[j] * K)
        out[j] = b
    return out


def _even_out(bins: np.ndarray, tok: np.ndarray, wt: np.ndarray, K: int, budget: int) -> np.ndarray:
    """Move the smallest samples off bins above the mean load into the least loaded bins with room."""
    loads = np.bincount(bins, weights=wt, minlength=K)
    target = loads.sum() / K
    # within each bin, samples by increasing weight; remove a prefix while the bin stays above target
    by_bin = np.lexsort((wt, bins))
    b_sorted = bins[by_bin]
    w_sorted = wt[by_bin].astype(np.float64)
    starts = np.searchsorted(b_sorted, np.arange(K))
    csum = np.cumsum(w_sorted)
    before = csum - w_sorted - np.repeat(np.r_[0.0, csum][starts], np.diff(np.r_[starts, len(bins)]))
    remove = loads[b_sorted] - before > target
    if not remove.any():
        return bins
    moved = by_bin[remove]
    moved = moved[np.lexsort((moved, -wt[moved]))]  # largest first, ties by position
    new = bins.copy()
    new[moved] = -1
    keep = new >= 0
    tok_load = np.bincount(new[keep], weights=tok[keep], minlength=K).astype(np.int64).tolist()
    w_load = np.bincount(new[keep], weights=wt[keep], minlength=K).astype(np.int64).tolist()
    heap = [w_load[b] * K + b for b in range(K)]
    heapq.heapify(heap)
    for j, t, w in zip(moved.tolist(), tok[moved].tolist(), wt[moved].tolist(), strict=True):
        b = heap[0] % K
        if tok_load[b] + t > budget:
            # the least loaded bin is full of long samples: take the least loaded bin that has room
            cands = [v for v in heap if tok_load[v % K] + t <= budget]
            if not cands:
                return bins
            v = min(cands)
            b = v % K
            heap.remove(v)
            heap.append(v + w * K)
            heapq.heapify(heap)
        else:
            heapq.heapreplace(heap, heap[0] + w * K)
        tok_load[b] += t
        new[j] = b
    return new


def _polish(
    groups: list[list[int]], members: list[list[int]], tok: np.ndarray, wt: np.ndarray, budget: int
) -> None:
    """Within each minibatch, move/swap samples between the busiest and idlest rank while it helps."""
    for ranks in groups:
        if len(ranks) < 2:
            continue
        for _ in range(4 * len(ranks)):
            loads = [int(wt[members[b]].sum()) if members[b] else 0 for b in ranks]
            hi = max(range(len(ranks)), key=loads.__getitem__)
            lo = min(range(len(ranks)), key=loads.__getitem__)
            gap = loads[hi] - loads[lo]
            if gap <= 0 or gap * 200 <= loads[hi]:
                break
            a, b = ranks[hi], ranks[lo]
            ia = np.asarray(members[a], dtype=np.int64)
            ib = np.asarray(members[b], dtype=np.int64)
            room_b = budget - int(tok[ib].sum()) if ib.size else budget
            room_a = budget - int(tok[ia].sum())
            best, best_delta = None, 0
            # move x from a to b: improves when 0 < w_x < gap; best at w_x = gap / 2
            ok = (wt[ia] < gap) & (wt[ia] > 0) & (tok[ia] <= room_b)
            if ok.any():
                cand = np.flatnonzero(ok)
                k = cand[np.argmin(np.abs(2 * wt[ia][cand] - gap))]
                best, best_delta = ("move", int(k), -1), min(int(wt[ia][k]), gap - int(wt[ia][k]))
            if ib.size:
                d = wt[ia][:, None] - wt[ib][None, :]  # weight moved from a to b by swapping x, y
                dt = tok[ia][:, None] - tok[ib][None, :]
                ok = (d > 0) & (d < gap) & (dt <= room_b) & (-dt <= room_a)
                if ok.any():
                    score = np.where(ok, np.minimum(d, gap - d), -1)
                    k, m = np.unravel_index(int(np.argmax(score)), score.shape)
                    if score[k, m] > best_delta:
                        best, best_delta = ("swap", int(k), int(m)), int(score[k, m])
            if best is None:
                break
            kind, k, m = best
            x = members[a].pop(k)
            members[b].append(x)
            if kind == "swap":
                y = members[b].pop(m)
                members[a].append(y)


def _group(bins: np.ndarray, wt: np.ndarray, K: int, world: int) -> list[list[int]]:
    """Bins sorted by load, heaviest first, cut into minibatches of `world` consecutive bins."""
    loads = np.bincount(bins, weights=wt, minlength=K)
    by_load = np.lexsort((np.arange(K), -loads))
    return [by_load[g * world : (g + 1) * world].tolist() for g in range(K // world)]


def _score(groups: list[list[int]], members: list[list[int]], wt: np.ndarray) -> float:
    """Sum over minibatches of the busiest rank's weight (lower is better)."""
    return float(sum(max(float(wt[members[b]].sum()) if members[b] else 0.0 for b in g) for g in groups))


def plan_minibatches(
    lengths: Sequence[int],
    max_tokens_per_rank: int,
    world_size: int,
    *,
    cost: str = "tokens",
    compute_coeffs: tuple[float, float] = (1.0, 1.0 / 8192),
) -> Plan:
    """Split one global batch into minibatches: result[m][r] = indices (into lengths) for rank r in minibatch m.

    Every index with `lengths[i] <= max_tokens_per_rank` appears exactly once; longer ones appear nowhere
    (the caller counts and reports them). Every minibatch has `world_size` lists (possibly empty) and every
    rank's token sum is <= max_tokens_per_rank. Returns [] when no sample fits. Deterministic.
    """
    if max_tokens_per_rank <= 0:
        raise UserError(f"max tokens per GPU must be >= 1, got {max_tokens_per_rank}")
    if world_size <= 0:
        raise UserError(f"world size must be >= 1, got {world_size}")
    budget, world = int(max_tokens_per_rank), int(world_size)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.size and lens.min() < 0:
        raise UserError("sample lengths must be >= 0")
    fit = np.flatnonzero(lens <= budget)
    if fit.size == 0:
        return []
    weights = sample_costs(lens[fit], cost, compute_coeffs)
    if cost == "compute":  # integer weights for the int-encoded heaps; relative precision 1e-6 suffices
        weights = np.rint(weights * (1e6 / max(float(weights.max()), 1.0))).astype(np.int64)
    tok_all = lens[fit]
    order = np.lexsort((np.arange(fit.size), -weights))  # decreasing weight, ties by index: deterministic
    tok = tok_all[order]
    wt = np.asarray(weights[order], dtype=np.int64)
    tok_l, wt_l = tok.tolist(), wt.tolist()

    m = lower_bound(tok, budget, world)
    m_ffd: int | None = None
    while True:
        K = m * world
        candidates = []
        lpt = _lpt(tok_l, wt_l, K, budget)
        if lpt is not None:
            candidates.append(lpt)
        else:
            for bins in (
                _split(tok_l, wt_l, K, budget, budget // 2),
                _split(tok_l, wt_l, K, budget, budget // 8),
                _bfd(tok_l, K, budget),
            ):
                if bins is not None:
                    candidates.append(_even_out(bins, tok, wt, K, budget))
            if not candidates:
                if m_ffd is None:
                    m_ffd = -(-ffd_bins(tok, budget) // world)
                if m >= m_ffd:
                    bins = _ffd(tok_l, K, budget)
                    assert bins is not None
                    candidates.append(_even_out(bins, tok, wt, K, budget))
        if candidates:
            break
        m += 1

    best: tuple[float, list[list[int]], list[list[int]]] | None = None
    for bins in candidates:
        groups = _group(bins, wt, K, world)
        members: list[list[int]] = [[] for _ in range(K)]
        for j, b in enumerate(bins.tolist()):
            members[b].append(j)
        _polish(groups, members, tok, wt, budget)
        score = _score(groups, members, wt)
        if best is None or score < best[0]:
            best = (score, groups, members)
    assert best is not None
    _, groups, members = best
    index = fit[order]  # position in sorted order -> original index
    return [[sorted(index[members[b]].tolist()) for b in g] for g in groups]
