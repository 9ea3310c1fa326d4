"""Minibatch planning: split one global batch into the fewest packed minibatches, balanced across ranks.

Owns `plan_minibatches`, a pure deterministic function of the sample lengths (no torch, no randomness).
Each minibatch costs a full round of FSDP all-gathers and reduce-scatters, and in each one every rank
waits for the busiest, so the plan aims at two things at once:

- count: M equals the lower bound `max(ceil(sum / (budget * world)), ceil(#(len > budget/2) / world))`
  as often as possible, and is never more than first-fit-decreasing (FFD) bin packing needs;
- balance: within every minibatch the ranks' loads are nearly equal, so that the sum over minibatches
  of the busiest rank's load is close to its floor `max(sum / world, longest)`.

How, for M = the lower bound (then M + 1), with K = M * world bins of `budget` tokens:

1. Pack the samples into the K bins, cheapest first:
   a. LPT: largest first into the least loaded bin (in vectorised rounds of K samples when K >= 32,
      on an int-encoded heap otherwise). Balanced by construction; fits unless the bins are nearly full.
   b. else best-fit decreasing (a bisect-sorted list of int-encoded rooms), keeping the samples it cannot
      place, then a repair that gathers free room for each of them: re-split the samples of the roomiest
      bin and another bin so the other is as full as possible (a subset-sum on Python-int bitsets),
      until the left-out sample fits. Bounded effort: hopeless batches give up quickly.
   c. if M and M + 1 both fail: the better of unlimited best fit and first fit (FFD), so the count never
      exceeds FFD's.
2. Even out a tight packing (b, c): take the smallest samples off every bin above the mean load and put
   them back, largest first, into the least loaded bin that has room.
3. Group the K bins into M minibatches of `world` bins by sorting them by load (heavy with heavy), then
   polish each unbalanced minibatch with moves and swaps between its busiest and idlest rank; a move or
   swap that lowers the busier of the two never breaks the budget (token room is checked too).

Why both targets: LPT into exactly K = bound * world bins spreads tokens evenly over ALL bins, so every
minibatch is balanced and the count is the bound whenever LPT fits; when the bins are nearly full
(where LPT fails), any feasible packing is nearly balanced too, and best fit + repair finds one at the
bound far more often than FFD. Plain FFD fills the first bins to the brim and leaves the last nearly
empty, which is where its imbalance comes from.

Balancing by compute instead of tokens (`cost="compute"`) weighs a sample as `a * len + b * len**2`
(attention is quadratic); `compute_coeffs=(a, b)` defaults to (1, 1/8192), i.e. the quadratic term
equals the linear one at 8192 tokens, about right for a ~1B model (crossover ~ params / (layers *
hidden)). The budget is always in tokens: it bounds activation memory.

Trade-off: greedy packers plus a bounded local repair instead of an exact solver: the lower bound is
missed on some batches packed to more than 99.5% of the budget (where it may well be infeasible), in
exchange for milliseconds per batch (CPU time in benchmarks/results/packing.json: a median of 0.7 ms for
128 samples and 2.7 ms for 2,048; for 16,384 samples 4.5 ms at best, a median of 22 ms and up to 150 ms on
tight 1,024-token budgets), O(n log n) time and O(n) memory.
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
# Packing into K bins. Each packer takes the samples sorted decreasing (LPT by weight, the bin packers by
# tokens) and returns the bin of each position in that order, or None when the budget cannot hold them all.


def _lpt(tok: np.ndarray, wt: np.ndarray, K: int, budget: int) -> np.ndarray | None:
    """Largest weight first into the least loaded bin; None if a sample does not fit there.

    With many bins the samples go in rounds of K (the i-th largest of a round into the i-th least loaded
    bin), which is vectorised and nearly identical to exact LPT; with few bins, exact LPT on a heap.
    """
    if K >= 32:
        loads = np.zeros(K, dtype=wt.dtype)
        out = np.empty(len(wt), dtype=np.int64)
        for start in range(0, len(wt), K):
            block = wt[start : start + K]
            target = np.argsort(loads, kind="stable")[: len(block)]
            out[start : start + len(block)] = target
            loads[target] += block
        if np.bincount(out, weights=tok, minlength=K).max() > budget:
            return None
        return out
    # heap entries are load * K + bin: one int per bin, so ties break by bin index without tuples
    heap = list(range(K))
    room = [budget] * K
    out = np.empty(len(tok), dtype=np.int64)
    replace = heapq.heapreplace
    for j, (t, w) in enumerate(zip(tok.tolist(), wt.tolist(), strict=True)):
        b = heap[0] % K
        if t > room[b]:
            return None
        room[b] -= t
        replace(heap, heap[0] + w * K)
        out[j] = b
    return out


def _bfd(tok: list[int], K: int | None, budget: int, overflow: bool = False) -> np.ndarray | None:
    """Best-fit decreasing on tokens: each sample into the fullest bin that still has room.

    With K=None the bins are unlimited (a new one opens when nothing fits); otherwise, when K is short,
    None, or with `overflow` the samples that found no room get bin -1 (for `_repair`).
    """
    cap = len(tok) + 1 if K is None else K
    # sorted list of room * cap + bin: bisect finds the tightest bin with room >= t (ties: lowest bin)
    find, insert = bisect.bisect_left, bisect.insort
    need = (np.asarray(tok, dtype=np.int64) * cap).tolist()  # t * cap: a room code >= it has room >= t
    taken: list[int] = []  # the room code each sample went into (bin = code % cap), -1 if left out
    put = taken.append
    if K is None:
        rooms: list[int] = []
        for x in need:
            k = find(rooms, x)
            if k == len(rooms):
                put(len(rooms))  # a new bin: its code's remainder is its number
                insert(rooms, budget * cap - x + len(rooms))
                continue
            v = rooms.pop(k)
            insert(rooms, v - x)
            put(v)
        return np.array(taken, dtype=np.int64) % cap
    rooms = [budget * cap + b for b in range(K)]
    pop = rooms.pop
    for x in need:
        k = find(rooms, x)
        if k == K:
            if not overflow:
                return None
            put(-1)
            continue
        v = pop(k)
        insert(rooms, v - x)
        put(v)
    codes = np.array(taken, dtype=np.int64)
    return np.where(codes >= 0, codes % cap, -1)


def _fullest_subset(sizes: list[int], cap: int) -> list[int]:
    """Positions of a subset of `sizes` with the largest sum <= cap (subset-sum DP on Python-int bitsets)."""
    mask = (1 << (cap + 1)) - 1
    reach = [1]  # reach[i]: bit s set when some subset of sizes[:i] sums to s
    for s in sizes:
        reach.append((reach[-1] | (reach[-1] << s)) & mask)
    best = reach[-1].bit_length() - 1
    chosen = []
    for i in range(len(sizes) - 1, -1, -1):
        if not (reach[i] >> best) & 1:  # best is not reachable without sizes[i]: take it
            chosen.append(i)
            best -= sizes[i]
    return chosen


def _repair(bins: np.ndarray, tok: np.ndarray, K: int, budget: int) -> np.ndarray | None:
    """Place the samples `_bfd(..., overflow=True)` left out (bin -1) by gathering free room; None on failure.

    For a left-out sample u that fits nowhere: take the roomiest bin b and, for other bins c (roomiest
    first), re-split the samples of b and c so that c is as full as possible (subset-sum), which moves
    c's free room into b, until u fits in b. Samples only move between bins that stay within budget.
    """
    bins = bins.copy()
    placed = bins >= 0
    room = budget - np.bincount(bins[placed], weights=tok[placed], minlength=K).astype(np.int64)
    members: list[list[int]] = [[] for _ in range(K)]
    for j, b in zip(np.flatnonzero(placed).tolist(), bins[placed].tolist(), strict=True):
        members[b].append(j)
    left_out = np.flatnonzero(~placed).tolist()
    max_pairs, tried = min(2048, 64 + 16 * len(left_out)), 0  # bounded effort: hopeless cases fail fast
    for j in left_out:  # largest first (tok is sorted decreasing)
        u = int(tok[j])
        if room.max() < u:
            b = int(np.argmax(room))
            for c in np.argsort(-room, kind="stable").tolist():
                if c == b or room[c] == 0:
                    continue
                tried += 1
                if tried > max_pairs:
                    return None
                pool = members[b] + members[c]
                sizes = tok[pool].tolist()
                into_c = set(_fullest_subset(sizes, budget))
                members[c] = [pool[k] for k in range(len(pool)) if k in into_c]
                members[b] = [pool[k] for k in range(len(pool)) if k not in into_c]
                room[c] = budget - int(tok[members[c]].sum()) if members[c] else budget
                room[b] = budget - int(tok[members[b]].sum()) if members[b] else budget
                if room[b] >= u:
                    break
            else:
                return None
        fits = np.flatnonzero(room >= u)
        b = int(fits[np.argmin(room[fits])])  # best fit
        members[b].append(j)
        room[b] -= u
    for b, items in enumerate(members):
        bins[items] = b
    return bins


def _ffd(tok: list[int], K: int | None, budget: int) -> np.ndarray | None:
    """First-fit decreasing on tokens: each sample into the lowest-numbered bin with room (segment tree).

    With K=None the bins are unlimited; otherwise None when K bins are not enough.
    """
    if K is None:  # any-fit packing never leaves two bins at most half full: <= 2 * sum / budget + 1 bins
        K = min(len(tok), 2 * (-(-sum(tok) // budget)) + 1)
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
            left, right = tree[2 * node], tree[2 * node + 1]
            tree[node] = left if left > right else right
            node //= 2
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


def _best_exchange(
    ia: np.ndarray, ib: np.ndarray, gap: float, room_a: int, room_b: int, tok: np.ndarray, wt: np.ndarray
) -> tuple[int, int] | None:
    """The move (k, -1) or swap (k, m) of samples ia[k] <-> ib[m] that lowers the busier of a, b the most.

    Moving weight d from a to b with 0 < d < gap lowers max(load_a, load_b) by min(d, gap - d); the
    token room of each side is checked too (tokens and weights differ under cost="compute").
    """
    wa, ta = wt[ia], tok[ia]
    best, best_gain = None, 0.0
    gain = np.where((wa < gap) & (ta <= room_b), np.minimum(wa, gap - wa), 0.0)
    k = int(np.argmax(gain)) if gain.size else 0
    if gain.size and gain[k] > 0:
        best, best_gain = (k, -1), float(gain[k])
    if ia.size and ib.size:
        d = wa[:, None] - wt[ib][None, :]  # weight moved from a to b by swapping x and y
        dt = ta[:, None] - tok[ib][None, :]
        ok = (d > 0) & (d < gap) & (dt <= room_b) & (-dt <= room_a)
        gain2 = np.where(ok, np.minimum(d, gap - d), 0.0)
        k2 = int(np.argmax(gain2))
        if gain2.flat[k2] > best_gain:
            best = (k2 // ib.size, k2 % ib.size)
    return best


def _polish(
    ranks: list[int],
    members: list[list[int]],
    wl: list[float],
    tl: list[int],
    tok: np.ndarray,
    wt: np.ndarray,
    budget: int,
) -> None:
    """Within one minibatch, move or swap samples off the busiest rank while that lowers it.

    The partner is the idlest rank for which some move or swap helps (a move or swap that lowers the
    busier of two ranks never breaks the budget of either).
    """
    for _ in range(4 * len(ranks)):
        a = max(ranks, key=wl.__getitem__)
        ia = np.asarray(members[a], dtype=np.int64)
        found = None
        for b in sorted(ranks, key=wl.__getitem__):
            gap = wl[a] - wl[b]
            if gap * 500 <= wl[a]:  # within 0.2% of the busiest: nothing worth moving to b or beyond
                break
            ib = np.asarray(members[b], dtype=np.int64)
            found = _best_exchange(ia, ib, gap, budget - tl[a], budget - tl[b], tok, wt)
            if found is not None:
                break
        if found is None:
            return
        k, m = found
        moves = [(members[a][k], a, b)] + ([(members[b][m], b, a)] if m >= 0 else [])
        for x, src, dst in moves:
            members[src].remove(x)
            members[dst].append(x)
            wl[src] -= float(wt[x])
            wl[dst] += float(wt[x])
            tl[src] -= int(tok[x])
            tl[dst] += int(tok[x])


def _arrange(
    bins: np.ndarray, tok: np.ndarray, wt: np.ndarray, K: int, world: int, budget: int
) -> np.ndarray:
    """Group bins into minibatches (heaviest with heaviest) and polish the unbalanced ones.

    Returns the slot of each sample, where slot = minibatch * world + rank.
    """
    wl_arr = np.bincount(bins, weights=wt, minlength=K)
    by_load = np.lexsort((np.arange(K), -wl_arr))  # slot s holds bin by_load[s]
    slot_of_bin = np.empty(K, dtype=np.int64)
    slot_of_bin[by_load] = np.arange(K)
    slots = slot_of_bin[bins]
    group_w = wl_arr[by_load].reshape(-1, world)
    # polish only minibatches whose busiest rank is more than 0.2% above the idlest
    todo = np.flatnonzero((group_w.max(1) - group_w.min(1)) * 500 > group_w.max(1))
    if todo.size and world > 1:
        wl = wl_arr[by_load].tolist()
        tl = np.bincount(slots, weights=tok, minlength=K).astype(np.int64).tolist()
        members: list[list[int]] = [[] for _ in range(K)]
        in_todo = np.isin(slots // world, todo)
        for j, sl in zip(np.flatnonzero(in_todo).tolist(), slots[in_todo].tolist(), strict=True):
            members[sl].append(j)
        for g in todo.tolist():
            ranks = list(range(g * world, (g + 1) * world))
            _polish(ranks, members, wl, tl, tok, wt, budget)
            for sl in ranks:
                slots[members[sl]] = sl
    return slots


def plan_minibatches(
    lengths: Sequence[int],
    max_tokens_per_rank: int,
    world_size: int,
    *,
    cost: str = "tokens",
    compute_coeffs: tuple[float, float] = (1.0, 1.0 / 8192),
) -> Plan:
    """Split one global batch into minibatches: result[m][r] = indices (into lengths) for rank r in
    minibatch m.

    Every index with `lengths[i] <= max_tokens_per_rank` appears exactly once; longer ones appear nowhere
    (the caller counts and reports them). Every minibatch has `world_size` lists (possibly empty) and every
    rank's token sum is <= max_tokens_per_rank. Returns [] when no sample fits. Deterministic.
    `cost="compute"` balances ranks by `a * len + b * len**2` with `(a, b) = compute_coeffs`.
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
    order = np.argsort(-weights, kind="stable")  # decreasing weight, ties by index: deterministic
    tok = lens[fit][order]
    wt = np.asarray(weights[order], dtype=np.int64)
    by_tok = np.argsort(-tok, kind="stable") if cost != "tokens" else np.arange(fit.size)
    sorted_tok: list[list[int]] = []  # decreasing tokens as a list, for the bin packers (built on demand)

    def tok_list() -> list[int]:
        if not sorted_tok:
            sorted_tok.append(tok[by_tok].tolist())
        return sorted_tok[0]

    def unsort(bins: np.ndarray | None) -> np.ndarray | None:  # bins by decreasing tokens -> by weight
        if bins is None or cost == "tokens":
            return bins
        out = np.empty_like(bins)
        out[by_tok] = bins
        return out

    def attempt(m: int) -> np.ndarray | None:
        """A packing into m * world bins, or None: LPT, else best fit (+ repair of what it left out)."""
        K = m * world
        lpt = _lpt(tok, wt, K, budget)
        if lpt is not None:  # balanced by construction
            return lpt
        partial = _bfd(tok_list(), K, budget, overflow=True)
        assert partial is not None
        if (partial < 0).any():
            partial = _repair(partial, tok[by_tok], K, budget)
            if partial is None:
                return None
        return _even_out(unsort(partial), tok, wt, K, budget)

    m = lower_bound(tok, budget, world)
    bins = attempt(m)
    if bins is None:
        m += 1
        bins = attempt(m)
    if bins is None:  # far from the bound: the better of unlimited best fit and first fit
        packed = [unsort(_bfd(tok_list(), None, budget)), unsort(_ffd(tok_list(), None, budget))]
        counts = [-(-(int(b.max()) + 1) // world) for b in packed]
        m = min(counts)
        bins = _lpt(tok, wt, m * world, budget)
        if bins is None:
            bins = _even_out(packed[counts.index(m)], tok, wt, m * world, budget)
    K = m * world
    slots = _arrange(bins, tok, wt, K, world, budget)
    index = fit[order]  # position in weight order -> original index
    by_slot = np.lexsort((index, slots))
    cuts = np.searchsorted(slots[by_slot], np.arange(K + 1)).tolist()
    flat = index[by_slot].tolist()
    return [[flat[cuts[s] : cuts[s + 1]] for s in range(g * world, (g + 1) * world)] for g in range(m)]
