"""Ulysses SP (DeepSpeed's UlyssesSPAttentionHF + our document-masked core) equals a single process.

Two gloo processes (mp.spawn, no Ray). In each process the reference is computed first on the full
sequence (no SP), then the same model runs with SP degree 2 on its contiguous half; losses are summed and
gradients all-reduced over the SP group. float64 so the tolerance can be tight. The negative control
swaps the core for DeepSpeed's own sdpa path (mask dropped): the packed loss then differs — the
cross-document leak the design notes warn about is real, and this test can fail.
"""

from __future__ import annotations

import json
import os

import pytest
from ports import free_port
import torch
import torch.multiprocessing as mp

CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote the letter to the church in Rome, and why?"},
     {"role": "assistant", "content": "Paul wrote it, to explain the gospel before his visit."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name two rivers of Eden."},
     {"role": "assistant", "content": "Pishon and Gihon."},
     {"role": "user", "content": "And the others?"},
     {"role": "assistant", "content": "Tigris and Euphrates."}],
    [{"role": "user", "content": "Count to five."},
     {"role": "assistant", "content": "One, two, three, four, five."}],
]


def build_samples(tokenizer):
    import numpy as np

    from ctxforge.pipeline.render import render_conversation
    from ctxforge.train.data import Sample

    out = []
    for n, conv in enumerate(CONVERSATIONS):
        ids, mask = render_conversation(conv, tokenizer)
        out.append(Sample(f"s{n}", np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)))
    return out


