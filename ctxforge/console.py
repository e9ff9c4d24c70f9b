"""What a run prints: ctxforge's own lines and tables on the console, Ray's detail in Ray's log files.

In a non-interactive terminal Ray Data replaces its progress bars with INFO log records every 10 s per
running dataset (hundreds of `logging_progress.py` lines for one synthesis run), and every actor's and
training worker's stdout/stderr is streamed to the driver (model-loading bars, DeepSpeed's set-up, Serve's
access log). `quiet_ray()` keeps all of it and moves it off the console:

- Ray Data's logger (`ray.data`) writes to its usual file, `<session>/logs/ray-data/ray-data.log`, and only
  WARNING and above reach the console. This goes through Ray Data's documented `RAY_DATA_LOGGING_CONFIG`
  (read by the driver and by every worker process Ray starts, which inherit the environment);
- the driver's `ray` logger (Ray core, Train and Serve driver-side records) keeps WARNING and above on the
  console and writes everything to `<session>/logs/ctxforge-driver.log`;
- workers' output stays in `<session>/logs/worker-*.out|err` (`log_to_driver=False`, applied by
  ctxforge.raycluster.init_ray);
- where the driver itself imports vLLM (to build the ray.serve.llm app, to check engine arguments), the
  `vllm` logger keeps WARNING and above on the console and writes everything to ctxforge-driver.log; the
  Triton probe vLLM runs at import goes only to that file (`quiet_vllm_driver`).

Progress is then ctxforge's own: a line per generation pass (pipeline), a line per training step
(`follow_training`, which reads the metrics rows rank 0 writes), a line per RULER group (serve), and each
stage's summary table. `-v/--verbose` keeps Ray's default console output instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import logging.handlers
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

_RAY_DATA_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"
_FORMAT = "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"  # Ray's own file format


class _State:
    quiet = False
    session_logs: str | None = None
    # loggers routed to ctxforge-driver.log before Ray started (the file's folder is Ray's session): their
    # records wait in a buffer that attach_driver_log writes out
    pending: dict[str, logging.handlers.MemoryHandler] = {}


def ray_data_logging_config() -> dict:
    """Ray Data's default logging config (ray/data/_internal/logging.py) with the console at WARNING:
    the file handler and its location are Ray Data's own."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": _FORMAT}},
        "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"}},
        "handlers": {
            "file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                     "filename": "ray-data.log"},
            "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "WARNING",
                        "filters": ["console_filter"]},
        },
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
    }


def quiet_ray(config_dir: Path | None = None) -> None:
    """Route Ray's INFO output to Ray's log files; call once from the CLI layer, before Ray starts.

    `config_dir` (default: the ctxforge cache, ~/.cache/ctxforge) receives the YAML file that
    RAY_DATA_LOGGING_CONFIG points to, so that worker processes read the same routing. Idempotent; a process
    that already imported ray.data is reconfigured in place.
    """
    import sys

    import ray  # importing it configures the `ray` logger, whose console handlers are lowered below
    import yaml

    from ctxforge.models import default_cache_dir

    config_dir = Path(config_dir or default_cache_dir()).expanduser().absolute()
    config_dir.mkdir(parents=True, exist_ok=True)
    config = ray_data_logging_config()
    path = config_dir / "ray-data-logging.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)  # several runs may share the cache: never a half-written file
    os.environ[_RAY_DATA_CONFIG_ENV] = str(path)
    if "ray.data" in sys.modules:  # Ray Data configured itself at import time: apply the same config now
        logging.config.dictConfig(config)
    _console_warnings_only(logging.getLogger(ray.__name__))  # "Started a local Ray instance." and the like
    # Ray Data warns once per pass whose requests are fewer than the generator actors (a global summary pass
    # of one request): expected, and not something to act on.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    _State.quiet = True


def is_quiet() -> bool:
    return _State.quiet


def _console_warnings_only(logger: logging.Logger) -> None:
    """The logger's console handlers (not its files) pass WARNING and above."""
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _write_driver_log(logger: logging.Logger, logs: str) -> logging.FileHandler:
    """The logger also writes everything to <logs>/ctxforge-driver.log (once, however often called); returns
    that handler."""
    target = os.path.join(logs, "ctxforge-driver.log")
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == target:
            return handler
    file_handler = logging.FileHandler(target)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(file_handler)
    return file_handler


def attach_driver_log(session_dir: str) -> str:
    """After ray.init in quiet mode: the driver's `ray` logger also writes everything to
    <session>/logs/ctxforge-driver.log. Returns the session's log directory."""
    logs = os.path.join(session_dir, "logs")
    _State.session_logs = logs
    _write_driver_log(logging.getLogger("ray"), logs)
    for name, held in list(_State.pending.items()):
        logger = logging.getLogger(name)
        logger.removeHandler(held)
        file_handler = _write_driver_log(logger, logs)
        for record in held.buffer:
            file_handler.handle(record)
        held.close()
        del _State.pending[name]
    return logs


