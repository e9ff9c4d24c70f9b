"""Memory savers change where memory goes, never the numbers: TiledMLP, checkpoint offload, ZeRO-3 zero.Init.

TiledMLP: loss and every gradient equal the untiled model (float64, the tiny Qwen2 model and SmolLM2's Llama
MLP with its real weights), including slice counts that torch.chunk cannot honour and batches of rows.
Checkpoint offload: equal loss and gradients with DeepSpeed's offload context, which saw every layer's input.
zero.Init: two gloo ranks, ZeRO-3; each rank holds only its partition from the moment the model is built,
and the loss and gradients equal those of a model loaded whole and partitioned by deepspeed.initialize, with
and without TiledMLP on micro-batches of different lengths per rank (the slice count is agreed across ranks,
or the weight gathers of ZeRO-3 would not match).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ports import free_port

from ctxforge.train.memory_savers import (TiledMLPError, _exact_chunks, checkpoint_offload, enable_tiled_mlp, gated_mlps,
                                   mlp_shards, tiled_mlp_forward)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny(tiny_model_path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64, **kw)


def test_exact_chunks_makes_torch_chunk_yield_every_slice():
    assert _exact_chunks(6, 4) == 2 and _exact_chunks(8, 4) == 0 and _exact_chunks(3, 5) == 2
    for rows in range(1, 60):
        for shards in range(1, 9):
            pad = _exact_chunks(rows, shards)
            assert len(torch.arange(rows + pad).chunk(shards)) == shards, (rows, shards)
            assert pad < shards
    assert mlp_shards(4096, 4096) == 1 and mlp_shards(4097, 4096) == 2 and mlp_shards(131072, 4096) == 32


def test_tiled_mlp_equals_untiled_on_the_tiny_model(tiny_model_path):
    torch.manual_seed(0)
    base = _tiny(tiny_model_path)
    tiled = copy.deepcopy(base)
    assert enable_tiled_mlp(tiled) == base.config.num_hidden_layers
    assert all(m.forward.__func__ is tiled_mlp_forward for m in gated_mlps(tiled))
    ids = torch.randint(0, base.config.vocab_size, (2, 150))       # 300 rows / hidden 64 -> 5 slices
    for model in (base, tiled):
        model(input_ids=ids, labels=ids).loss.backward()
    ref, got = base(input_ids=ids, labels=ids).loss, tiled(input_ids=ids, labels=ids).loss
    assert torch.equal(ref, got)
    g_ref, g_got = _grads(base), _grads(tiled)
    assert g_ref.keys() == g_got.keys() and len(g_ref) == len(list(base.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-12, atol=1e-14, msg=name)


def test_tiled_mlp_equals_untiled_on_smollm2s_llama_mlp(smollm2_path):
    """SmolLM2's layer-0 MLP with its real weights (hidden 576, ffn 1536), forward and gradients, at the
    default slice count and at slice counts torch.chunk cannot honour (zero rows added, then cut)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = AutoConfig.from_pretrained(smollm2_path)
    mlp = LlamaMLP(config)
    with safe_open(os.path.join(smollm2_path, "model.safetensors"), "pt") as f:
        mlp.load_state_dict({k.split("mlp.")[1]: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.mlp.")})
    mlp = mlp.double()
    torch.manual_seed(0)
    for shape, shards in (((1, 1500, 576), None), ((1, 6, 576), 4), ((3, 7, 576), 5)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(*shape, dtype=torch.float64)
        ref = mlp(x)
        ref.backward(upstream)
        ref_grads = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in mlp.named_parameters()}}
        x.grad = None
        mlp.zero_grad()
        got = tiled_mlp_forward(mlp, x, shards)
        got.backward(upstream)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        got_grads = {"x": x.grad, **{n: p.grad for n, p in mlp.named_parameters()}}
        for name, g in ref_grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-10, atol=1e-10, msg=f"{shape} {name}")
        mlp.zero_grad()


def test_tiled_mlp_refuses_a_model_without_a_gated_mlp():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(TiledMLPError, match=r"runtime.tiled_mlp: model type 'gpt2' has no gated MLP"):
        enable_tiled_mlp(model)


def test_checkpoint_offload_keeps_loss_and_gradients_and_sees_every_layer(tiny_model_path):
    torch.manual_seed(0)
    model = _tiny(tiny_model_path)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 96))
    plain = model(input_ids=ids, labels=ids).loss
    plain.backward()
    ref = _grads(model)
    model.zero_grad()
    offload = checkpoint_offload(True)                   # its __enter__ returns None: keep the object
    with offload:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        stats = offload.stats
    assert torch.equal(loss, plain)
    for name, g in _grads(model).items():
        assert torch.equal(g, ref[name]), name
    # every decoder layer's checkpointed input reached the offload hook (on CPU it stays where it is)
    assert stats.marked_tensors == model.config.num_hidden_layers
    assert stats.skipped_marked_tensors == model.config.num_hidden_layers
    model.gradient_checkpointing_disable()                 # negative control: nothing checkpointed, nothing marked
    offload = checkpoint_offload(True)
    with offload:
        model(input_ids=ids, labels=ids).loss.backward()
        assert offload.stats.marked_tensors == 0


def test_checkpoint_offload_needs_gradient_checkpointing():
    from ctxforge.train.config import RuntimeConfig

    with pytest.raises(ValueError, match=r"runtime.offload_checkpoints=true needs runtime.gradient_checkpointing=true"):
        RuntimeConfig(offload_checkpoints=True, gradient_checkpointing=False)


