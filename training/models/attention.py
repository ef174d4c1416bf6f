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
in blocks of consecutive positions: 16 in raster order for row and conv attention, one whole
column for column attention (after transposing the image, as the paper does). A block attends
all T text keys plus a window of image keys gathered for it: the union of the keys its queries
may attend (``block_plan``: built from the dense mask, so it cannot miss one). Scores are
``[block, T + window]`` instead of ``[block, T + N]``: at 256 + 32 x 32, a row block's window is
48 image keys, a column's 32, a 11 x 11 conv block's 151, against 1024 for dense attention.
One softmax runs over text and window scores together, so the result is the dense layer's.
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


@dataclass(frozen=True)
class BlockPlan:
    """How one layer's image queries are computed sparsely.

    Queries go in blocks of ``size`` consecutive positions of the computation order (raster
    order; column-major for column attention, so a column is one block). Block b attends all
    text keys plus image keys ``key_index[b]`` (computation-order position + 1; 0 is an all-zero
    padding key, masked), ``window`` of them: the union of the keys its queries may attend.
    ``mask[b, i, j]``: query i of block b attends window key j.
    """

    size: int
    blocks: int
    window: int
    transposed: bool
    key_index: torch.Tensor  # [blocks, window] int64
    mask: torch.Tensor  # [blocks, size, window] bool


# Row and conv queries per block: smaller blocks gather fewer keys per query but run more,
# smaller matmuls; 16 was fastest at the paper's layout on CPU (8 and 32 slower).
QUERY_BLOCK = 16


@functools.lru_cache(maxsize=64)
def block_plan(kind: Kind, layout: Layout, kernel: int = 11) -> BlockPlan:
    """The blocks and key windows of ``kind`` at ``layout``, from its dense mask."""
    dense = image_mask(kind, layout, kernel)  # raster order
    n = layout.image_len
    transposed = kind == "column"
    if transposed:  # computation order: column-major
        order = torch.arange(n).view(layout.rows, layout.cols).t().reshape(-1)
        dense = dense[order][:, order]
        size = layout.rows
    else:
        size = math.gcd(QUERY_BLOCK, n)
    blocks = n // size
    keys = [dense[b * size : (b + 1) * size].any(dim=0).nonzero().flatten() for b in range(blocks)]
    window = max(len(k) for k in keys)
    key_index = torch.zeros(blocks, window, dtype=torch.long)
    mask = torch.zeros(blocks, size, window, dtype=torch.bool)
    for b, k in enumerate(keys):
        key_index[b, : len(k)] = k + 1
        mask[b, :, : len(k)] = dense[b * size : (b + 1) * size, k]
    return BlockPlan(size, blocks, window, transposed, key_index, mask)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: Kind, layout: Layout, kernel: int = 11
) -> torch.Tensor:
    """The layer's attention, computed block-sparsely. q, k, v: [B, h, S, d] -> [B, h, S, d]."""
    t = layout.text_len
    q_text, k_text, v_text = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    out_text = F.scaled_dot_product_attention(q_text, k_text, v_text, is_causal=True)
    plan = block_plan(kind, layout, kernel)
    q_image, k_image, v_image = q[:, :, t:], k[:, :, t:], v[:, :, t:]
    if plan.transposed:
        q_image, k_image, v_image = (
            _transpose_image(x, layout) for x in (q_image, k_image, v_image)
        )
    out_image = _image_attention(q_image, k_image, v_image, k_text, v_text, plan)
    if plan.transposed:
        out_image = _transpose_image(out_image, Layout(t, layout.cols, layout.rows))
    return torch.cat([out_text, out_image], dim=2)


def _transpose_image(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, h, rows*cols, d] in raster order -> the same tokens in column-major order."""
    bsz, heads, _, dim = x.shape
    x = x.view(bsz, heads, layout.rows, layout.cols, dim).transpose(2, 3)
    return x.reshape(bsz, heads, layout.image_len, dim)


def _image_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    plan: BlockPlan,
) -> torch.Tensor:
    """Image queries against all text keys and their block's window of image keys.
    q, k, v: [B, h, N, d] in computation order; k_text, v_text: [B, h, T, d] -> [B, h, N, d]."""
    bsz, heads, n, dim = q.shape
    t = k_text.shape[2]
    nb, size, window = plan.blocks, plan.size, plan.window
    index = plan.key_index.to(q.device).flatten()
    pad = q.new_zeros(bsz, heads, 1, dim)  # key 0: padding, always masked

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, h, N, d] -> [B, h, nb, window, d]
        return torch.cat([pad, x], dim=2).index_select(2, index).view(bsz, heads, nb, window, dim)

    k_local, v_local = gather(k), gather(v)
    q = q * dim**-0.5
    scores_text = (q @ k_text.transpose(-1, -2)).view(bsz, heads, nb, size, t)
    scores_local = q.view(bsz, heads, nb, size, dim) @ k_local.transpose(-1, -2)
    scores_local = scores_local.masked_fill(~plan.mask.to(q.device), float("-inf"))
    # one softmax over text + window keys, in fp32 at least (as the fused kernels do)
    scores = torch.cat([scores_text, scores_local], dim=-1)
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = probs[..., :t].reshape(bsz, heads, n, t) @ v_text  # [B, h, N, d]
    return out + (probs[..., t:] @ v_local).view(bsz, heads, n, dim)
