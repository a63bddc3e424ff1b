"""Opt-in float8 for the DiT blocks: linear layers and the full self-attention on Hopper's fp8 tensor cores.

Linear layers: weights quantised once to e4m3 with one scale per output row, activations per token on the fly
(`wan.model.fp8_rows`, the FFN's GELU fused in; with `fused_norms`, by the LayerNorms that make them); both scales
are applied by `torch._scaled_mm` itself (cuBLASLt, fast accumulation), so the result comes back in bf16.
Self-attention: Q, K and V quantised per tensor, then cuDNN's fp8 flash attention (which also keeps the
probabilities in e4m3). The accuracy against float32 and bf16 is checked by tests/gpu/test_gpu_dit.py; this path is
off unless a memory plan asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch
import torch.nn as nn

from .attention import attention
from .dit import FP32LayerNorm
from .fp8_rows import FP8, FP8_MAX, Fp8Rows, norm_quantize_rows, quantize_rows

# The attention output is a convex combination of V's rows, so |O| <= amax(V); scaling O by half of e4m3's range
# over amax(V) leaves a binade for rounding and costs no precision (a power of two only shifts the exponent).
_OUT_RANGE = FP8_MAX / 2


class Fp8Linear(nn.Module):
    """Drop-in for an `nn.Linear` whose weight is stored in e4m3 with per-output-row scales; with `gelu_input`, for
    `nn.Sequential(nn.GELU(approximate="tanh"), linear)` (the GELU is fused into the activation quantisation)."""

    def __init__(self, linear: nn.Linear, gelu_input: bool = False, fast_accumulation: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu_input = gelu_input
        # cuBLASLt's fp8 GEMM without the periodic promotion of its partial sums to float32 registers: on an H100 a
        # block's fp8 linear layers take 16.6 ms instead of 20.4 (1.23x), and a product moves 2.3e-3 instead of
        # 1.7e-3 (rel. L2) from the float32 product of the same e4m3 values; the e4m3 rounding of the inputs
        # dominates, and a block stays 0.028 / 0.041 (1 / 2 speakers) from float32 either way (bench/RESULTS.md).
        self.fast_accumulation = fast_accumulation
        self.source_dtype = linear.weight.dtype  # what a new weight is rounded to before quantising, as this one was
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.T.contiguous())  # [1, N], the layout _scaled_mm wants
        self.bias = linear.bias

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantise from a new high-precision weight `[out, in]` (another audio-layer set, a LoRA merge or its
        undoing), rounded to the dtype the layer was built from first, as that one was; written into the existing
        tensors: wherever they live (GPU, or host memory a block streams from), they stay there."""
        values, scale = quantize_rows(weight.detach().to(self.weight.device, self.source_dtype))
        self.weight.copy_(values)
        self.weight_scale.copy_(scale.T)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """x `[..., in_features]`, or its rows already quantised (`Fp8InputLayerNorm`'s output)."""
        if isinstance(x, Fp8Rows):
            values, scale, shape, dtype = x
        else:
            values, scale = quantize_rows(x.reshape(-1, self.in_features), gelu=self.gelu_input)
            shape, dtype = x.shape, x.dtype
        out = torch._scaled_mm(
            values,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=dtype,
            use_fast_accum=self.fast_accumulation,
        )
        return out.view(*shape[:-1], self.out_features)


class Fp8InputLayerNorm(FP32LayerNorm):
    """A block's LayerNorm (modulated or not) whose every reader is an `Fp8Linear`: it returns its output's `Fp8Rows`.

    On CUDA one Triton pass per row normalises, modulates, rounds to the activation dtype and quantises, so the
    normalised activations are never written out and read back (`norm_quantize_rows`); elsewhere the norm's own
    arithmetic, then `quantize_rows`. The two differ only where the row statistics round differently.
    """

    @classmethod
    def replacing(cls, norm: FP32LayerNorm) -> "Fp8InputLayerNorm":
        """One holding `norm`'s parameters themselves (same keys, same tensors: a weight switch writes into them)."""
        fused = cls(norm.normalized_shape, norm.eps, elementwise_affine=False)
        fused.elementwise_affine = norm.elementwise_affine
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> Fp8Rows:
        if x.is_cuda:
            values, scales = norm_quantize_rows(
                x.reshape(-1, x.shape[-1]), self.weight, self.bias, shift, scale, self.eps
            )
        else:
            values, scales = quantize_rows(super().forward(x, shift, scale).reshape(-1, x.shape[-1]))
        return Fp8Rows(values, scales, x.shape, x.dtype)


