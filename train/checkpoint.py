"""Stage checkpoints on Ray Train storage: what is saved, what each worker reads back, and resharding.

Saved (one Ray Train checkpoint directory; every rank reports its own files and Ray merges them):
- `deepspeed/state/`: DeepSpeed's ZeRO checkpoint (each rank's `zero_pp_rank_<r>_*` shards of weights,
  optimizer and the files every rank shares, such as `mp_rank_00_model_states.pt` with the scheduler);
- `train_state.json` (rank 0): step, data position, layout, fingerprint (`loop.py` writes its fields);
- `hf/` at the stage end only: the Hugging Face export (a ZeRO-3 gather on rank 0 is not paid at every
  intermediate checkpoint).

Read back on resume: each worker fetches only `train_state.json`, its own `zero_pp_rank_<rank>_*` files
and the shared files, never `hf/` nor another rank's shards (DeepSpeed itself, without
`elastic_checkpoint`, reads only its own rank's ZeRO file). On local or shared-filesystem storage the files
are read in place; on an object store only those files are downloaded.

A different worker count changes how ZeRO partitions the flat world, so the shards do not fit. Then rank 0
converts the checkpoint once to DeepSpeed's universal format (`ds_to_universal`: one file per parameter
with its fp32 weights and Adam moments, independent of the partitioning) beside it, under `universal/`,
and every rank loads that with `checkpoint.load_universal`. That one resume reads every shard (rank 0)
and the whole universal checkpoint (each rank). Weights, optimizer moments, scheduler step and data
position carry over exactly; see step_batches.py for what a different global batch changes.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pyarrow.fs as pafs

DS_DIR, DS_TAG, STATE_FILE, HF_DIR, UNIVERSAL_DIR = "deepspeed", "state", "train_state.json", "hf", "universal"
UNIVERSAL_DONE = "CONVERTED"
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def save(engine, lm, ckpt_dir: Path, state: dict, tokenizer_dir: str, export_hf_weights: bool) -> None:
    """Write this rank's part of a checkpoint into `ckpt_dir` (a collective: every rank calls it)."""
    from .deepspeed_setup import export_hf

    engine.save_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, client_state={"train_state": state})
    if export_hf_weights:
        export_hf(engine, lm, ckpt_dir / HF_DIR, tokenizer_dir)
    if engine.global_rank == 0:
        (ckpt_dir / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def read_state(checkpoint) -> dict:
    """train_state.json of a Ray Train checkpoint, read through its filesystem (nothing else is fetched)."""
    with checkpoint.filesystem.open_input_stream(_join(checkpoint.path, STATE_FILE)) as fh:
        return json.loads(fh.read().decode("utf-8"))


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Paths relative to `root` of every file below it."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    base = root.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def own_files(names: list[str], rank: int) -> list[str]:
    """The files of a DeepSpeed checkpoint directory that rank `rank` reads: its own ZeRO shards and the
    files no rank owns."""
    keep = []
    for name in names:
        match = _RANK_FILE.search(Path(name).name)
        if match is None or int(match.group(1)) == rank:
            keep.append(name)
    return keep


def _fetch(fs: pafs.FileSystem, root: str, names: list[str], dest: Path) -> None:
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(_join(root, name)) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)


def fetch_own_shards(checkpoint, rank: int, scratch: Path) -> Path:
    """A local directory holding `deepspeed/` with this rank's shards and the shared files. Local storage:
    the checkpoint itself (nothing copied); otherwise only those files are downloaded into `scratch`."""
    fs, root = checkpoint.filesystem, checkpoint.path
    if _is_local(fs):
        return Path(root)
    ds_root = _join(root, DS_DIR)
    names = own_files(_files(fs, ds_root), rank)
    _fetch(fs, ds_root, names, scratch / DS_DIR)
    return scratch


def prepare_universal(checkpoint, rank: int, scratch: Path) -> Path:
    """Make the universal form of a checkpoint exist (rank 0 converts, once; a collective: every rank
    calls it) and return a local directory holding `universal/<tag>/`."""
    import torch.distributed as dist

    fs, root = checkpoint.filesystem, checkpoint.path
    universal_root = _join(root, UNIVERSAL_DIR)
    if rank == 0 and fs.get_file_info(_join(universal_root, UNIVERSAL_DONE)).type != pafs.FileType.File:
        local_ds = Path(root) / DS_DIR if _is_local(fs) else scratch / "all-shards" / DS_DIR
        if not _is_local(fs):
            _fetch(fs, _join(root, DS_DIR), _files(fs, _join(root, DS_DIR)), local_ds)
        out = scratch / "converted" / DS_TAG
        convert_to_universal(local_ds / DS_TAG, out)
        fs.create_dir(universal_root, recursive=True)
        pafs.copy_files(str(out.parent), universal_root, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        with fs.open_output_stream(_join(universal_root, UNIVERSAL_DONE)) as fh:
            fh.write(b"ok\n")
    if dist.is_initialized():
        dist.barrier()
    if _is_local(fs):
        return Path(root)
    _fetch(fs, universal_root, [n for n in _files(fs, universal_root) if n != UNIVERSAL_DONE], scratch / UNIVERSAL_DIR)
    return scratch


def convert_to_universal(ds_tag_dir: Path, out_tag_dir: Path) -> None:
    """DeepSpeed's own converter (deepspeed.checkpoint.ds_to_universal), in this process."""
    from deepspeed.checkpoint.ds_to_universal import main

    shutil.rmtree(out_tag_dir, ignore_errors=True)
    main(argparse.Namespace(input_folder=str(ds_tag_dir), output_folder=str(out_tag_dir), num_extract_workers=1,
                            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))


def load(engine, local_root: Path, universal: bool) -> dict:
    """Restore weights, optimizer and scheduler from `local_root/deepspeed` (or `local_root/universal`
    when resharding; the engine must have been built with checkpoint.load_universal); return the
    train_state saved with them.

    Raises FileNotFoundError when `local_root` holds no DeepSpeed checkpoint.
    """
    load_dir = local_root / (UNIVERSAL_DIR if universal else DS_DIR)
    path, client = engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{load_dir}: no DeepSpeed checkpoint '{DS_TAG}' to resume from")
    return client["train_state"]


def final_export(checkpoint, dest: Path) -> dict:
    """Copy a stage's final checkpoint's `hf/` (only that) into `dest` and return its train_state.

    Raises FileNotFoundError when the checkpoint has no `hf/` export.
    """
    fs, root = checkpoint.filesystem, checkpoint.path
    state = read_state(checkpoint)
    hf_root = _join(root, HF_DIR)
    names = _files(fs, hf_root)
    if not names:
        raise FileNotFoundError(f"{hf_root}: the stage's last checkpoint has no Hugging Face export")
    _fetch(fs, hf_root, names, dest)
    return state