def _worker(rank: int, world: int, port: int, model_path: str, out_dir: str, core: str = "ctxforge_doc_sdpa",
            dtype: str = "float64", backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ctxforge.models import load_tokenizer
    from ctxforge.train.batching import collate
    from ctxforge.train.loss import step_scale
    from ctxforge.train.model import load_stage_model, weighted_loss_sum
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import DOC_SDPA, enable_ulysses, pad_to_multiple, shard_sequence

    deepspeed.init_distributed(dist_backend=backend)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    tok = load_tokenizer(model_path)
    samples = build_samples(tok)
    model = load_stage_model(model_path, RopeConfig(), 4096, core, dtype=dtype).to(device)
    pad_id = tok.pad_token_id

    cases = {}
    for name, chosen in (("packed", samples), ("single", samples[:1])):
        mb = collate(chosen, "pack", "sample", pad_id)
        mb.tensors["weights"] = mb.tensors["weights"] * step_scale("sample", 1, mb.num_samples, mb.num_targets)
        padded = pad_to_multiple(mb.tensors, world, pad_id)
        cases[name] = (mb.tensors["input_ids"].shape[1], {k: v.to(device) for k, v in padded.items()})

    def grads():
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    refs = {}
    for name, (_, batch) in cases.items():  # reference: whole sequence, one process, no SP
        model.zero_grad(set_to_none=True)
        loss = weighted_loss_sum(model, batch, chunk_tokens=16)
        loss.backward()
        refs[name] = (loss.item(), grads())

    mpu = enable_ulysses(model, world, core)
    group = mpu.get_sequence_parallel_group()
    result = {}
    for name, (raw_len, batch) in cases.items():
        model.zero_grad(set_to_none=True)
        local = shard_sequence(batch, rank, world)
        loss = weighted_loss_sum(model, local, chunk_tokens=16)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)  # [] per rank -> [] sum over the SP group
        g = grads()
        for t in g.values():
            dist.all_reduce(t, group=group)  # param-shaped partial grads -> their sum over SP ranks
        ref_loss, ref_grads = refs[name]
        width = batch["input_ids"].shape[1] // world
        result[name] = {
            "raw_len": raw_len, "padded_len": batch["input_ids"].shape[1], "ref": ref_loss, "sp": total.item(),
            # the last position of shard r predicts the first token of shard r + 1: a target there is what
            # tests that labels were shifted before sharding
            "boundary_targets": [bool(batch["target_ids"][0, (r + 1) * width - 1] != -100) for r in range(world - 1)],
            "local_targets": int((local["target_ids"] != -100).sum()),
            "max_grad_diff": max((g[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
            "rel_grad_diff": max(((g[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)).item()
                                 for n in ref_grads),
            "max_grad": max(v.abs().max().item() for v in ref_grads.values()),
            "grad_names": sorted(set(g) ^ set(ref_grads)),
        }

    if core != DOC_SDPA:  # the negative control below is about the CPU core
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(result, fh)
        dist.destroy_process_group()
        return
    # Negative control: DeepSpeed's wrapper over plain sdpa (mask dropped -> causal across documents).
    cfg = model.config
    leaky = UlyssesSPAttentionHF(attn=sdpa_attention_forward, batch_size=1, attn_head_count=cfg.num_attention_heads,
                                 attn_head_size=cfg.hidden_size // cfg.num_attention_heads,
                                 kv_head_count=cfg.num_key_value_heads, num_hidden_layers=cfg.num_hidden_layers,
                                 process_group=group, seq_length_is_variable=True)
    ALL_ATTENTION_FUNCTIONS[DOC_SDPA] = lambda module, q, k, v, mask, *a, **kw: leaky(module, q, k, v, None, *a, **kw)
    with torch.no_grad():
        local = shard_sequence(cases["packed"][1], rank, world)
        leak = weighted_loss_sum(model, local, chunk_tokens=16)
        dist.all_reduce(leak, group=group)
    result["leak_loss"] = leak.item()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp2_results(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp2")
    mp.spawn(_worker, args=(2, free_port(), tiny_model_path, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", ["packed", "single"])
def test_sp2_loss_and_grads_equal_single_process(sp2_results, case):
    for res in sp2_results:
        r = res[case]
        assert r["grad_names"] == []
        assert r["sp"] == pytest.approx(r["ref"], rel=1e-12, abs=1e-12)
        assert r["max_grad_diff"] <= 1e-10 * max(1.0, r["max_grad"])


@pytest.mark.slow
def test_sp4_replicates_kv_heads_and_still_equals_single_process(tiny_model_path, tmp_path):
    """SP 4 > 2 KV heads: DeepSpeed replicates each KV head 2x before the all-to-all (4 gloo processes)."""
    mp.spawn(_worker, args=(4, free_port(), tiny_model_path, str(tmp_path)), nprocs=4, join=True)
    for r in range(4):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert all(res["packed"]["boundary_targets"])                     # all 3 shard edges carry a target
        for case in ("packed", "single"):
            assert res[case]["padded_len"] % 4 == 0
            assert res[case]["sp"] == pytest.approx(res[case]["ref"], rel=1e-12)
            assert res[case]["max_grad_diff"] <= 1e-10 * max(1.0, res[case]["max_grad"])
        assert abs(res["leak_loss"] - res["packed"]["ref"]) > 1e-4 * abs(res["packed"]["ref"])


def test_the_packed_case_has_a_target_at_the_shard_boundary(sp2_results):
    """The label at a shard edge (shard 0's last position predicts shard 1's first token) is only tested
    when that position is a target; the packed case must have one (the single case happens not to)."""
    for res in sp2_results:
        assert res["packed"]["boundary_targets"] == [True]
        assert res["single"]["boundary_targets"] == [False]


def test_sp2_handles_a_length_the_degree_does_not_divide(sp2_results):
    lengths = {res["single"]["raw_len"] for res in sp2_results}
    assert len(lengths) == 1 and lengths.pop() % 2 == 1, "the single-sample case must exercise padding"
    assert sp2_results[0]["single"]["padded_len"] % 2 == 0


def test_a_shard_may_hold_no_target(sp2_results):
    # The first half of a single sample is mostly prompt; the weighted SUM still matches (no per-shard mean).
    per_rank = [res["single"]["local_targets"] for res in sp2_results]
    assert sum(per_rank) > 0 and min(per_rank) < max(per_rank)


def test_dropping_the_document_mask_leaks_across_packed_documents(sp2_results):
    res = sp2_results[0]
    assert abs(res["leak_loss"] - res["packed"]["ref"]) > 1e-4 * abs(res["packed"]["ref"])


@pytest.mark.gpu
def test_sp2_with_flash_attn_varlen_equals_single_gpu(tiny_model_path, tmp_path):
    """The GPU path: the same SP code with flash_attention_2 (varlen from the gathered position ids), bf16, NCCL."""
    pytest.importorskip("flash_attn")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for SP degree 2")
    mp.spawn(_worker, args=(2, free_port(), tiny_model_path, str(tmp_path), "flash_attention_2", "bfloat16", "nccl"),
             nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for case in ("packed", "single"):
            assert res[case]["sp"] == pytest.approx(res[case]["ref"], rel=2e-2)
            assert res[case]["rel_grad_diff"] < 5e-2


@pytest.mark.gpu
def test_flash_attn_varlen_keeps_packed_documents_apart(tiny_model_path, tiny_tokenizer):
    pytest.importorskip("flash_attn")
    from ctxforge.train.batching import collate
    from ctxforge.train.loss import per_token_ce
    from ctxforge.train.model import load_stage_model
    from ctxforge.train.rope import RopeConfig

    model = load_stage_model(tiny_model_path, RopeConfig(), 4096, "flash_attention_2", dtype="bfloat16").cuda()
    samples = build_samples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id

    def ce(mb):
        t = {k: v.cuda() for k, v in mb.tensors.items()}
        with torch.no_grad():
            h = model.get_decoder()(input_ids=t["input_ids"], position_ids=t["position_ids"]).last_hidden_state
            return per_token_ce(h, model.get_output_embeddings(), t["target_ids"])[0].float().cpu()

    packed, offset = ce(collate(samples, "pack", "sample", pad)), 0
    for s in samples:
        torch.testing.assert_close(packed[offset:offset + len(s)], ce(collate([s], "pack", "sample", pad)),
                                   rtol=2e-2, atol=2e-2)
        offset += len(s)


def test_document_spans_follow_position_resets():
    from ctxforge.train.sequence_parallel import document_spans

    pos = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    assert document_spans(pos) == [(0, 3), (3, 5), (5, 6), (6, 10)]


def test_padding_is_its_own_document_and_shards_are_contiguous():
    from ctxforge.train.sequence_parallel import (ParallelLayout, SequenceParallelError, pad_to_multiple,
                                                  shard_sequence)

    batch = {"input_ids": torch.arange(5)[None], "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
             "target_ids": torch.tensor([[1, 2, -100, 4, -100]]), "weights": torch.ones(1, 5, dtype=torch.float64)}
    padded = pad_to_multiple(batch, 4, pad_id=99)
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert padded["target_ids"][0, 5:].tolist() == [-100] * 3 and padded["weights"][0, 5:].sum() == 0
    halves = [shard_sequence(padded, r, 2)["input_ids"].tolist() for r in range(2)]
    assert halves == [[[0, 1, 2, 3]], [[4, 99, 99, 99]]]
    with pytest.raises(SequenceParallelError, match=r"5 % 2 = 1"):
        shard_sequence(batch, 0, 2)
    layout = ParallelLayout.build(world_size=8, rank=5, sp_degree=4)
    assert (layout.dp_degree, layout.dp_rank, layout.sp_rank) == (2, 1, 1)
    with pytest.raises(SequenceParallelError, match=r"6 % 4 = 2"):
        ParallelLayout.build(world_size=6, rank=0, sp_degree=4)
