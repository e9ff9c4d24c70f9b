"""What `ctxforge lengthen` prints, as a user runs it (a child process: the quiet console binds logging to the
process's own streams): ctxforge's progress, a line per training step and the summary table; the engines' and
training workers' output (model loading, DeepSpeed, Ray Train's checkpoint reports) in Ray's log files, whose
folder the last line names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_TINY = ["--config", "lengthen-tiny", "runtime.progress=false", "extend.rounds=1"]


def test_lengthen_console_is_quiet_and_names_rays_logs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "ctxforge", "lengthen", *_TINY, f"output.dir={tmp_path / 'out'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500, env={**env, "HF_HUB_OFFLINE": "1"})
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    for worker_line in ("pid=", "DeepSpeed", "Checkpoint successfully created", "Loading weights"):
        assert worker_line not in console, console
    assert re.search(r"^   \[generator\] step 1: loss", proc.stdout, re.M), proc.stdout   # a line per training step
    assert re.search(r"^   \[extender\] step 1: loss", proc.stdout, re.M), proc.stdout
    assert "long-output set:" in proc.stdout
    logs = re.search(r"^Ray's logs:  (\S+)", proc.stdout, re.M)
    assert logs, proc.stdout
    # the pointer is right: the training workers' output is in that folder
    workers = "".join(p.read_text(errors="replace") for p in Path(logs.group(1)).glob("worker-*"))
    assert "Checkpoint successfully created" in workers
