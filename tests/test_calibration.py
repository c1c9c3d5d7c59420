"""Tests of adamergex_peft.calibration against brute force on small cases.

The oracle enumerates every assignment of n items to k classes (k**n), decides with a linear
program (scipy's HiGHS, independent of the module's graph algorithms) whether some offsets make
it the strict argmax of every item, and from those finds the best reachable count vector and the
largest total log-likelihood with the target counts.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.optimize import linprog  # the LP oracle: which assignments offsets can reach

from adamergex_peft import calibration as cal


def realizable(L: torch.Tensor, assign: tuple[int, ...]) -> bool:
    """Is there b with L[i, a_i] + b[a_i] > L[i, j] + b[j] for all i, j != a_i? (LP: max margin > 0)."""
    n, k = L.shape
    # variables: b_0..b_{k-1}, delta ; maximise delta s.t. b_j - b_a + delta <= L[i,a] - L[i,j], delta <= 1
    rows, rhs = [], []
    for i, a in enumerate(assign):
        for j in range(k):
            if j == a:
                continue
            row = [0.0] * (k + 1)
            row[j] += 1.0
            row[a] -= 1.0
            row[k] = 1.0
            rows.append(row)
            rhs.append(float(L[i, a] - L[i, j]))
    bounds = [(None, None)] * k + [(None, 1.0)]
    res = linprog([0.0] * k + [-1.0], A_ub=rows, b_ub=rhs, bounds=bounds, method="highs")
    assert res.status == 0
    return -res.fun > 1e-9


def brute_force(L: torch.Tensor, counts: list[int]):
    """Best L1 distance of a reachable count vector to counts, the set of count vectors attaining it,
    and the largest total log-likelihood over all assignments with exactly ``counts``."""
    n, k = L.shape
    best_ll = -math.inf
    by_distance: dict[int, list[tuple[int, ...]]] = {}
    for assign in itertools.product(range(k), repeat=n):
        cnt = [assign.count(j) for j in range(k)]
        if cnt == counts:
            best_ll = max(best_ll, sum(float(L[i, a]) for i, a in enumerate(assign)))
        by_distance.setdefault(sum(abs(x - y) for x, y in zip(cnt, counts)), []).append(assign)
    for d in sorted(by_distance):  # the LP only for the nearest distances
        vectors = {tuple(a.count(j) for j in range(k)) for a in by_distance[d] if realizable(L, a)}
        if vectors:
            return d, vectors, best_ll
    raise AssertionError("some assignment is always reachable")


def counts_of(L: torch.Tensor, offsets: torch.Tensor) -> list[int]:
    pred = (L.double() + offsets).argmax(dim=1)
    return torch.bincount(pred, minlength=L.shape[1]).tolist()


def check_against_brute_force(L: torch.Tensor, target=None) -> None:
    n, k = L.shape
    counts = cal.target_counts(n, k, target).tolist()
    offsets = cal.prior_offsets(L, target)
    got = counts_of(L, offsets)
    best_d, best_vectors, best_ll = brute_force(L.double(), counts)
    assert sum(abs(x - y) for x, y in zip(got, counts)) == best_d, (L.tolist(), got, counts, best_vectors)
    assert tuple(got) in best_vectors
    # Equally close: the vector with most items in the lowest classes (lexicographically largest).
    assert tuple(got) == max(best_vectors)
    pred = cal.calibrated_predictions(L, target)
    assert torch.equal(pred, (L.double() + offsets).argmax(dim=1))
    if best_d == 0:
        total = float(L.double().gather(1, pred[:, None]).sum())
        assert total == pytest.approx(best_ll, abs=1e-9)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", range(4))
def test_random_continuous_cases_reach_target_with_max_loglik(k, seed):
    gen = torch.Generator().manual_seed(100 * k + seed)
    n = {2: 7, 3: 6, 4: 5, 5: 4}[k]
    # A strong prior towards class 0 so that the plain argmax is far from uniform.
    L = torch.randn(n, k, generator=gen, dtype=torch.float64)
    L[:, 0] += 1.5
    check_against_brute_force(L)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_integer_scores_with_many_ties(k, seed):
    gen = torch.Generator().manual_seed(7 * k + seed)
    n = {2: 7, 3: 6, 4: 5}[k]
    L = torch.randint(0, 3, (n, k), generator=gen).double()
    check_against_brute_force(L)


@pytest.mark.parametrize(
    "target",
    [[0.7, 0.3], [0.5, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 0.0]],
)
def test_non_uniform_targets(target):
    k = len(target)
    gen = torch.Generator().manual_seed(k)
    L = torch.randn({2: 7, 3: 6, 4: 5}[k], k, generator=gen, dtype=torch.float64)
    check_against_brute_force(L, target)


def test_target_counts_largest_remainder():
    assert cal.target_counts(7, 3).tolist() == [3, 2, 2]
    assert cal.target_counts(2, 5).tolist() == [1, 1, 0, 0, 0]  # n < k: lowest indices first
    # quotas 2.1, 2.45, 2.45 -> floors 2,2,2, one left: largest remainder, ties to the lowest index
    assert cal.target_counts(7, 3, [0.3, 0.35, 0.35]).tolist() == [2, 3, 2]
    assert cal.target_counts(10, 2, [0.25, 0.75]).tolist() == [3, 7]  # 2.5 / 7.5: tie -> class 0
    assert cal.target_counts(1, 2).tolist() == [1, 0]


def test_binary_threshold_is_between_sorted_margins():
    # margins 3, 1, -1, -2 (class 1 minus class 0): uniform -> the two largest margins go to class 1
    L = torch.tensor([[0.0, 3.0], [0.0, -2.0], [1.0, 2.0], [0.5, -0.5]])
    off = cal.prior_offsets(L)
    assert cal.calibrated_predictions(L).tolist() == [1, 0, 1, 0]
    t = float(off[0] - off[1])  # class 1 iff margin > t
    assert -1.0 < t < 1.0 and t == pytest.approx(0.0)


def test_binary_ties_give_closest_reachable_count():
    # margins 1, 1, 1, 0: class 1 can hold 0, 3 or 4 items; target 2 -> 3 is closest (distance 1 < 2)
    L = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    assert cal.calibrated_predictions(L).tolist() == [1, 1, 1, 0]
    # margins 1, 1, 0, 0: class 1 can hold 0, 2 or 4 items; target [0.75, 0.25] wants 1: 0 and 2 are
    # equally close -> the smaller (more items in class 0)
    L = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert cal.calibrated_predictions(L, [0.75, 0.25]).tolist() == [0, 0, 0, 0]


def test_one_item():
    L = torch.tensor([[0.0, 5.0, 1.0]])
    assert cal.calibrated_predictions(L).tolist() == [0]
    assert cal.calibrated_predictions(L, [0.0, 0.0, 1.0]).tolist() == [2]
    assert cal.calibrated_predictions(torch.tensor([[3.0, 0.0]]), [0.2, 0.8]).tolist() == [1]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_all_rows_equal_go_to_the_largest_target_class(k):
    L = torch.full((6, k), -1.25)
    assert cal.calibrated_predictions(L).tolist() == [0] * 6
    target = [0.1] * k
    target[-1] = 1.0 - 0.1 * (k - 1)
    assert cal.calibrated_predictions(L, target).tolist() == [k - 1] * 6
    # identical up to a constant per row: the same (rows are equivalent for argmax(L + b))
    L2 = torch.tensor([[0.0, 1.0, 2.0]] * 4) + torch.arange(4.0)[:, None]
    assert cal.calibrated_predictions(L2).tolist() == [0] * 4


def test_n_smaller_than_k():
    L = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    pred = cal.calibrated_predictions(L)
    assert sorted(pred.tolist()) == [0, 1]  # counts [1, 1, 0, 0]
    check_against_brute_force(L)


def test_larger_problem_reaches_uniform_and_is_optimal_locally():
    gen = torch.Generator().manual_seed(3)
    L = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    L[:, 2] += 3.0  # strong prior for class 2
    pred = cal.calibrated_predictions(L)
    assert torch.bincount(pred, minlength=4).tolist() == [75, 75, 75, 75]
    # Optimality: no pairwise swap of two items between two classes raises the total log-likelihood.
    gain = L[:, None, :] - L.gather(1, pred[:, None])[:, :, None]  # gain[i, 0, j]: move i to j
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            best_ab = gain[pred == a, 0, b].max()
            best_ba = gain[pred == b, 0, a].max()
            assert float(best_ab + best_ba) <= 1e-9


def test_offsets_are_invariant_to_a_per_item_constant():
    gen = torch.Generator().manual_seed(5)
    L = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    shifted = L + 10.0 * torch.randn(40, 1, generator=gen, dtype=torch.float64)
    assert torch.equal(cal.calibrated_predictions(L), cal.calibrated_predictions(shifted))


@pytest.mark.parametrize(
    ("loglik", "target", "message"),
    [
        (torch.zeros(3), None, "must be an \\(n, k\\) tensor"),
        (torch.zeros(0, 3), None, "no items"),
        (torch.zeros(3, 1), None, "at least 2 choices"),
        (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), None, "NaN or infinite value \\(first at item 0\\)"),
        (torch.tensor([[0.0, 1.0], [0.0, float("-inf")]]), None, "first at item 1"),
        (torch.zeros(3, 2), [0.5, 0.6], "must sum to 1"),
        (torch.zeros(3, 2), [1.5, -0.5], "non-negative"),
        (torch.zeros(3, 2), [0.2, 0.3, 0.5], "vector of 2 class shares"),
    ],
)
def test_bad_inputs_raise_clear_errors(loglik, target, message):
    with pytest.raises(ValueError, match=message):
        cal.prior_offsets(loglik, target)


def test_input_is_not_modified():
    L = torch.tensor([[0.0, 2.0], [1.0, 0.5], [0.3, 0.2]], dtype=torch.float32)
    before = L.clone()
    cal.calibrated_predictions(L)
    assert torch.equal(L, before) and L.dtype == torch.float32


# ------------------------------------------------------------------------- statistics


def test_predicted_distribution_ties_to_lowest_index():
    L = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert cal.predicted_distribution(L).tolist() == [0.5, 0.25, 0.25]


def test_total_variation():
    assert cal.total_variation([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.5)
    assert cal.total_variation([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    with pytest.raises(ValueError, match="q must be a vector of 2"):
        cal.total_variation([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="must sum to 1"):
        cal.total_variation([0.5, 0.6], [0.5, 0.5])


def test_mean_choice_entropy_closed_form():
    L = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)  # probs (1/2, 1/2) and (3/4, 1/4)
    h1 = math.log(2.0)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert cal.mean_choice_entropy(L) == pytest.approx((h1 + h2) / 2, abs=1e-12)
    assert cal.mean_choice_entropy(torch.zeros(4, 5)) == pytest.approx(math.log(5.0))


def _auc_brute(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    total = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_against_pair_count(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (13,), generator=gen).double()  # many ties
    labels = torch.arange(13) % 2
    assert cal.binary_auc(scores, labels) == pytest.approx(_auc_brute(scores.tolist(), labels.tolist()), abs=1e-12)


def test_binary_auc_known_values_and_errors():
    assert cal.binary_auc([0.1, 0.9], [0, 1]) == 1.0
    assert cal.binary_auc([0.9, 0.1], [0, 1]) == 0.0
    assert cal.binary_auc([0.5, 0.5], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="all labels are the same class"):
        cal.binary_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels must lie in"):
        cal.binary_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        cal.binary_auc([0.1, float("nan")], [0, 1])


def test_calibrated_accuracy_recovers_a_shifted_prior():
    # A model that ranks perfectly but prefers class 1 everywhere: plain accuracy 1/2, calibrated 1.
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    margin = torch.tensor([1.0, 3.0, 1.5, 4.0, 0.5, 2.0])  # positives have larger margins
    L = torch.stack([torch.zeros(6), margin], dim=1)
    assert float((L.argmax(1) == labels).double().mean()) == 0.5
    assert cal.calibrated_accuracy(L, labels) == 1.0
    assert cal.binary_auc(margin, labels) == 1.0


# ------------------------------------------------------------------------- label-free rules


def test_least_prior_shift_picks_the_smallest_total_variation():
    balanced = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    skewed = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    idx, scores = cal.least_prior_shift([skewed, balanced, balanced])
    assert idx == 1 and scores == pytest.approx([0.25, 0.0, 0.0])
    idx, _ = cal.least_prior_shift([skewed, balanced], reference=[0.25, 0.75])
    assert idx == 0


def test_calibrated_confidence_closed_form():
    sharp = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    flat = torch.tensor([[0.0, 0.1], [0.1, 0.0]])
    idx, scores = cal.calibrated_confidence([flat, sharp])
    assert idx == 1
    # offsets are 0 (already balanced and symmetric): mean max-probability = sigmoid(margin)
    assert scores[1] == pytest.approx(1 / (1 + math.exp(-5.0)))
    assert scores[0] == pytest.approx(1 / (1 + math.exp(-0.1)))


def test_agreement_with_source():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    idx, scores = cal.agreement_with_source([b, a], source_predictions=[1, 0, 1, 0])
    assert idx == 1 and scores == [0.5, 1.0]


def test_rules_need_points():
    for rule in (cal.least_prior_shift, cal.calibrated_confidence):
        with pytest.raises(ValueError, match="at least one point"):
            rule([])


def test_tie_search_budget_exhausted_falls_back_to_local_search(monkeypatch, caplog):
    gen = torch.Generator().manual_seed(11)
    L = torch.randint(0, 3, (60, 3), generator=gen).double()
    counts = cal.target_counts(60, 3)
    dual, _ = cal._separating_offsets(L, cal._optimal_assignment(L, counts.clone()))
    monkeypatch.setattr(cal, "_MAX_TIE_CANDIDATES", 1)
    with caplog.at_level("WARNING", logger="adamergex_peft.calibration"):
        offsets = cal.prior_offsets(L)
    assert "not reachable" in caplog.text
    got = torch.tensor(counts_of(L, offsets))
    assert int((got - counts).abs().sum()) <= int((torch.tensor(counts_of(L, dual)) - counts).abs().sum())
    # no single offset move improves further (the local search stopped at a local optimum)
    for j in range(3):
        for value in torch.linspace(-5, 5, 201).tolist():
            trial = offsets.clone()
            trial[j] = value
            moved = torch.tensor(counts_of(L, trial))
            assert int((moved - counts).abs().sum()) >= int((got - counts).abs().sum())
