"""The VGGT Speed3R student ``vggt-nano-speed3r``: its learned layer on row-major VGGT tokens,
its relation to the dense vggt-nano it is distilled from, and strict loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from spark3r import accel
from spark3r.models import CheckpointMismatchError, load_pretrained, load_weights
from spark3r.models.layers.attention import Attention, AttentionLayerInputs
from spark3r.models.layers.layout import TokenLayout
from spark3r.models.layers.rope import RoPE2D, grid_positions
from spark3r.models.layers.sparse_attention import block_table, gated_block_attention
from spark3r.models.registry import build_model
from spark3r.models.vggt_speed3r import speed3r_state_dict_from_dense

IMAGES = torch.rand(3, 3, 56, 70, generator=torch.Generator().manual_seed(0))  # 4x5 patches: edge windows


@pytest.fixture(scope="module")
def teacher():
    return load_pretrained("vggt-nano", "builtin")


def student_of(teacher, **overrides):
    """The student the distillation starts from: the teacher's weights (copied) + fresh gates."""
    state = speed3r_state_dict_from_dense({k: v.clone() for k, v in teacher.state_dict().items()},
                                          teacher.config.num_heads)
    return load_weights(build_model("vggt-nano-speed3r", device="meta", **overrides), state)


def force_gates(model, compression: float, selection: float) -> None:
    """Gate biases so large that sigmoid gives exactly ``compression`` / ``selection`` (0 or 1)."""
    to_bias = {0.0: -1e4, 1.0: 1e4}
    with torch.no_grad():
        for attn in model.global_attention_modules():
            attn.gate[0].weight.zero_()
            attn.gate[0].bias.copy_(torch.tensor([to_bias[compression], to_bias[selection]]).repeat(attn.num_heads))


def test_fresh_student_is_the_teacher_plus_gates_at_the_official_init(teacher):
    student = student_of(teacher)
    dense_state, state = teacher.state_dict(), student.state_dict()
    gates = sorted(set(state) - set(dense_state))
    assert gates == sorted(f"aggregator.global_blocks.{i}.attn.gate.0.{p}" for i in range(4) for p in ("weight", "bias"))
    assert all(torch.equal(state[k], v) for k, v in dense_state.items())
    heads = teacher.config.num_heads
    for i in range(4):
        assert torch.equal(state[f"aggregator.global_blocks.{i}.attn.gate.0.weight"], torch.zeros(2 * heads, 128))
        assert torch.equal(state[f"aggregator.global_blocks.{i}.attn.gate.0.bias"], torch.tensor([-1.0, 1.0] * heads))
    # the sparse layer is the model's own; frame attention stays dense
    assert all(m.global_op is not None for m in student.global_attention_modules())
    assert all(blk.attn.global_op is None and blk.attn.gate is None for blk in student.aggregator.frame_blocks)


def test_all_blocks_with_selection_gates_is_dense_and_remove_gives_the_teacher(teacher):
    student = student_of(teacher, top_k=1000)
    force_gates(student, compression=0.0, selection=1.0)
    with torch.no_grad():
        reference = teacher(IMAGES)
        sparse = student(IMAGES)
        for name in ("pose_enc", "depth", "depth_conf"):
            torch.testing.assert_close(sparse[name], reference[name], atol=2e-5, rtol=1e-5)
        # anchors only move keys from the block set to the always-selected set: still every key once
        accel.apply(student, "speed3r", top_k=1000, anchor_every=2)
        torch.testing.assert_close(student(IMAGES)["depth"], reference["depth"], atol=2e-5, rtol=1e-5)
        accel.remove(student)
        removed = student(IMAGES)
    assert all(torch.equal(removed[k], reference[k]) for k in ("pose_enc", "depth", "depth_conf"))


def test_learned_student_is_not_dense_and_trains_its_gates(teacher):
    student = student_of(teacher, top_k=1)
    out = student(IMAGES, heads=("camera", "depth"))
    with torch.no_grad():
        reference = teacher(IMAGES, heads=("camera", "depth"))
    assert (out["depth"] - reference["depth"]).abs().max() > 1e-6
    (out["depth"].mean() + out["pose_enc"].abs().mean()).backward()
    for attn in student.global_attention_modules():
        assert attn.gate[0].weight.grad is not None and attn.gate[0].weight.grad.abs().sum() > 0


