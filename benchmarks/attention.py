"""DALL-E attention: sparse row / column / conv kernels against dense masked attention.

Both sides compute the same layer (training/models/attention.py) at the paper's layout (256 text
+ 32 x 32 image tokens) with a CPU-sized width: forward + backward, dense and sparse alternating,
one table per dtype, and the speed-up summed over a model's layer schedule (the 12B's 64 layers).
Measured figures: docs/benchmarks.md.

    .venv/bin/python benchmarks/attention.py                    # attention kernels
    .venv/bin/python benchmarks/attention.py --train-tokens     # + dalle-tiny training tokens/s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file

from benchmarks.metering import time_alternately  # noqa: E402
from training.models.attention import (  # noqa: E402
    KINDS,
    Layout,
    dense_attention,
    layer_kinds,
    sparse_attention,
)


def attention_step(attend, q, k, v, kind, layout, kernel):
    def run():
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, kind, layout, kernel)
        out.backward(torch.ones_like(out))

    return run


def bench_attention(args, dtype_name: str) -> None:
    layout = Layout(args.text_len, args.grid, args.grid)
    shape = (args.batch, args.heads, layout.seq_len, args.head_dim)
    print(
        f"layout: {layout.text_len} text + {layout.rows}x{layout.cols} image tokens, "
        f"batch {args.batch}, {args.heads} heads x {args.head_dim}, {dtype_name}, "
        f"{torch.get_num_threads()} threads, forward + backward, median of {args.repeats}"
    )
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    print(f"{'kind':<8}{'dense ms':>10}{'sparse ms':>11}{'speed-up':>10}")
    times = {}
    for kind in KINDS:
        times[kind] = dense, sparse = time_alternately(
            attention_step(dense_attention, q, k, v, kind, layout, args.kernel),
            attention_step(sparse_attention, q, k, v, kind, layout, args.kernel),
            args.repeats,
        )
        print(f"{kind:<8}{dense * 1e3:>10.1f}{sparse * 1e3:>11.1f}{dense / sparse:>9.2f}x")
    # what a whole model's attention gains: each kind weighted by its layers in the schedule
    kinds = layer_kinds(args.schedule_layers)
    counts = {kind: kinds.count(kind) for kind in KINDS}
    dense, sparse = (sum(counts[kind] * times[kind][i] for kind in KINDS) for i in (0, 1))
    shown = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    print(f"{args.schedule_layers}-layer schedule ({shown}): {dense / sparse:.2f}x")


def bench_training(args) -> None:
    from training.models.dalle import Dalle, DalleConfig, dalle_loss

    cfg = DalleConfig.named("dalle-tiny")
    torch.manual_seed(0)
    text = torch.randint(0, cfg.text_vocab_padded, (args.train_batch, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (args.train_batch, cfg.image_len))
    print(
        f"dalle-tiny training step, batch {args.train_batch} x {cfg.seq_len} tokens, fp32, "
        f"{torch.get_num_threads()} threads, AdamW, median of {args.repeats}"
    )
    steps = {}
    for dense in (True, False):
        model = Dalle(cfg)
        model.set_dense_attention(dense)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad()
            dalle_loss(*model(text, image), text, image)["total"].backward()
            optimizer.step()

        steps["dense" if dense else "sparse"] = step
    timings = time_alternately(steps["dense"], steps["sparse"], args.repeats)
    for name, seconds in zip(("dense", "sparse"), timings, strict=True):
        tokens = args.train_batch * cfg.seq_len / seconds
        print(f"{name:<8}{seconds * 1e3:>8.1f} ms/step {tokens:>10.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--kernel", type=int, default=11)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="one table each (the tiny and 12B configs train in bf16)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--schedule-layers", type=int, default=64, help="layers of the schedule summed (12B: 64)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    parser.add_argument("--train-tokens", action="store_true", help="also time dalle-tiny steps")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_attention:
        for dtype_name in args.dtype:
            bench_attention(args, dtype_name)
    if args.train_tokens:
        bench_training(args)


if __name__ == "__main__":
    main()
