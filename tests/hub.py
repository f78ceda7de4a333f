"""A Hugging Face Hub for the loading tests: a model laid out as the cache holds it, and
loading in a fresh interpreter that reads ``HF_ENDPOINT`` and ``HF_HOME`` as a worker would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter so huggingface_hub reads HF_ENDPOINT and HF_HOME at import,
# exactly as a worker started with them would.
LOAD_SCRIPT = """
import json, sys, time
from pathlib import Path
# Imported before the clock starts, so only the time spent on the Hub is measured.
from diffusers import StableVideoDiffusionPipeline
from worker.pipeline import ModelUnavailable, load_pipeline
from worker.plans import Plan

models_dir, timeout, specs = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
for spec in specs:
    started = time.monotonic()
    try:
        pipe = load_pipeline(spec, models_dir, Plan.uniform("fp32", "cpu"), hub_timeout_s=timeout)
        result = {"loaded": type(pipe).__name__}
    except ModelUnavailable as error:
        result = {"error": str(error)}
    result["seconds"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
"""


def load_in_subprocess(
    tmp_path: Path, endpoint: str, timeout_s: float, *specs: str
) -> list[dict[str, object]]:
    """Run load_pipeline for each spec in a new Python with the Hub at ``endpoint``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE_")) and key != "TRANSFORMERS_OFFLINE"
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "models"), str(timeout_s), *specs],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def cache_as_hub_model(tiny_model_dir: Path, hf_home: Path, repo_id: str) -> None:
    """Lay the tiny model out as huggingface_hub's cache holds a downloaded repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
