"""The memory planner's terms and published anchors, `plan --gpus`, the cluster capacity preflight, and the
GPU-only pieces that CPU can still check (flash-attn absent, the GPU extra's pin). Fast: no Ray, no training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ctxforge.config import load_config
from ctxforge.train.config import RuntimeConfig, StageConfig, TrainConfig
from ctxforge.train.memory_plan import (GIB, HEADROOM, KNOWN_ARCHITECTURES, Arch, arch_of, bytes_per_token, need_bytes,
                                 plan_curriculum, state_bytes, tile_bytes)
from ctxforge.train.resources import ResourceError, check_capacity

ROOT = Path(__file__).resolve().parents[1]
LLAMA = Arch(**KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"])
H = LLAMA.hidden


def _llama(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, str(ROOT / "configs" / "train-llama8b-1m.yaml"), list(overrides))


def test_per_token_terms_for_llama8b_have_their_derived_values():
    untiled = bytes_per_token(LLAMA, RuntimeConfig())                    # checkpoints on GPU, no tiling
    assert untiled == {"checkpoints": 32 * 2 * H, "norms": 8 * H, "norm_fp32": 8 * H,
                       "attention": 2 * H + 4 * 1024 + 2 * H + 2 * H + 4 * 32, "residual_grads": 4 * H,
                       "peak_phase:mlp": 12 * 14336, "total": 544_896}
    alst = bytes_per_token(LLAMA, RuntimeConfig(tiled_mlp=True, offload_checkpoints=True))
    assert alst["checkpoints"] == 2 * 2 * H and alst["peak_phase:norm_backward"] == 20 * H
    assert alst["total"] == 209_024                                     # 51.0 h per token
    assert bytes_per_token(LLAMA, RuntimeConfig(tiled_mlp=True), sp=16)["attention"] == 6 * H + 4 * 2048 + 128
    no_ckpt = bytes_per_token(LLAMA, RuntimeConfig(gradient_checkpointing=False))
    assert no_ckpt["all_layers"] == 32 * (8 * H + 8 * H + 28_800 + 8 * 14336)
    assert no_ckpt["peak_phase:norm_backward"] == 20 * H                # the MLP adds only 4f = 14h beyond its 8f
    tiles = tile_bytes(LLAMA, RuntimeConfig(tiled_mlp=True, loss_chunk_tokens=2048), 131072)
    assert tiles == {"loss_tile": 3 * 2048 * 128256 * 4, "mlp_tile": 4096 * (12 * 14336 + 4 * H)}


def test_one_million_tokens_fit_one_8_gpu_node_at_sp8_with_headroom():
    cfg = _llama()
    one_m = cfg.stages[-1]
    assert (one_m.max_seq_len, one_m.workers, one_m.sp_degree) == (1048576, 8, 8)
    assert all(s.workers == 8 and s.sp_degree <= 8 for s in cfg.stages)   # one node; all-to-all inside it
    need = need_bytes(LLAMA, cfg, one_m, 8, 8)
    assert need["total"] / GIB == pytest.approx(36.9, abs=0.05)
    assert need["total"] < 0.5 * 80 * GIB                                  # headroom: under half the GPU
    rows = plan_curriculum(cfg, gpu_memory_gib=80, gpus=8)
    assert all(r.configured_fits and r.on_gpus for r in rows)
    # negative control: without tiled MLP and checkpoint offload the same layout does not fit, at any dp
    before = _llama("runtime.tiled_mlp=false", "runtime.offload_checkpoints=false")
    assert need_bytes(LLAMA, before, one_m, 8, 8)["total"] > HEADROOM * 80 * GIB
    assert need_bytes(LLAMA, before, one_m, 256, 8)["total"] > HEADROOM * 80 * GIB


def _alst_fits(tokens_per_gpu: int, world: int, offload_params: bool) -> float:
    """GiB that ALST's recipe needs by this formula: ZeRO-3 with optimizer (and param) offload, tiled MLP,
    checkpoint offload, and Liger's fused RMSNorm (no fp32 norm copies)."""
    rt = RuntimeConfig(zero_stage=3, offload_optimizer=True, offload_params=offload_params, tiled_mlp=True,
                       offload_checkpoints=True, loss_chunk_tokens=2048)
    total = (state_bytes(LLAMA, 3, world, True, offload_params)
             + tokens_per_gpu * bytes_per_token(LLAMA, rt, sp=world, fused_norm=True)["total"]
             + sum(tile_bytes(LLAMA, rt, tokens_per_gpu).values()) + 4 * GIB)
    return total / GIB