def small_layer(seed=0):
    torch.manual_seed(seed)
    attn = Attention(32, 2, qk_norm=True, rope=RoPE2D(100.0), gates=True)
    layout = TokenLayout(frames=4, tokens_per_frame=2 + 4 * 6, special_tokens=2, grid=(4, 6), reference_frame=0)
    x = torch.randn(1, layout.num_tokens, 32)
    return attn, layout, x, grid_positions(4, 6, 2)


def test_selection_sees_the_always_selected_tokens_and_special_tokens_attend_densely():
    attn, layout, x, pos = small_layer()
    with torch.no_grad():
        attn.gate[0].bias.copy_(torch.tensor([-1e4, 1e4, -1e4, 1e4]))
        out = gated_block_attention(AttentionLayerInputs(attn, x, pos, layout), (2, 2), top_k=1)
        dense = torch.nn.functional.scaled_dot_product_attention(*attn.project_qkv(x, pos))
        protected = layout.protected_mask()
        torch.testing.assert_close(out[:, :, protected], dense[:, :, protected], atol=1e-6, rtol=1e-5)
        assert (out[:, :, ~protected] - dense[:, :, ~protected]).abs().max() > 1e-4  # top-1 of 12 blocks
        # a camera token of frame 2 is an exact key of every block query, whatever the top-k
        x2 = x.clone()
        x2[:, 2 * layout.tokens_per_frame] += 3.0
        moved = gated_block_attention(AttentionLayerInputs(attn, x2, pos, layout), (2, 2), top_k=1)
        table = block_table(layout, (2, 2), "cpu")
        blocks = table.tokens.reshape(-1)
        assert ((moved - out)[:, :, blocks].abs().amax(-1) > 0).all()


def test_gates_mix_the_two_branches_per_head():
    attn, layout, x, pos = small_layer(1)
    with torch.no_grad():
        outs = {}
        for name, bias in (("comp", [1e4, -1e4]), ("sel", [-1e4, 1e4]), ("both", [1e4, 1e4])):
            attn.gate[0].bias.copy_(torch.tensor(bias * 2))
            outs[name] = gated_block_attention(AttentionLayerInputs(attn, x, pos, layout), (2, 2), top_k=2)
        blocks = block_table(layout, (2, 2), "cpu").tokens.reshape(-1)
        torch.testing.assert_close(outs["both"][:, :, blocks], (outs["comp"] + outs["sel"])[:, :, blocks],
                                   atol=1e-6, rtol=1e-5)
        # a compression-only query sees the same pooled output as the other tokens of its block
        comp = outs["comp"][:, :, block_table(layout, (2, 2), "cpu").tokens[0]]
        torch.testing.assert_close(comp, comp[:, :, :1].expand_as(comp))


def test_strict_load_round_trip_and_refusals(teacher, tmp_path):
    student = student_of(teacher)
    with torch.no_grad():
        student.aggregator.global_blocks[2].attn.gate[0].bias.add_(0.5)
    (tmp_path / "run").mkdir()
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(tmp_path / "run" / "model.safetensors"))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model_name": "vggt-nano-speed3r"}))
    for loaded in (load_pretrained("vggt-nano-speed3r", str(tmp_path / "run")), load_pretrained(None, str(tmp_path / "run"))):
        assert loaded.preset == "vggt-nano-speed3r"
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items())
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="those of 'vggt-nano'"):  # plain vggt-nano weights: no gates
        load_pretrained("vggt-nano-speed3r", str(tmp_path / "dense.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="those of 'vggt-nano-speed3r'"):  # nor the student's as vggt-nano
        load_pretrained("vggt-nano", str(tmp_path / "run" / "model.safetensors"))


def test_pooled_block_positions_are_truncated_means_of_the_real_tokens():
    from spark3r.models.layers.sparse_attention import pooled_block_positions

    layout = TokenLayout(frames=2, tokens_per_frame=5 + 4 * 5, special_tokens=5, grid=(4, 5), reference_frame=0)
    table = block_table(layout, (4, 4), "cpu")
    pos = grid_positions(4, 5, 5)  # VGGT: specials at 0, patch (r, c) at (r + 1, c + 1)
    got = pooled_block_positions(pos, table, layout.tokens_per_frame)
    # the full window: rows and cols 1..4 -> 2.5 -> 2; the edge window (one column, 5): rows 2.5 -> 2, col 5
    assert got.tolist() == [[2, 2], [2, 5]]
    batched = pooled_block_positions(pos[None].expand(3, -1, -1), table, layout.tokens_per_frame)
    assert batched.shape == (3, 2, 2) and torch.equal(batched[1], got)
