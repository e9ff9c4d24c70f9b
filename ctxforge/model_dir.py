"""Writing a packaged model's directory atomically, once: the one write path of `ctxforge:tiny` and `ctxforge:smollm2`.

A model directory is complete when it holds its marker file with the expected payload (recipe version, seed or
source hash). `write_model_dir` returns such a directory as it is; otherwise it builds the model in a sibling
temp directory, writes the marker last and renames the whole into place, under a lock beside the directory, so a
killed run never leaves a half model and concurrent builders (several Ray workers on one node) build it once.
This module knows nothing about what a model holds: the caller's `build` writes the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Callable

logger = logging.getLogger(__name__)

# What a materialized model directory holds (save_pretrained's files): a directory of only these (a model of
# ours, or one an older version left half-written) may be rebuilt; anything else in it is someone's data.
MODEL_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                         "merges.txt", "added_tokens.json"})


def check_replaceable(out_dir: pathlib.Path, marker: str) -> None:
    """Refuse to write a model over anything ctxforge did not write: `out_dir` must be absent, or a directory
    holding `marker` (a model of ours: stale, other seed, or --overwrite), or one holding only model files
    (MODEL_FILES).

    Raises FileExistsError naming `out_dir` when it is a file, or a directory with other content: neither is
    ever deleted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory; give a new directory for the model")
    if (out_dir / marker).is_file():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in MODEL_FILES or not p.is_file())
    if foreign:
        raise FileExistsError(f"{out_dir}: a directory ctxforge did not write (it holds {', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); give a new or empty directory for the model")


@contextlib.contextmanager
def dir_lock(out_dir: pathlib.Path):
    """Serialise builders of the same directory (e.g. several Ray workers on one node): an exclusive flock on
    `<out_dir>.lock` beside it."""
    lock_path = out_dir.with_name(out_dir.name + ".lock")
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_complete(out_dir: pathlib.Path, marker: str, payload: dict) -> bool:
    """Whether `out_dir` holds `marker` with exactly `payload` (a model written completely by this recipe)."""
    try:
        return json.loads((out_dir / marker).read_text()) == payload
    except (OSError, ValueError):
        return False


def write_model_dir(out_dir, marker: str, payload: dict, build: Callable[[pathlib.Path], None],
                    overwrite: bool = False) -> pathlib.Path:
    """The model directory at `out_dir` (absolute), built once by `build(tmp_dir)` and renamed into place.

    Returned as it is when its marker carries `payload` and not `overwrite`. Else, under `dir_lock`, `build`
    writes the files into an empty sibling temp directory, the marker (`payload` as JSON) is written last, every
    file is made world-readable (the cache is shared across users of a node), the old directory (stale, partial,
    another seed) is removed and the temp directory renamed to `out_dir`. Whatever `build` raises propagates,
    with the temp directory removed and `out_dir` untouched.

    Raises FileExistsError (check_replaceable) when `out_dir` is a file or a directory ctxforge did not write.
    """
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    check_replaceable(out_dir, marker)  # before the lock file is made beside it
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with dir_lock(out_dir):
        if not overwrite and is_complete(out_dir, marker, payload):
            logger.debug("model already materialized at %s", out_dir)
            return out_dir
        check_replaceable(out_dir, marker)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the model is meant to be shared (e.g. a node cache)
        try:
            build(tmp)
            (tmp / marker).write_text(json.dumps(payload, sort_keys=True))
            for written in tmp.iterdir():  # save_pretrained may create owner-only files
                if written.is_file():
                    os.chmod(written, 0o644)
            if out_dir.exists():
                shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir
