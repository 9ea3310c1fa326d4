"""Benchmark of the minibatch planner against plain FFD and a mini_trainer-like LPT baseline.

Measures, per length distribution and world size, over many global batches (batch sizes 128..16384,
budgets 1024 and 4096 tokens per rank for
the fixture data, whose samples are short, 4096 and 16384 for the synthetic ones):
  at bound   % of batches whose minibatch count equals the lower bound
  max over   largest (count - lower bound)
  > FFD      batches where the count exceeds plain FFD's (must be 0 for the planner)
  util       tokens / (minibatches x ranks x budget), mean
  worst imb  largest busiest-rank / mean-rank ratio of any minibatch
  balance    mean over batches of floor / sum over minibatches of the busiest rank's tokens,
             floor = max(tokens / ranks, longest sample)
  in-mb bal  the same with a plan-specific floor, sum over minibatches of max(mean rank, longest sample
             in that minibatch): how well each minibatch is split (the rest is which samples share one)
  p50/max ms planning CPU time per batch (process time, so that other jobs on a shared machine do not
             count); 16k ms: median over the 16384-sample batches

Length distributions: the fixture conversations (../shared/fixtures/data/*.messages.jsonl) rendered
with each fixture tokenizer's chat template (lengths only), and synthetic ones: lognormal, bimodal,
power-law, and lognormal with a few huge outliers.

    python benchmarks/bench_packing.py [--quick] [--out benchmarks/results/packing.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minitrain.data.packing import _ffd, lower_bound, plan_minibatches  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures"
Plan = list[list[list[int]]]


# --- baselines -------------------------------------------------------------------------------------------


def plan_ffd(lengths: list[int], budget: int, world: int) -> Plan:
    """Plain first-fit decreasing into bins; bin k -> minibatch k // world, rank k % world."""
    lens = np.asarray(lengths, dtype=np.int64)
    fit = np.flatnonzero(lens <= budget)
    if fit.size == 0:
        return []
    order = fit[np.lexsort((fit, -lens[fit]))]
    bins = _ffd(lens[order].tolist(), len(order), budget)
    assert bins is not None
    m = -(-(int(bins.max()) + 1) // world)
    plan: Plan = [[[] for _ in range(world)] for _ in range(m)]
    for i, b in zip(order.tolist(), bins.tolist(), strict=True):
        plan[b // world][b % world].append(i)
    return plan


def _lpt_fits(lens: list[int], world: int, budget: int) -> list[list[int]] | None:
    order = sorted(range(len(lens)), key=lambda k: -lens[k])
    heap = [(0, r) for r in range(world)]
    ranks: list[list[int]] = [[] for _ in range(world)]
    for k in order:
        load, r = heap[0]
        if load + lens[k] > budget:
            return None
        heapq.heapreplace(heap, (load + lens[k], r))
        ranks[r].append(k)
    return ranks


def plan_lpt_greedy(lengths: list[int], budget: int, world: int) -> Plan:
    """mini_trainer-like: take samples in batch order into the current minibatch while an LPT split of it
    over the ranks fits the budget; otherwise close it and open the next. LPT within each minibatch."""
    fit = [i for i, n in enumerate(lengths) if n <= budget]
    plan: Plan = []
    ranks: list[list[int]] = [[] for _ in range(world)]
    loads = [0] * world
    for i in fit:
        r = min(range(world), key=loads.__getitem__)  # greedy least-loaded placement first (cheap)
        if loads[r] + lengths[i] <= budget:
            loads[r] += lengths[i]
            ranks[r].append(i)
            continue
        trial = [k for rk in ranks for k in rk] + [i]
        split = _lpt_fits([lengths[k] for k in trial], world, budget)
        if split is not None:  # an LPT re-split of the minibatch with the new sample still fits
            ranks = [[trial[k] for k in rk] for rk in split]
            loads = [sum(lengths[k] for k in rk) for rk in ranks]
            continue
        plan.append(ranks)
        ranks, loads = [[] for _ in range(world)], [0] * world
        ranks[0], loads[0] = [i], lengths[i]
    if any(ranks):
        plan.append(ranks)
    return plan


PLANNERS: dict[str, Callable[[list[int], int, int], Plan]] = {
    "minitrain": plan_minibatches,
    "ffd": plan_ffd,
    "lpt-greedy": plan_lpt_greedy,
}


# --- length distributions -------------------------------------------------------------------------------


def fixture_lengths() -> dict[str, np.ndarray]:
    """Token counts of the fixture conversations under each fixture tokenizer's chat template."""
    cache = REPO / "benchmarks" / "results" / "fixture_lengths.json"
    if cache.exists():
        return {k: np.asarray(v) for k, v in json.loads(cache.read_text()).items()}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    out: dict[str, list[int]] = {}
    for tok_dir in sorted((FIXTURES / "tokenizers").iterdir()):
        tok = AutoTokenizer.from_pretrained(tok_dir)
        lens: list[int] = []
        for data in sorted((FIXTURES / "data").glob("*.messages.jsonl")):
            for line in data.read_text().splitlines():
                msgs = json.loads(line)["messages"]
                ids = tok.apply_chat_template(msgs, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                lens.append(len(ids))
        out[f"fixture/{tok_dir.name.split('-')[0]}"] = lens
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return {k: np.asarray(v) for k, v in out.items()}


def distributions() -> dict[str, Callable[[np.random.Generator, int, int], np.ndarray]]:
    dists: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {}
    if FIXTURES.is_dir():
        for name, lens in fixture_lengths().items():
            dists[name] = lambda rng, n, budget, lens=lens: rng.choice(lens, n)
    dists["lognormal"] = lambda rng, n, budget: np.maximum(
        1, rng.lognormal(np.log(budget / 16), 1.0, n)
    ).astype(int)
    dists["bimodal"] = lambda rng, n, budget: np.where(
        rng.random(n) < 0.8,
        rng.integers(16, budget // 16, n),
        rng.integers(budget // 4, budget, n),
    )
    dists["power-law"] = lambda rng, n, budget: np.minimum(
        budget * 2, (rng.pareto(1.2, n) + 1) * budget / 64
    ).astype(int)

    def outliers(rng: np.random.Generator, n: int, budget: int) -> np.ndarray:
        lens = np.maximum(1, rng.lognormal(np.log(budget / 32), 0.8, n)).astype(int)
        k = max(1, n // 500)
        lens[rng.choice(n, k, replace=False)] = rng.integers(budget // 2, int(budget * 1.1), k)
        return lens

    dists["outliers"] = outliers
    return dists


# --- metrics ---------------------------------------------------------------------------------------------


def evaluate(plan: Plan, lens: np.ndarray, budget: int, world: int) -> dict[str, float]:
    fit = lens[lens <= budget]
    total, longest = int(fit.sum()), int(fit.max()) if fit.size else 0
    busiest = [max(int(lens[r].sum()) if r else 0 for r in mb) for mb in plan]
    imbalance = [
        max(int(lens[r].sum()) if r else 0 for r in mb) / (sum(int(lens[r].sum()) for r in mb if r) / world)
        for mb in plan
    ]
    floor = max(total / world, longest)
    # a plan-specific floor: in each minibatch the busiest rank holds at least the mean and the longest sample
    mb_floor = sum(
        max(sum(int(lens[r].sum()) for r in mb) / world, max(int(lens[r].max()) for r in mb if r))
        for mb in plan
    )
    return {
        "balance_in_minibatch": mb_floor / sum(busiest) if busiest else 1.0,
        "minibatches": len(plan),
        "bound": lower_bound(lens, budget, world),
        "util": total / (len(plan) * world * budget) if plan else 1.0,
        "worst_imbalance": max(imbalance) if imbalance else 1.0,
        "balance": floor / sum(busiest) if busiest else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke run)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "packing.json")
    ap.add_argument("--planners", default=",".join(PLANNERS))
    args = ap.parse_args()
    planners = {k: PLANNERS[k] for k in args.planners.split(",")}
    batch_sizes = [128, 512, 2048] if args.quick else [128, 512, 2048, 16384]
    worlds = [1, 2, 8, 64]
    reps = 1 if args.quick else 3
    rows: list[dict] = []
    for dist_name, draw in distributions().items():
        for world in worlds:
            for budget in [1024, 4096] if dist_name.startswith("fixture") else [4096, 16384]:
                for n in batch_sizes:
                    for rep in range(reps if n < 16384 else 1):
                        rng = np.random.default_rng([world, budget, n, rep, len(dist_name)])
                        lens = np.asarray(draw(rng, n, budget), dtype=np.int64)
                        lens_l = lens.tolist()
                        ffd_m = None
                        for pname, planner in planners.items():
                            if pname == "lpt-greedy" and n > 2048:
                                # quadratic-ish in pure Python; mini_trainer's numba version is the real one
                                continue
                            t0 = time.process_time()  # CPU time: robust to other jobs on a shared machine
                            plan = planner(lens_l, budget, world)
                            ms = (time.process_time() - t0) * 1e3
                            row = {"dist": dist_name, "world": world, "budget": budget, "n": n, "rep": rep}
                            row |= {"planner": pname, "ms": ms, **evaluate(plan, lens, budget, world)}
                            if pname == "ffd":
                                ffd_m = row["minibatches"]
                            rows.append(row)
                        if ffd_m is None:
                            ffd_m = len(plan_ffd(lens_l, budget, world))
                        for row in rows[-len(planners) :]:
                            row["ffd_minibatches"] = ffd_m
    summarize(rows, planners)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows))
    print(f"wrote {len(rows)} rows to {args.out}")


def summarize(rows: list[dict], planners: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    keys = sorted({(r["dist"], r["world"]) for r in rows}, key=lambda k: (k[0], k[1]))
    table = Table(title="minibatch planner: per distribution and world size (all batch sizes and budgets)")
    for col in [
        "dist",
        "world",
        "planner",
        "batches",
        "at bound %",
        "max over",
        "> FFD",
        "util",
        "worst imb",
        "balance",
        "in-mb bal",
        "p50 ms",
        "max ms",
        "16k ms",
    ]:
        table.add_column(col, justify="left" if col in ("dist", "planner") else "right")
    overall: dict[str, list[dict]] = {p: [] for p in planners}
    for dist, world in keys:
        for pname in planners:
            rs = [r for r in rows if r["dist"] == dist and r["world"] == world and r["planner"] == pname]
            if not rs:
                continue
            overall[pname] += rs
            table.add_row(*fmt(dist, str(world), pname, rs))
        table.add_section()
    for pname, rs in overall.items():
        if rs:
            table.add_row(*fmt("ALL", "", pname, rs))
    console.print(table)
    ref = overall.get("minitrain")
    if ref:
        big = [r["ms"] for r in ref if r["n"] == 16384]
        if big:
            console.print(
                f"minitrain 16384-sample batches: p50 {np.median(big):.1f} ms, max {max(big):.1f} ms"
            )


def fmt(dist: str, world: str, pname: str, rs: list[dict]) -> list[str]:
    at = np.mean([r["minibatches"] == r["bound"] for r in rs]) * 100
    over = max(r["minibatches"] - r["bound"] for r in rs)
    more_than_ffd = sum(r["minibatches"] > r["ffd_minibatches"] for r in rs)
    big = [r["ms"] for r in rs if r["n"] == 16384]
    return [
        dist, world, pname, str(len(rs)), f"{at:.1f}", str(over), str(more_than_ffd),
        f"{np.mean([r['util'] for r in rs]):.3f}", f"{max(r['worst_imbalance'] for r in rs):.2f}",
        f"{np.mean([r['balance'] for r in rs]):.4f}",
        f"{np.mean([r['balance_in_minibatch'] for r in rs]):.4f}",
        f"{np.median([r['ms'] for r in rs]):.1f}",
        f"{max(r['ms'] for r in rs):.1f}", f"{np.median(big):.1f}" if big else "-",
    ]  # fmt: skip


if __name__ == "__main__":
    main()
