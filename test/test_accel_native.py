"""The fused CPU kernels agree with their eager PyTorch twins, and their absence only costs speed."""
from __future__ import annotations

import logging

import pytest
import torch

from spark3r.accel import TokenLayout, build_op, native
from spark3r.accel.common import Workspace
from spark3r.accel.schedule import KVSchedule
from spark3r.accel.spark3r import merge_queries

LAYOUTS = [
    TokenLayout(4, 40, 5, (5, 7), 1, layer=0, num_layers=2),        # odd grid, reference in the middle
    TokenLayout(3, 1 + 6 * 8, 1, (6, 8), None, layer=0, num_layers=2),  # reference-free
]


@pytest.fixture
def kernels(native_kernel):
    return native_kernel("pair_merge")


@pytest.mark.parametrize("dim", [16, 24])  # 24: a head size that is not a multiple of the kernel's lanes
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pair_merge_kernel_matches_the_eager_merge(kernels, layout, dim):
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 3, layout.num_tokens, dim, generator=g)
    assert native.pair_merge_usable(q)
    fused_q, fused_rows = merge_queries(q, layout, (2, 2), 2, Workspace())
    eager_q, eager_rows = merge_queries(q, layout, (2, 2), 2, None)  # no workspace: eager path
    assert torch.equal(fused_rows, eager_rows)
    torch.testing.assert_close(fused_q, eager_q, rtol=1e-6, atol=1e-6)
    assert list(kernels.glob("pair_merge-*.so"))


def test_kernel_reads_queries_from_strided_views(kernels):
    layout = LAYOUTS[0]
    q = torch.randn(1, layout.num_tokens, 3, 16).permute(0, 2, 1, 3)  # [B, H, N, d] over [B, N, H, d]
    fused_q, fused_rows = merge_queries(q, layout, (2, 2), 2, Workspace())
    eager_q, eager_rows = merge_queries(q.contiguous(), layout, (2, 2), 2, None)
    assert torch.equal(fused_rows, eager_rows)
    torch.testing.assert_close(fused_q, eager_q, rtol=1e-6, atol=1e-6)


def test_without_a_compiler_the_op_falls_back_to_eager_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SPARK3R_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native, "_libraries", {})
    layout = LAYOUTS[0]
    q, k, v = (torch.randn(1, 3, layout.num_tokens, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.pair_merge_usable(q)
    assert "eager PyTorch path" in caplog.text
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))
    with torch.no_grad():
        fallback = op(q, k, v, layout).clone()
    monkeypatch.setenv("SPARK3R_NATIVE", "0")  # switched off explicitly: same numbers
    monkeypatch.setattr(native, "_libraries", {})
    with torch.no_grad():
        torch.testing.assert_close(op(q, k, v, layout), fallback)
