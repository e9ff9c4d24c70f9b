"""`ctxforge plan`: GPU memory per rank for each stage, and the smallest GPU count / SP degree that fits.

The formula is design/sequence-parallel.md §7, specialised to what this trainer does (gradient
checkpointing on GPU, tiled loss, no TiledMLP, no checkpoint offload):

    S      = ceil(max_seq_len / sp)                                    local tokens per rank
    c_tok  = c_work (40*h, fitted to ALST's two published points)      per local token
           + L*2*h            (checkpointed layer inputs, bf16)         when gradient checkpointing
             or ~2*(6h + 3h_kv + 4*ffn) * L (all activations)           when not
           + 2*3*ffn          (one layer's MLP intermediates on recompute; TiledMLP would remove it)
    loss   = 3 * chunk * V * 4                                          one fp32 logits tile + grad + softmax
    state  = ZeRO: 3 -> 16P/W (4P/W with optimizer offload, 0 with params offloaded too),
             2 -> 2P + 14P/W, 1 -> 4P + 12P/W, 0 -> 16P                 W = dp*sp ranks
    need   = state + fixed (4 GiB: CUDA context, NCCL, ZeRO buckets) + S*c_tok + loss  <=  0.9 * GPU memory

It is an estimate to choose a layout, not a guarantee: calibrate c_work on the lent GPU (peak memory per
rank at two lengths, see bench/bench_train_sp.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import StageConfig, TrainConfig
from .sequence_parallel import valid_sp_degrees

GIB = 1024 ** 3
FIXED_BYTES = 4 * GIB
HEADROOM = 0.9

# Architectures `plan` knows without downloading a config (hub ids cannot be resolved offline).
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                                             ffn=14336, vocab=128256, tied=False),
    "Qwen/Qwen2.5-7B-Instruct": dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, ffn=18944,
                                     vocab=152064, tied=False),
}


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * self.heads * self.head_dim * 2 + h * kv * 2
        mlp = 3 * h * self.ffn
        emb = self.vocab * h * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * h) + emb + h


def arch_of(model: str) -> Arch:
    if model in KNOWN_ARCHITECTURES:
        return Arch(**KNOWN_ARCHITECTURES[model])
    from transformers import AutoConfig

    from ctxforge.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model)).get_text_config()
    return Arch(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                ffn=c.intermediate_size, vocab=c.vocab_size, tied=bool(c.tie_word_embeddings))


def bytes_per_token(arch: Arch, gradient_checkpointing: bool) -> float:
    h = arch.hidden
    work = 40 * h
    if gradient_checkpointing:
        acts = arch.layers * 2 * h
    else:
        acts = 2 * (6 * h + 3 * arch.kv_heads * arch.head_dim + 4 * arch.ffn) * arch.layers
    return work + acts + 2 * 3 * arch.ffn


def state_bytes(arch: Arch, zero_stage: int, world: int, offload_optimizer: bool, offload_params: bool) -> float:
    p = arch.params
    if zero_stage == 3:
        if offload_params:
            return 0.0
        return (4 if offload_optimizer else 16) * p / world
    if zero_stage == 2:
        return 2 * p + (2 if offload_optimizer else 14) * p / world
    if zero_stage == 1:
        return 4 * p + (0 if offload_optimizer else 12) * p / world
    return 16.0 * p


def need_bytes(arch: Arch, cfg: TrainConfig, stage: StageConfig, world: int, sp: int) -> dict:
    rt = cfg.runtime
    local = math.ceil(stage.max_seq_len / sp)
    parts = {
        "state": state_bytes(arch, rt.zero_stage, world, rt.offload_optimizer, rt.offload_params),
        "activations": local * bytes_per_token(arch, rt.gradient_checkpointing),
        "loss_tile": 3 * min(rt.loss_chunk_tokens, local) * arch.vocab * 4,
        "fixed": FIXED_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class PlanRow:
    stage: str
    max_seq_len: int
    configured: dict          # need_bytes for the stage's own (workers, sp_degree)
    configured_fits: bool
    min_gpus: int | None      # smallest dp*sp that fits (None: nothing up to the search limit)
    min_sp: int | None
    min_need: dict | None


def plan_curriculum(cfg: TrainConfig, gpu_memory_gib: float, max_sp: int = 8, max_gpus: int = 256) -> list[PlanRow]:
    arch = arch_of(cfg.model)
    budget = HEADROOM * gpu_memory_gib * GIB
    rows = []
    for stage in cfg.stages:
        configured = need_bytes(arch, cfg, stage, stage.workers, stage.sp_degree)
        best = None
        for sp in valid_sp_degrees(arch.heads, arch.kv_heads, limit=max_sp):
            for dp in range(1, max_gpus // sp + 1):
                need = need_bytes(arch, cfg, stage, dp * sp, sp)
                if need["total"] <= budget:
                    if best is None or (dp * sp, sp) < (best[0], best[1]):
                        best = (dp * sp, sp, need)
                    break
        rows.append(PlanRow(stage.name, stage.max_seq_len, configured, configured["total"] <= budget,
                            best[0] if best else None, best[1] if best else None, best[2] if best else None))
    return rows


def format_plan(cfg: TrainConfig, rows: list[PlanRow], gpu_memory_gib: float) -> str:
    arch = arch_of(cfg.model)
    rt = cfg.runtime
    g = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
    lines = [f"model {cfg.model}: {arch.params / 1e9:.2f}B params, {arch.layers} layers, hidden {arch.hidden}, "
             f"{arch.heads} q / {arch.kv_heads} kv heads (valid SP degrees: "
             f"{', '.join(map(str, valid_sp_degrees(arch.heads, arch.kv_heads)))})",
             f"ZeRO-{rt.zero_stage}, optimizer offload {rt.offload_optimizer}, param offload {rt.offload_params}, "
             f"gradient checkpointing {rt.gradient_checkpointing}, loss tile {rt.loss_chunk_tokens} tokens; "
             f"budget {HEADROOM:.0%} of {gpu_memory_gib:g} GiB per GPU", "",
             "stage     max_len  layout (dp x sp)   state   activ   loss  fixed   total GiB  fits | smallest fit: GPUs  sp  GiB"]
    for r, stage in zip(rows, cfg.stages):
        c = r.configured
        fit = f"{r.min_gpus:>4} {r.min_sp:>3} {g(r.min_need['total'])}" if r.min_gpus else "  none up to the search limit"
        lines.append(f"{r.stage:<8} {r.max_seq_len:>8}  {stage.dp_degree:>3} x {stage.sp_degree:<3}       "
                     f"{g(c['state'])} {g(c['activations'])} {g(c['loss_tile'])} {g(c['fixed'])} {g(c['total'])}  "
                     f"{'yes' if r.configured_fits else 'NO ':<4}|              {fit}")
    return "\n".join(lines)