# ---------------------------------------------------------------------------------------------------
# ZeRO-3: building under zero.Init


def _zero3_worker(rank: int, world: int, port: int, model_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from ctxforge.train.config import RuntimeConfig, StageConfig
    from ctxforge.train.deepspeed_setup import build_engine, ds_config
    from ctxforge.train.model import load_stage_model
    from ctxforge.train.rope import RopeConfig

    deepspeed.init_distributed(dist_backend="gloo")
    cpu = torch.device("cpu")
    stage = StageConfig(name="s", max_seq_len=512, lr=1e-3, max_grad_norm=0.0)
    results = {}
    for path, tiled in (("zero_init", False), ("whole", False), ("zero_init", True)):
        runtime = RuntimeConfig(device="cpu", dtype="float32", zero_stage=3, gradient_checkpointing=True,
                                tiled_mlp=tiled)
        cfg = ds_config(stage, runtime, cpu, rows=1)
        lm = load_stage_model(model_path, RopeConfig(), 512, "ctxforge_doc_sdpa", "float32", True, tiled_mlp=tiled,
                              zero3_config=cfg if path == "zero_init" else None)
        params = list(lm.parameters())
        held = sum(p.numel() for p in params)          # what the rank holds as full tensors
        full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        part = sum(p.ds_tensor.numel() for p in params) if path == "zero_init" else None
        expected_part = sum(math.ceil(p.ds_numel / world) for p in params) if path == "zero_init" else None
        engine, _ = build_engine(lm, stage, runtime, cpu, rows=1, total_steps=1)
        torch.manual_seed(100 + rank)                   # different micro-batch lengths per rank: 150 vs 70
        n = 150 if rank == 0 else 70
        ids = torch.randint(0, lm.config.vocab_size, (1, n))
        batch = {"input_ids": ids, "position_ids": torch.arange(n)[None], "target_ids": torch.roll(ids, -1, 1),
                 "weights": torch.full((1, n), 1.0 / n)}
        loss = engine(**batch)
        engine.backward(loss)
        grads = {name: safe_get_full_grad(p).norm().item() for name, p in engine.module.named_parameters()
                 if "mlp" in name or "embed" in name}
        results[f"{path}-{'tiled' if tiled else 'untiled'}"] = {
            "held": held, "full": full, "part": part, "expected_part": expected_part, "loss": loss.item(),
            "grad_norms": grads}
        engine.destroy()
        del engine, lm
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


@pytest.fixture(scope="module")
def zero3_results(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    mp.spawn(_zero3_worker, args=(2, free_port(), tiny_model_path, str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    print({k: {f: v for f, v in r.items() if f != "grad_norms"} for k, r in results[0].items()})
    return results


@pytest.mark.slow
def test_zero_init_holds_only_the_partition_and_gives_the_same_loss(zero3_results):
    for rank, res in enumerate(zero3_results):
        z, w = res["zero_init-untiled"], res["whole-untiled"]
        assert z["held"] == 0, f"rank {rank}: a zero.Init model must hold no full parameter"
        assert z["part"] == z["expected_part"] and 2 * z["part"] < 1.01 * z["full"]   # its 1/2 share (+ padding)
        assert w["held"] == w["full"] == z["full"]         # negative control: the whole path held everything
        assert z["loss"] == pytest.approx(w["loss"], rel=1e-6, abs=1e-9)
        for name, norm in w["grad_norms"].items():
            assert z["grad_norms"][name] == pytest.approx(norm, rel=1e-5, abs=1e-9), (rank, name)


@pytest.mark.slow
def test_tiled_mlp_under_zero3_with_uneven_ranks_equals_untiled(zero3_results):
    for res in zero3_results:
        t, u = res["zero_init-tiled"], res["zero_init-untiled"]
        assert t["held"] == 0 and t["part"] == u["part"]
        assert t["loss"] == pytest.approx(u["loss"], rel=1e-6)
        for name, norm in u["grad_norms"].items():
            assert t["grad_norms"][name] == pytest.approx(norm, rel=1e-5, abs=1e-9), name


@pytest.mark.slow
def test_ray_train_stage_runs_zero3_zero_init_tiled_mlp_and_offload_under_sp2(tmp_path, tiny_tokenizer):
    """The worker loop with every saver on: ZeRO-3 with zero.Init, TiledMLP, checkpoint offload, Ulysses SP 2,
    one optimizer step on Ray Train (2 gloo workers), then the final HF export gathered from the partitions."""
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file
    from test_train_config import _rows, _write

    _write(tmp_path / "synth", "4K", _rows(tiny_tokenizer, "4K"))
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train-tiny.yaml").read_text())
    config["stages"] = [{**config["stages"][1], "name": "4K", "data_stage": "4K", "max_seq_len": 4096}]
    config["runtime"].update(zero_stage=3, tiled_mlp=True, offload_checkpoints=True, progress=False, max_failures=0)
    config["input"]["path"], config["output"]["dir"] = str(tmp_path / "synth"), str(tmp_path / "train")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "ctxforge", "train", "--config", str(tmp_path / "train.yaml")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics" / "4K.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"]) and rows[0]["loss"] > 0
    weights = load_file(str(tmp_path / "train" / "checkpoints" / "4K" / "model.safetensors"))
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)   # whole tensors, not partitions