def test_formula_fits_alsts_published_llama8b_points():
    """ALST (arXiv 2506.13996): Llama-8B trains 500K tokens on one H100 and 3.7M on one 8xH100 node (sp 8)."""
    assert _alst_fits(500_000, 1, offload_params=True) < 80
    assert _alst_fits(3_700_000 // 8, 8, offload_params=False) < 80
    # the fp32 norm terms are what a fused norm saves: with transformers' RMSNorm 3.7M would not fit
    rt = RuntimeConfig(tiled_mlp=True, offload_checkpoints=True)
    assert 3_700_000 // 8 * bytes_per_token(LLAMA, rt, sp=8)["total"] / GIB > 80


def test_180k_fits_one_gpu_per_sequence_and_alone_with_alsts_single_gpu_offload():
    cfg = _llama()
    rows = plan_curriculum(cfg, gpu_memory_gib=80)
    assert (rows[0].stage, rows[0].min_sp, rows[0].min_gpus) == ("180K", 1, 2)    # sp 1; ZeRO-3 over 2 GPUs
    alone = _llama("runtime.offload_params=true")                                   # ALST's sp1 recipe
    row = plan_curriculum(alone, gpu_memory_gib=80)[0]
    assert (row.min_sp, row.min_gpus) == (1, 1)
    assert row.min_need["state"] == 0 and row.min_need["total"] / GIB == pytest.approx(43.6, abs=0.1)


def test_plan_gpus_says_which_stages_fit_and_how(capsys):
    from ctxforge.train.command import add_plan_arguments, run_plan

    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    assert run_plan(parser.parse_args(["--config", "train-llama8b-1m", "--gpus", "2"])) == 0
    out = capsys.readouterr().out
    table = out[out.index("on 2 GPUs"):].splitlines()
    assert "total GPUs" in table[1]
    rows = {line.split()[0]: line for line in table[2:]}
    assert rows["180K"].split()[1:7] == ["184320", "2", "x", "1", "2", "58.5"]
    assert rows["350K"].split()[2:6] == ["1", "x", "2", "2"]
    assert "NO (needs 4 GPUs at sp 4)" in rows["1M"] and "NO" in rows["650K"]
    assert run_plan(parser.parse_args(["--config", "train-llama8b-1m", "--gpus", "0"])) == 2
    assert capsys.readouterr().err.strip() == "ctxforge plan: --gpus 0: must be at least 1"


def test_plan_for_an_unknown_model_offline_is_one_line_on_stderr(capsys, monkeypatch):
    from ctxforge.train.command import add_plan_arguments, run_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    assert run_plan(parser.parse_args(["--config", "train-llama8b-1m", "model=example-org/not-a-model"])) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctxforge plan: model: cannot read the architecture of "
                                                   "'example-org/not-a-model'")
    assert "Traceback" not in captured.err


def test_arch_of_a_local_model_reads_its_config(tiny_model_path):
    arch = arch_of(tiny_model_path)
    assert (arch.hidden, arch.ffn, arch.layers) == (64, 128, 2)


# ---------------------------------------------------------------------------------------------------
# Cluster capacity at preflight (a stubbed resource view)


class StubCluster:
    def __init__(self, totals, node_gpus=(8.0,), grows_to=None, grow_after=1):
        self._totals, self._nodes, self._grows_to, self._grow_after = dict(totals), list(node_gpus), grows_to, grow_after
        self.requests, self.polls = [], 0

    def totals(self):
        self.polls += 1
        if self._grows_to and self.requests and self.polls > self._grow_after:
            return dict(self._grows_to)
        return dict(self._totals)

    def node_gpus(self):
        return self._nodes

    def request(self, bundles):
        self.requests.append(bundles)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


GPU_WORKER = {"CPU": 8, "GPU": 1}


def test_capacity_check_passes_when_the_cluster_holds_the_largest_stage():
    report = check_capacity(_llama().stages, GPU_WORKER, StubCluster({"CPU": 96, "GPU": 8}))
    assert report.needed == {"CPU": 64, "GPU": 8} and not report.warnings


