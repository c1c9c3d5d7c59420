"""Label-free calibration of multiple-choice predictions, and label-free statistics of them.

A merged adapter can rank the answers of a task better than the task adapter alone and still
lose accuracy, because the language-gap update also shifts which answer the model prefers a
priori. The functions here undo that shift **without labels**: they move the per-class
log-likelihoods by additive offsets ``b`` (one per answer) so that the predicted class shares
on the evaluated inputs match a target distribution (uniform unless given), then read the
predictions off ``argmax_j (loglik[i, j] + b[j])``.

Notation: ``L`` is an ``(n, k)`` tensor of per-item choice log-likelihoods (item ``i``, answer
``j``), ``pi`` a target distribution over the ``k`` answers and ``c`` the integer class counts
targeted (:func:`target_counts`: largest-remainder rounding of ``pi * n``).

**Which offsets.** Among all assignments ``a: items -> classes`` with class counts ``c``, take one
that maximises the total log-likelihood ``sum_i L[i, a(i)]`` (a transportation problem). By LP
duality its optimal dual variables are offsets ``b`` with ``a(i) in argmax_j (L[i, j] + b[j])``
for every item, and conversely every offsets vector whose argmax predictions have counts ``c``
(strictly, i.e. without ties) is dual-optimal and induces the *unique* optimal assignment. So
``c`` is reachable by offsets iff the optimal assignment can be separated strictly; it then is,
by the offsets that maximise the smallest margin ``min_i (L[i, a(i)] + b[a(i)] - max_{j != a(i)}
(L[i, j] + b[j]))``, which :func:`prior_offsets` returns. With continuous log-likelihoods this
holds with probability one; it fails only with exact ties (equal choice margins, duplicate
items, rows with all answers equally likely), and then :func:`prior_offsets` returns the offsets
of the reachable count vector closest to ``c`` (see there).

Algorithm (exact, finite): successive shortest paths on the ``k``-node *class graph*. Start from
the argmax of ``L + b0`` (optimal for its own counts, for any ``b0``; ``b0`` from a few steps
of soft prior re-estimation, so that few moves remain); while a class holds more items than targeted,
move one item along the cheapest path of single-item moves from an over-full class to an
under-full one, where the edge ``s -> j`` costs ``min_{i: a(i)=s} (L[i, s] - L[i, j])``. This is
the successive-shortest-path min-cost-flow algorithm on the bipartite item/class network, whose
residual graph collapses to the class graph; it keeps the assignment optimal for its counts
after every move and stops after at most ``n`` moves. The max-min-margin offsets are then
shortest-path potentials of the class graph with every edge lowered by its minimum cycle mean
(Karp's algorithm), which is the largest achievable smallest margin.

Ties in ``argmax`` are broken towards the lowest class index everywhere (as ``torch.argmax``).

Only torch is imported; everything is computed in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from itertools import combinations_with_replacement
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "agreement_with_source",
    "binary_auc",
    "binary_auc_of_items",
    "calibrated_accuracy",
    "calibrated_accuracy_of_items",
    "calibrated_confidence",
    "calibrated_predictions",
    "least_prior_shift",
    "mean_choice_entropy",
    "predicted_distribution",
    "prior_offsets",
    "target_counts",
    "total_variation",
]

_MAX_TIE_CANDIDATES = 64
"""Count vectors tried (k > 2, ties only) before giving up on the closest reachable one."""


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_loglik(loglik: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(loglik, torch.Tensor):
        loglik = torch.as_tensor(loglik)
    if loglik.dim() != 2:
        raise ValueError(f"loglik must be an (n, k) tensor of choice log-likelihoods, got shape {tuple(loglik.shape)}")
    n, k = loglik.shape
    if n < 1:
        raise ValueError("loglik holds no items (n = 0): calibration is undefined")
    if k < 2:
        raise ValueError(f"loglik must have at least 2 choices per item, got k = {k}")
    loglik = loglik.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(loglik).all():
        bad = int((~torch.isfinite(loglik)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"loglik holds a NaN or infinite value (first at item {bad}): calibration is undefined")
    return loglik


def _check_distribution(p: torch.Tensor | Sequence[float], k: int, name: str) -> torch.Tensor:
    import torch

    p = torch.as_tensor(p, dtype=torch.float64).detach().cpu()
    if p.shape != (k,):
        raise ValueError(f"{name} must be a vector of {k} class shares, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must hold finite non-negative shares, got {p.tolist()}")
    total = float(p.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {p.tolist()} (sum {total:.6g})")
    return p / total


def _check_labels(labels: torch.Tensor | Sequence[int], n: int, k: int) -> torch.Tensor:
    import torch

    labels = torch.as_tensor(labels).detach().cpu()
    if labels.shape != (n,):
        raise ValueError(f"labels must be a vector of {n} class indices, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("labels must be integer class indices")
    labels = labels.long()
    if ((labels < 0) | (labels >= k)).any():
        raise ValueError(f"labels must lie in [0, {k - 1}], got {sorted(set(labels.tolist()))}")
    return labels


# --------------------------------------------------------------------------------------
# Target counts
# --------------------------------------------------------------------------------------


def target_counts(n: int, k: int, target: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Integer class counts closest to ``target * n``: largest-remainder (Hamilton) rounding.

    ``c_j = floor(pi_j n)`` plus one for the ``n - sum_j floor(pi_j n)`` classes with the largest
    fractional parts ``pi_j n - floor(pi_j n)``; equal fractional parts favour the lowest class
    index. ``target=None`` is uniform: ``n // k`` each, the first ``n % k`` classes one more.

    Returns:
        A (k,) long tensor summing to ``n``.
    """
    import torch

    if n < 1 or k < 2:
        raise ValueError(f"need n >= 1 items and k >= 2 classes, got n={n}, k={k}")
    if target is None:
        counts = torch.full((k,), n // k, dtype=torch.long)
        counts[: n % k] += 1
        return counts
    pi = _check_distribution(target, k, "target")
    quota = pi * n
    base = torch.floor(quota + 1e-9).long()
    remaining = n - int(base.sum())
    if remaining < 0:  # only through float rounding of the quotas
        raise ValueError(f"target {pi.tolist()} does not round to {n} items")
    frac = (quota - base.double()).tolist()
    order = sorted(range(k), key=lambda j: (-frac[j], j))
    for j in order[:remaining]:
        base[j] += 1
    return base


# --------------------------------------------------------------------------------------
# Optimal assignment with given class counts (successive shortest paths on the class graph)
# --------------------------------------------------------------------------------------


def _edge_costs(L: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class graph: W[s, j] = min over items i in class s of L[i, s] - L[i, j] (inf: no item)."""
    import torch

    n, k = L.shape
    cost = L.gather(1, assign[:, None]) - L  # (n, k): log-likelihood lost by moving i to j
    W = torch.full((k, k), math.inf, dtype=torch.float64)
    W = W.scatter_reduce(0, assign[:, None].expand(n, k), cost, reduce="amin", include_self=True)
    W.fill_diagonal_(math.inf)
    return W, cost


def _optimal_assignment(L: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """An assignment with class counts ``counts`` maximising sum_i L[i, a(i)] (exact)."""
    import torch

    n, k = L.shape
    # Warm start: any argmax(L + b) is optimal for its own counts, so start from offsets that
    # roughly match the soft shares to the counts (prior re-estimation, Saerens et al. 2002);
    # the exact moves below then only fix the remainder.
    log_target = torch.log(counts.double().clamp(min=1e-3) / n)
    b = torch.zeros(k, dtype=torch.float64)
    for _ in range(30):
        share = torch.softmax(L + b, dim=1).mean(dim=0)
        b = b + log_target - torch.log(share.clamp(min=1e-300))
    assign = (L + b).argmax(dim=1)
    excess = torch.bincount(assign, minlength=k) - counts
    scale = 1e-12 * (1.0 + float(L.abs().max()))
    while bool((excess > 0).any()):
        W, cost = _edge_costs(L, assign)
        w = W.tolist()
        ex = excess.tolist()
        dist = [0.0 if ex[j] > 0 else math.inf for j in range(k)]
        pred = [-1] * k
        for _ in range(k - 1):  # Bellman-Ford (edge weights may be negative, no negative cycle)
            changed = False
            for s in range(k):
                if dist[s] == math.inf:
                    continue
                for j in range(k):
                    if w[s][j] < math.inf and dist[s] + w[s][j] < dist[j] - scale:
                        dist[j] = dist[s] + w[s][j]
                        pred[j] = s
                        changed = True
            if not changed:
                break
        deficit = [j for j in range(k) if ex[j] < 0 and dist[j] < math.inf]
        if not deficit:  # cannot happen: the over-full classes hold items that can move anywhere
            raise RuntimeError("calibration: no path from an over-full to an under-full class")
        t = min(deficit, key=lambda j: (dist[j], j))
        path = [t]
        while pred[path[-1]] != -1 and len(path) <= k:
            path.append(pred[path[-1]])
        path.reverse()  # s -> ... -> t
        moves = []
        for s, j in zip(path[:-1], path[1:]):
            members = (assign == s).nonzero()[:, 0]
            moves.append((int(members[cost[members, j].argmin()]), j))
        for item, j in moves:
            assign[item] = j
        excess[path[0]] -= 1
        excess[t] += 1
    return assign


def _min_cycle_mean(w: list[list[float]]) -> float:
    """Karp's minimum mean cycle weight of a complete-ish digraph (inf: no cycle)."""
    k = len(w)
    D = [[math.inf] * k for _ in range(k + 1)]
    D[0] = [0.0] * k
    for m in range(1, k + 1):
        for s in range(k):
            if D[m - 1][s] == math.inf:
                continue
            for j in range(k):
                if w[s][j] < math.inf and D[m - 1][s] + w[s][j] < D[m][j]:
                    D[m][j] = D[m - 1][s] + w[s][j]
    best = math.inf
    for v in range(k):
        if D[k][v] == math.inf:
            continue
        worst = max((D[k][v] - D[m][v]) / (k - m) for m in range(k) if D[m][v] < math.inf)
        best = min(best, worst)
    return best


def _separating_offsets(L: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Max-min-margin offsets for an assignment, and that margin (<= 0: not strictly separable)."""
    import torch

    k = L.shape[1]
    W, _ = _edge_costs(L, assign)
    w = W.tolist()
    margin = _min_cycle_mean(w)
    delta = 1.0 if margin == math.inf else max(margin, 0.0)
    # Potentials b with b[j] <= b[s] + W[s, j] - delta: Bellman-Ford from a virtual source.
    b = [0.0] * k
    for _ in range(k):
        changed = False
        for s in range(k):
            for j in range(k):
                if w[s][j] < math.inf and b[s] + w[s][j] - delta < b[j]:
                    b[j] = b[s] + w[s][j] - delta
                    changed = True
        if not changed:
            break
    offsets = torch.tensor(b, dtype=torch.float64)
    return offsets - offsets.mean(), margin


def _counts_of(L: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.bincount((L + offsets).argmax(dim=1), minlength=L.shape[1])


def _reach(L: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """Offsets whose argmax predictions have exactly ``counts``, or None when no offsets do."""
    import torch

    assign = _optimal_assignment(L, counts.clone())
    offsets, margin = _separating_offsets(L, assign)
    if margin > 0 and torch.equal(_counts_of(L, offsets), counts):
        return offsets
    return None


def _candidates_at(counts: list[int], d: int) -> list[list[int]]:
    """Count vectors at L1 distance 2d from ``counts`` (same total), most weight on low indices first."""
    k = len(counts)
    out = set()
    for plus in combinations_with_replacement(range(k), d):
        up = [0] * k
        for j in plus:
            up[j] += 1
        for minus in combinations_with_replacement(range(k), d):
            down = [0] * k
            for j in minus:
                down[j] += 1
            if any(up[j] and down[j] for j in range(k)):
                continue
            cand = [counts[j] + up[j] - down[j] for j in range(k)]
            if min(cand) >= 0:
                out.add(tuple(cand))
    return [list(c) for c in sorted(out, reverse=True)]


def prior_offsets(loglik: torch.Tensor, target: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Additive per-class offsets that make the predicted class counts match the target.

    Returns ``b`` (shape ``(k,)``, float64, mean zero) such that the class counts of
    ``argmax_j (loglik[i, j] + b[j])`` (ties: lowest index) equal ``c =``
    :func:`target_counts` ``(n, k, target)`` whenever any offsets reach ``c``; the offsets then
    maximise the smallest margin by which an item prefers its predicted class (module docstring).

    When no offsets reach ``c`` (exact ties only):

    * k = 2: exact. With margins ``d_i = L[i, 1] - L[i, 0]``, offsets ``(0, -t)`` predict class 1
      iff ``d_i > t``, so the reachable counts of class 1 are the numbers of items above each
      threshold between distinct margins. The one closest to ``c_1`` is returned (equally close:
      the smaller one, i.e. more items in class 0), with ``t`` midway between the two margins.
    * k > 2: rows identical up to a constant (one reachable prediction pattern per class: all
      items in one class) give all items to the class with the largest target count (lowest
      index among equals). Otherwise count vectors are tried by increasing L1 distance from
      ``c`` (equally far: more items in lower class indices first), each by solving the exact
      assignment problem for it; the first reachable one is returned, which is then the closest.
      After 64 unreachable vectors the search stops with a warning and returns offsets from a
      coordinate local search (one offset moved to its best breakpoint at a time, while the
      counts get closer) started at the optimal assignment's dual offsets: closer than those,
      but not guaranteed the closest.

    Args:
        loglik: (n, k) per-item choice log-likelihoods (any real scores; finite).
        target: k class shares summing to 1; ``None`` = uniform.

    Raises:
        ValueError: not 2-D, no items, fewer than 2 choices, NaN/inf values, or a bad target.
    """
    import torch

    L = _check_loglik(loglik)
    n, k = L.shape
    counts = target_counts(n, k, target)

    if k == 2:
        return _binary_offsets(L, int(counts[1]))

    found = _reach(L, counts)
    if found is not None:
        return found
    rows = L - L[:, :1]
    if bool((rows == rows[:1]).all()):  # every item identical up to a constant
        best = int(torch.argmax(counts))
        offsets = torch.full((k,), -1.0, dtype=torch.float64) - rows[0]
        offsets[best] += 1.0
        return offsets - offsets.mean()
    tried = 1
    base = counts.tolist()
    for d in range(1, n + 1):
        for cand in _candidates_at(base, d):
            if tried >= _MAX_TIE_CANDIDATES:
                break
            tried += 1
            found = _reach(L, torch.tensor(cand, dtype=torch.long))
            if found is not None:
                return found
        if tried >= _MAX_TIE_CANDIDATES:
            break
    offsets, _ = _separating_offsets(L, _optimal_assignment(L, counts.clone()))
    offsets = _local_search(L, offsets, counts)
    logger.warning(
        "prior_offsets: the target counts %s are not reachable (tied items) and no reachable counts were found "
        "among the %d nearest; returning offsets found by local search, with counts %s",
        base,
        tried,
        _counts_of(L, offsets).tolist(),
    )
    return offsets


def _distance_key(cnt: torch.Tensor, counts: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    """Order of count vectors: L1 distance to the target, then more items in lower classes first."""
    return int((cnt - counts).abs().sum()), tuple(-x for x in cnt.tolist())


def _local_search(L: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, max_rounds: int = 100) -> torch.Tensor:
    """Coordinate descent on the offsets: move one ``b[j]`` to the best breakpoint, while counts improve.

    With the other offsets fixed, item ``i`` is predicted ``j`` iff ``b[j] > t_i = max_{l != j}
    (L[i, l] + b[l]) - L[i, j]`` (ties aside), so the reachable counts are those with the items of
    the ``r`` smallest ``t_i`` in class ``j``; every ``b[j]`` between two consecutive distinct
    ``t`` is tried (the midpoint). Monotone in the order of :func:`_distance_key`, so it stops.
    """
    import torch

    n, k = L.shape
    b = offsets.clone()
    best = _distance_key(_counts_of(L, b), counts)
    for _ in range(max_rounds):
        improved = None
        for j in range(k):
            others = L + b
            others[:, j] = -math.inf
            other_best, other_class = others.max(dim=1)
            t = other_best - L[:, j]
            order = torch.argsort(t, stable=True)
            t_sorted = t[order].tolist()
            # counts when the first r items (by t) are in class j: base counts of the others minus them
            onehot = torch.nn.functional.one_hot(other_class[order], k).long()
            base = onehot.sum(dim=0)
            taken = torch.cat([torch.zeros(1, k, dtype=torch.long), onehot.cumsum(dim=0)])
            for r in range(n + 1):
                if 0 < r < n and t_sorted[r - 1] == t_sorted[r]:
                    continue  # not separable here
                cnt = base - taken[r]
                cnt[j] = r
                key = _distance_key(cnt, counts)
                if key < best and (improved is None or key < improved[0]):
                    if r == 0:
                        value = t_sorted[0] - 1.0
                    elif r == n:
                        value = t_sorted[-1] + 1.0
                    else:
                        value = 0.5 * (t_sorted[r - 1] + t_sorted[r])
                    improved = (key, j, value)
        if improved is None:
            break
        trial = b.clone()
        trial[improved[1]] = improved[2]
        key = _distance_key(_counts_of(L, trial), counts)
        if not key < best:  # float rounding or lowest-index tie-breaks: stop rather than loop
            break
        b, best = trial, key
    return b - b.mean()


def _binary_offsets(L: torch.Tensor, c1: int) -> torch.Tensor:
    """k = 2: threshold between sorted margins, for the reachable class-1 count closest to c1."""
    import torch

    margins = L[:, 1] - L[:, 0]
    values = sorted(set(margins.tolist()), reverse=True)  # distinct margins, largest first
    # Threshold below values[m-1] and above values[m] puts the items with margin >= values[m-1]
    # in class 1; the reachable class-1 counts are 0 and those cumulative counts.
    reach = [0]
    for v in values:
        reach.append(int((margins >= v).sum()))
    m = min(range(len(reach)), key=lambda idx: (abs(reach[idx] - c1), reach[idx]))
    if m == 0:
        t = values[0] + 1.0
    elif m == len(values):
        t = values[-1] - 1.0
    else:
        t = 0.5 * (values[m - 1] + values[m])
        if not values[m] < t < values[m - 1]:  # adjacent floats: no midpoint
            t = values[m]
    offsets = torch.tensor([0.0, -t], dtype=torch.float64)
    offsets = offsets - offsets.mean()
    return offsets


def calibrated_predictions(loglik: torch.Tensor, target: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """``argmax_j (loglik[i, j] + b[j])`` with ``b =`` :func:`prior_offsets` (ties: lowest index).

    Returns:
        An (n,) long tensor of predicted class indices.
    """
    L = _check_loglik(loglik)
    return (L + prior_offsets(L, target)).argmax(dim=1)


# --------------------------------------------------------------------------------------
# Label-free statistics
# --------------------------------------------------------------------------------------


def predicted_distribution(loglik: torch.Tensor) -> torch.Tensor:
    """Shares of the plain predictions: ``p_j = |{i : argmax_l L[i, l] = j}| / n`` (ties: lowest index).

    Returns:
        A (k,) float64 tensor summing to 1.
    """
    L = _check_loglik(loglik)
    n, k = L.shape
    return _counts_of(L, L.new_zeros(k)).double() / n


def total_variation(p: torch.Tensor | Sequence[float], q: torch.Tensor | Sequence[float]) -> float:
    """Total-variation distance ``TV(p, q) = 1/2 sum_j |p_j - q_j|`` (in [0, 1]) of two distributions."""
    import torch

    p = torch.as_tensor(p, dtype=torch.float64)
    if p.dim() != 1 or p.numel() < 2:
        raise ValueError(f"p must be a vector of at least 2 class shares, got shape {tuple(p.shape)}")
    p = _check_distribution(p, p.numel(), "p")
    q = _check_distribution(q, p.numel(), "q")
    return 0.5 * float((p - q).abs().sum())


def mean_choice_entropy(loglik: torch.Tensor) -> float:
    """Mean entropy (nats) of the normalised choice probabilities.

    ``H = 1/n sum_i -sum_j p_ij log p_ij`` with ``p_ij = exp(L[i, j]) / sum_l exp(L[i, l])``: 0
    when every item is answered with certainty, ``log k`` when every item is a coin toss.
    """
    import torch

    L = _check_loglik(loglik)
    logp = torch.log_softmax(L, dim=1)
    return float(-(logp.exp() * logp).sum(dim=1).mean())


def binary_auc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]) -> float:
    """ROC AUC of ``scores`` for the positive class (label 1) against label 0, ties counted 1/2.

    ``AUC = (1 / (n_1 n_0)) sum_{i: y_i=1} sum_{l: y_l=0} ([s_i > s_l] + 1/2 [s_i = s_l])``, the
    Mann-Whitney statistic: the probability that a random positive outscores a random negative.
    For a two-choice task the natural score is the choice margin ``L[i, 1] - L[i, 0]``; it does
    not change under additive offsets, so it measures ranking, not the answer prior.

    Raises:
        ValueError: shapes differ, non-finite scores, labels other than 0/1, or only one class.
    """
    import torch

    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"scores must be a vector of at least 2 values, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores hold a NaN or infinite value: AUC is undefined")
    y = _check_labels(labels, s.numel(), 2)
    pos, neg = s[y == 1], s[y == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("AUC is undefined when all labels are the same class")
    # Average ranks (ties get the mean rank), then the Mann-Whitney U of the positives.
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    i = 0
    values = sorted_s.tolist()
    n = len(values)
    while i < n:
        j = i
        while j + 1 < n and values[j + 1] == values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n1, n0 = pos.numel(), neg.numel()
    u = float(ranks[y == 1].sum()) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def calibrated_accuracy(
    loglik: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    target: torch.Tensor | Sequence[float] | None = None,
) -> float:
    """Accuracy of :func:`calibrated_predictions` (the labels are read only to score, never to calibrate)."""
    L = _check_loglik(loglik)
    y = _check_labels(labels, L.shape[0], L.shape[1])
    return float((calibrated_predictions(L, target) == y).double().mean())


def _split_items(items: Sequence[tuple[int, Sequence[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if len(items) == 0:
        raise ValueError("no items")
    golds, lls = zip(*items)
    k = {len(row) for row in lls}
    if len(k) != 1:
        raise ValueError(f"items have different numbers of choices: {sorted(k)}")
    return torch.tensor([int(g) for g in golds], dtype=torch.long), torch.tensor(lls, dtype=torch.float64)


def calibrated_accuracy_of_items(
    items: Sequence[tuple[int, Sequence[float]]], target: torch.Tensor | Sequence[float] | None = None
) -> float:
    """:func:`calibrated_accuracy` over ``(gold, choice log-likelihoods)`` pairs (lm-eval's per-item values).

    Calibration uses every item's log-likelihoods; an item whose gold index is outside
    ``[0, k)`` (lm-eval marks a bad label with -100) is calibrated but scored wrong, as lm-eval's
    ``acc`` scores it.
    """
    golds, L = _split_items(items)
    pred = calibrated_predictions(L, target)
    return float((pred == golds).double().mean())


def binary_auc_of_items(items: Sequence[tuple[int, Sequence[float]]]) -> float:
    """:func:`binary_auc` of the margin ``L[i, 1] - L[i, 0]`` over ``(gold, [ll_0, ll_1])`` pairs.

    Items whose gold index is not 0 or 1 are left out.
    """
    golds, L = _split_items(items)
    if L.shape[1] != 2:
        raise ValueError(f"AUC needs two choices per item, got {L.shape[1]}")
    keep = (golds == 0) | (golds == 1)
    return binary_auc(L[keep, 1] - L[keep, 0], golds[keep])


# --------------------------------------------------------------------------------------
# Label-free rules to pick a point (e.g. the merge coefficient t) of a sweep
# --------------------------------------------------------------------------------------


def _first_best(scores: list[float], higher: bool) -> int:
    sign = -1.0 if higher else 1.0
    return min(range(len(scores)), key=lambda i: (sign * scores[i], i))


def least_prior_shift(
    logliks: Sequence[torch.Tensor], reference: torch.Tensor | Sequence[float] | None = None
) -> tuple[int, list[float]]:
    """Pick the point whose plain predictions shift the answer prior least.

    ``score_t = TV(predicted_distribution(L_t), r)`` with ``r`` the reference distribution
    (uniform, or e.g. the task adapter's predicted shares on source-language inputs); the point
    with the smallest score wins (ties: the first). Reads no labels.

    Returns:
        ``(index of the chosen point, scores)``.
    """
    if not logliks:
        raise ValueError("least_prior_shift needs at least one point")
    scores = []
    for L in logliks:
        L = _check_loglik(L)
        k = L.shape[1]
        ref = [1.0 / k] * k if reference is None else reference
        scores.append(total_variation(predicted_distribution(L), ref))
    return _first_best(scores, higher=False), scores


def calibrated_confidence(
    logliks: Sequence[torch.Tensor], target: torch.Tensor | Sequence[float] | None = None
) -> tuple[int, list[float]]:
    """Pick the point that is most confident after calibration.

    ``score_t = 1/n sum_i max_j softmax_j(L_t[i] + b_t)`` with ``b_t =`` :func:`prior_offsets`
    ``(L_t, target)``: the mean probability of the calibrated prediction. Calibration first
    removes the answer prior, so the score rewards a model that separates the items rather than
    one that prefers one answer everywhere. Highest wins (ties: the first). Reads no labels.

    Returns:
        ``(index of the chosen point, scores)``.
    """
    import torch

    if not logliks:
        raise ValueError("calibrated_confidence needs at least one point")
    scores = []
    for L in logliks:
        L = _check_loglik(L)
        probs = torch.softmax(L + prior_offsets(L, target), dim=1)
        scores.append(float(probs.max(dim=1).values.mean()))
    return _first_best(scores, higher=True), scores


def agreement_with_source(
    logliks: Sequence[torch.Tensor],
    source_predictions: torch.Tensor | Sequence[int],
    target: torch.Tensor | Sequence[float] | None = None,
) -> tuple[int, list[float]]:
    """Pick the point whose calibrated predictions on target-language inputs agree most with the source.

    For parallel data (item ``i`` in the target language is a translation of source item ``i``):
    ``score_t = 1/n sum_i [calibrated_predictions(L_t)[i] = s_i]`` with ``s`` the task adapter's
    predictions on the source-language inputs. Highest wins (ties: the first). Reads no labels.

    Returns:
        ``(index of the chosen point, scores)``.
    """
    if not logliks:
        raise ValueError("agreement_with_source needs at least one point")
    scores = []
    for L in logliks:
        L = _check_loglik(L)
        s = _check_labels(source_predictions, L.shape[0], L.shape[1])
        scores.append(float((calibrated_predictions(L, target) == s).double().mean()))
    return _first_best(scores, higher=True), scores
