"""Experiment tracking on rank 0 (`output.report_to`): TensorBoard, MLflow, Weights & Biases.

Per step: loss, lr, grad_norm, tokens_per_s, samples_per_s, step_s and peak memory (GiB, the max over
ranks); the same numbers as metrics/<stage>.jsonl, which is always written.

- tensorboard: event files under OUTPUT/tensorboard/<stage>/ (tensorboardX, what Ray's own TensorBoard
  logger uses); `tensorboard --logdir OUTPUT/tensorboard`.
- mlflow: Ray Train's integration (`ray.air.integrations.mlflow.setup_mlflow`), one run per stage (and per
  resume, with the step numbers continuing) in experiment `output.name`; tracking URI `output.mlflow_uri`
  (a server, or sqlite:///... with mlflow's database extras), default a local file store OUTPUT/mlruns
  (works offline with the light mlflow-skinny; MLflow 3 keeps that backend in maintenance mode and wants
  MLFLOW_ALLOW_FILE_STORE=true, which ctxforge sets for the file store it chooses itself;
  `mlflow ui --backend-store-uri file://OUTPUT/mlruns`). Needs the `tracking` extra (mlflow-skinny).
- wandb: Ray Train's integration (`setup_wandb`), project `output.name`, run `<name>-<stage>`; needs
  `pip install wandb` and the user's login or WANDB_API_KEY (WANDB_MODE=offline works too).

A tracker that cannot start (package missing) is refused at preflight (`check_available`), not mid-run.

After a restart from a checkpoint at step S (a killed worker, `runtime.max_failures`, or a rerun), each
record reads as one history, each step once: metrics/<stage>.jsonl drops the rows past S (loop.py);
TensorBoard writes with `purge_step=S+1`, so TensorBoard discards what the killed attempt logged past S;
MLflow and W&B start a new run for the attempt and replay steps 1..S into it, so the latest run holds
the whole curve, and the MLflow run it supersedes is deleted (soft: `mlflow gc` or the UI's trash can
restore it); a superseded W&B run stays, and the newest `<name>-<stage>` run holds the whole curve.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GIB = 1024 ** 3
LOGGED = ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_s")
PACKAGES = {"tensorboard": ("tensorboardX", "pip install tensorboardX"),
            "mlflow": ("mlflow", "pip install 'ctxforge[tracking]' (mlflow-skinny)"),
            "wandb": ("wandb", "pip install wandb")}


def check_available(report_to: list[str]) -> None:
    """Raise ValueError naming `output.report_to` when a chosen tracker's package is not installed."""
    for name in report_to:
        module, hint = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"output.report_to: {name} needs the {module} package, which is not installed ({hint})")


def step_metrics(row: dict) -> dict[str, float]:
    out = {k: float(row[k]) for k in LOGGED if row.get(k) is not None}
    out["peak_mem_gib"] = row["peak_mem_bytes"] / GIB
    return out


class Tracker:
    """The trackers rank 0 logs to; `log` and `finish` do nothing when none is chosen."""

    def __init__(self, sinks: list):
        self.sinks = sinks  # objects with log(metrics, step) and close()

    @classmethod
    def start(cls, cfg, stage, payload: dict, resumed_step: int = 0, history: list[dict] | None = None) -> "Tracker":
        """The chosen trackers for one attempt at a stage. `resumed_step`: the restored checkpoint's step
        (0 for a fresh start); `history`: the kept metrics rows of steps 1..resumed_step."""
        out = Path(cfg.output.dir).expanduser().absolute()
        run_name = f"{cfg.output.name}-{stage.name}"
        params = {"stage": stage.name, "model": cfg.model, "max_seq_len": stage.max_seq_len, "lr": stage.lr,
                  "workers": stage.workers, "sp_degree": stage.sp_degree, "grad_accum": stage.grad_accum,
                  "batching": stage.batching, "loss_weighting": stage.loss_weighting, "zero_stage": cfg.runtime.zero_stage,
                  "fingerprint": payload["fingerprint"]}
        sinks = []
        for name in cfg.output.report_to:
            if name == "tensorboard":
                sinks.append(_TensorBoard(out / "tensorboard" / stage.name, purge_step=resumed_step + 1))
                continue  # purging needs no replay
            if name == "mlflow":
                if not cfg.output.mlflow_uri:
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                sink = _MLflow(cfg.output.mlflow_uri or (out / "mlruns").as_uri(), cfg.output.name, run_name,
                               params, out / "metrics" / f"{stage.name}.mlflow_run")
            else:
                sink = _WandB(cfg.output.name, run_name, params)
            for row in history or []:  # the steps before the checkpoint, into this attempt's run
                sink.log(step_metrics(row), int(row["step"]))
            sinks.append(sink)
        return cls(sinks)

    def log(self, row: dict, step: int) -> None:
        metrics = step_metrics(row)
        for sink in self.sinks:
            sink.log(metrics, step)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, logdir: Path, purge_step: int = 1):
        from tensorboardX import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard drops events of earlier files at steps >= it (what a killed attempt logged
        # after the checkpoint this one resumes from); a fresh start purges nothing (steps begin at 1)
        # the suffix keeps two attempts started within one second in two files, in attempt order (TensorBoard
        # reads a folder's files sorted by name: time stamp, host, then this)
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=purge_step if purge_step > 1 else None,
                                    filename_suffix=f".from-step-{purge_step - 1:010d}")

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, uri: str, experiment: str, run_name: str, params: dict, id_file: Path):
        from ray.air.integrations.mlflow import setup_mlflow

        self.mlflow = setup_mlflow(tracking_uri=uri, experiment_name=experiment, run_name=run_name, config=params,
                                   create_experiment_if_not_exists=True)
        # One run per stage: the run of an interrupted attempt is superseded by this one (which replays its
        # steps up to the checkpoint), so it is deleted (soft); its id is kept beside the metrics file.
        run_id = self.mlflow.active_run().info.run_id
        if id_file.is_file() and (old := id_file.read_text().strip()) and old != run_id:
            try:
                self.mlflow.delete_run(old)
            except Exception:  # already deleted or in another store: nothing to supersede
                pass
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)

    def log(self, metrics: dict, step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, project: str, run_name: str, params: dict):
        from ray.air.integrations.wandb import setup_wandb

        self.run = setup_wandb(config=params, project=project, name=run_name)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
