"""DALL-E's attention masks, computed sparsely, with a dense masked reference.

The sequence is ``[text (T) | image (N = H x W, raster order)]``. Text is causal and never sees
the image; every image token sees all text. Image-to-image, by layer (paper, appendix B.1):

- **row**: itself and the ``W`` image tokens before it, ``0 <= q - k <= W``, wrapping around
  row ends;
- **column**: the tokens above it in its own column, itself included (computed on the
  transposed image, as the paper's figure 11 c);
- **conv**: a causal k x k window (11 x 11 in the paper's last layer) as raster offsets
  ``q - k`` in ``{0..k//2} U {r*W + c : 1 <= r <= k//2, -k//2 <= c <= k//2}``, wrapping like row.

Layers ``i = 1..L`` (list index ``i - 1``): column where ``(i - 2) mod 4 == 0``, conv in the
last layer, row in the others (``layer_kinds``).

Sparse computation. Text queries attend the text causally, in row blocks (``TEXT_BLOCK``). Image
queries go in blocks (16 raster positions for row, a whole column for column, a 4 x 8 tile for
conv); a block attends all T text keys plus a window of image keys: the union of the keys its
queries may attend (``block_plan``, built from the dense mask, so it cannot miss one). One
softmax runs over text and window scores together, so the result is the dense layer's. Forward
and backward are written out (``_BlockSparseAttention``), not left to autograd.

docs/attention.md has the design in full and the CPU measurements behind the constants.
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
    attends all text keys plus image keys ``key_index[b]`` (computation-order positions),
    ``window`` of them: the union of the keys its queries may attend, then padding entries
    (position 0, masked) where a block's union is smaller. ``mask[b, i, j]``: query i of block b
    attends window key j.
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
# The fastest sizes at the paper's layout on CPU (docs/attention.md).
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
        key_index[b, : len(k)] = k
        mask[b, :, : len(k)] = dense[b * size : (b + 1) * size, k]
    return BlockPlan(size, blocks, window, order, inverse, key_index, mask)


# Text queries go in row blocks of this many, each attending keys up to its last row: 5/8 of the
# causal 256 x 256 scores at 256 text tokens instead of the full square.
TEXT_BLOCK = 64
# Score rows (text_len + window) are padded to a multiple of this many elements (64 bytes in
# float32): CPU matmuls are slower on rows of odd length.
ALIGN = 16
# On CPU, image queries go through the kernel in chunks of heads whose score buffer is about
# this size (one head at the paper's layout), so the matmuls' operands stay in cache. Other
# devices take all heads at once.
CPU_CHUNK_BYTES = 2 << 20


@functools.lru_cache(maxsize=256)
def _plan_on(plan: BlockPlan, t: int, device: torch.device) -> BlockPlan:
    """The plan as the kernel uses it, on ``device`` (copied once, not per call): windows padded
    with masked padding keys so that ``t + window`` is a multiple of ``ALIGN``, and ``key_index``
    flat and in raster positions: keys are gathered from (and their gradients scattered onto)
    the raster-ordered image part, only queries are permuted into computation order."""
    window = -(-(t + plan.window) // ALIGN) * ALIGN - t
    pad = window - plan.window
    keys = F.pad(plan.key_index, (0, pad))
    if plan.order is not None:
        keys = plan.order[keys]
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return BlockPlan(
        plan.size,
        plan.blocks,
        window,
        move(plan.order),
        move(plan.inverse),
        move(keys).flatten(),
        move(F.pad(plan.mask, (0, pad))),
    )


@functools.lru_cache(maxsize=256)
def _mask_bias(plan: BlockPlan, dtype: torch.dtype) -> torch.Tensor:
    """[blocks, size, window]: 0 where the window key is attended, -inf where not. Adding it
    is much faster than ``masked_fill_`` with a broadcast mask on CPU."""
    bias = torch.zeros(plan.mask.shape, dtype=dtype, device=plan.mask.device)
    return bias.masked_fill_(~plan.mask, float("-inf"))


def _flat_index(plan: BlockPlan, heads: int, t: int) -> torch.Tensor:
    """Rows of each head's window keys in ``heads`` heads' [heads * S, d] keys (S = t + N): the
    gather and the gradient scatter index the flat 2-d tensor (index_add_ along its dim 0 is
    faster on CPU than along dim 1 of [heads, S, d]). Built per call, not cached: with all heads
    at once (GPU) it has bh * blocks * window entries."""
    seq = t + plan.blocks * plan.size
    offsets = torch.arange(heads, device=plan.key_index.device).view(-1, 1) * seq + t
    return (plan.key_index.view(1, -1) + offsets).flatten()


@functools.lru_cache(maxsize=64)
def _causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((t, t), float("-inf"), dtype=dtype, device=device).triu(1)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: Kind, layout: Layout, kernel: int = 11
) -> torch.Tensor:
    """The layer's attention, computed block-sparsely. q, k, v: [B, h, S, d] -> [B, h, S, d]."""
    plan = _plan_on(block_plan(kind, layout, kernel), layout.text_len, q.device)
    return _BlockSparseAttention.apply(q, k, v, plan, layout.text_len)


