"""DALL-E's attention: the paper's masks and layer schedule; sparse == dense masked reference."""

import pytest
import torch

from training.models import attention
from training.models.attention import (
    KINDS,
    Layout,
    block_plan,
    conv_offsets,
    dense_attention,
    full_mask,
    image_mask,
    layer_kinds,
    sparse_attention,
)

FIGURE = Layout(text_len=6, rows=4, cols=4)  # the paper's figure 11: 6 text tokens, 4x4 image


def allowed(kind, layout, q, kernel=11):
    """Image keys that image query q attends, as a set of raster positions."""
    return {int(k) for k in image_mask(kind, layout, kernel)[q].nonzero()}


def test_layer_schedule_is_the_papers():
    kinds = layer_kinds(64)
    # layers numbered 1..64: column where (i - 2) % 4 == 0, conv in the last, row elsewhere
    assert kinds[63] == "conv"
    columns = [i for i in range(1, 65) if kinds[i - 1] == "column"]
    assert columns == list(range(2, 63, 4))  # 2, 6, ..., 62
    assert kinds.count("row") == 64 - 1 - len(columns) == 47
    assert layer_kinds(4) == ["row", "column", "row", "conv"]


def test_row_mask_attends_the_previous_width_plus_one_tokens_with_wraparound():
    # figure 11a: "each image token attends to the previous 5 image tokens in raster order"
    assert allowed("row", FIGURE, 7) == {3, 4, 5, 6, 7}  # back to the same column, a row up
    assert allowed("row", FIGURE, 4) == {0, 1, 2, 3, 4}  # wraps to the end of the row above
    assert allowed("row", FIGURE, 0) == {0}


def test_column_mask_attends_the_column_above():
    assert allowed("column", FIGURE, 13) == {1, 5, 9, 13}
    assert allowed("column", FIGURE, 2) == {2}


def test_conv_mask_is_a_causal_kernel_with_wraparound():
    # 3x3 (figure 11d): left neighbour, the three above, itself; raster offsets 0, 1, W-1, W, W+1
    assert conv_offsets(4, 3) == [0, 1, 3, 4, 5]
    assert allowed("conv", FIGURE, 9, kernel=3) == {4, 5, 6, 8, 9}
    assert allowed("conv", FIGURE, 8, kernel=3) == {3, 4, 5, 7, 8}  # left edge wraps
    # 11x11 on the paper's 32-wide grid: 5 rows above (11 wide) + 5 to the left + itself
    assert len(conv_offsets(32, 11)) == 5 * 11 + 6


