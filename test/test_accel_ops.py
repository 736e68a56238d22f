"""The reduction ops on q/k/v: exactness at factor 1, protected tokens, unmerge, budgets,
compensation maths, and the uniform baseline's merge/unmerge."""
from __future__ import annotations

import math

import pytest
import torch

from spark3r.accel import TokenLayout, build_op
from spark3r.accel.common import (Workspace, attention_with_extra_keys, exact_attention, gather_rows,
                                  masked_attention_with_extra_keys, static_index)
from spark3r.accel.schedule import KVSchedule
from spark3r.accel.spark3r import (Spark3RConfig, kv_scores, merge_greedy, merge_queries, pair_choice, prune_kv,
                                   query_groups, spark3r_attention, spark3r_sizes)
from spark3r.accel.uniform import UniformConfig, partition, uniform_attention, uniform_sizes

# 4 frames, 5 special tokens, a 5x7 grid (odd on both sides: partial groups at the edges).
LAYOUT = TokenLayout(frames=4, tokens_per_frame=40, special_tokens=5, grid=(5, 7), reference_frame=1,
                     layer=0, num_layers=2)
H, D = 3, 16


def qkv(layout=LAYOUT, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, layout.num_tokens, D, generator=g) for _ in range(3)]


def no_pruning(layers=2):
    return KVSchedule(tuple([1.0] * layers))


def mean_query_scores(q, k, layout=LAYOUT):
    return kv_scores(torch.matmul(q.mean(2, keepdim=True), k.transpose(-1, -2)), k, layout, "query_mean")


def test_factor_one_is_bitwise_dense():
    q, k, v = qkv()
    ref = exact_attention(q, k, v)
    dense = build_op("dense", 2)(q, k, v, LAYOUT)
    uniform = build_op("uniform", 2, ratio=0.0)(q, k, v, LAYOUT)
    spark = build_op("spark3r", 2, query_keep=4, schedule=no_pruning())(q, k, v, LAYOUT)
    for out in (dense, uniform, spark):
        assert torch.equal(out, ref)


def test_protected_queries_exact_when_only_queries_merge():
    # With K/V untouched, attention rows are independent: merging other queries cannot change the
    # output of the protected (unmerged) queries.
    q, k, v = qkv(seed=1)
    ref = exact_attention(q, k, v)
    out = build_op("spark3r", 2, query_keep=2, schedule=no_pruning())(q, k, v, LAYOUT)
    prot = LAYOUT.protected_mask()
    torch.testing.assert_close(out[:, :, prot], ref[:, :, prot], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, ~prot], ref[:, :, ~prot], atol=1e-3)


def test_merging_identical_queries_is_exact_and_unmerge_restores_order():
    # Queries constant inside every 2x2 group: merging loses nothing, so the output is dense.
    q, k, v = qkv(seed=2)
    groups = query_groups(LAYOUT, (2, 2), 2, "cpu")
    for members in list(groups.full) + [row[v_] for row, v_ in zip(groups.partial, groups.partial_valid)]:
        q[:, :, members] = q[:, :, members[:1]]
    out = build_op("spark3r", 2, query_keep=2, schedule=no_pruning())(q, k, v, LAYOUT)
    torch.testing.assert_close(out, exact_attention(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_unmerge_map_covers_every_token_with_exact_group_budgets(keep):
    q, _, _ = qkv(seed=3)
    q_red, source = merge_queries(q, LAYOUT, (2, 2), keep)
    groups = query_groups(LAYOUT, (2, 2), keep, "cpu")
    npro = int(LAYOUT.protected_mask().sum())
    assert q_red.shape[2] == npro + groups.num_outputs == spark3r_sizes(LAYOUT, Spark3RConfig(query_keep=keep), 35)[0]
    assert source.shape == (1, H, LAYOUT.num_tokens)
    assert int(source.min()) >= 0 and int(source.max()) < q_red.shape[2]
    # protected tokens keep their own rows, in token order
    prot = torch.nonzero(LAYOUT.protected_mask()).flatten()
    assert torch.equal(source[0, 0, prot], torch.arange(npro))
    # every full group maps to exactly `keep` distinct rows, partial ones to min(keep, size)
    for head in range(H):
        for members in groups.full:
            assert source[0, head, members].unique().numel() == keep
        for members, valid, kp in zip(groups.partial, groups.partial_valid, groups.partial_keep):
            assert source[0, head, members[valid]].unique().numel() == int(kp)
    # every reduced row is used, and a merged row is the mean of its members
    unmerged = gather_rows(q_red, source)
    assert unmerged.shape == q.shape
    for head in range(H):
        rows = source[0, head]
        assert rows.unique().numel() == q_red.shape[2]
        for r in rows.unique()[:50]:
            members = torch.nonzero(rows == r).flatten()
            torch.testing.assert_close(q_red[0, head, r], q[0, head, members].mean(0), rtol=1e-5, atol=1e-6)


def test_pair_choice_is_the_least_squared_error_pairing():
    x = torch.randn(1, 2, 200, 4, 8)
    best = pair_choice(x.unbind(-2))
    splits = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]])  # slot of each member

    def merge_error(slot):  # squared error of replacing each pair by its mean
        means = torch.stack([(x * (slot == s)[..., None]).sum(-2) / 2 for s in (0, 1)], -2)
        return (x - means.gather(-2, slot[..., None].expand_as(x))).square().sum((-1, -2))

    errors = torch.stack([merge_error(split.expand(1, 2, 200, 4)) for split in splits], -1)
    torch.testing.assert_close(merge_error(splits[best]), errors.min(-1).values)
    assert torch.equal(best, errors.argmin(-1))
    # Points a, b, a, b: the vertical split {02, 13} is exact, and greedy Ward finds it too.
    a_, b_ = torch.randn(8), torch.randn(8)
    line = torch.stack([a_, b_, a_, b_])[None, None, None]
    assert int(pair_choice(line.unbind(-2))) == 1
    means, slot = merge_greedy(line, torch.ones(1, 4, dtype=torch.bool), 2)
    assert slot[0, 0, 0, 0] == slot[0, 0, 0, 2] != slot[0, 0, 0, 1] == slot[0, 0, 0, 3]
    assert means.shape == (1, 1, 1, 2, 8)


