"""`ctxforge plan` for the 1M curriculum before and after tiled MLP + checkpoint offload, and the planner's
per-token formula against the live-tensor peak of real Llama-3.1-8B decoder layers measured on fake tensors.

Part 1 (instant): per stage, GiB per GPU of the configured layout and the GPUs the stage needs, for
  - before:   the previous planner formula (40h "work" + L*2h + 6f per token) on the previous layouts
              (180K 8/sp4, 350K 8/sp8, 650K 16/sp8, 1M 32/sp16), no tiled MLP, checkpoints on the GPU;
  - options off: today's formula on the previous layouts, runtime.tiled_mlp=false runtime.offload_checkpoints=false
              (what `ctxforge plan --config train-llama8b-1m <those overrides>` prints);
  - after:    today's formula and the shipped config (every stage on one 8-GPU node).
Part 2 (~2 min on 2 cores): two decoder layers at Llama-3.1-8B sizes (h 4096, f 14336, 32/8 heads) run one
forward + backward on FakeTensorMode tensors (shapes and dtypes only, no arithmetic, so 64K tokens cost
nothing); a dispatch mode adds up the bytes of every live tensor storage and keeps the peak. Two lengths give
the per-token slope (weight-sized buffers cancel), which is compared with `bytes_per_token` for the same
layer count. The attention here is torch's CPU sdpa with KV heads repeated (the formula is evaluated with
rep = 4 to match); flash-attn's buffers on a GPU differ a little: bench/gpu_checks.py measures those.

    .venv/bin/python bench/bench_memory_plan.py [--skip-measure] [--tokens 32768,65536] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import sys
import weakref
from pathlib import Path

from smoke_sizes import parse_args

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS_LAYOUTS = {"180K": (8, 4), "350K": (8, 8), "650K": (16, 8), "1M": (32, 16)}


def previous_need(arch, rt, max_seq_len: int, world: int, sp: int) -> float:
    """The estimate `ctxforge plan` printed before tiled MLP, checkpoint offload, MLP backward buffers and fp32
    norm upcasts were counted: 40h 'work' (fitted to ALST) + L*2h checkpoints + 6f, per token."""
    from ctxforge.train.memory_plan import FIXED_BYTES, state_bytes

    local = math.ceil(max_seq_len / sp)
    per_token = 40 * arch.hidden + arch.layers * 2 * arch.hidden + 2 * 3 * arch.ffn
    return (state_bytes(arch, rt.zero_stage, world, rt.offload_optimizer, rt.offload_params) + local * per_token
            + 3 * min(rt.loss_chunk_tokens, local) * arch.vocab * 4 + FIXED_BYTES)


def smallest(fn, arch, budget: float, max_sp: int = 16) -> tuple[int, int] | None:
    from ctxforge.train.sequence_parallel import valid_sp_degrees

    best = None
    for sp in valid_sp_degrees(arch.heads, arch.kv_heads, limit=max_sp):
        for dp in range(1, 256 // sp + 1):
            if fn(dp * sp, sp) <= budget:
                if best is None or (dp * sp, sp) < best:
                    best = (dp * sp, sp)
                break
    return best


def part1() -> None:
    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.memory_plan import GIB, HEADROOM, arch_of, need_bytes

    path = str(ROOT / "configs" / "train-llama8b-1m.yaml")
    after = load_config(TrainConfig, path)
    off = load_config(TrainConfig, path, ["runtime.tiled_mlp=false", "runtime.offload_checkpoints=false"])
    arch = arch_of(after.model)
    budget = HEADROOM * 80 * GIB
    print(f"Part 1: {after.model} on 80 GiB GPUs (budget {budget / GIB:.0f} GiB); 'needs' = smallest GPU count "
          f"that fits (sp <= 16)\n")
    print(f"{'stage':<6}| {'before: layout  GiB  needs':<30}| {'options off: layout  GiB  needs':<34}| "
          f"{'after: layout  GiB  needs':<29}| GiB after/before")
    for s_after, s_off in zip(after.stages, off.stages):
        w0, sp0 = PREVIOUS_LAYOUTS[s_after.name]
        before_gib = previous_need(arch, off.runtime, s_after.max_seq_len, w0, sp0) / GIB
        before_fit = smallest(lambda w, sp: previous_need(arch, off.runtime, s_after.max_seq_len, w, sp), arch, budget)
        s_old = s_off.model_copy(update={"workers": w0, "sp_degree": sp0})
        off_gib = need_bytes(arch, off, s_old, w0, sp0)["total"] / GIB
        off_fit = smallest(lambda w, sp: need_bytes(arch, off, s_old, w, sp)["total"], arch, budget)
        after_gib = need_bytes(arch, after, s_after, s_after.workers, s_after.sp_degree)["total"] / GIB
        after_fit = smallest(lambda w, sp: need_bytes(arch, after, s_after, w, sp)["total"], arch, budget, max_sp=8)
        f = lambda fit: f"{fit[0]:>3} GPUs sp{fit[1]:<2}" if fit else "   none     "  # noqa: E731
        print(f"{s_after.name:<6}| {w0:>3}/sp{sp0:<3} {before_gib:5.1f}  {f(before_fit)} | "
              f"{w0:>3}/sp{sp0:<3} {off_gib:5.1f}{'*' if off_gib > budget / GIB else ' '} {f(off_fit)}     | "
              f"{s_after.workers:>3}/sp{s_after.sp_degree:<3} {after_gib:5.1f}  {f(after_fit)} | "
              f"{after_gib / before_gib:5.2f}")
    print("(* = the configured layout does not fit.) Total GPUs for the curriculum, the largest stage: "
          f"before {max(PREVIOUS_LAYOUTS[s.name][0] for s in after.stages)}, after "
          f"{max(s.workers for s in after.stages)}; the 1M stage's all-to-all spans "
          f"{PREVIOUS_LAYOUTS['1M'][1]} -> {after.stages[-1].sp_degree} GPUs (one node: 8).\n")


class LiveBytes:
    """TorchDispatchMode: bytes of the tensor storages alive now, and the peak (storages freed when collected)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        st = t.untyped_storage()
                        if st not in outer.seen:
                            n = st.nbytes()
                            outer.seen[st] = n
                            outer.now += n
                            weakref.finalize(st, outer._free, n)
                outer.peak = max(outer.peak, outer.now)
                return out

        self.seen, self.now, self.peak, self.mode = WeakIdKeyDictionary(), 0, 0, _Mode()

    def _free(self, n: int) -> None:
        self.now -= n


