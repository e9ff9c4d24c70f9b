"""The training checks that need a GPU, in one script that fits in 10 minutes on one H100/H200.

1. **flash-attn varlen = document-masked sdpa.** The trainer's GPU attention core is transformers'
   `flash_attention_2`, which turns the packed batch's position ids (reset to 0 at each document) into
   varlen cu_seqlens; the CPU core is `ctxforge_doc_sdpa` (causal sdpa per document). A small Llama
   (GQA, 2 layers, random weights, bf16) runs a packed batch of documents through both: outputs and
   gradients must agree within bf16 rounding. Negative control: plain causal sdpa over the whole pack
   (documents see each other) must not.
2. **Peak memory of one step at a long sequence**, to calibrate `ctxforge plan`'s per-token formula:
   `--layers` decoder layers at Llama-3.1-8B sizes (random weights, bf16), packed documents, the trainer's
   own forward (`weighted_loss_sum`, tiled loss), gradient checkpointing, gradients handed off as they are
   made (as ZeRO does). For each variant (checkpoints on GPU; + tiled MLP; + checkpoint offload) the peak
   `torch.cuda.max_memory_allocated` above the weights is measured at two lengths; the slope per token is
   compared with `bytes_per_token` for the same layer count and options, and the constant with the tiles.
   The ratio measured / formula is what to calibrate the planner by.

Writes gpu_checks.json (every number) to --out (default: $OUT if set, else runs/gpu_checks) and prints a
summary. Without CUDA it prints that nothing ran and exits 0.

    python bench/gpu_checks.py [--tokens 32768,65536] [--layers 4] [--out DIR] [--smoke]

With --smoke (CI) the same checks at 2K/4K tokens and one layer; on a machine without CUDA that is the
line saying that nothing ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from smoke_sizes import parse_args


def _packed(length: int, vocab: int, device, seed: int = 0, doc_min: int = 1024, doc_max: int = 8192):
    """[1, length] input_ids, position_ids (reset per document), target_ids, weights (answer share 25%)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (length,), generator=g)
    pos, start = torch.empty(length, dtype=torch.long), 0
    while start < length:
        n = min(int(torch.randint(doc_min, doc_max, (1,), generator=g)), length - start)
        pos[start:start + n] = torch.arange(n)
        start += n
    targets = torch.roll(ids, -1)
    targets[(torch.roll(pos, -1) == 0) | (torch.rand(length, generator=g) > 0.25)] = -100
    weights = (targets != -100).float() / max(int((targets != -100).sum()), 1)
    return {k: v[None].to(device) for k, v in
            {"input_ids": ids, "position_ids": pos, "target_ids": targets, "weights": weights}.items()}


def check_flash_varlen(device) -> dict:
    """flash_attention_2 (varlen from position ids) vs ctxforge_doc_sdpa on one packed batch."""
    import importlib.util

    import torch.nn.functional as F
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from ctxforge.train.model import weighted_loss_sum
    from ctxforge.train.sequence_parallel import DOC_SDPA, FLASH_VARLEN, register_doc_sdpa

    if importlib.util.find_spec("flash_attn") is None:
        return {"ran": False, "why": "flash-attn is not installed (pip install --no-build-isolation -e '.[gpu]')"}
    register_doc_sdpa()

    def causal_pack(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):  # the leak, on purpose
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register("gpu_check_causal_pack", causal_pack)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, num_hidden_layers=2, vocab_size=32000, max_position_embeddings=16384,
                      use_cache=False)
    torch.manual_seed(0)
    state = None
    out = {}
    batch = _packed(8192, cfg.vocab_size, device, doc_min=256, doc_max=3000)
    for impl in (FLASH_VARLEN, DOC_SDPA, "gpu_check_causal_pack"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16).to(device)
        if state is None:
            state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        loss = weighted_loss_sum(model, batch, 2048)
        loss.backward()
        out[impl] = {"hidden": hidden.detach().float(), "loss": float(loss),
                     "grad": model.model.layers[0].self_attn.q_proj.weight.grad.detach().float()}
        del model
    ref, res = out[DOC_SDPA], {"ran": True, "tokens": 8192, "documents": int((batch["position_ids"] == 0).sum())}

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for impl in (FLASH_VARLEN, "gpu_check_causal_pack"):
        res[impl] = {"hidden_rel_err": rel(out[impl]["hidden"], ref["hidden"]),
                     "loss": out[impl]["loss"], "loss_ref": ref["loss"],
                     "q_proj_grad_rel_err": rel(out[impl]["grad"], ref["grad"])}
    fa, leak = res[FLASH_VARLEN], res["gpu_check_causal_pack"]
    res["passed"] = (fa["hidden_rel_err"] < 2e-2 and fa["q_proj_grad_rel_err"] < 5e-2
                     and abs(fa["loss"] - fa["loss_ref"]) < 2e-2 * abs(fa["loss_ref"])
                     and leak["hidden_rel_err"] > 10 * max(fa["hidden_rel_err"], 1e-3))
    return res


