"""The pure merge formulas against float64 closed forms computed here, independently."""

from __future__ import annotations

import pytest
import torch

from adamergex_peft import merge_utils as mu
from adamergex_peft.errors import AdaMergeXError


def rand(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("t", [1.0, 0.3, -0.7, 2.5])
def test_lora_stack_is_exact_weighted_sum(t):
    out_f, in_f = 24, 17
    ranks, scales = (4, 2, 7), (2.0, 1.5 / 2**0.5, 0.75)  # different ranks and scalings (one rsLoRA-like)
    factors = [(rand(r, in_f, seed=i), rand(out_f, r, seed=10 + i), s) for i, (r, s) in enumerate(zip(ranks, scales))]
    weights = (1.0, t, -t)
    a, b = mu.lora_stack(factors, weights)
    assert a.shape == (sum(ranks), in_f) and b.shape == (out_f, sum(ranks))
    ref = sum(w * s * (bb.double() @ aa.double()) for (aa, bb, s), w in zip(factors, weights))
    assert rel_err(b @ a, ref) < 1e-6


def test_lora_svd_matches_float64_truncated_svd():
    a, b = rand(9, 20, seed=1), rand(16, 9, seed=2)
    dense = b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dense)
    for rank in (1, 3, 5):
        a2, b2, kept = mu.lora_svd(a, b, rank)
        assert a2.shape == (rank, 20) and b2.shape == (16, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert rel_err(b2 @ a2, best) < 1e-5
        assert kept == pytest.approx(float((s[:rank] ** 2).sum() / (s**2).sum()), rel=1e-5)
        assert kept < 1.0


def test_lora_svd_is_exact_when_rank_suffices_and_pads():
    a, b = rand(3, 12, seed=3), rand(10, 3, seed=4)
    a2, b2, kept = mu.lora_svd(a, b, 8)  # more than the true rank 3: padded with zeros to rank 8
    assert a2.shape == (8, 12) and b2.shape == (10, 8)
    assert rel_err(b2 @ a2, b.double() @ a.double()) < 1e-5
    assert kept == pytest.approx(1.0)
    assert torch.count_nonzero(a2[3:]) == 0


def test_lora_svd_of_zero_update():
    a2, b2, kept = mu.lora_svd(torch.zeros(2, 5), torch.zeros(4, 2), 2)
    assert kept == 1.0 and torch.count_nonzero(b2 @ a2) == 0


def test_linear_combination():
    x = [rand(3, 4, seed=i) for i in range(3)]
    out = mu.linear_combination(x, [1.0, 0.4, -0.4])
    ref = x[0].double() + 0.4 * (x[1].double() - x[2].double())
    assert rel_err(out, ref) < 1e-7


def test_arimerge_lora_formula():
    (at, bt), (ag, bg), (as_, bs) = [(rand(4, 6, seed=i), rand(5, 4, seed=9 + i)) for i in range(3)]
    a, b = mu.arimerge_lora((at, bt), (ag, bg), (as_, bs), 0.3, 0.7)
    assert rel_err(a, 0.3 * at.double() + 0.7 * (ag.double() + as_.double())) < 1e-7
    assert rel_err(b, 0.3 * bt.double() + 0.7 * (bg.double() - bs.double())) < 1e-7


def positive(*shape, seed):
    return 0.5 + rand(*shape, seed=seed).abs()


@pytest.mark.parametrize("shape", [(1, 11), (7, 1)])  # feed-forward (1, in) and attention (out, 1) vectors
@pytest.mark.parametrize("t", [1.0, 0.5, -1.5])
def test_ia3_linear_and_power(shape, t):
    lt, lg, ls = (positive(*shape, seed=i) for i in range(3))
    ref_linear = lt.double() * (t * (lg.double() / ls.double() - 1) + 1)
    ref_power = lt.double() * (lg.double() / ls.double()) ** t
    assert rel_err(mu.multiplicative_linear(lt, lg, ls, t), ref_linear) < 1e-6
    assert rel_err(mu.multiplicative_power(lt, lg, ls, t), ref_power) < 1e-6
    # without a source reference (task_plus_target): l_Rs = 1
    assert rel_err(mu.multiplicative_linear(lt, lg, None, t), lt.double() * (t * (lg.double() - 1) + 1)) < 1e-6
    assert rel_err(mu.multiplicative_power(lt, lg, None, t), lt.double() * lg.double() ** t) < 1e-6


def test_ia3_linear_t1_is_ratio_and_t0_is_task():
    lt, lg, ls = (positive(1, 9, seed=i) for i in range(3))
    assert rel_err(mu.multiplicative_linear(lt, lg, ls, 1.0), lt.double() * lg.double() / ls.double()) < 1e-6
    assert torch.equal(mu.multiplicative_linear(lt, lg, ls, 0.0), lt)


@pytest.mark.parametrize("fn", [mu.multiplicative_linear, mu.multiplicative_power])
@pytest.mark.parametrize("bad", [0.0, 1e-9, -0.5])
def test_ia3_bad_denominator_is_an_error(fn, bad):
    lt, lg, ls = (positive(1, 9, seed=i) for i in range(3))
    ls[0, 4] = bad
    with pytest.raises(AdaMergeXError, match="denominator"):
        fn(lt, lg, ls, 0.5)


def test_ia3_power_non_positive_ratio_is_an_error():
    lt, lg, ls = (positive(6, 1, seed=i) for i in range(3))
    lg[2, 0] = -0.1
    with pytest.raises(AdaMergeXError, match="ratio"):
        mu.multiplicative_power(lt, lg, ls, 0.5)
    # the linear form is defined there
    assert torch.isfinite(mu.multiplicative_linear(lt, lg, ls, 0.5)).all()


def test_arimerge_ia3_formula():
    lt, lg, ls = (positive(1, 5, seed=i) for i in range(3))
    out = mu.arimerge_ia3(lt, lg, ls, 0.4, 0.6)
    assert rel_err(out, (1 - 0.4) + 0.4 * lt.double() + 0.6 * (lg.double() - ls.double())) < 1e-7


def test_cross_lora_is_elementwise_multiplicative():
    at, ag, as_ = (positive(3, 5, seed=i) for i in range(3))
    bt, bg, bs = (positive(4, 3, seed=10 + i) for i in range(3))
    a, b = mu.elementwise_multiplicative_factors((at, bt), (ag, bg), (as_, bs), 0.8)
    assert rel_err(a, at.double() * (0.8 * (ag.double() / as_.double() - 1) + 1)) < 1e-6
    assert rel_err(b, bt.double() * (0.8 * (bg.double() / bs.double() - 1) + 1)) < 1e-6
    as_[1, 1] = 0.0
    with pytest.raises(AdaMergeXError, match="zeros"):
        mu.elementwise_multiplicative_factors((at, bt), (ag, bg), (as_, bs), 0.8)


def test_lora_scaling():
    assert mu.lora_scaling(16, 8, False) == 2.0
    assert mu.lora_scaling(16, 4, True) == 8.0


def test_lora_stack_pads_and_rounds_once_into_the_output_dtype():
    factors = [
        (rand(3, 10, seed=1).bfloat16(), rand(6, 3, seed=2).bfloat16(), 0.7),
        (rand(2, 10, seed=3), rand(6, 2, seed=4), 1.3),
    ]
    a, b = mu.lora_stack(factors, [1.0, -0.4], rank=8, dtype=torch.bfloat16)
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == (8, 10) and b.shape == (6, 8)
    assert torch.equal(a[:3], (factors[0][0].float() * 0.7).bfloat16())  # one rounding of the float32 product
    assert torch.equal(a[3:5], (factors[1][0] * (-0.4 * 1.3)).bfloat16())
    assert torch.count_nonzero(a[5:]) == 0 and torch.count_nonzero(b[:, 5:]) == 0
    with pytest.raises(ValueError, match="smaller than the stacked rank"):
        mu.lora_stack(factors, [1.0, 1.0], rank=4)


def test_finite_check_is_exact():
    from adamergex_peft.merge import _all_finite

    x = rand(4, 5, seed=0)
    assert _all_finite(x) and _all_finite(torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not _all_finite(y) and not _all_finite(y.bfloat16())
