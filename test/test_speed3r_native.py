"""Speed3R's fused CPU kernel (``native/block_attention.c``) agrees with its eager twin (the
spec): training-free op and learned selection branch, including edge windows, anchors, special
tokens, the reference frame, batches, strided inputs and the selects-everything case."""
from __future__ import annotations

import pytest
import torch

from spark3r.accel import native
from spark3r.accel.common import Workspace
from spark3r.accel.speed3r import Speed3RConfig, Speed3ROp, block_table, fused_block_sparse_attention, training_free_attention
from spark3r.models.layers.layout import TokenLayout
from spark3r.models.layers.sparse_attention import block_sparse_attention


@pytest.fixture
def kernels(native_kernel):
    return native_kernel("block_attention")


def eager(monkeypatch, fn):
    """``fn()`` with the kernels switched off (``SPARK3R_NATIVE=0``), then switched back on."""
    libraries = dict(native._libraries)
    monkeypatch.setenv("SPARK3R_NATIVE", "0")
    monkeypatch.setattr(native, "_libraries", {})
    try:
        return fn()
    finally:
        monkeypatch.setenv("SPARK3R_NATIVE", "1")
        monkeypatch.setattr(native, "_libraries", libraries)


def assert_agree(fused, reference):
    # fp32 rounding only: a different summation order, and exp2 by a polynomial.
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def qkv(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


CASES = [
    # layout, block_size, top_k, anchor_every
    (TokenLayout(4, 5 + 5 * 7, 5, (5, 7), 1), (4, 4), 2, 0),      # edge windows smaller than the block, reference in the middle
    (TokenLayout(4, 5 + 5 * 7, 5, (5, 7), 1), (2, 2), 3, 2),      # anchors, 4-token blocks (partial key tiles)
    (TokenLayout(3, 64, 0, (8, 8), None), (4, 4), 3, 0),          # no special tokens, no reference: no always-selected keys
    (TokenLayout(3, 1 + 6 * 10, 1, (6, 10), 0), (3, 6), 2, 0),    # 18-token blocks: two query tiles, edge windows
    (TokenLayout(5, 2 + 4 * 4, 2, (4, 4), 0), (4, 4), 1, 1),      # every kept frame an anchor: no key blocks at all
]


@pytest.mark.parametrize("dim", [64, 16])  # 64: the unrolled head size; 16: the generic loop
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout,block,top_k,anchor_every", CASES)
def test_training_free_kernel_matches_the_eager_op(kernels, monkeypatch, layout, block, top_k, anchor_every, batch, dim):
    q, k, v = qkv(batch, 3, layout.num_tokens, dim, seed=top_k)
    config = Speed3RConfig(block, top_k, anchor_every)
    assert native.block_attention_usable(q, k, v)
    with torch.no_grad():
        fused = training_free_attention(q, k, v, layout, config, workspace=Workspace())
        reference = eager(monkeypatch, lambda: training_free_attention(q, k, v, layout, config, workspace=Workspace()))
    assert_agree(fused, reference)


def test_kernel_with_every_block_selected_is_dense(kernels):
    layout = TokenLayout(4, 5 + 5 * 7, 5, (5, 7), 1)
    q, k, v = qkv(2, 2, layout.num_tokens, 64, seed=3)
    blocks = block_table(layout, (4, 4), "cpu").key_blocks.numel()
    with torch.no_grad():  # the function itself: the op would short-circuit to dense attention
        out = training_free_attention(q, k, v, layout, Speed3RConfig((4, 4), blocks), workspace=Workspace())
    assert_agree(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_kernel_reads_strided_views_and_writes_any_output_strides(kernels, monkeypatch):
    layout = TokenLayout(3, 5 + 5 * 7, 5, (5, 7), 0)
    fused_qkv = torch.randn(2, layout.num_tokens, 3, 4, 64, generator=torch.Generator().manual_seed(5))
    q, k, v = fused_qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] views into [B, N, 3, H, d]
    op = Speed3ROp(Speed3RConfig((4, 4), 2))
    with torch.no_grad():
        fused = op(q, k, v, layout)
        reference = eager(monkeypatch, lambda: op(q.contiguous(), k.contiguous(), v.contiguous(), layout))
    assert_agree(fused, reference)


def test_kernel_takes_queries_whose_rows_are_not_unit_stride(kernels, monkeypatch):
    layout = TokenLayout(3, 5 + 5 * 7, 5, (5, 7), 0)
    q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in qkv(1, 2, layout.num_tokens, 64, seed=6))
    assert q.stride(-1) != 1
    config = Speed3RConfig((4, 4), 2)
    with torch.no_grad():
        fused = training_free_attention(q, k, v, layout, config, workspace=Workspace())
        reference = eager(monkeypatch, lambda: training_free_attention(q, k, v, layout, config, workspace=Workspace()))
    assert_agree(fused, reference)


@pytest.mark.parametrize("blocks,top_k", [(12, 4), (3, 5)])  # 3 < 5: the official padding repeats the last block
def test_learned_selection_kernel_matches_the_eager_branch(kernels, blocks, top_k):
    bt = 16
    q, k, v = qkv(2, 3, blocks * bt, 64, seed=blocks)
    g = torch.Generator().manual_seed(9)
    index = torch.rand(2, 3, blocks, blocks, generator=g).argsort(-1)[..., :min(top_k, blocks)]
    if top_k > blocks:
        index = torch.cat((index, index.new_full((2, 3, blocks, top_k - blocks), blocks - 1)), -1)
    with torch.no_grad():
        fused = block_sparse_attention(q, k, v, index, bt, scale=0.2, kernel=fused_block_sparse_attention)
        reference = block_sparse_attention(q, k, v, index, bt, scale=0.2)
    assert fused_block_sparse_attention(q, k, v, index, bt, 0.2) is not None  # the kernel ran
    assert_agree(fused, reference)


def test_autograd_and_other_dtypes_take_the_eager_path(kernels):
    layout = TokenLayout(3, 5 + 5 * 7, 5, (5, 7), 0)
    q, k, v = qkv(1, 2, layout.num_tokens, 64)
    assert not native.block_attention_usable(q.double(), k.double(), v.double())
    q.requires_grad_(True)
    assert not native.block_attention_usable(q, k, v)
    out = training_free_attention(q, k, v, layout, Speed3RConfig((4, 4), 2))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_switched_off_the_kernel_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARK3R_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("SPARK3R_NATIVE", "0")
    monkeypatch.setattr(native, "_libraries", {})
    q, k, v = qkv(1, 1, 16, 64)
    assert not native.block_attention_usable(q, k, v)
    assert not list(tmp_path.glob("block_attention-*.so"))


def test_learned_layers_of_pi3_speed3r_run_through_the_kernel(kernels, monkeypatch):
    from spark3r import accel
    from spark3r.models import load_pretrained

    model = load_pretrained("pi3-speed3r-tiny", "seeded")
    accel.apply(model, "speed3r")  # the op (which hands the kernel to the learned layer) in every global layer
    images = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    calls = []
    real = native.block_attention
    monkeypatch.setattr(native, "block_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with torch.inference_mode():
        fused = model(images, heads=("mid_hidden",))["mid_hidden"]
        assert calls
        reference = eager(monkeypatch, lambda: model(images, heads=("mid_hidden",))["mid_hidden"])
    assert_agree(fused, reference)