def test_kv_budget_is_exact_per_frame_and_protected_keys_stay():
    q, k, v = qkv(seed=4)
    budget = 6
    kv = prune_kv(mean_query_scores(q, k), k, v, LAYOUT, budget)
    kept = kv.kept
    idx = static_index(LAYOUT, "cpu")
    nf = len(idx.frames)
    assert kept.shape == (1, H, nf, budget)
    for f_row, frame in enumerate(idx.frames):
        lo, hi = frame * 40 + 5, frame * 40 + 40
        per = kept[0, :, f_row]
        assert ((per >= lo) & (per < hi)).all()
        assert all(per[h].unique().numel() == budget for h in range(H))
    npro = idx.protected.numel()
    assert kv.k.shape[2] == kv.v.shape[2] == npro + nf * budget
    assert torch.equal(kv.k[:, :, :npro], k[:, :, idx.protected])
    assert torch.equal(kv.v[:, :, npro:], gather_rows(v, kept.reshape(1, H, -1)))
    assert kv.k_extra.shape == kv.v_extra.shape == (1, H, nf, D)
    assert kv.bias == pytest.approx(math.log(35 - budget))
    # the compensation token is the mean of the frame's pruned tokens
    frame, row = idx.frames[0], 0
    pruned = torch.arange(frame * 40 + 5, frame * 40 + 40)
    pruned = pruned[~torch.isin(pruned, kept[0, 0, row])]
    torch.testing.assert_close(kv.v_extra[0, 0, row], v[0, 0, pruned].mean(0), rtol=1e-5, atol=1e-6)


def test_compensation_token_is_exact_when_pruned_tokens_are_identical():
    # If all pruned keys/values of a frame are equal, one token with a log(count) logit bias
    # carries exactly their softmax mass: the pruned attention equals dense attention.
    q, k, v = qkv(seed=5)
    budget = 4
    kept = prune_kv(mean_query_scores(q, k), k, v, LAYOUT, budget).kept
    idx = static_index(LAYOUT, "cpu")
    for f_row, frame in enumerate(idx.frames):
        for h in range(H):
            frame_patches = torch.arange(frame * 40 + 5, frame * 40 + 40)
            pruned = frame_patches[~torch.isin(frame_patches, kept[0, h, f_row])]
            k[0, h, pruned] = k[0, h, pruned[:1]]
            v[0, h, pruned] = v[0, h, pruned[:1]]
    sched = KVSchedule((budget / 35, budget / 35), reference_frames=16)
    cfg = Spark3RConfig(query_keep=4, schedule=sched)
    out = spark3r_attention(q, k, v, LAYOUT, cfg, budget)
    torch.testing.assert_close(out, exact_attention(q, k, v), rtol=1e-4, atol=1e-5)
    # ... and without compensation it is not
    cfg_off = Spark3RConfig(query_keep=4, schedule=sched, kv_compensation=False)
    assert not torch.allclose(spark3r_attention(q, k, v, LAYOUT, cfg_off, budget), exact_attention(q, k, v), atol=1e-3)