def _route_to_driver_log(logger: logging.Logger) -> None:
    """The logger writes everything to ctxforge-driver.log: now when Ray's session is known, else into a
    buffer that attach_driver_log writes there once Ray starts."""
    if _State.session_logs:
        _write_driver_log(logger, _State.session_logs)
    elif logger.name not in _State.pending:
        held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=None,
                                              flushOnClose=False)
        logger.addHandler(held)
        _State.pending[logger.name] = held


def quiet_vllm_driver() -> None:
    """In quiet mode, call before this process (the driver) imports vLLM's engine modules: vLLM's `vllm`
    logger then keeps WARNING and above on the console and writes everything to ctxforge-driver.log, and the
    Triton probe vLLM runs when `vllm.triton_utils` is imported (a WARNING and an INFO line on a CPU
    machine) writes only to that file. The driver runs no vLLM kernel: the engines run in Ray's workers,
    probe Triton there and log into their own worker files. vLLM's warnings and errors from anything else
    still reach the console.

    vLLM configures the `vllm` logger (its own stdout handler, no propagation) with dictConfig when
    `vllm.logger` is imported, which resets the handlers of every `vllm.*` logger that exists then; so
    `vllm.logger` is imported here first and the routing applied after it. No-op unless quiet."""
    if not _State.quiet:
        return
    import vllm.logger  # noqa: F401  (configures the `vllm` logger; prints nothing)

    vllm_logger = logging.getLogger("vllm")
    _console_warnings_only(vllm_logger)
    _route_to_driver_log(vllm_logger)
    probe = logging.getLogger("vllm.triton_utils.importing")
    probe.propagate = False  # off the console: the driver never runs a Triton kernel
    _route_to_driver_log(probe)


def quiet_serve_driver() -> None:
    """In quiet mode, once `ray.serve` is imported: its driver-side logger ("Started Serve", "Application ... is
    ready", "Deleting app") writes to <session>/logs/ctxforge-driver.log instead of the console; warnings stay
    on the console. Serve configures that logger itself at import, with its own console handler and without
    propagation, which is why quiet_ray() alone does not reach it."""
    if not _State.quiet:
        return
    serve_logger = logging.getLogger("ray.serve")
    _console_warnings_only(serve_logger)
    if _State.session_logs:
        _write_driver_log(serve_logger, _State.session_logs)


def ray_logs_dir() -> str | None:
    """Where this process's Ray session keeps its logs (None before Ray started in quiet mode)."""
    return _State.session_logs


def ray_logs_note() -> str:
    """One line saying where Ray's detail went, for the end of a command ('' when not quiet)."""
    if not _State.quiet or not _State.session_logs:
        return ""
    return (f"Ray's logs:  {_State.session_logs}  (ray-data/ray-data.log: Ray Data progress; "
            f"worker-*.out|err: generator actors, training workers, Serve replicas)")


def _step_line(row: dict) -> str:
    if row.get("event") == "killed":
        return f"   [{row.get('stage', '?')}] step {row['at_step']}: worker crashed (fault injection); resuming"
    if row.get("event") == "resumed":
        dropped = row.get("dropped_steps") or []
        span = f"step {dropped[0]}" if len(dropped) == 1 else f"steps {dropped[0]}-{dropped[-1]}"
        redo = f"; the rows logged for {span} were dropped and are recomputed" if dropped else ""
        start = f"the checkpoint at step {row['from_step']}" if row.get("from_step") else "the stage's start"
        return f"   [{row.get('stage', '?')}] resumed from {start}{redo}"
    if "step" not in row:
        return f"   {json.dumps(row)}"
    return (f"   [{row['stage']}] step {row['step']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['samples']} samples / {row['tokens']:,} tokens in {row['step_s']:.1f} s "
            f"({row['tokens_per_s']:.0f} tokens/s)")


@contextlib.contextmanager
def follow_training(metrics_dir: Path, emit: Callable[[str], None] = print, poll_s: float = 1.0) -> Iterator[None]:
    """Print one line per training step while the block runs, from the rows rank 0 appends to
    <metrics_dir>/<stage>.jsonl (the workers' own output stays in Ray's logs), and one per event row (a
    killed worker, a resume). Rows already present when the block starts (an earlier run) are not printed
    again."""
    metrics_dir = Path(metrics_dir)

    def complete_lines(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        return [line for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]  # a row being written waits

    # Lines, not byte offsets: a resumed stage rewrites its file without the rows past its checkpoint.
    seen: dict[Path, set[str]] = ({p: set(complete_lines(p)) for p in metrics_dir.glob("*.jsonl")}
                                  if metrics_dir.is_dir() else {})
    stop = threading.Event()

    def poll() -> None:
        if not metrics_dir.is_dir():
            return
        for path in sorted(metrics_dir.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
            printed = seen.setdefault(path, set())
            try:
                lines = complete_lines(path)
            except FileNotFoundError:  # replaced between the listing and the read: next poll
                continue
            for line in lines:
                if line not in printed:
                    printed.add(line)
                    emit(_step_line(json.loads(line)))

    def loop() -> None:
        while not stop.wait(poll_s):
            poll()

    thread = threading.Thread(target=loop, name="ctxforge-follow-training", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()  # rows written after the last tick
