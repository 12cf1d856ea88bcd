"""The main job's tables in BENCHMARKS.md: `infertrix bench` on SmolLM2, each family on its workload.

    python -m benchmarks.bench --recipe baseline --all-recipes [any other `infertrix bench` flag]

The measurement is ``infertrix.eval.workloads`` (``infertrix bench`` prints the same tables); this
script also records them in the "bench" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.report import write_section
from infertrix import cli
from infertrix.eval import bench_report


def main(argv: list[str]) -> None:
    args = cli.parse_args(["bench", "--model", "smollm2", *argv])
    report = cli.bench(args)
    body = bench_report.format_report(report)
    print(body)
    bench_report.write_outputs(report, args)
    write_section("bench", "infertrix bench: SmolLM2-135M-Instruct, each family on its workload", body)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