class _BlockSparseAttention(torch.autograd.Function):
    """Text queries: causal over the text. Image queries: all text keys + their block's window,
    one softmax over both. Forward and backward by hand (flash-attention's dS = P * (dP - rowsum
    (dO * O))): autograd of the same ops spent as long on slicing, concatenating and zero-filled
    slice gradients as on the matmuls. Text and window scores share one buffer; the gathered
    window keys and values are not kept for the backward but gathered again. Batch and heads
    are one batch dim (bh); image queries go in chunks of it (``_chunks``)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, t: int):
        bsz, heads, seq, dim = q.shape
        bh, n, width = bsz * heads, seq - t, t + plan.window
        q, k, v = (x.reshape(bh, seq, dim).contiguous() for x in (q, k, v))
        qs = q * dim**-0.5
        qs_t, k_t, v_t = qs[:, :t], k[:, :t], v[:, :t]
        qs_i = _image_part(qs, t, plan)

        causal, p_text, out_t = _causal_bias(t, q.dtype, q.device), [], []
        for r in _text_blocks(t):  # row block r attends keys [0, r.stop)
            p_text.append(
                _softmax(torch.baddbmm(causal[r, : r.stop], qs_t[:, r], k_t[:, : r.stop].mT))
            )
            out_t.append(torch.bmm(p_text[-1], v_t[:, : r.stop]))
        out_t = torch.cat(out_t, dim=1)

        probs = q.new_empty(bh, n, width)
        out_i = q.new_empty(bh, n, dim)
        chunks = _chunks(bh, n * width * q.element_size(), q.device)
        scores = q.new_empty(chunks[0].stop - chunks[0].start, n, width)
        bias = _mask_bias(plan, q.dtype)
        for c in chunks:
            s = scores[: c.stop - c.start]
            index = _flat_index(plan, c.stop - c.start, t)
            k_w, v_w = _gather(k[c], plan, index), _gather(v[c], plan, index)  # [c * blocks, W, d]
            _bmm_into(s[:, :, :t], qs_i[c], k_t[c].mT)
            local = _local(s, t, plan)
            _bmm_into(local, _blocks(qs_i[c], plan), k_w.mT)
            local.view(-1, plan.blocks, plan.size, plan.window).add_(bias)
            _softmax(s, out=probs[c])
            torch.bmm(probs[c, :, :t], v_t[c], out=out_i[c])
            _blocks(out_i[c], plan).baddbmm_(_local(probs[c], t, plan), v_w)

        ctx.save_for_backward(qs_t, k, v, qs_i, probs, out_t, out_i, *p_text)
        ctx.plan, ctx.shape = plan, (bsz, heads, seq, dim)
        out = torch.cat([out_t, _raster(out_i, plan)], dim=1)
        return out.view(bsz, heads, seq, dim)

    @staticmethod
    def backward(ctx, grad):
        qs_t, k, v, qs_i, probs, out_t, out_i, *p_text = ctx.saved_tensors
        plan, (bsz, heads, seq, dim) = ctx.plan, ctx.shape
        bh, t = bsz * heads, qs_t.shape[1]
        k_t, v_t = k[:, :t], v[:, :t]
        scale = dim**-0.5
        grad = grad.reshape(bh, seq, dim)
        g_t, g_i = grad[:, :t], _image_part(grad, t, plan)

        # text queries
        rowsum = (g_t * out_t).sum(-1, keepdim=True)
        dq_t, dk_t, dv_t = [], qs_t.new_zeros(bh, t, dim), qs_t.new_zeros(bh, t, dim)
        for r, p in zip(_text_blocks(t), p_text, strict=True):
            ds = torch.bmm(g_t[:, r], v_t[:, : r.stop].mT).sub_(rowsum[:, r]).mul_(p)
            dq_t.append(torch.bmm(ds, k_t[:, : r.stop]))
            dk_t[:, : r.stop].baddbmm_(ds.mT, qs_t[:, r])
            dv_t[:, : r.stop].baddbmm_(p.mT, g_t[:, r])
        dq_t = torch.cat(dq_t, dim=1).mul_(scale)

        # image queries
        rowsum = (g_i * out_i).sum(-1, keepdim=True)
        dq_i = torch.empty_like(out_i)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # image keys: scattered into
        chunks = _chunks(bh, probs[0].numel() * probs.element_size(), probs.device)
        ds = torch.empty_like(probs[chunks[0]])
        for c in chunks:
            d = ds[: c.stop - c.start]
            index = _flat_index(plan, c.stop - c.start, t)
            k_w, v_w = _gather(k[c], plan, index), _gather(v[c], plan, index)
            g_blocks, qs_blocks = _blocks(g_i[c], plan), _blocks(qs_i[c], plan)
            _bmm_into(d[:, :, :t], g_i[c], v_t[c].mT)
            _bmm_into(_local(d, t, plan), g_blocks, v_w.mT)
            d.sub_(rowsum[c]).mul_(probs[c])  # masked keys: probs 0
            ds_local, p_local = _local(d, t, plan), _local(probs[c], t, plan)
            torch.bmm(d[:, :, :t], k_t[c], out=dq_i[c])
            _blocks(dq_i[c], plan).baddbmm_(ds_local, k_w)
            dk_t[c].baddbmm_(d[:, :, :t].mT, qs_i[c])
            dv_t[c].baddbmm_(probs[c, :, :t].mT, g_i[c])
            for target, a, b in ((dk, ds_local, qs_blocks), (dv, p_local, g_blocks)):
                target[c].view(-1, dim).index_add_(0, index, torch.bmm(a.mT, b).flatten(0, 1))
        dq_i.mul_(scale)

        dk[:, :t] = dk_t
        dv[:, :t] = dv_t
        dq = torch.cat([dq_t, _raster(dq_i, plan)], dim=1)
        return tuple(x.view(bsz, heads, seq, dim) for x in (dq, dk, dv)) + (None, None)


def _text_blocks(t: int) -> list[slice]:
    """Row blocks of the text queries (causal: block r attends keys [0, r.stop) only)."""
    return [slice(i, min(i + TEXT_BLOCK, t)) for i in range(0, t, TEXT_BLOCK)]


def _chunks(bh: int, bytes_per_head: int, device: torch.device) -> list[slice]:
    """Slices of the bh dim that image queries go through the kernel in (see CPU_CHUNK_BYTES)."""
    step = bh if device.type != "cpu" else max(1, min(bh, CPU_CHUNK_BYTES // bytes_per_head))
    return [slice(i, min(i + step, bh)) for i in range(0, bh, step)]


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[:] = a @ b`` (batched). Into a strided ``out`` (a slice of the score buffer), CPU
    ``bmm`` falls back to one small matmul call per batch item, which at dalle-tiny's 256 heads x
    4 blocks cost more than the matmuls: there it multiplies into a temporary and copies."""
    if out.is_contiguous() or out.shape[0] <= 32:
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b))


def _softmax(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim in float32 at least (as the fused kernels do), in the input's
    dtype; into ``out`` if given."""
    if scores.dtype in (torch.float32, torch.float64):
        return torch.softmax(scores, dim=-1, out=out) if out is not None else scores.softmax(-1)
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    return out.copy_(probs) if out is not None else probs.to(scores.dtype)


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


def _gather(x: torch.Tensor, plan: BlockPlan, index: torch.Tensor) -> torch.Tensor:
    """Contiguous [heads, S, d] -> each block's window of image keys [heads * blocks, window, d]."""
    return x.view(-1, x.shape[2]).index_select(0, index).view(-1, plan.window, x.shape[2])
