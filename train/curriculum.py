"""Stage orchestration on the driver: preflight, one Ray Train run per stage, resume, final exports.

Stage i starts from stage i-1's final weights (OUTPUT/checkpoints/<prev>/, Hugging Face format) with its
own RoPE. A stage whose `stage_complete.json` matches the config is never re-run. An unfinished stage is
a Ray Train run named <output.name>-<stage> under the storage path: running the same command again
makes Ray Train restore its latest checkpoint (weights, optimizer, scheduler, data position), and
FailureConfig restarts crashed workers from it within one run. The layout (workers, sp_degree,
grad_accum) may change between runs: it is not part of what a stage computes (config.stage_fingerprint;
checkpoint.py reshards). A directory written by a different config is refused before anything starts
(run.json keeps each stage's fingerprint); run.json is written only once preflight has passed, so a
command refused at preflight (a typo in input.path) leaves nothing that refuses the corrected one.

Preflight reads metadata only: Parquet footers and the small per-sample columns (data.index_stage).

Layout of OUTPUT: checkpoints/<stage>/ (final HF export + stage_complete.json), metrics/<stage>.jsonl
(one row per step), run.json, ray/ (Ray Train storage unless output.storage_path).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataError
from .loop import ResumeError, check_enough_data, open_source, stage_step_batches, train_stage_worker
from .resources import RayClusterView, check_capacity, scaling_config, worker_resources

COMPLETE = "stage_complete.json"


@dataclass
class CurriculumReport:
    output_dir: str
    stages: dict = field(default_factory=dict)  # name -> {"status": "trained"|"skipped", "checkpoint": ..., ...}


def stage_checkpoint_dir(output_dir: str | Path, stage_name: str) -> Path:
    """Where a finished stage's Hugging Face export lands: OUTPUT/checkpoints/<stage> (config.json, weights,
    tokenizer). The next stage starts from it; the last stage's is what serve and eval load."""
    return Path(output_dir) / "checkpoints" / stage_name


def _check_run_dir(out: Path, cfg: TrainConfig, label: str) -> dict:
    """Refuse a directory started by another config; return the fingerprints (nothing is written)."""
    run_file = out / "run.json"
    fingerprints = {s.name: cfg.stage_fingerprint(i) for i, s in enumerate(cfg.stages)}
    if run_file.is_file():
        previous = json.loads(run_file.read_text()).get("fingerprints", {})
        for name, fp in fingerprints.items():
            if name in previous and previous[name] != fp:
                raise ResumeError(f"{out}: stage {name} was started with a different config (fingerprint "
                                  f"{previous[name]}, now {fp} from {label}); resume needs the same model, input, "
                                  f"stages (the layout workers/sp_degree/grad_accum may change) and seed — use "
                                  f"another output.dir to start over")
    return fingerprints


def _write_run_file(out: Path, cfg: TrainConfig, label: str, fingerprints: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps({"config_source": label, "fingerprints": fingerprints,
                               "config": cfg.model_dump(mode="json")}, indent=2, sort_keys=True))
    tmp.replace(out / "run.json")


def _completed(final_dir: Path, fingerprint: str) -> bool:
    marker = final_dir / COMPLETE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    if done.get("fingerprint") != fingerprint:
        raise ResumeError(f"{marker}: stage finished under a different config (fingerprint {done.get('fingerprint')}, "
                          f"now {fingerprint})")
    return True


def preflight(cfg: TrainConfig, tokenizer, tok_hash: str) -> dict:
    """Index every stage's shards on the driver from metadata (footers, lengths, tokenizer hashes): a bad
    shard, a foreign tokenizer or (strict) an over-long sample stops the run here, before any worker starts.

    Raises DataError naming the stage and the input when a stage has no usable sample (and index_stage's
    DataErrors for bad shards).
    """
    stats = {}
    for i, stage in enumerate(cfg.stages):
        source = open_source(cfg, i, tok_hash, tokenizer)
        if not len(source):
            raise DataError(f"stage {stage.name}: no usable sample in {cfg.input.path} ({source.stats})")
        check_enough_data(stage_step_batches(source, stage, cfg.runtime.seed), stage, i)
        stats[stage.name] = source.stats
    return stats