def test_capacity_check_names_the_stage_and_the_numbers():
    cluster = StubCluster({"CPU": 96, "GPU": 4})
    with pytest.raises(ResourceError, match=r"^stage 180K: workers 8 \(= dp 8 x sp 1\) x CPU 8, GPU 1 per worker "
                                            r"needs GPU 8 \(> 4\); the cluster has CPU 96, GPU 4\. .*plan --gpus"):
        check_capacity(_llama().stages, GPU_WORKER, cluster)
    assert cluster.requests == []                                   # no wait asked: no autoscaler request


def test_capacity_check_waits_for_the_autoscaler_then_clears_its_request():
    clock = FakeClock()
    cluster = StubCluster({"CPU": 0}, grows_to={"CPU": 192, "GPU": 16}, grow_after=3)
    report = check_capacity(_llama().stages, GPU_WORKER, cluster, wait_s=600, poll_s=10, sleep=clock.sleep, clock=clock)
    assert cluster.requests == [[GPU_WORKER] * 8, []] and report.waited_s == 30
    clock, cluster = FakeClock(), StubCluster({"CPU": 0})
    with pytest.raises(ResourceError, match=r"needs CPU 64 \(> 0\), GPU 8 \(> 0\); .*after waiting 600 s"):
        check_capacity(_llama().stages, GPU_WORKER, cluster, wait_s=600, poll_s=10, sleep=clock.sleep, clock=clock)
    assert cluster.requests[-1] == []


def test_capacity_check_warns_when_an_sp_group_spans_nodes():
    stages = [StageConfig(name="1M", max_seq_len=1 << 20, workers=16, sp_degree=16)]
    report = check_capacity(stages, GPU_WORKER, StubCluster({"CPU": 256, "GPU": 16}, node_gpus=(8.0, 8.0)))
    assert report.warnings == ["stage 1M: sp_degree 16 > 8 GPUs on the largest node: its Ulysses all-to-all "
                               "crosses nodes (slower); ctxforge plan --gpus-per-node 8 shows layouts that stay "
                               "within a node"]


def test_train_checks_capacity_before_any_stage_runs(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """`ctxforge train` with a stage wider than the (stubbed) cluster: a one-line error on stderr, no trainer."""
    from test_train_config import _rows, _write

    from ctxforge.train import command, curriculum

    for stage in ("4K", "8K"):
        _write(tmp_path / "synth", stage, _rows(tiny_tokenizer, stage))
    cluster = StubCluster({"CPU": 2})
    monkeypatch.setattr(curriculum, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(curriculum, "RayClusterView", lambda: cluster)
    monkeypatch.setattr("ray.train.torch.TorchTrainer", lambda *a, **k: pytest.fail("a trainer was built"))
    parser = argparse.ArgumentParser()
    command.add_train_arguments(parser)
    args = parser.parse_args(["--config", "train-tiny", f"input.path={tmp_path / 'synth'}",
                              f"output.dir={tmp_path / 'train'}", "stages.1.workers=4",
                              # enough micro-batches for a step of each layout from the 3 fixture samples
                              "stages.0.workers=1", "stages.1.batching=sort", "stages.1.batch_size=1"])
    assert command.run_train(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ctxforge train: stage 8K: workers 4 (= dp 2 x sp 2) x CPU 1 per worker needs CPU 4 (> 2); the "
                   "cluster has CPU 2. Lower stages.N.workers (ctxforge plan --gpus N says which layout fits), add "
                   "nodes, or set runtime.wait_for_resources_s for an autoscaling cluster"]


# ---------------------------------------------------------------------------------------------------
# flash-attn: the GPU extra pins it; its absence is a clear error, not an ImportError deep in transformers


def test_flash_attention_without_flash_attn_is_a_clear_error(monkeypatch):
    import importlib.util

    import torch

    from ctxforge.train.model import AttentionUnavailableError, resolve_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(AttentionUnavailableError, match=r"runtime.attention=auto needs flash_attention_2 on cuda, but "
                                                        r"the flash-attn package is not installed.*"
                                                        r"runtime.attention=ctxforge_doc_sdpa"):
        resolve_attention("auto", torch.device("cuda"))
    assert resolve_attention("ctxforge_doc_sdpa", torch.device("cuda")) == "ctxforge_doc_sdpa"
    assert resolve_attention("auto", torch.device("cpu")) == "ctxforge_doc_sdpa"


def test_gpu_extra_and_image_install_a_pinned_flash_attn():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pins = [e for e in extras if e.startswith("flash-attn")]
    assert pins == ["flash-attn==2.8.3.post2"]
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "--no-build-isolation" in docker and '.[gpu]' in docker