def _step_peak(model, batch, offload: bool, device) -> int:
    """Peak bytes allocated above what was allocated before one forward + backward."""
    from ctxforge.train.memory_savers import checkpoint_offload
    from ctxforge.train.model import weighted_loss_sum

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with checkpoint_offload(offload):
        loss = weighted_loss_sum(model, batch, 2048)
        loss.backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def check_peak_memory(device, lengths: list[int], layers: int) -> dict:
    """Measured per-token slope and constant of one step vs the planner's formula, per variant."""
    import importlib.util

    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxforge.train.config import RuntimeConfig
    from ctxforge.train.memory_savers import enable_tiled_mlp
    from ctxforge.train.memory_plan import KNOWN_ARCHITECTURES, Arch, bytes_per_token, tile_bytes
    from ctxforge.train.sequence_parallel import DOC_SDPA, FLASH_VARLEN, register_doc_sdpa

    register_doc_sdpa()
    attention = FLASH_VARLEN if importlib.util.find_spec("flash_attn") else DOC_SDPA
    dims = KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"]
    arch = Arch(**{**dims, "layers": layers})
    cfg = LlamaConfig(hidden_size=arch.hidden, intermediate_size=arch.ffn, num_attention_heads=arch.heads,
                      num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, num_hidden_layers=layers,
                      vocab_size=arch.vocab, max_position_embeddings=max(lengths), rope_theta=5e5, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=attention, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for p in model.parameters():  # ZeRO hands gradients off as they are made
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    result = {"attention": attention, "layers": layers, "lengths": lengths,
              "weights_gib": sum(p.numel() for p in model.parameters()) * 2 / 2**30, "variants": {}}
    for name, tiled, offload in (("checkpoints", False, False), ("checkpoints+tiled_mlp", True, False),
                                 ("tiled_mlp+offload", True, True)):
        if tiled:
            enable_tiled_mlp(model)
        rt = RuntimeConfig(tiled_mlp=tiled, offload_checkpoints=offload, loss_chunk_tokens=2048)
        peaks = [_step_peak(model, _packed(n, arch.vocab, device, seed=n), offload, device) for n in lengths]
        slope = (peaks[1] - peaks[0]) / (lengths[1] - lengths[0])
        formula = bytes_per_token(arch, rt, sp=1)["total"]
        const = peaks[0] - slope * lengths[0]
        tiles = sum(tile_bytes(arch, rt, lengths[0]).values())
        result["variants"][name] = {"peaks_bytes": peaks, "slope_bytes_per_token": slope,
                                    "formula_bytes_per_token": formula, "measured_over_formula": slope / formula,
                                    "constant_bytes": const, "tiles_bytes": tiles}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32768,65536", help="two sequence lengths for the memory slope")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers at Llama-3.1-8B sizes")
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_checks")
    args = parse_args(parser, {"tokens": "2048,4096", "layers": 1}, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device here: the GPU checks did not run")
        (out / "gpu_checks.json").write_text(json.dumps({"ran": False, "why": "no CUDA device"}))
        return 0
    device = torch.device("cuda", 0)
    report = {"ran": True, "device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    t0 = time.time()
    try:
        report["flash_varlen"] = check_flash_varlen(device)
    except Exception as exc:  # one check failing must not hide the other's numbers
        report["flash_varlen"] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"}
    torch.cuda.empty_cache()
    report["flash_varlen_s"] = time.time() - t0
    t0 = time.time()
    try:
        report["peak_memory"] = check_peak_memory(device, [int(x) for x in args.tokens.split(",")][:2], args.layers)
    except Exception as exc:
        report["peak_memory"] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"}
    report["peak_memory_s"] = time.time() - t0
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
    fv = report["flash_varlen"]
    print(f"device {report['device']}, torch {report['torch']}")
    print(f"1. flash-attn varlen vs document-masked sdpa: {json.dumps(fv)}")
    pm = report["peak_memory"]
    if pm.get("variants"):
        print(f"2. peak memory, {pm['layers']} Llama-8B layers, attention {pm['attention']}, tokens {pm['lengths']}:")
        for name, v in pm["variants"].items():
            print(f"   {name:<22} slope {v['slope_bytes_per_token'] / 4096:6.1f} h/token, formula "
                  f"{v['formula_bytes_per_token'] / 4096:6.1f} h/token, measured/formula {v['measured_over_formula']:.3f}; "
                  f"constant {v['constant_bytes'] / 2**30:.2f} GiB (tiles {v['tiles_bytes'] / 2**30:.2f} GiB)")
    else:
        print(f"2. peak memory: {json.dumps(pm)}")
    ok = fv.get("passed", False) and bool(pm.get("variants"))
    print(f"wrote {out / 'gpu_checks.json'}; {'all checks ran' if ok else 'NOT all checks ran or passed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
