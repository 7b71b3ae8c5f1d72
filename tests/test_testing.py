"""The comparison helpers of ``tspline_kernels/testing.py``."""

import pytest
import torch

from tspline_kernels.testing import assert_close


def test_assert_close_refuses_a_non_finite_expected_tensor():
    """An inf or NaN in the reference would make every bound inf/NaN and let anything pass."""
    expected = torch.tensor([1.0, float("inf")])
    with pytest.raises(AssertionError, match="non-finite values in the expected tensor"):
        assert_close(torch.tensor([1.0, 2.0]), expected)
    with pytest.raises(AssertionError, match="non-finite values in the expected tensor"):
        assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]))


def test_assert_close_bounds():
    e = torch.randn(50, dtype=torch.float64)
    assert_close(e.float(), e, torch.float32)
    with pytest.raises(AssertionError, match="relative RMS error"):
        assert_close((e + 1e-2).float(), e, torch.float32)
    with pytest.raises(AssertionError, match="non-finite values in result"):
        assert_close(torch.full((50,), float("nan")), e, torch.float32)
