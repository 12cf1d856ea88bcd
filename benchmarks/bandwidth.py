"""Memory read bandwidth, and the decode speed it allows a model whose weights are read once per token.

    python benchmarks/bandwidth.py                    # 1 and 2 threads, SmolLM2's float32 and W4A8 sizes
    python benchmarks/bandwidth.py --no-write

A batch-1 decode step reads every weight once, so ``bandwidth / weight bytes`` is a ceiling on its
tokens/s whatever the kernels do. Two readers over buffers of the sizes a SmolLM2 decode step
streams: ``torch.sum`` (torch's vectorised reduction) and ``infertrix::skinny_linear`` with one row
(the engine's float32 matrix-vector kernel, the one the ceiling is about). Each figure is the median
of alternating rounds; the buffer is rotated through several copies when it is small enough to stay
in a cache, so that every read comes from memory (or the last-level cache, when the machine's is large:
say which in the notes). Two clocks: wall time, and CPU time over the thread count (what the reads
take while the process is on a core, the better estimate on a shared machine, where other jobs take
turns on the cores; it still shares the memory bus). The ceilings use the faster of the two. On a
shared machine the figures are lower bounds of the idle machine's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import markdown_table, write_section  # noqa: E402

FP32_WEIGHTS = 538_000_000  # bytes a SmolLM2-135M float32 decode step reads (all linears and the tied head)
W4A8_WEIGHTS = 73_000_000   # the same with W4A8 weights and the quantized head (float32 embedding not read)


def read_seconds(reader, bufs: list[torch.Tensor], rounds: int, clock=time.perf_counter) -> float:
    """Median seconds (by ``clock``) per buffer read over ``rounds`` passes through ``bufs``."""
    times = []
    for _ in range(rounds):
        t = clock()
        for b in bufs:
            reader(b)
        times.append((clock() - t) / len(bufs))
    return statistics.median(times)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    import infertrix.ops.skinny_linear  # noqa: F401  (registers the op)

    k = 576  # SmolLM2's hidden size: the shape of its matrix-vector products
    readers = {"torch.sum": lambda b: b.sum(), "skinny_linear M=1": None}
    rows = []
    for label, size in (("float32 SmolLM2 weights", FP32_WEIGHTS), ("W4A8 SmolLM2 weights", W4A8_WEIGHTS)):
        n = size // (4 * k)
        copies = max(1, FP32_WEIGHTS // size)  # a float32 model's worth per pass (more than the L3 of most machines)
        bufs = [torch.randn(n, k) for _ in range(copies)]
        x = torch.randn(1, k)
        readers["skinny_linear M=1"] = lambda b, x=x: torch.ops.infertrix.skinny_linear(x, b, None)
        for t in args.threads:
            torch.set_num_threads(t)
            for name, reader in readers.items():
                read_seconds(reader, bufs[:1], 1)  # warm
                wall = read_seconds(reader, bufs, args.rounds)
                cpu = read_seconds(reader, bufs, args.rounds, time.process_time) / t
                gbs = n * k * 4 / min(wall, cpu) / 1e9
                rows.append({"buffer": f"{label} ({size / 1e6:.0f} MB)", "reader": name, "threads": t,
                             "GB/s (wall)": n * k * 4 / wall / 1e9, "GB/s (CPU time)": n * k * 4 / cpu / 1e9,
                             "tok/s ceiling (fp32)": gbs * 1e9 / FP32_WEIGHTS,
                             "tok/s ceiling (W4A8)": gbs * 1e9 / W4A8_WEIGHTS})
        del bufs
    body = (f"{args.note}\n\n" if args.note else "") + (
        "Read bandwidth over buffers of a SmolLM2 decode step's weight bytes; the ceilings are the batch-1 "
        "decode tokens/s the faster of the two figures allows (float32: 538 MB a token, W4A8+head: 73 MB).\n\n" + markdown_table(rows))
    print(body)
    if not args.no_write:
        write_section("bandwidth", "bandwidth: the batch-1 decode ceiling", body)


if __name__ == "__main__":
    main(sys.argv[1:])
