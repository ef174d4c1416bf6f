"""DALL-E's attention masks, computed sparsely, with a dense masked reference.

The sequence is ``[text (T) | image (N = H x W, raster order)]``. Every layer uses the same
text part: text is causal and never sees the image; every image token sees all text. The
image-to-image part depends on the layer (paper, appendix B.1 and figure 11):

- **row**: a token attends to itself and the ``W`` image tokens before it in raster order.
  The paper's figure (6 text tokens, a 4 x 4 grid) has each token attend to "the previous 5
  image tokens ... so that the last token being attended to is the one in the same column of
  the previous row": ``0 <= q - k <= W``, wrapping around row ends.
- **column**: a token attends to the tokens above it in its own column, itself included
  (figure 11 b; 11 c is the same mask with the image transposed, which is how it is computed).
- **conv**: a causal k x k convolutional window (11 x 11 in the paper's last layer), with the
  same wraparound as the row mask: the window is a fixed set of raster offsets ``q - k`` in
  ``{0..k//2} U {r*W + c : 1 <= r <= k//2, -k//2 <= c <= k//2}``, so near the left and right
  edges it reaches into the neighbouring rows instead of being clipped.

Layer schedule. Layers are numbered ``i = 1..L`` as in the paper: column attention where
``(i - 2) mod 4 == 0`` (layers 2, 6, 10, ...), row attention in the other layers below ``L``,
and convolutional attention in the last layer ``L`` (layer 64 of the 12B; ``(64-2) mod 4 = 2``,
so the last layer would have been a row layer). In code the layer at list index ``j`` is
``i = j + 1``.

Sparse computation. Text queries use causal attention over the text alone. Image queries go
in blocks: 16 consecutive raster positions for row attention, one whole column for column
attention (the image transposed, as the paper does), a 4 x 8 tile for conv attention. A block
attends all T text keys plus a window of image keys gathered for it: the union of the keys its
queries may attend (``block_plan``: built from the dense mask, so it cannot miss one). Scores
are ``[block, T + window]`` instead of ``[block, T + N]``: at 256 + 32 x 32, a row block's
window is 48 image keys, a column's 32, an 11 x 11 conv tile's 157, against 1024 for dense
attention. One softmax runs over text and window scores together, so the result is the dense
layer's. Forward and backward are written out (``_BlockSparseAttention``), not left to autograd.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Kind = Literal["row", "column", "conv"]
KINDS: tuple[Kind, ...] = ("row", "column", "conv")


@dataclass(frozen=True)
class Layout:
    """Where tokens sit in the sequence: ``text_len`` text tokens, then an image grid."""

    text_len: int
    rows: int
    cols: int

    @property
    def image_len(self) -> int:
        return self.rows * self.cols

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


def layer_kinds(n_layer: int) -> list[Kind]:
    """The paper's schedule; entry j is layer i = j + 1 (see module doc)."""
    kinds: list[Kind] = []
    for i in range(1, n_layer + 1):
        if i == n_layer:
            kinds.append("conv")
        elif (i - 2) % 4 == 0:
            kinds.append("column")
        else:
            kinds.append("row")
    return kinds


def conv_offsets(cols: int, kernel: int) -> list[int]:
    """Raster distances ``q - k >= 0`` inside a causal ``kernel x kernel`` window (wrapping)."""
    half = kernel // 2
    offsets = set(range(half + 1))  # the current row: itself and `half` to the left
    for r in range(1, half + 1):  # `half` rows above, `half` to each side
        offsets |= {r * cols - c for c in range(-half, half + 1)}
    return sorted(o for o in offsets if o >= 0)  # narrow grids: never a later token


def image_mask(kind: Kind, layout: Layout, kernel: int = 11) -> torch.Tensor:
    """[N, N] bool, ``[q, k]`` True where image token q attends image token k (raster order)."""
    n, cols = layout.image_len, layout.cols
    q = torch.arange(n).view(n, 1)
    k = torch.arange(n).view(1, n)
    distance = q - k  # > 0: k comes before q
    if kind == "row":
        return (distance >= 0) & (distance <= cols)
    if kind == "column":
        return (distance >= 0) & (q % cols == k % cols)
    if kind == "conv":
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[[o for o in conv_offsets(cols, kernel) if o < n]] = True
        return (distance >= 0) & allowed[distance.clamp(0, n - 1)]
    raise ValueError(f"unknown attention kind {kind!r}; known: {KINDS}")


def full_mask(kind: Kind, layout: Layout, kernel: int = 11) -> torch.Tensor:
    """[S, S] bool, True where query q attends key k: the dense reference's mask."""
    t, s = layout.text_len, layout.seq_len
    mask = torch.zeros(s, s, dtype=torch.bool)
    mask[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()  # text: causal
    mask[t:, :t] = True  # image -> all text
    mask[t:, t:] = image_mask(kind, layout, kernel)
    return mask


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: Kind, layout: Layout, kernel: int = 11
) -> torch.Tensor:
    """Reference: every query against every key, masked. q, k, v: [B, h, S, d]."""
    mask = _full_mask_cached(kind, layout, kernel).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=64)
