"""scripts/gpu_check.py's dry run: every step of the GPU check on a tiny model on the CPU, so that the
script is known to run when a GPU is lent (it has minutes there, not time to debug)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_reports_numbers(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["install", "tests", "decode", "compile", "train", "serve"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["tests"]["counts"].get("skipped", 0) >= 7  # the CUDA tests, collected and skipped on CPU
    decode = steps["decode"]
    for key in ("bf16_eager_tok_s", "int4_eager_tok_s", "prefill_tok_s", "bf16_limit_tok_s", "int4_limit_tok_s"):
        assert decode[key] > 0, key
    assert steps["compile"]["bf16_compiled_tok_s"] > 0
    assert decode["int4_weight_bytes"] < decode["weight_bytes"] / 3
    train = steps["train"]
    assert train["lora_tok_s"] > 0 and train["qlora_tok_s"] > 0
    assert 0 < train["lora_loss"] < 10 and 0 < train["qlora_loss"] < 10  # ln(512) = 6.2 at the start
    assert all(steps["serve"][f"clients_{n}"]["tok_s"] > 0 for n in (1, 4, 8))
    summary = (tmp_path / "summary.md").read_text()
    assert "| decode | ok |" in summary and "dry run" in summary
