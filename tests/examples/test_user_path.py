"""The user's path end to end on the real SmolLM2 (examples/user_path.py), as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "user_path.py"


@pytest.mark.smollm2
def test_user_path_example_runs_and_checks_every_step(smollm2):  # the fixture skips when SmolLM2 is absent
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "from_pretrained: logits bit-identical" in out
    assert "lm-eval log-likelihoods" in out or "lm-eval not installed" in out
    assert out.rstrip().endswith("user path: ok")
