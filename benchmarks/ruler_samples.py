"""RULER samples, question split, post-processing and metrics: no torch, no infertrix.

Shared by ``benchmarks/kvcache_ruler.py`` (our policies) and ``benchmarks/kvpress_ruler.py`` (kvpress's
presses in their own venv), so both read the same samples, cut them at the same place and score them
with the same RULER functions.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUESTION_MARKERS = {  # where RULER's templates (data/synthetic/constants.py) put the question
    "niah": "\nWhat", "variable_tracking": "\nQuestion:", "common_words_extraction": "\nQuestion:",
    "freq_words_extraction": "\nQuestion:", "qa": "\n\nAnswer the question",
}


def ruler_package() -> Path:
    """The installed ``long_context_eval`` (RULER) of the benchmark venv made by setup_ruler.sh."""
    env = os.environ.get("RULER_PACKAGE")
    found = [env] if env else glob.glob(str(ROOT / ".venv-ruler/lib/python*/site-packages/long_context_eval"))
    if not found or not Path(found[0]).is_dir():
        raise SystemExit("RULER is not installed: run `bash benchmarks/setup_ruler.sh` (or set RULER_PACKAGE)")
    return Path(found[0])


def module_from(path: Path, name: str):
    """Import one file of the RULER package by path (its package __init__ pulls in NeMo clients)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ruler_tasks(pkg: Path) -> tuple[dict, dict]:
    """(task name -> RULER's kind, e.g. niah_single_1 -> niah; kind -> RULER's metric function)."""
    config = yaml.safe_load((pkg / "synthetic.yaml").read_text())
    metrics = module_from(pkg / "eval" / "synthetic" / "constants.py", "ruler_eval_constants").TASKS
    return {name: c["task"] for name, c in config.items()}, {k: v["metric_fn"] for k, v in metrics.items()}


def split_question(text: str, kind: str) -> tuple[str, str]:
    """(context, question with RULER's answer prefix): cut at the last question marker of the task."""
    at = text.rfind(QUESTION_MARKERS[kind])
    if at <= 0:
        raise ValueError(f"no question marker {QUESTION_MARKERS[kind]!r} in a {kind} sample")
    return text[:at], text[at:]


def postprocess(pred: str) -> str:
    """RULER's ``postprocess_pred`` (eval/evaluate.py, which imports pandas; the same two steps)."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def load_samples(data: Path, length: int, task: str, n: int) -> list[dict]:
    path = data / str(length) / task / "validation.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `LENGTH={length} TASKS={task} bash benchmarks/setup_ruler.sh`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def ruler_setup() -> tuple[dict, dict, dict]:
    """(task -> RULER's kind, kind -> metric function, kind -> RULER's generation config such as
    ``tokens_to_generate``) from the installed RULER package."""
    pkg = ruler_package()
    kinds, metrics = ruler_tasks(pkg)
    gen_config = module_from(pkg / "data" / "synthetic" / "constants.py", "ruler_data_constants").TASKS
    return kinds, metrics, gen_config


def stamped_log():
    """A ``log(msg)`` printing the seconds since it was made before each message."""
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    return log