@pytest.mark.parametrize("kind", KINDS)
def test_text_is_causal_and_image_sees_all_text(kind):
    mask = full_mask(kind, FIGURE, 3)
    t = FIGURE.text_len
    assert torch.equal(mask[:t, :t], torch.ones(t, t, dtype=torch.bool).tril())
    assert not mask[:t, t:].any()
    assert mask[t:, :t].all()
    assert not mask.triu(1).any()  # nothing attends a later position
    assert mask.diagonal().all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "layout, kernel",
    [(FIGURE, 3), (Layout(5, 3, 7), 11), (Layout(8, 8, 8), 11), (Layout(16, 6, 6), 5)],
)
def test_sparse_equals_dense_forward_and_backward(kind, layout, kernel):
    torch.manual_seed(0)
    shape = (2, 3, layout.seq_len, 8)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sparse = sparse_attention(q, k, v, kind, layout, kernel)
    dense = dense_attention(q, k, v, kind, layout, kernel)
    torch.testing.assert_close(sparse, dense)
    upstream = torch.randn_like(dense)
    grads_sparse = torch.autograd.grad(sparse, (q, k, v), upstream)
    grads_dense = torch.autograd.grad(dense, (q, k, v), upstream)
    for a, b in zip(grads_sparse, grads_dense, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_attends_far_fewer_keys_at_the_paper_layout(kind):
    layout = Layout(256, 32, 32)
    plan = block_plan(kind, layout, 11)
    assert plan.blocks * plan.size == layout.image_len
    # image keys per query block, against 1024 for the dense layer
    # conv: a 4 x 8 tile of 32 queries (32 raster positions would need 197 keys)
    assert plan.window == {"row": 16 + 32, "column": 32, "conv": 157}[kind]
    # the windows hold exactly the allowed keys: nothing is lost, nothing extra is unmasked
    assert int(plan.mask.sum()) == int(image_mask(kind, layout, 11).sum())


def test_sparse_in_float32_and_bfloat16_matches_dense():
    torch.manual_seed(0)
    layout = Layout(8, 4, 4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(1, 2, layout.seq_len, 16, dtype=dtype) for _ in range(3))
        for kind in KINDS:
            torch.testing.assert_close(
                sparse_attention(q, k, v, kind, layout, 3),
                dense_attention(q, k, v, kind, layout, 3),
                atol=tol,
                rtol=tol,
            )


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_in_chunks_of_heads_and_text_blocks_equals_dense(kind, monkeypatch):
    # one head per chunk, and chunks of 4 of 6 heads (the last chunk smaller); text queries in
    # row blocks of 3, 3 and 2
    monkeypatch.setattr(attention, "TEXT_BLOCK", 3)
    layout = Layout(8, 8, 8)
    plan = attention._plan_on(block_plan(kind, layout, 5), layout.text_len, torch.device("cpu"))
    per_head = layout.image_len * (layout.text_len + plan.window) * 8  # float64 scores
    for chunk_bytes, chunks in ((1, 6), (4 * per_head, 2)):
        monkeypatch.setattr(attention, "CPU_CHUNK_BYTES", chunk_bytes)
        assert len(attention._chunks(6, per_head, torch.device("cpu"))) == chunks
        torch.manual_seed(0)
        shape = (2, 3, layout.seq_len, 8)
        q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
        sparse = sparse_attention(q, k, v, kind, layout, 5)
        dense = dense_attention(q, k, v, kind, layout, 5)
        torch.testing.assert_close(sparse, dense)
        upstream = torch.randn_like(dense)
        for a, b in zip(
            torch.autograd.grad(sparse, (q, k, v), upstream),
            torch.autograd.grad(dense, (q, k, v), upstream),
            strict=True,
        ):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_takes_non_contiguous_views(kind):
    # the model passes q, k, v as permuted views of [B, S, h, d]
    layout = Layout(5, 3, 7)
    torch.manual_seed(0)
    x = torch.randn(3, 1, layout.seq_len, 2, 4, dtype=torch.float64, requires_grad=True)
    q, k, v = (x[i].permute(0, 2, 1, 3) for i in range(3))
    sparse = sparse_attention(q, k, v, kind, layout, 11)
    dense = dense_attention(q, k, v, kind, layout, 11)
    torch.testing.assert_close(sparse, dense)
    upstream = torch.randn_like(dense)
    (g_sparse,) = torch.autograd.grad(sparse, x, upstream)
    (g_dense,) = torch.autograd.grad(dense, x, upstream)
    torch.testing.assert_close(g_sparse, g_dense)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_plan_pads_windows_with_masked_keys(kind):
    layout = Layout(256, 32, 32)
    plan = block_plan(kind, layout, 11)
    padded = attention._plan_on(plan, layout.text_len, torch.device("cpu"))
    assert (layout.text_len + padded.window) % attention.ALIGN == 0
    assert padded.window - plan.window < attention.ALIGN
    assert torch.equal(padded.mask[:, :, : plan.window], plan.mask)
    assert not padded.mask[:, :, plan.window :].any()
    # kernel plan: raster positions of the same keys
    order = torch.arange(layout.image_len) if plan.order is None else plan.order
    keys = padded.key_index.view(plan.blocks, -1)[:, : plan.window]
    assert torch.equal(keys, order[plan.key_index])
