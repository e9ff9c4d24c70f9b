"""`ctxforge plan`: GPU (and host) memory per rank for each stage, and the layouts that fit.

Peak memory of one rank = model states + per-token activations x local tokens + per-step tiles + fixed.
Every term below is in bytes; h = hidden size, h_kv = KV heads x head dim, f = MLP (ffn) size, n = query heads,
L = layers, V = vocabulary, P = parameters, W = dp x sp ranks sharing ZeRO, S = ceil(max_seq_len / sp) local
tokens, rep = max(1, sp / KV heads) (Ulysses replicates KV heads when sp exceeds them). bf16 activations.

Per local token (`bytes_per_token`), at the peak, the backward of one checkpointed decoder layer:

    checkpoints     L * 2h            each layer's bf16 input, kept by activation checkpointing
                    2 * 2h            with offload_checkpoints: the newest input (kept on GPU) + the one
                                      restored for the layer in backward; the rest is in pinned host memory
    norms           2 * (2h + 2h)     per RMSNorm: its bf16 normalized input (saved for the weight's gradient)
                                      and its output (saved by the next projection)
    norm_fp32       2 * 4h            per RMSNorm: x.float(), saved by pow and mul (transformers' RMSNorm
                                      computes in fp32)
    attention       2h + 4*h_kv*rep + 2h + 2h + 4n
                                      q, k, v after RoPE and the all-to-all (saved by the attention kernel), its
                                      output, o_proj's input, fp32 log-sum-exp per head
    residual_grads  2 * 2h            the residual stream's gradient and the branch gradient added to it
  + the largest of three phases of the layer's backward:
    mlp             12f               untiled: the saved gate, up, act(gate) outputs (the product is freed by
                                      then) plus the gradients of the product, act and up (MLP backward buffers)
                    2h                tiled_mlp: TiledMLP's input-gradient buffer; the [tile, f] part is per tile
    norm_backward   5 * 4h            fp32 gradients inside an RMSNorm's backward (cast, mul, rsqrt/mean, pow)
    attention_bwd   2h + 2h + 4*h_kv*rep + 4h
                                      output gradient, dq, dk, dv, and flash-attn's fp32 dq accumulator
  no gradient_checkpointing: every layer keeps norms + norm_fp32 + attention + 8f (gate, up, act, product;
                                      0 with tiled_mlp) instead of its input, plus the largest phase, the MLP
                                      phase counting only the 12f - 8f beyond what the layer already keeps.

Source: counted from the saved tensors of transformers' Llama/Qwen2 decoder layer (autograd keeps the
operands named above) and checked against the live-tensor peak of one decoder layer at Llama-3.1-8B sizes
measured on fake tensors (bench/bench_memory_plan.py, 2 layers, 64K-128K tokens: the formula is 0-15% above the
measurement; the measurement uses torch's CPU attention, whose buffers differ a little from flash-attn's). ALST's own
figures (500K tokens on 1 H100, 3.7M on 8) are reached with Liger's fused RMSNorm, which keeps neither
`norm_fp32` nor `norm_backward`: tests/test_train_memory_plan.py checks that the formula without those two terms
fits both published points.

Per step, once per rank (`tile_bytes`):

    loss_tile       3 * chunk * V * 4                      one fp32 logits tile, its softmax and its gradient
    mlp_tile        ceil(S / shards) * (12f + 4h)          with tiled_mlp (shards = ceil(S / h), DeepSpeed's rule)

Model states (`state_bytes`, mixed-precision Adam, 16 bytes/param: bf16 weights + bf16 grads + fp32 master,
m, v; ZeRO paper, Rajbhandari et al. 2020): ZeRO-3 16P/W (4P/W with optimizer offload, 0 with params
offloaded too); ZeRO-2 2P + 14P/W; ZeRO-1 4P + 12P/W; ZeRO-0 16P. Fixed: 4 GiB (CUDA context, NCCL
buffers, ZeRO-3 gathered layers and buckets). A layout fits when the sum is <= 90% of the GPU.

Host memory per node (`host_bytes`): optimizer offload 16P/W per rank (fp32 master, m, v and gradient;
ZeRO-Offload), param offload 2P/W, offload_checkpoints S * L * 2h per rank, times the ranks on the node.

It is an estimate to choose a layout, not a guarantee: calibrate it on a lent GPU with bench/gpu_checks.py
(measured peak of one step at a long sequence against `need_bytes` for the same model and length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import RuntimeConfig, StageConfig, TrainConfig
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


class PlanError(ValueError):
    """A model whose architecture cannot be known here; the message names the key."""


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
    """The architecture of `model` (a known hub id, a local directory or a ctxforge: name). Raises PlanError
    naming `model` when its config cannot be read (an unknown hub id offline, a missing directory)."""
    if model in KNOWN_ARCHITECTURES:
        return Arch(**KNOWN_ARCHITECTURES[model])
    from transformers import AutoConfig

    from ctxforge.models import resolve_model_path

    try:
        c = AutoConfig.from_pretrained(resolve_model_path(model)).get_text_config()
    except (OSError, ValueError) as exc:  # hub unreachable/offline, gated, no config.json, unknown model type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"model: cannot read the architecture of {model!r} ({first}); give a local model directory, "
                        f"or one of the architectures known offline: {', '.join(KNOWN_ARCHITECTURES)}") from None
    return Arch(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                ffn=c.intermediate_size, vocab=c.vocab_size, tied=bool(c.tie_word_embeddings))


def bytes_per_token(arch: Arch, rt: RuntimeConfig, sp: int = 1, fused_norm: bool = False) -> dict[str, float]:
    """Activation bytes per local token at the peak, by term; "total" sums them. Each term's source (the
    tensors autograd saves in transformers' Llama/Qwen2 decoder layer) is in the module docstring's table.
    `fused_norm`: a fused RMSNorm kernel (Liger's, as in ALST) that keeps no fp32 copies."""
    h, f, L = arch.hidden, arch.ffn, arch.layers
    kv = arch.kv_heads * arch.head_dim * max(1, sp // arch.kv_heads)
    layer = {
        "norms": 2 * (2 * h + 2 * h),
        "norm_fp32": 0 if fused_norm else 2 * 4 * h,
        "attention": 2 * h + 4 * kv + 2 * h + 2 * h + 4 * arch.heads,
    }
    phases = {
        "mlp": 2 * h if rt.tiled_mlp else 12 * f,
        "norm_backward": 0 if fused_norm else 5 * 4 * h,
        "attention_bwd": 2 * h + 2 * h + 4 * kv + 4 * h,
    }
    if rt.gradient_checkpointing:
        terms = {"checkpoints": (2 if rt.offload_checkpoints else L) * 2 * h, **layer}
    else:  # every layer's saved tensors, MLP included; the MLP phase adds only what exceeds them
        saved_mlp = 0 if rt.tiled_mlp else 8 * f
        terms = {"all_layers": L * (sum(layer.values()) + saved_mlp)}
        phases["mlp"] -= saved_mlp
    phase = max(phases, key=phases.get)
    terms["residual_grads"] = 2 * 2 * h
    terms[f"peak_phase:{phase}"] = phases[phase]
    terms["total"] = sum(terms.values())
    return terms


def tile_bytes(arch: Arch, rt: RuntimeConfig, local: int) -> dict[str, float]:
    """Per-step buffers that do not grow with the local length (beyond a tile)."""
    out = {"loss_tile": 3 * min(rt.loss_chunk_tokens, local) * arch.vocab * 4}
    if rt.tiled_mlp:
        shards = math.ceil(local / arch.hidden)
        out["mlp_tile"] = math.ceil(local / shards) * (12 * arch.ffn + 4 * arch.hidden)
    return out


def state_bytes(arch: Arch, zero_stage: int, world: int, offload_optimizer: bool, offload_params: bool) -> float:
    """GPU bytes of one rank's model states under mixed-precision Adam: 16 bytes per parameter (bf16 weights and
    grads, fp32 master, m, v), partitioned over `world` ranks by ZeRO stage (Rajbhandari et al. 2020, "ZeRO: Memory
    Optimizations Toward Training Trillion Parameter Models", §5, Figure 1); offloaded parts count 0 here
    (ZeRO-Offload, Ren et al. 2021)."""
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


def host_bytes(arch: Arch, rt: RuntimeConfig, world: int, sp: int, max_seq_len: int, ranks_on_node: int) -> float:
    """Host (CPU) memory of one node for what the GPUs offload to it: 16P/W per rank with optimizer offload
    (ZeRO-Offload, Ren et al. 2021: fp32 master, m, v and gradient), 2P/W with param offload, and each layer's
    checkpointed input with offload_checkpoints (ALST, arXiv 2506.13996)."""
    per_rank = 0.0
    if rt.zero_stage and rt.offload_optimizer:
        per_rank += 16 * arch.params / world
    if rt.zero_stage == 3 and rt.offload_params:
        per_rank += 2 * arch.params / world
    if rt.gradient_checkpointing and rt.offload_checkpoints:
        per_rank += math.ceil(max_seq_len / sp) * arch.layers * 2 * arch.hidden
    return per_rank * ranks_on_node


def need_bytes(arch: Arch, cfg: TrainConfig, stage: StageConfig, world: int, sp: int) -> dict:
    """GPU bytes of one rank of `stage` laid out on `world` ranks at SP `sp`, by part; "total" sums them."""
    rt = cfg.runtime
    local = math.ceil(stage.max_seq_len / sp)
    parts = {
        "state": state_bytes(arch, rt.zero_stage, world, rt.offload_optimizer, rt.offload_params),
        "activations": local * bytes_per_token(arch, rt, sp)["total"],
        **tile_bytes(arch, rt, local),
        "fixed": FIXED_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class Layout:
    dp: int
    sp: int
    need: dict

    @property
    def gpus(self) -> int:
        return self.dp * self.sp


@dataclass
class PlanRow:
    stage: str
    max_seq_len: int
    configured: dict          # need_bytes for the stage's own (workers, sp_degree)
    configured_fits: bool
    min_gpus: int | None      # smallest dp*sp that fits (None: nothing up to the search limit)
    min_sp: int | None
    min_need: dict | None
    on_gpus: Layout | None = None   # with --gpus N: the layout chosen on N GPUs (None: none fits)
    host_per_node: float = 0.0      # host bytes per node of the configured layout


def fits_on(arch: Arch, cfg: TrainConfig, stage: StageConfig, gpus: int, budget: float, max_sp: int) -> Layout | None:
    """The layout of `stage` on `gpus` GPUs: the smallest SP degree (the most data parallelism, the least
    all-to-all) that fits, with dp = gpus // sp. None when no SP degree up to `max_sp` fits."""
    for sp in valid_sp_degrees(arch.heads, arch.kv_heads, limit=min(max_sp, gpus)):
        dp = gpus // sp
        need = need_bytes(arch, cfg, stage, dp * sp, sp)
        if need["total"] <= budget:
            return Layout(dp, sp, need)
    return None


def plan_curriculum(cfg: TrainConfig, gpu_memory_gib: float, max_sp: int = 8, max_gpus: int = 256,
                    gpus: int | None = None, gpus_per_node: int = 8) -> list[PlanRow]:
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
        host = host_bytes(arch, cfg.runtime, stage.workers, stage.sp_degree, stage.max_seq_len,
                          min(stage.workers, gpus_per_node))
        rows.append(PlanRow(stage.name, stage.max_seq_len, configured, configured["total"] <= budget,
                            best[0] if best else None, best[1] if best else None, best[2] if best else None,
                            fits_on(arch, cfg, stage, gpus, budget, max_sp) if gpus else None, host))
    return rows


def format_plan(cfg: TrainConfig, rows: list[PlanRow], gpu_memory_gib: float, gpus: int | None = None,
                gpus_per_node: int = 8) -> str:
    arch = arch_of(cfg.model)
    rt = cfg.runtime
    g = lambda b: f"{b / GIB:6.1f}"  # noqa: E731
    lines = [f"model {cfg.model}: {arch.params / 1e9:.2f}B params, {arch.layers} layers, hidden {arch.hidden}, "
             f"{arch.heads} q / {arch.kv_heads} kv heads (valid SP degrees: "
             f"{', '.join(map(str, valid_sp_degrees(arch.heads, arch.kv_heads)))})",
             f"ZeRO-{rt.zero_stage}, optimizer offload {rt.offload_optimizer}, param offload {rt.offload_params}, "
             f"gradient checkpointing {rt.gradient_checkpointing}, checkpoint offload {rt.offload_checkpoints}, "
             f"tiled MLP {rt.tiled_mlp}, loss tile {rt.loss_chunk_tokens} tokens; budget {HEADROOM:.0%} of "
             f"{gpu_memory_gib:g} GiB per GPU", "",
             "stage     max_len  layout dp x sp  GPUs   state  activ  tiles  fixed  total GiB  fits  host GiB/node"
             " | smallest fit: GPUs  sp    GiB"]
    for r, stage in zip(rows, cfg.stages):
        c = r.configured
        tiles = c["loss_tile"] + c.get("mlp_tile", 0)
        fit = f"{r.min_gpus:>4} {r.min_sp:>3} {g(r.min_need['total'])}" if r.min_gpus else "  none up to the search limit"
        lines.append(f"{r.stage:<8} {r.max_seq_len:>8}  {stage.dp_degree:>6} x {stage.sp_degree:<3}  {stage.workers:>4} "
                     f"{g(c['state'])} {g(c['activations'])} {g(tiles)} {g(c['fixed'])}     {g(c['total'])}  "
                     f"{'yes' if r.configured_fits else 'NO ':<4} {g(r.host_per_node):>13} |              {fit}")
    if gpus:
        lines += ["", f"on {gpus} GPUs ({gpus_per_node} per node; SP kept within a node):",
                  "stage     max_len  layout dp x sp  total GPUs  GiB/GPU  fits"]
        for r in rows:
            lay = r.on_gpus
            if lay is None:
                need = f"needs {r.min_gpus} GPUs at sp {r.min_sp}" if r.min_gpus else "fits on no layout searched"
                lines.append(f"{r.stage:<8} {r.max_seq_len:>8}  {'-':>10}      {'-':>10}  {'-':>7}  NO ({need})")
            else:
                lines.append(f"{r.stage:<8} {r.max_seq_len:>8}  {lay.dp:>6} x {lay.sp:<3}  {lay.gpus:>10}  "
                             f"{g(lay.need['total']):>7}  yes")
    return "\n".join(lines)
