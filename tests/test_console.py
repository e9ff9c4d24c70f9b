"""The console of a run: Ray Data's INFO progress records go to Ray's log file, not the terminal; training
progress is a line per step read from the metrics rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter whose environment lacks RAY_DATA_LOGGING_CONFIG: a CLI command run
    in-process earlier in this pytest session may have set it (quiet_ray), which would silence a negative control."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_quiet_ray_keeps_ray_data_info_off_the_console_and_warnings_on_it(tmp_path):
    code = (
        "import logging, os, sys\n"
        "from ctxforge.console import quiet_ray\n"
        f"quiet_ray({str(tmp_path)!r})\n"
        "import ray.data\n"
        "log = logging.getLogger('ray.data._internal.progress.logging_progress')\n"
        "log.info('PROGRESS-LINE')\n"
        "log.warning('WARNING-LINE')\n"
        "print(os.environ['RAY_DATA_LOGGING_CONFIG'])\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING-LINE" in proc.stderr and "PROGRESS-LINE" not in proc.stderr + proc.stdout
    assert proc.stdout.strip() == str(tmp_path / "ray-data-logging.yaml")  # the file Ray's workers read too
    # negative control: without quiet_ray, Ray Data prints its INFO records on the console
    plain = _python(code.replace(f"quiet_ray({str(tmp_path)!r})", "pass")
                    .replace("print(os.environ['RAY_DATA_LOGGING_CONFIG'])", ""))
    assert "PROGRESS-LINE" in plain.stderr + plain.stdout


def test_quiet_serve_driver_moves_serves_info_lines_to_the_driver_log(tmp_path):
    code = (
        "import logging, sys\n"
        "from ctxforge import console\n"
        f"console.quiet_ray({str(tmp_path)!r})\n"
        f"console._State.session_logs = {str(tmp_path)!r}\n"   # what attach_driver_log sets after ray.init
        "import ray.serve\n"
        "console.quiet_serve_driver()\n"
        "log = logging.getLogger('ray.serve')\n"
        "log.info('SERVE-INFO')\n"
        "log.warning('SERVE-WARNING')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stderr + proc.stdout
    assert "SERVE-WARNING" in console and "SERVE-INFO" not in console
    assert "SERVE-INFO" in (tmp_path / "ctxforge-driver.log").read_text()   # kept, in the file the demo names
    # negative control: Serve's own console handler prints its INFO lines
    plain = _python(code.replace("console.quiet_serve_driver()", "pass"))
    assert "SERVE-INFO" in plain.stderr + plain.stdout


def test_follow_training_prints_a_line_per_new_step(tmp_path):
    from ctxforge.console import follow_training

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    row = {"stage": "2K", "loss": 2.5, "lr": 1e-4, "samples": 1, "tokens": 1200, "step_s": 3.0, "tokens_per_s": 400.0}
    (metrics / "2K.jsonl").write_text(json.dumps({**row, "step": 1}) + "\n")  # an earlier run's row: not shown
    lines: list[str] = []

    def worker():
        with (metrics / "2K.jsonl").open("a") as fh:
            fh.write(json.dumps({**row, "step": 2, "loss": 2.25}) + "\n")
            fh.flush()
            time.sleep(0.3)
            text = json.dumps({**row, "stage": "4K", "step": 1, "loss": 2.0})
            with (metrics / "4K.jsonl").open("a") as other:
                other.write(text[:10])   # half a row: held until its newline arrives
                other.flush()
                time.sleep(0.3)
                other.write(text[10:] + "\n")

    with follow_training(metrics, emit=lines.append, poll_s=0.05):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert len(lines) == 2
    assert lines[0].startswith("   [2K] step 2: loss 2.2500") and "1,200 tokens" in lines[0]
    assert lines[1].startswith("   [4K] step 1: loss 2.0000")


def test_follow_training_reads_a_history_rewritten_by_a_resume(tmp_path):
    """A resumed stage rewrites its file without the rows past its checkpoint (train/loop.py); the lines
    after that are printed whole, once, with the resume itself."""
    from ctxforge.console import follow_training
    from ctxforge.train.loop import truncate_history

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    path = metrics / "2K.jsonl"
    row = {"stage": "2K", "loss": 2.5, "lr": 1e-4, "samples": 1, "tokens": 1200, "step_s": 3.0, "tokens_per_s": 400.0}
    lines: list[str] = []
    with follow_training(metrics, emit=lines.append, poll_s=0.05):
        path.write_text("".join(json.dumps({**row, "step": s, "loss": 3.0 - s / 10}) + "\n" for s in (1, 2, 3)))
        time.sleep(0.3)
        kept = truncate_history(path, 2)
        with path.open("a") as fh:
            for s in (3, 4):
                fh.write(json.dumps({**row, "step": s, "loss": 2.0 - s / 10}) + "\n")
    assert [r["step"] for r in kept] == [1, 2]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines() if "event" not in x] == [1, 2, 3, 4]
    assert lines[3] == "   [2K] resumed from the checkpoint at step 2; the rows logged for step 3 were dropped and are recomputed"
    assert [x.split(":")[0] for x in lines] == ["   [2K] step 1", "   [2K] step 2", "   [2K] step 3",
                                              "   [2K] resumed from the checkpoint at step 2; the rows logged for step 3 were dropped and are recomputed",
                                              "   [2K] step 3", "   [2K] step 4"]


_VLLM_IMPORT = (
    "import logging, os, sys\n"
    "logging.basicConfig(level=logging.WARNING)\n"      # as the CLI sets it up
    "from ctxforge import console\n"
    "console.quiet_ray({tmp!r})\n"
    "{before}\n"
    "from ray.serve.llm import LLMConfig, build_openai_app\n"   # what serve/vllm_app.py imports to build the app
    "{after}\n"
    "logging.getLogger('vllm.engine').warning('VLLM-RUNTIME-WARNING')\n"
    "logging.getLogger('vllm.engine').info('VLLM-RUNTIME-INFO')\n"
)


def _triton_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Triton" in line]


@pytest.fixture(scope="module")
def vllm_import_prints_triton_lines():
    """The lines vLLM prints on import where its Triton probe fails (a CPU machine): the negative control of the
    tests below, which need them to exist."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    plain = _python(_VLLM_IMPORT.format(tmp="/nonexistent", before="", after="")
                    .replace("console.quiet_ray('/nonexistent')", "pass"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    lines = _triton_lines(plain.stdout + plain.stderr)
    if not lines:
        pytest.skip("vLLM's Triton probe prints nothing on this machine")
    assert "VLLM-RUNTIME-INFO" in plain.stdout + plain.stderr   # vLLM's own console: INFO and up
    return lines


@pytest.mark.parametrize("ray_started", [True, False])
def test_quiet_vllm_driver_moves_vllms_import_lines_to_the_driver_log(tmp_path, vllm_import_prints_triton_lines,
                                                                      ray_started):
    """The Triton probe's WARNING and INFO lines go to ctxforge-driver.log, also when vLLM is imported before Ray
    starts (engine-argument checks at preflight: held until the session's log folder is known); vLLM's later
    warnings still reach the console."""
    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    if ray_started:   # what init_ray's attach_driver_log sets after ray.init
        before, after = f"console.attach_driver_log({str(tmp_path / 'session')!r})\nconsole.quiet_vllm_driver()", ""
    else:
        before, after = "console.quiet_vllm_driver()", f"console.attach_driver_log({str(tmp_path / 'session')!r})"
    proc = _python(_VLLM_IMPORT.format(tmp=str(tmp_path), before=before, after=after))
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert not _triton_lines(console), console
    assert "VLLM-RUNTIME-WARNING" in console and "VLLM-RUNTIME-INFO" not in console
    log = (logs / "ctxforge-driver.log").read_text()
    assert len(_triton_lines(log)) == len(vllm_import_prints_triton_lines), log
    assert "VLLM-RUNTIME-INFO" in log


def test_lengthen_gets_the_quiet_console_unless_verbose():
    """The CLI's choice of console, in a child process (the quiet console binds logging to the process's streams)."""
    code = (
        "import sys\n"
        "from ctxforge import cli, console\n"
        "cli._dispatch = lambda args: 0\n"       # the choice only: no stage runs
        "cli.main(sys.argv[1:])\n"
        "print('QUIET' if console.is_quiet() else 'LOUD')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    for argv, want in ((["lengthen"], "QUIET"), (["-v", "lengthen"], "LOUD"), (["serve"], "LOUD")):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == want, (argv, proc.stdout)
