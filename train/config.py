"""TrainConfig: the staged long-context curriculum as one typed object.

Static checks run at construction (pydantic, `extra="forbid"`); checks that need the model's config
or the cluster (`validate_for`) run once on the driver before any worker starts, and their messages
state the arithmetic. This module knows nothing about Ray, DeepSpeed or data files.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ctxforge.config import PathStr, StrictModel

from .rope import RopeConfig, apply_rope, check_trainable, dynamic_rope_message
from .sequence_parallel import check_sp_degree


LAYOUT_KEYS = ("workers", "sp_degree", "grad_accum")


class StageConfig(StrictModel):
    name: str = Field(description="stage name; checkpoints go to OUTPUT/checkpoints/<name>")
    data_stage: str | None = Field(None, description="synthesis manifest stage whose shards this stage reads; "
                                                     "null = the stage name")
    max_seq_len: int = Field(gt=0, description="longest sequence (sample or pack) in tokens")
    rope: RopeConfig = Field(default_factory=RopeConfig, description="RoPE setting written into this stage's config")
    lr: float = Field(6e-5, gt=0, description="peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr for linear and cosine")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    epochs: int = Field(1, ge=1, description="passes over the stage's data (ignored when max_steps > 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = as many as `epochs` gives")
    workers: int = Field(1, ge=1, description="training workers (one GPU each on GPU); = dp_degree x sp_degree")
    sp_degree: int = Field(1, ge=1, description="Ulysses sequence-parallel degree")
    batching: Literal["pack", "sort", "naive"] = Field(
        "pack", description="pack: samples packed up to max_seq_len with document-isolated attention; "
                            "sort: sorted batching (LongAlign); naive: shuffled, padded batches")
    batch_size: int = Field(1, ge=1, description="rows per micro-batch for sort/naive (pack uses 1 row)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per data-parallel rank per optimizer step")
    loss_weighting: Literal["sample", "token"] = Field(
        "sample", description="sample: every sample weighs the same (LongAlign K/(N_i*M), K and M counted per "
                              "step); token: mean over all target tokens of the step")
    short_ratio: float = Field(0.0, ge=0, lt=1, description="share of short instruction samples mixed in "
                                                            "(ProLong: ~0.4); needs input.short_data")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the stage end")
    long_output_ratio: float = Field(0.0, ge=0, lt=1, description="share of long-output samples (ctxforge lengthen) "
                                                                  "mixed in; needs input.long_output")

    @property
    def dp_degree(self) -> int:
        return self.workers // self.sp_degree

    @model_validator(mode="after")
    def _layout(self) -> "StageConfig":
        if self.workers % self.sp_degree:
            raise ValueError(f"stage {self.name}: workers {self.workers} is not a multiple of sp_degree "
                             f"{self.sp_degree} ({self.workers} % {self.sp_degree} = {self.workers % self.sp_degree}); "
                             f"workers = dp_degree x sp_degree")
        if self.rope.type == "dynamic":
            raise ValueError(dynamic_rope_message(f"stage {self.name}: rope.type"))
        if self.batching == "pack" and self.batch_size != 1:
            raise ValueError(f"stage {self.name}: batching=pack uses one packed row per micro-batch; "
                             f"batch_size must be 1 (got {self.batch_size})")
        return self


class InputConfig(StrictModel):
    path: PathStr = Field(description="synthesis output directory (samples/<stage>/part-*.parquet + manifest.json): a "
                                 "local path or an object-store URI (s3://, gs://, file://; read through pyarrow)")
    strict: bool = Field(False, description="a sample longer than its stage is an error (false: dropped, counted)")
    short_data: str | None = Field(None, description="JSONL/Parquet chat dataset with a 'messages' column for the "
                                                     "short-data mix")
    long_output: PathStr | None = Field(None, description="long-output sample set for the long-output mix: the final/ "
                                                      "folder of `ctxforge lengthen` (samples/long_output/ + manifest)")


class OutputConfig(StrictModel):
    dir: PathStr = Field("runs/train", description="checkpoints/<stage>/ (HF format), metrics/, run.json")
    name: str = Field("ctxforge", description="run name; Ray Train runs are <name>-<stage>")
    storage_path: PathStr | None = Field(None, description="Ray Train storage (local path or s3://, gs://); "
                                                       "null = OUTPUT/ray")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers rank 0 logs every step to (loss, lr, grad norm, "
                                          "tokens/s, memory): tensorboard (OUTPUT/tensorboard), mlflow "
                                          "(output.mlflow_uri), wandb (needs wandb installed and a login)")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; null = the local file store "
                                                     "OUTPUT/mlruns (offline)")


class RuntimeConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when workers get GPUs")
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="training dtype (bf16 on GPU)")
    attention: Literal["auto", "ctxforge_doc_sdpa", "flash_attention_2"] = Field(
        "auto", description="attention core: auto = flash_attention_2 (varlen) on GPU, document-masked sdpa on CPU")
    gradient_checkpointing: bool = Field(True, description="activation checkpointing per decoder layer")
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer states in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3 parameters in CPU memory")
    loss_chunk_tokens: int = Field(4096, gt=0, description="tokens per tile of the tiled cross-entropy")
    cpus_per_worker: float = Field(1, gt=0, description="Ray CPUs per training worker")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each training worker "
                                        "requests besides its CPUs/GPU, so that it lands only on the node type that "
                                        "provides them, e.g. {ctxforge_train: 1} (the on-demand training nodes of "
                                        "cluster/aws.yaml); {} = none (local runs)")
    seed: int = Field(0, description="data order and model init seed")
    max_failures: int = Field(0, ge=-1, description="Ray Train FailureConfig.max_failures (restarts from the last "
                                                    "checkpoint); -1 = unlimited")
    num_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept per stage")
    ray_address: str | None = Field(None, description="Ray cluster address; null = RAY_ADDRESS or a local Ray")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray (null = all)")
    progress: bool = Field(True, description="progress bar on rank 0")
    fail_at_step: int = Field(0, ge=0, description="fault injection for resume tests: in a run that did not start "
                                                   "from a checkpoint, rank 0 exits after the forward/backward of this "
                                                   "step (before the optimizer step), once per stage; 0 = never")
    tiled_mlp: bool = Field(False, description="DeepSpeed's TiledMLP on every gated MLP: its [tokens, ffn] "
                                               "intermediates exist for ~hidden_size tokens at a time (ALST); same "
                                               "numbers, one more MLP forward per step")
    offload_checkpoints: bool = Field(False, description="keep each decoder layer's checkpointed input in pinned CPU "
                                                         "memory between forward and backward (ALST; DeepSpeed's "
                                                         "CheckpointHiddenStatesOffload); needs gradient_checkpointing")
    wait_for_resources_s: float = Field(0, ge=0, description="preflight: seconds to wait (asking the autoscaler) for "
                                                             "the GPUs/CPUs the largest stage needs before failing; "
                                                             "0 = fail at once if the cluster has fewer")

    @model_validator(mode="after")
    def _offload_needs_checkpoints(self) -> "RuntimeConfig":
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError("runtime.offload_checkpoints=true needs runtime.gradient_checkpointing=true (it offloads the "
                             "checkpointed layer inputs; without checkpointing there are none)")
        return self


class TrainConfig(StrictModel):
    # `input.path` as in synth (and lengthen's seeds.path); the old spelling still loads, with a notice
    deprecated_keys: ClassVar[dict[str, str]] = {"input.dir": "input.path"}

    model: str = Field(description="initial weights: HF model dir, hub id, or ctxforge:tiny")
    input: InputConfig
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    stages: list[StageConfig] = Field(min_length=1, description="curriculum stages, in order")

    @model_validator(mode="after")
    def _stages(self) -> "TrainConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        if any(s.short_ratio > 0 for s in self.stages) and not self.input.short_data:
            raise ValueError("a stage sets short_ratio > 0 but input.short_data is not set")
        for s in self.stages:
            if s.long_output_ratio > 0 and not self.input.long_output:
                raise ValueError(f"stage {s.name}: long_output_ratio > 0 but input.long_output is not set")
            if s.short_ratio + s.long_output_ratio >= 1:
                raise ValueError(f"stage {s.name}: short_ratio {s.short_ratio} + long_output_ratio "
                                 f"{s.long_output_ratio} = {s.short_ratio + s.long_output_ratio} leaves no room for "
                                 f"the stage's own samples (must be < 1)")
        return self

    def validate_for(self, model_config, available_workers: int | None = None) -> None:
        """Checks that need the model's config (heads) and, when known, the cluster size.

        Raises ValueError naming the stage: a RoPE type training cannot use (check_trainable), an SP degree the
        model's heads cannot be split by (SequenceParallelError, with the arithmetic), or more workers than
        `available_workers`.
        """
        text = model_config.get_text_config()
        staged = copy.deepcopy(model_config)  # each stage starts from the previous stage's saved config
        for stage in self.stages:
            apply_rope(staged, stage.rope, stage.max_seq_len, where=f"stage {stage.name}: rope")
            rope = staged.get_text_config().rope_parameters
            kept = " (the model's own, kept by the stage)" if stage.rope.type is None else ""
            check_trainable(rope, f"stage {stage.name}: rope{kept}")
            check_sp_degree(stage.sp_degree, text.num_attention_heads, text.num_key_value_heads,
                            where=f"stage {stage.name}")
            if available_workers is not None and stage.workers > available_workers:
                raise ValueError(f"stage {stage.name}: workers {stage.workers} (= dp {stage.dp_degree} x sp "
                                 f"{stage.sp_degree}) but the cluster offers {available_workers}")

    def stage_fingerprint(self, index: int) -> str:
        """What decides what a stage computes: model, input, the stage and every earlier stage, seed, dtype.
        Left out, so that a rerun with them changed resumes: runtime knobs (progress, failures, fault
        injection, storage, trackers) and the layout (`LAYOUT_KEYS`: workers, sp_degree, grad_accum), which
        changes how a step is spread over ranks, not the data order or the loss (step_batches.py says what a
        different dp x grad_accum changes)."""
        inputs = self.input.model_dump(mode="json")
        inputs["dir"] = inputs.pop("path")  # its name before the rename: fingerprints of earlier runs stay valid
        payload = {
            "model": self.model, "input": inputs,
            "stages": [s.model_dump(mode="json", exclude=set(LAYOUT_KEYS)) for s in self.stages[:index + 1]],
            "runtime": self.runtime.model_dump(mode="json", include={"seed", "dtype", "attention", "zero_stage",
                                                                     "loss_chunk_tokens"}),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