def _full_mask_cached(kind: Kind, layout: Layout, kernel: int) -> torch.Tensor:
    return full_mask(kind, layout, kernel)


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """How one layer's image queries are computed sparsely.

    Image positions are visited in a computation order (``order[i]`` is the raster position of
    the i-th; None: raster order) and cut into blocks of ``size`` consecutive ones. Block b
    attends all text keys plus image keys ``key_index[b]`` (computation-order position + 1; 0 is
    an all-zero padding key, masked), ``window`` of them: the union of the keys its queries may
    attend. ``mask[b, i, j]``: query i of block b attends window key j.
    """

    size: int
    blocks: int
    window: int
    order: torch.Tensor | None  # [N] int64, raster position of each computation-order position
    inverse: torch.Tensor | None  # [N] int64, computation-order position of each raster position
    key_index: torch.Tensor  # [blocks, window] int64
    mask: torch.Tensor  # [blocks, size, window] bool


# Query blocks. Row attention takes 16 consecutive raster positions (its window, 16 + W keys,
# is contiguous); column attention a whole column (the paper's transposed image); conv attention
# a 4 x 8 tile of the image, whose 11 x 11 windows span 157 keys (32 raster positions: 197).
# Measured fastest at the paper's layout on CPU (conv: 2 x 8, 2 x 16, 4 x 16 and 8 x 8 tiles
# within 10%, 16 raster positions 1.6x slower).
QUERY_BLOCK = 16
CONV_TILE = (4, 8)


def _block_order(kind: Kind, layout: Layout) -> tuple[torch.Tensor | None, int]:
    """(computation order or None for raster, block size) of ``kind`` at ``layout``."""
    rows, cols = layout.rows, layout.cols
    if kind == "column":
        tile = (rows, 1)
    elif kind == "conv" and rows % CONV_TILE[0] == 0 and cols % CONV_TILE[1] == 0:
        tile = CONV_TILE
    else:
        return None, math.gcd(QUERY_BLOCK, layout.image_len)
    th, tw = tile
    raster = torch.arange(layout.image_len).view(rows // th, th, cols // tw, tw)
    return raster.permute(0, 2, 1, 3).reshape(-1), th * tw


@functools.lru_cache(maxsize=64)
def block_plan(kind: Kind, layout: Layout, kernel: int = 11) -> BlockPlan:
    """The blocks and key windows of ``kind`` at ``layout``, from its dense mask."""
    dense = image_mask(kind, layout, kernel)  # raster order
    n = layout.image_len
    order, size = _block_order(kind, layout)
    inverse = None
    if order is not None:
        dense = dense[order][:, order]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
    blocks = n // size
    keys = [dense[b * size : (b + 1) * size].any(dim=0).nonzero().flatten() for b in range(blocks)]
    window = max(len(k) for k in keys)
    key_index = torch.zeros(blocks, window, dtype=torch.long)
    mask = torch.zeros(blocks, size, window, dtype=torch.bool)
    for b, k in enumerate(keys):
        key_index[b, : len(k)] = k + 1
        mask[b, :, : len(k)] = dense[b * size : (b + 1) * size, k]
    return BlockPlan(size, blocks, window, order, inverse, key_index, mask)


@functools.lru_cache(maxsize=256)
def _plan_on(plan: BlockPlan, device: torch.device) -> BlockPlan:
    """The plan's index tensors on ``device`` (copied once, not per call)."""
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return BlockPlan(
        plan.size,
        plan.blocks,
        plan.window,
        move(plan.order),
        move(plan.inverse),
        move(plan.key_index).flatten(),
        move(plan.mask),
    )


@functools.lru_cache(maxsize=64)
def _causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: Kind, layout: Layout, kernel: int = 11
) -> torch.Tensor:
    """The layer's attention, computed block-sparsely. q, k, v: [B, h, S, d] -> [B, h, S, d]."""
    plan = _plan_on(block_plan(kind, layout, kernel), q.device)
    return _BlockSparseAttention.apply(q, k, v, plan, layout.text_len)


