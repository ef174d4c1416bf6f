"""DALL-E attention: sparse row / column / conv kernels against dense masked attention.

Both sides compute the same layer (training/models/attention.py; tests check they agree): the
dense side is one ``scaled_dot_product_attention`` over all ``T + N`` keys with the layer's
boolean mask, the sparse side attends text + a local window per block of image queries. The
layout is the paper's (256 text tokens + 32 x 32 image tokens); width is reduced to fit a CPU.
Each measurement is forward + backward, the median of ``--repeats`` runs after a warm-up,
dense and sparse alternating. One thread by default: what each training worker uses here. The
last line sums the kinds over a model's layer schedule (the 12B's 64 layers: 47 row, 16 column,
1 conv): the speed-up of a whole model's attention. One table per dtype: float32, and bfloat16,
the precision the DALL-E configs train in.

Measured (2 cores, quiet, 1 thread, 2026-12-06, medians of 5 runs on an AMD EPYC core): float32
row 4.08x, column 4.39x, conv 2.80x (2.71-3.18x), 12B schedule 4.12x; bfloat16 row 5.09x, column
5.63x, conv 4.05x, schedule 5.17x (another machine that day: float32 3.91x, 4.18x, 2.82x, 3.95x;
bfloat16 4.09x, 4.62x, 3.31x, 4.20x). Conv in float32
is bound by its window (every image query scores 256 text + 160 window keys against 1,280) and
by gathering the windows (~115 us per head and pass in the kernel, 34 us with the keys in cache).

    .venv/bin/python benchmarks/attention.py                    # attention kernels
    .venv/bin/python benchmarks/attention.py --train-tokens     # + dalle-tiny training tokens/s

``--train-tokens`` times optimizer steps of dalle-tiny (configs/models/dalle-tiny.json) on
random tokens in one process, sparse and dense attention, and prints tokens/s (text + image
positions per second). Timings on a shared machine are noisy: compare runs taken together.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training.models.attention import (
    KINDS,
    Layout,
    dense_attention,
    layer_kinds,
    sparse_attention,
)


def _time_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately so that load from other
    processes hits both alike."""
    first(), second()  # warm-up: caches masks and plans, the allocator
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


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
        times[kind] = dense, sparse = _time_pair(
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
    timings = _time_pair(steps["dense"], steps["sparse"], args.repeats)
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