@torch.no_grad()
def assign_weight(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Write `tensor` into the model's state-dict entry `key`, cast to its dtype and device; an fp8 layer's weight is
    quantised as `quantize_blocks` quantised the original."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Fp8Linear) and leaf == "weight":
        module.set_weight(tensor)
        return
    target = getattr(module, leaf)
    target.copy_(tensor.to(target.device, target.dtype))


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and the float32 descale `[1, 1, 1, 1]` with x ≈ values * descale (one scale for the tensor)."""
    descale = x.abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8), descale.reshape(1, 1, 1, 1)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`wan.attention.attention` with Q, K, V, the probabilities and the output in e4m3.

    On CUDA this is cuDNN's fp8 flash attention (Hopper and newer); elsewhere the same quantisation of Q, K, V and
    O around float attention, so the CPU tests see the same input and output rounding.
    """
    (q8, descale_q), (k8, descale_k), (v8, descale_v) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    out_descale = descale_v * (FP8_MAX / _OUT_RANGE)
    if q.is_cuda:
        out8 = torch.ops.multitalk.cudnn_fp8_attention(q8, k8, v8, descale_q, descale_k, descale_v)
    else:
        out = attention(*(t.float() * d for t, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v))))
        out8 = (out / out_descale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (out8.float() * out_descale).to(q.dtype)


@torch.library.custom_op("multitalk::cudnn_fp8_attention", mutates_args=())
def _cudnn_fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
) -> torch.Tensor:
    """e4m3 `[B, L, H, D]` in, e4m3 out scaled by `_OUT_RANGE / amax(V)`; the descales are float32 `[1, 1, 1, 1]`."""
    plan = _fp8_attention_plan(q.device.index, _bhsd(q), _bhsd(k), _bhsd(v))
    out = torch.empty_like(q)
    amax = torch.empty(2, 1, 1, 1, 1, device=q.device)  # written by cuDNN, unused
    workspace = torch.empty(plan.workspace_size, device=q.device, dtype=torch.uint8)
    pack = fp8_attention_pack(plan.tensors, q, k, v, (descale_q, descale_k, descale_v), out, amax)
    plan.cudnn.set_stream(handle=plan.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    plan.graph.execute(pack, workspace, handle=plan.handle)
    return out


def fp8_attention_pack(tensors: dict, q, k, v, descales, out: torch.Tensor, amax: torch.Tensor) -> dict:
    """The values of `fp8_attention_graph`'s tensors for one call: e4m3 q, k, v and their float32 descales `[1, 1,
    1, 1]`, the e4m3 output to write, and `amax` `[2, 1, 1, 1, 1]` for cuDNN's (unused) amax outputs."""
    descale_q, descale_k, descale_v = descales
    probability_scales = _probability_scales(q.device)
    values = dict(
        q=q,
        k=k,
        v=v,
        o=out,
        descale_q=descale_q,
        descale_k=descale_k,
        descale_v=descale_v,
        descale_s=probability_scales[0],
        scale_s=probability_scales[1],
        scale_o=_OUT_RANGE / FP8_MAX / descale_v,
        amax_s=amax[0],
        amax_o=amax[1],
    )
    return {tensors[name]: t for name, t in values.items()}


@functools.lru_cache(maxsize=16)
def _probability_scales(device: torch.device) -> torch.Tensor:
    """Descale and scale `[2, 1, 1, 1, 1]` of the probabilities, which lie in [0, 1]: all of e4m3's range for them."""
    return torch.tensor([1 / FP8_MAX, FP8_MAX], device=device).reshape(2, 1, 1, 1, 1)


@_cudnn_fp8_attention.register_fake
def _(q, k, v, descale_q, descale_k, descale_v):
    return torch.empty_like(q)


def _bhsd(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Dims and strides of `[B, L, H, D]` as cuDNN's `[B, H, L, D]`."""
    return tuple(x.transpose(1, 2).shape), tuple(x.transpose(1, 2).stride())


@dataclasses.dataclass(frozen=True)
class _Fp8AttentionPlan:
    cudnn: types.ModuleType
    handle: object
    graph: object
    tensors: dict
    workspace_size: int


@functools.lru_cache(maxsize=16)
def _fp8_attention_plan(device_index: int, q_layout, k_layout, v_layout) -> _Fp8AttentionPlan:
    """cuDNN's fp8 SDPA graph for one set of shapes and strides, built once (heuristics' first plan)."""
    torch.backends.cudnn.version()  # the frontend binds to an already loaded libcudnn: torch's, loaded here
    import cudnn

    with torch.cuda.device(device_index):
        handle = cudnn.create_handle()
    graph, tensors = fp8_attention_graph(cudnn, handle, q_layout, k_layout, v_layout)
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Fp8AttentionPlan(cudnn, handle, graph, tensors, graph.get_workspace_size())


def fp8_attention_graph(cudnn: types.ModuleType, handle, q_layout, k_layout, v_layout) -> tuple[object, dict]:
    """The operation graph of `_cudnn_fp8_attention` (validated, before any execution plan) and its tensors by name;
    layouts are `_bhsd`'s (dims, strides)."""
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    tensors = {
        name: graph.tensor(name=name, dim=list(dims), stride=list(strides), data_type=e4m3)
        for name, (dims, strides) in dict(q=q_layout, k=k_layout, v=v_layout).items()
    }
    scalar_names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    for name in scalar_names:
        tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
    out, _, amax_s, amax_o = graph.sdpa_fp8(
        q=tensors["q"],
        k=tensors["k"],
        v=tensors["v"],
        **{n: tensors[n] for n in scalar_names},
        is_inference=True,
        attn_scale=q_layout[0][-1] ** -0.5,
        name="sdpa_fp8",
    )
    # On Hopper cuDNN writes the fp8 attention's output in fp8 only (bf16 output needs Blackwell).
    out.set_output(True).set_dim(list(q_layout[0])).set_stride(list(q_layout[1])).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    tensors.update(o=out, amax_s=amax_s, amax_o=amax_o)
    graph.validate()
    graph.build_operation_graph()
    return graph, tensors


def quantize_blocks(
    model: nn.Module, min_features: int = 1024, fast_accumulation: bool = True, fused_norms: bool = False
) -> int:
    """Make the blocks fp8: every `nn.Linear` with at least `min_features` inputs becomes an `Fp8Linear` (with
    `fast_accumulation`, see there), and the full self-attention runs `fp8_attention`; with `fused_norms`, each
    LayerNorm that feeds only fp8 linears quantises its own output (`Fp8InputLayerNorm`).

    Small layers (the audio key/value projection from 768 features) and the cross-attentions stay in bf16. Returns
    the number of linear layers replaced.
    """
    model.set_self_attention(fp8_attention)
    return sum(quantize_block(block, min_features, fast_accumulation, fused_norms) for block in model.blocks)


def quantize_block(
    block: nn.Module, min_features: int = 1024, fast_accumulation: bool = True, fused_norms: bool = False
) -> int:
    """`quantize_blocks` for one block, without the self-attention kernel (which the model sets for all blocks);
    lets a loader quantise each block as it arrives. Returns the number of linear layers replaced."""
    replaced = 0
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear) and module.in_features >= min_features:
            parent_name, _, child = name.rpartition(".")
            fp8 = Fp8Linear(module, fast_accumulation=fast_accumulation)
            setattr(block.get_submodule(parent_name) if parent_name else block, child, fp8)
            replaced += 1
    _fuse_gelu(block.ffn)
    if fused_norms:
        _fuse_norms(block)
    return replaced


def _fuse_norms(block: nn.Module) -> None:
    """Each LayerNorm of the block whose readers are all fp8 linears -> `Fp8InputLayerNorm` (see `DiTBlock.forward`:
    norm1 feeds the self-attention's q, k, v; norm3 the cross-attention's q; norm_x the audio q; norm2 the FFN)."""
    readers = {
        "norm1": [block.self_attn.q, block.self_attn.k, block.self_attn.v],
        "norm3": [block.cross_attn.q],
        "norm_x": [block.audio_cross_attn.q_linear],
        "norm2": [block.ffn[0]],
    }
    for name, linears in readers.items():
        norm = getattr(block, name)
        if type(norm) is FP32LayerNorm and all(isinstance(linear, Fp8Linear) for linear in linears):
            setattr(block, name, Fp8InputLayerNorm.replacing(norm))


def _fuse_gelu(ffn: nn.Sequential) -> None:
    """Linear, tanh-GELU, Fp8Linear -> Linear, Identity, Fp8Linear quantising GELU(x): one pass over the hidden."""
    if isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh" and isinstance(ffn[2], Fp8Linear):
        ffn[1] = nn.Identity()
        ffn[2].gelu_input = True