class _BlockSparseAttention(torch.autograd.Function):
    """Text queries: causal over the text. Image queries: all text keys + their block's window,
    one softmax over both. Forward and backward by hand (flash-attention's dS = P * (dP - rowsum
    (dO * O))): autograd of the same ops spent as long on slicing, concatenating and zero-filled
    slice gradients as on the matmuls. Text and window scores share one buffer; the gathered
    window keys and values are not kept for the backward but gathered again."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, t: int):
        bsz, heads, seq, dim = q.shape
        bh, n = bsz * heads, seq - t
        q, k, v = (x.reshape(bh, seq, dim) for x in (q, k, v))
        qs = q * dim**-0.5
        qs_t, k_t, v_t = qs[:, :t], k[:, :t], v[:, :t]
        qs_i, k_i, v_i = (_image_part(x, t, plan) for x in (qs, k, v))

        p_text = _softmax(torch.baddbmm(_causal_bias(t, q.dtype, q.device), qs_t, k_t.mT))
        out_t = torch.bmm(p_text, v_t)

        k_w, v_w = _gather(k_i, plan), _gather(v_i, plan)  # [bh * blocks, window, d]
        scores = q.new_empty(bh, n, t + plan.window)
        torch.bmm(qs_i, k_t.mT, out=scores[:, :, :t])
        local = _local(scores, t, plan)
        torch.bmm(_blocks(qs_i, plan), k_w.mT, out=local)
        local.view(bh, plan.blocks, plan.size, plan.window).masked_fill_(~plan.mask, float("-inf"))
        probs = _softmax(scores)
        out_i = torch.bmm(probs[:, :, :t], v_t)
        _blocks(out_i, plan).baddbmm_(_local(probs, t, plan), v_w)

        ctx.save_for_backward(qs_t, k_t, v_t, qs_i, k_i, v_i, p_text, probs, out_t, out_i)
        ctx.plan, ctx.shape = plan, (bsz, heads, seq, dim)
        out = torch.cat([out_t, _raster(out_i, plan)], dim=1)
        return out.view(bsz, heads, seq, dim)

    @staticmethod
    def backward(ctx, grad):
        qs_t, k_t, v_t, qs_i, k_i, v_i, p_text, probs, out_t, out_i = ctx.saved_tensors
        plan, (bsz, heads, seq, dim) = ctx.plan, ctx.shape
        bh, t = bsz * heads, qs_t.shape[1]
        scale = dim**-0.5
        grad = grad.reshape(bh, seq, dim)
        g_t, g_i = grad[:, :t], _image_part(grad, t, plan)

        # text queries
        ds = torch.bmm(g_t, v_t.mT).sub_((g_t * out_t).sum(-1, keepdim=True)).mul_(p_text)
        dq_t = torch.bmm(ds, k_t).mul_(scale)
        dk_t = torch.bmm(ds.mT, qs_t)
        dv_t = torch.bmm(p_text.mT, g_t)

        # image queries
        k_w, v_w = _gather(k_i, plan), _gather(v_i, plan)
        g_blocks = _blocks(g_i, plan)
        ds = torch.empty_like(probs)
        torch.bmm(g_i, v_t.mT, out=ds[:, :, :t])
        torch.bmm(g_blocks, v_w.mT, out=_local(ds, t, plan))
        ds.sub_((g_i * out_i).sum(-1, keepdim=True)).mul_(probs)  # masked keys: probs 0
        ds_local, p_local = _local(ds, t, plan), _local(probs, t, plan)
        dq_i = torch.bmm(ds[:, :, :t], k_t)
        _blocks(dq_i, plan).baddbmm_(ds_local, k_w)
        dq_i.mul_(scale)
        dk_t.baddbmm_(ds[:, :, :t].mT, qs_i)
        dv_t.baddbmm_(probs[:, :, :t].mT, g_i)
        dk_i = _scatter(torch.bmm(ds_local.mT, _blocks(qs_i, plan)), plan, bh, dim)
        dv_i = _scatter(torch.bmm(p_local.mT, g_blocks), plan, bh, dim)

        def whole(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
            return torch.cat([text, _raster(image, plan)], dim=1).view(bsz, heads, seq, dim)

        return whole(dq_t, dq_i), whole(dk_t, dk_i), whole(dv_t, dv_i), None, None


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in float32 at least (as the fused kernels do), in the input's
    dtype."""
    if scores.dtype in (torch.float32, torch.float64):
        return scores.softmax(dim=-1)
    return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)


def _image_part(x: torch.Tensor, t: int, plan: BlockPlan) -> torch.Tensor:
    """[bh, S, d] -> the image positions [bh, N, d], contiguous, in computation order."""
    if plan.order is None:
        return x[:, t:].contiguous()
    return x[:, t:].index_select(1, plan.order)


def _raster(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """[bh, N, d] in computation order -> raster order."""
    return x if plan.inverse is None else x.index_select(1, plan.inverse)


def _blocks(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """[bh, N, d] -> [bh * blocks, size, d] (a view)."""
    return x.view(-1, plan.size, x.shape[-1])


def _local(scores: torch.Tensor, t: int, plan: BlockPlan) -> torch.Tensor:
    """The window part of [bh, N, t + window] scores as [bh * blocks, size, window] (a view)."""
    return scores[:, :, t:].view(-1, plan.size, plan.window)


def _gather(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """[bh, N, d] -> each block's window of keys [bh * blocks, window, d] (padding: zeros)."""
    padded = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1)
    return padded.index_select(1, plan.key_index).view(-1, plan.window, x.shape[2])


def _scatter(grad_w: torch.Tensor, plan: BlockPlan, bh: int, dim: int) -> torch.Tensor:
    """Window gradients [bh * blocks, window, d] summed back onto the keys [bh, N, d]."""
    n = plan.blocks * plan.size
    out = grad_w.new_zeros(bh, n + 1, dim)
    out.index_add_(1, plan.key_index, grad_w.view(bh, -1, dim))
    return out[:, 1:]