def test_spark3r_op_sizes_match_closed_form_and_batch_is_independent():
    q, k, v = qkv(seed=6, batch=2)
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.5)))
    out = op(q, k, v, LAYOUT)
    assert out.shape == q.shape
    single = op(q[1:], k[1:], v[1:], LAYOUT)
    torch.testing.assert_close(out[1:], single, rtol=1e-5, atol=1e-6)
    seen = {}

    def spy(q_, k_, v_, k_extra, v_extra, bias, scale=None):
        seen.setdefault("shape", (q_.shape[2], k_.shape[2] + k_extra.shape[2]))
        return attention_with_extra_keys(q_, k_, v_, k_extra, v_extra, bias, scale)

    import spark3r.accel.spark3r as mod
    orig = mod.attention_with_extra_keys
    mod.attention_with_extra_keys = spy
    try:
        op(q, k, v, LAYOUT)
    finally:
        mod.attention_with_extra_keys = orig
    cost = op.attention_flops(LAYOUT, q.shape[1], q.shape[3])
    assert seen["shape"] == (cost.queries, cost.keys)


def test_camera_queries_see_all_keys_when_dense_queries_is_set():
    q, k, v = qkv(seed=8)
    ref = exact_attention(q, k, v)
    cameras = torch.arange(LAYOUT.frames) * LAYOUT.tokens_per_frame
    registers = cameras + 1
    out = build_op("spark3r", 2, schedule=KVSchedule((0.1, 0.1)), dense_queries=1)(q, k, v, LAYOUT)
    torch.testing.assert_close(out[:, :, cameras], ref[:, :, cameras], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[:, :, registers], ref[:, :, registers], atol=1e-3)
    out0 = build_op("spark3r", 2, schedule=KVSchedule((0.1, 0.1)), dense_queries=0)(q, k, v, LAYOUT)
    assert not torch.allclose(out0[:, :, cameras], ref[:, :, cameras], atol=1e-3)


def test_uniform_merges_into_destinations_and_copies_outputs_back():
    q, k, v = qkv(seed=7)
    cfg = UniformConfig(ratio=1.0)
    out = uniform_attention(q, k, v, LAYOUT, cfg)
    assert out.shape == q.shape
    dst, src = partition(LAYOUT, cfg.cell, cfg.destination_seed, "cpu")
    prot = torch.nonzero(LAYOUT.protected_mask()).flatten()
    assert torch.isin(prot, dst).all()  # protected tokens are destinations, never sources
    assert not torch.isin(src, prot).any()
    assert dst.numel() + src.numel() == LAYOUT.num_tokens and torch.cat((dst, src)).unique().numel() == LAYOUT.num_tokens
    assert uniform_sizes(LAYOUT, cfg) == dst.numel()
    # every source's output equals one destination's output (unmerge by copy)
    for s in src[:20]:
        diff = (out[0, :, dst] - out[0, :, s][:, None]).abs().amax(dim=(0, 2))
        assert float(diff.min()) == 0.0


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv()
    op = build_op("spark3r", 2)
    with pytest.raises(ValueError, match="tokens"):
        op(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], LAYOUT)
    with pytest.raises(ValueError, match="3-D|4-D"):
        op(q[0], k[0], v[0], LAYOUT)
    with pytest.raises(ValueError, match="query_keep"):
        Spark3RConfig(query_keep=5)
    with pytest.raises(ValueError, match="ratio"):
        UniformConfig(ratio=1.5)
    with pytest.raises(TypeError, match="no parameter"):
        build_op("spark3r", 2, ratio=0.5)
    with pytest.raises(ValueError, match="unknown reduction method"):
        build_op("nope", 2)
    bad_layers = TokenLayout(4, 40, 5, (5, 7), 1, layer=0, num_layers=3)
    with pytest.raises(ValueError, match="layers"):
        op(q, k, v, bad_layers)
    with pytest.raises(ValueError, match="budget"):
        prune_kv(mean_query_scores(q, k), k, v, LAYOUT, 0)


