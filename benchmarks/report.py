"""Writing benchmark tables into BENCHMARKS.md, one section per script.

Each benchmark script prints its tables and calls :func:`write_section` with its family name;
the section between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->`` is replaced, and the
command, machine and date are recorded above the tables so anyone can re-run them.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
        isa = [f for f in ("avx512_vnni", "avx512f", "avx2") if f in out]
    except OSError:
        isa = []
    ext = "n/a"
    try:
        import infertrix

        ext = infertrix.ops.status().cpu_isa or "reference (no extension)"
    except Exception:  # noqa: BLE001 - a report must still be written
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores ({', '.join(isa) or 'no AVX2'}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; infertrix kernels: {ext}"
    )


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, title: str, body: str, command: str | None = None) -> None:
    """Replace section ``name`` of BENCHMARKS.md with ``body`` (markdown) and a header."""
    command = command or "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- begin:{name} -->\n## {title}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.rstrip()}\n"
        f"<!-- end:{name} -->"
    )
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- begin:{re.escape(name)} -->.*?<!-- end:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
