"""Packing, sorted batching and LongAlign loss weighting (single process, tiny model in float64)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ctxforge.train.batching import collate, plan_microbatches, real_token_share
from ctxforge.train.data import Sample
from ctxforge.train.loss import (IGNORE, longalign_reference, naive_pack_loss, per_token_ce, shift_targets,
                                 step_counts, step_scale)
from test_sp_equivalence import build_samples


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from ctxforge.train.model import load_stage_model
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import DOC_SDPA

    return load_stage_model(tiny_model_path, RopeConfig(), 4096, DOC_SDPA, dtype="float64")


@pytest.fixture(scope="module")
def samples(tiny_tokenizer):
    base = build_samples(tiny_tokenizer)
    return base + [base[0], base[2]]  # 5 samples, different answer lengths


def _token_losses(model, tensors):
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"]).last_hidden_state
        return per_token_ce(hidden, model.get_output_embeddings(), tensors["target_ids"])


def test_shift_targets_predicts_only_answer_tokens():
    ids = torch.tensor([5, 6, 7, 8, 9])
    mask = torch.tensor([0, 0, 1, 1, 0])
    assert shift_targets(ids, mask).tolist() == [IGNORE, 7, 8, IGNORE, IGNORE]


def test_weighted_packed_loss_equals_mean_of_per_sample_means(model, samples, tiny_tokenizer):
    from ctxforge.train.model import weighted_loss_sum

    pad = tiny_tokenizer.pad_token_id
    packs = [[0, 1, 2], [3, 4]]                       # K = 2 packs, M = 5 samples
    alone = []
    for s in samples:                                  # L_i and N_i, each sample on its own
        mb = collate([s], "pack", "sample", pad)
        ce = _token_losses(model, mb.tensors)
        alone.append((ce.sum().item(), mb.num_targets))
    expected = longalign_reference([l for l, _ in alone], [n for _, n in alone])

    k, m = len(packs), sum(len(p) for p in packs)
    pack_losses, naive_sums, naive_targets = [], [], []
    for pack in packs:
        mb = collate([samples[i] for i in pack], "pack", "sample", pad)
        mb.tensors["weights"] = mb.tensors["weights"] * step_scale("sample", k, m, 0)
        with torch.no_grad():
            pack_losses.append(weighted_loss_sum(model, mb.tensors, chunk_tokens=7).item())
        naive_sums.append(sum(alone[i][0] for i in pack))
        naive_targets.append(sum(alone[i][1] for i in pack))
    reduced = sum(pack_losses) / k                     # what averaging over the K packs' ranks gives
    assert reduced == pytest.approx(expected, rel=1e-13, abs=0)
    # ... and the unweighted per-pack token mean LongAlign corrects is measurably different here.
    assert abs(naive_pack_loss(naive_sums, naive_targets) - expected) > 1e-6


def test_identity_is_exact_on_arbitrary_token_losses():
    rng = np.random.default_rng(0)
    n = [3, 11, 1, 7, 25, 2]
    token_losses = [rng.random(k) * 10 for k in n]
    packs = [[0, 1], [2, 3, 4], [5]]
    k, m = len(packs), len(n)
    reduced = np.mean([sum((token_losses[i] * (k / (n[i] * m))).sum() for i in p) for p in packs])
    expected = longalign_reference([t.sum() for t in token_losses], n)
    assert reduced == pytest.approx(expected, rel=1e-14)


def test_packed_documents_are_isolated(model, samples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    packed = collate(samples[:3], "pack", "sample", pad)
    ce_packed = _token_losses(model, packed.tensors)[0]
    offset = 0
    for s in samples[:3]:
        alone = _token_losses(model, collate([s], "pack", "sample", pad).tensors)[0]
        torch.testing.assert_close(ce_packed[offset:offset + len(s)], alone, rtol=1e-12, atol=1e-12)
        offset += len(s)


def test_without_document_positions_a_pack_leaks(model, samples, tiny_tokenizer):
    """Negative control: one running position range over the pack (no boundaries) changes the losses."""
    pad = tiny_tokenizer.pad_token_id
    packed = collate(samples[:3], "pack", "sample", pad)
    leaky = dict(packed.tensors, position_ids=torch.arange(packed.tensors["input_ids"].shape[1])[None])
    assert not torch.allclose(_token_losses(model, packed.tensors), _token_losses(model, leaky))


def test_token_weighting_is_a_token_mean(samples, tiny_tokenizer):
    mb = collate(samples, "pack", "token", tiny_tokenizer.pad_token_id)
    w = mb.tensors["weights"] * step_scale("token", 1, mb.num_samples, mb.num_targets)
    assert w.sum().item() == pytest.approx(1.0, rel=1e-12)


def test_pack_plan_respects_budget_and_uses_every_sample_once():
    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(200)]
    plan = plan_microbatches(lengths, "pack", 1024, 4, seed=3, epoch=0)
    assert sorted(i for mb in plan for i in mb) == list(range(200))
    assert all(sum(lengths[i] for i in mb) <= 1024 for mb in plan)
    assert plan == plan_microbatches(lengths, "pack", 1024, 4, seed=3, epoch=0)   # every rank agrees
    assert plan != plan_microbatches(lengths, "pack", 1024, 4, seed=3, epoch=1)   # reshuffled per epoch


def test_sorted_batching_wastes_less_than_naive_and_packing_least():
    rng = random.Random(2)
    lengths = [int(rng.lognormvariate(5, 1)) + 8 for _ in range(400)]
    cap = max(lengths)
    share = {mode: real_token_share(lengths, plan_microbatches(lengths, mode, cap, 8, 0, 0), mode, cap, 8)
             for mode in ("naive", "sort", "pack")}
    assert share["naive"] < share["sort"] < share["pack"] == 1.0
    sort_plan = plan_microbatches(lengths, "sort", cap, 8, 0, 0)
    assert all(len(g) <= 8 for g in sort_plan)


def test_padded_batches_have_fixed_rows_and_no_weight_on_padding(samples, tiny_tokenizer):
    mb = collate(samples[:2], "sort", "sample", tiny_tokenizer.pad_token_id, rows=3)
    t = mb.tensors
    assert t["input_ids"].shape[0] == 3 and t["weights"][2].abs().sum() == 0
    assert t["weights"].sum().item() == pytest.approx(2.0)   # two samples, each weighing 1 before K/M


def test_step_counts_without_a_process_group_are_local():
    assert step_counts(2, 5, 40, sp_degree=1, extra=7) == (2, 5, 40, 7)


def test_sample_num_targets_ignores_first_token():
    s = Sample("x", np.array([1, 2, 3]), np.array([1, 1, 0], dtype=np.int8))
    assert s.num_targets == 1