def prepare(cfg: TrainConfig, label: str, log=print):
    """Everything before the first worker: resolve paths, load the tokenizer, check the config against the
    model, refuse a foreign run directory, preflight the data, and only then write run.json.
    Returns (cfg with absolute paths, output dir, model path, tokenizer, tokenizer hash)."""
    from transformers import AutoConfig

    from ctxforge.models import load_tokenizer, resolve_model_path, tokenizer_hash

    from .tracking import check_available

    # Ray Train workers do not run in the driver's working directory: local paths must be absolute
    cfg = cfg.model_copy(deep=True)
    cfg.input.path = _absolute(cfg.input.path)
    if cfg.input.short_data:
        cfg.input.short_data = _absolute(cfg.input.short_data)
    if cfg.input.long_output:
        cfg.input.long_output = _absolute(cfg.input.long_output)
    out = Path(cfg.output.dir).expanduser().absolute()
    check_available(cfg.output.report_to)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    tok_hash = tokenizer_hash(tokenizer)
    cfg.validate_for(AutoConfig.from_pretrained(model_path))
    fingerprints = _check_run_dir(out, cfg, label)
    stats = preflight(cfg, tokenizer, tok_hash)
    for name, st in stats.items():
        if st["dropped_too_long"]:
            log(f"stage {name}: dropped {st['dropped_too_long']} of {st['read']} samples longer than max_seq_len "
                f"(longest {st['longest_dropped']} tokens)")
    _write_run_file(out, cfg, label, fingerprints)
    return cfg, out, model_path, tokenizer, tok_hash


def start_ray(address: str | None, num_cpus: int | None, progress: bool) -> None:
    """Join `address` (a cluster, e.g. from `ray job submit`) or start a fresh embedded local Ray."""
    from ctxforge.raycluster import init_ray

    init_ray(address, num_cpus=num_cpus, progress=progress)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().absolute())


def run_curriculum(cfg: TrainConfig, label: str = "config", log=print,
                   ray_address: str | None = None) -> CurriculumReport:
    """Train every unfinished stage. `ray_address`: a cluster to join (None: runtime.ray_address, else a
    fresh local Ray).

    Raises RuntimeError naming the stage when Ray Train ends without a checkpoint at the stage's last step.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, out, model_path, tokenizer, tok_hash = prepare(cfg, label, log)
    storage = cfg.output.storage_path or str(out / "ray")

    report = CurriculumReport(output_dir=str(out))
    init_model = model_path
    checked = False
    for i, stage in enumerate(cfg.stages):
        fingerprint = cfg.stage_fingerprint(i)
        final_dir = stage_checkpoint_dir(out, stage.name)
        if _completed(final_dir, fingerprint):
            log(f"stage {stage.name}: already complete ({final_dir}); not re-run")
            report.stages[stage.name] = {"status": "skipped", "checkpoint": str(final_dir)}
            init_model = str(final_dir)
            continue
        start_ray(ray_address or cfg.runtime.ray_address, cfg.runtime.num_cpus, cfg.runtime.progress)
        use_gpu = cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto"
                                                   and ray.cluster_resources().get("GPU", 0) > 0)
        backend = "nccl" if use_gpu else "gloo"
        per_worker = worker_resources(cfg.runtime, use_gpu)
        if not checked:  # once, for this stage and every later one, before anything trains
            capacity = check_capacity(cfg.stages[i:], per_worker, RayClusterView(), cfg.runtime.wait_for_resources_s)
            for warning in capacity.warnings:
                log(warning)
            checked = True
        payload = {"config": cfg.model_dump(mode="json"), "stage_index": i, "init_model": init_model,
                   "tokenizer_dir": model_path, "tokenizer_hash": tok_hash, "pad_id": tokenizer.pad_token_id,
                   "fingerprint": fingerprint, "backend": backend, "storage": f"{storage}/{cfg.output.name}-{stage.name}",
                   "metrics_path": str(out / "metrics" / f"{stage.name}.jsonl")}
        trainer = TorchTrainer(
            train_stage_worker, train_loop_config=payload,
            scaling_config=scaling_config(stage, per_worker, use_gpu),
            torch_config=TorchConfig(backend=backend),
            run_config=RunConfig(name=f"{cfg.output.name}-{stage.name}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.runtime.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.runtime.num_to_keep)))
        log(f"stage {stage.name}: training (workers {stage.workers} = dp {stage.dp_degree} x sp {stage.sp_degree}, "
            f"max_seq_len {stage.max_seq_len}, rope {stage.rope.model_dump(exclude_none=True) or 'unchanged'})")
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
        state = ckpt.read_state(result.checkpoint)
        if not state.get("final"):
            raise RuntimeError(f"stage {stage.name}: last checkpoint is step {state['step']}, not the stage end")
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt.final_export(result.checkpoint, tmp)  # hf/ only, never the ZeRO shards
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
        (final_dir / COMPLETE).write_text(json.dumps({"fingerprint": fingerprint, **state}, indent=2, sort_keys=True))
        report.stages[stage.name] = {"status": "trained", "checkpoint": str(final_dir), "steps": state["step"],
                                     "loss": state["loss"], "metrics": result.metrics}
        init_model = str(final_dir)
    return report