def measure(tokens: int, layers: int, checkpointing: bool, tiled: bool) -> int:
    """Peak live bytes of one forward + backward of `layers` Llama-3.1-8B decoder layers on fake tensors."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from ctxforge.train.memory_savers import enable_tiled_mlp

    def causal(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register("bench_causal", causal)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=tokens,
                      attn_implementation="bench_causal", use_cache=False)
    default = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tiled:
            enable_tiled_mlp(model)
        model.train()
        for p in model.parameters():  # ZeRO hands gradients off as they are made: do not keep them
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        ids, pos = torch.randint(0, 1000, (1, tokens)), torch.arange(tokens)[None]
        live = LiveBytes()
        with live.mode:
            model.model(input_ids=ids, position_ids=pos).last_hidden_state.sum().backward()
    return live.peak


def part2(lengths: list[int]) -> None:
    from ctxforge.train.config import RuntimeConfig
    from ctxforge.train.memory_plan import Arch, KNOWN_ARCHITECTURES, bytes_per_token

    arch = Arch(**{**KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B-Instruct"], "layers": 2})
    h = arch.hidden
    print(f"Part 2: per-token peak of 2 Llama-3.1-8B decoder layers, fake tensors, slope between {lengths[0]} and "
          f"{lengths[1]} tokens (bytes / token / hidden)")
    print(f"{'variant':<28} {'measured':>9} {'formula':>8} {'formula/measured':>17}")
    for name, ckpt, tiled in (("checkpointing", True, False), ("checkpointing + tiled MLP", True, True),
                              ("no checkpointing", False, False)):
        a, b = (measure(n, 2, ckpt, tiled) for n in lengths)
        slope = (b - a) / (lengths[1] - lengths[0])
        formula = bytes_per_token(arch, RuntimeConfig(gradient_checkpointing=ckpt, tiled_mlp=tiled), sp=32)["total"]
        print(f"{name:<28} {slope / h:9.2f} {formula / h:8.2f} {formula / slope:17.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-measure", action="store_true", help="part 1 only")
    parser.add_argument("--tokens", default="65536,131072", help="the two lengths of part 2")
    args = parse_args(parser, {"tokens": "1024,2048"}, argv)
    part1()
    if not args.skip_measure:
        part2([int(x) for x in args.tokens.split(",")][:2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