def test_extra_keys_fold_in_through_log_sum_exp_exactly():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for n in (50, 40, 40))
    k_x, v_x = torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64)
    bias = math.log(7.0)
    logits = torch.cat((q @ k.transpose(-1, -2) / 4.0, q @ k_x.transpose(-1, -2) / 4.0 + bias), -1)  # scale 16^-0.5
    ref = torch.softmax(logits, -1) @ torch.cat((v, v_x), 2)
    for fn in (attention_with_extra_keys, masked_attention_with_extra_keys):
        out = fn(q.float(), k.float(), v.float(), k_x.float(), v_x.float(), bias)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rows_are_gathered_from_strided_views_without_copies():
    qkv_ = torch.randn(2, 30, 3, 4, 8)  # [B, N, 3, H, d] like the fused projection
    v = qkv_.permute(2, 0, 3, 1, 4)[2]
    index = torch.randint(0, 30, (2, 4, 11))
    expected = torch.stack([torch.stack([v[b, h, index[b, h]] for h in range(4)]) for b in range(2)])
    assert torch.equal(gather_rows(v, index), expected)
    out = torch.empty(2, 4, 11, 8)
    assert gather_rows(v, index, out=out) is out and torch.equal(out, expected)


def test_op_results_are_never_overwritten_while_referenced_and_buffers_are_reused():
    q, k, v = qkv(seed=9)
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))
    first = op(q, k, v, LAYOUT)
    kept_copy = first.clone()
    second = op(q * 0.5, k, v, LAYOUT)  # `first` is still referenced: a new buffer
    assert torch.equal(first, kept_copy) and second.data_ptr() != first.data_ptr()
    ptr = second.data_ptr()
    del first, second
    third = op(q, k, v, LAYOUT)
    assert torch.equal(third, kept_copy)
    assert third.data_ptr() == ptr  # nothing referenced the buffer any more: recycled
    # a view kept by the caller also pins the buffer
    view = third.transpose(1, 2).reshape(1, LAYOUT.num_tokens, -1)
    del third
    fourth = op(q * 2.0, k, v, LAYOUT)
    assert torch.equal(view.reshape(1, LAYOUT.num_tokens, H, D).transpose(1, 2), kept_copy)
    assert not torch.equal(fourth, kept_copy)


def test_workspace_recycles_only_unreferenced_outputs_and_survives_inference_mode():
    ws = Workspace()
    a = ws.output((2, 3), torch.float32, "cpu")
    assert ws.output((2, 3), torch.float32, "cpu") is not a  # `a` is held here
    b = ws.output((2, 3), torch.float32, "cpu")
    ptr = b.data_ptr()
    del a, b
    assert ws.output((2, 3), torch.float32, "cpu").data_ptr() == ptr
    q, k, v = qkv(seed=10)
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))
    with torch.inference_mode():
        inf = op(q, k, v, LAYOUT).clone()
    with torch.no_grad():
        torch.testing.assert_close(op(q, k, v, LAYOUT), inf)
    torch.testing.assert_close(op(q, k, v, LAYOUT), inf)


def test_spark3r_reads_v_as_a_strided_view_of_the_fused_projection():
    q, k, v = qkv(seed=12)
    fused = torch.stack((q, k, v)).permute(1, 3, 0, 2, 4).contiguous()  # [B, N, 3, H, d]
    v_view = fused.permute(2, 0, 3, 1, 4)[2]
    assert not v_view.is_contiguous()
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))
    torch.testing.assert_close(op(q, k, v_view, LAYOUT), op(q, k, v, LAYOUT), rtol=1e-6, atol=1e-6)


def test_half_precision_compensation_is_as_exact_as_its_rounding_and_the_op_runs_in_half():
    # The compensation token is (frame total - kept sum) / pruned: accumulated in fp32 its error
    # is the bf16 rounding of the result itself (half-precision sums would double it).
    layout = TokenLayout(4, 1 + 24 * 24, 1, (24, 24), 0, layer=0, num_layers=2)
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 32, generator=g) + 0.5 for _ in range(3))
    scores = mean_query_scores(q, k, layout)
    exact = prune_kv(scores, k, v, layout, 60)
    half = prune_kv(scores, k.bfloat16(), v.bfloat16(), layout, 60)
    for got, ref in ((half.k_extra, exact.k_extra), (half.v_extra, exact.v_extra)):
        rounding = torch.linalg.vector_norm(ref.bfloat16().float() - ref)
        assert got.dtype == torch.bfloat16
        assert torch.linalg.vector_norm(got.float() - ref) <= 1.3 * rounding
    out = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))(q.half(), k.half(), v.half(), layout)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_gradients_flow_through_the_reduced_attention():
    q, k, v = qkv(seed=14)
    op = build_op("spark3r", 2, schedule=KVSchedule((0.2, 0.2)))
    with torch.no_grad():
        expected = op(q, k, v, LAYOUT).clone()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = op(*leaves, LAYOUT)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # every query token gets a gradient (merged ones through their pair mean)
    assert (leaves[0].grad.abs().sum(-1) > 0).all()
