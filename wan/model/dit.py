"""The MultiTalk DiT: Wan2.1-I2V-14B plus MultiTalk's audio layers, with the published checkpoint's key names.

Precision follows the reference: weights and activations in the parameter dtype (bf16 at run time), while the time
embedding, modulation, gated residuals, LayerNorm/RMSNorm statistics and the head run in float32. With float32
parameters the model is an exact float32 port.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from einops import rearrange

from .attention import attention
from .audio_layers import (
    AudioCrossAttention,
    AudioProjModel,
    reference_attention_map,
    speaker_key_positions,
    speaker_query_positions,
    speaker_token_masks,
    split_audio_windows,
)
from ..configs import DiTConfig
from .rope import apply_rope, grid_rope

if TYPE_CHECKING:
    from .sequence_parallel import SequenceParallel, TokenShard

CLIP_TOKENS = 257


class BlockCache(Protocol):
    """Skips the block stack when consecutive calls are close enough (TeaCache); the DiT only calls it."""

    residual: torch.Tensor | None

    def skip(self, e0: torch.Tensor) -> bool: ...


BlockRunner = Callable[[nn.ModuleList, torch.Tensor, dict], torch.Tensor]


def run_blocks(blocks: nn.ModuleList, tokens: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    """The block stack, each block with the weights it holds."""
    for block in blocks:
        tokens = block(tokens, **block_kwargs)
    return tokens


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype (the reference's `WanLayerNorm`); with `shift` and
    `scale` (float32), modulated as the blocks modulate: `normed * (1 + scale) + shift` in float32, rounded again."""

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        normed = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        if shift is None:
            return normed
        return (normed.float() * (1 + scale) + shift).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full width; normalised in float32, rounded to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class FP32Sequential(nn.Sequential):
    """Runs its Linear layers with float32 weights (the reference's time MLPs run under float32 autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, nn.Linear):
                x = F.linear(x.float(), layer.weight.float(), layer.bias.float())
            else:
                x = layer(x)
        return x


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`[cos(t w), sin(t w)]` with w_k = 10000^(-k / (dim/2)), computed in float64, returned float32 `[N, dim]`."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def _norm_or_identity(enabled: bool, dim: int, eps: float, cls=RMSNorm, **kwargs) -> nn.Module:
    return cls(dim, eps=eps, **kwargs) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        # The kernel of the full self-attention; `MultiTalkDiT.set_self_attention` swaps in FA4 or the fp8 one.
        self.attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = attention
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = _norm_or_identity(qk_norm, dim, eps)
        self.norm_k = _norm_or_identity(qk_norm, dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        token_masks: torch.Tensor | None = None,
        shard: TokenShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[1, L, dim]` (or its `Fp8Rows`, for fp8 q/k/v); rope cos/sin `[L, head_dim/2]`. Returns the output
        and, when speaker token masks are given, the reference attention map `[3, L]` used to route two speakers.
        With a `shard`, x and rope hold this rank's slice of the tokens and the attention runs over the whole
        sequence."""
        heads = (self.num_heads, -1)
        v = self.v(x).unflatten(-1, heads)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), *rope).to(v.dtype)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), *rope).to(v.dtype)
        out = self.attend(q, k, v) if shard is None else shard.attention(q, k, v, self.attend)
        out = self.o(out.flatten(2))
        if token_masks is None:
            return out, None
        # The map's keys are the first frame's tokens; like the reference, no gradient flows through it.
        ref_k = k if shard is None else shard.leading_tokens(k, token_masks.shape[1])
        return out, reference_attention_map(q.detach(), ref_k.detach(), token_masks)


class ImageTextCrossAttention(SelfAttention):
    """Attention to CLIP tokens and text tokens, two softmaxes summed before the output projection.

    Shares q/k/v/o and the q/k norms with self-attention (same key names) and adds the image key/value path.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = _norm_or_identity(qk_norm, dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x `[1, L, dim]`; context `[1, 257 + text_len, dim]` (CLIP tokens first)."""
        heads = (self.num_heads, -1)
        image, text = context[:, :CLIP_TOKENS], context[:, CLIP_TOKENS:]
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        text_out = attention(q, self.norm_k(self.k(text)).unflatten(-1, heads), self.v(text).unflatten(-1, heads))
        image_out = attention(
            q, self.norm_k_img(self.k_img(image)).unflatten(-1, heads), self.v_img(image).unflatten(-1, heads)
        )
        return self.o(text_out.flatten(2) + image_out.flatten(2))


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.class_range = config.class_range
        self.class_interval = config.class_interval
        self.norm1 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = _norm_or_identity(config.cross_attn_norm, dim, eps, FP32LayerNorm, elementwise_affine=True)
        self.cross_attn = ImageTextCrossAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.audio_cross_attn = AudioCrossAttention(dim, config.output_dim, config.num_heads)
        self.norm_x = _norm_or_identity(config.norm_input_visual, dim, eps, FP32LayerNorm, elementwise_affine=True)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor,
        audio_tokens: torch.Tensor,
        token_masks: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        shard: TokenShard | None = None,
    ) -> torch.Tensor:
        """x `[1, L, dim]`; e0 `[1, 6, dim]` float32; audio_tokens `[T, N_a, output_dim]`; token_masks and
        key_positions only with two speakers; `shard`: x is this rank's slice of the tokens (sequence parallel)."""
        dtype = x.dtype
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e0).chunk(6, dim=1)

        # Modulation and gated residuals in float32, rounded back to the activation dtype (as the reference).
        y, attn_map = self.self_attn(self.norm1(x, shift_sa, scale_sa), rope, token_masks=token_masks, shard=shard)
        x = (x.float() + y.float() * gate_sa).to(dtype)

        x = x + self.cross_attn(self.norm3(x), context)

        query_positions = None
        if attn_map is not None:
            bounds = None if shard is None else shard.row_bounds(attn_map[:2])
            query_positions = speaker_query_positions(attn_map, self.class_range, self.class_interval, bounds)
        where = {} if shard is None else dict(first_token=shard.start, frame_tokens=shard.frame_tokens)
        x = x + self.audio_cross_attn(
            self.norm_x(x), audio_tokens, q_positions=query_positions, k_positions=key_positions, **where
        )

        y = self.ffn(self.norm2(x, shift_ff, scale_ff))
        return (x.float() + y.float() * gate_ff).to(dtype)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[1, L, dim]`, e `[1, dim]` float32 -> `[1, L, prod(patch) * out_dim]` float32."""
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        x = self.norm(x).float() * (1 + scale) + shift
        return F.linear(x, self.head.weight.float(), self.head.bias.float())


class ImageProjection(nn.Module):
    """CLIP features -> context tokens (the reference's `MLPProj`)."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(clip_dim),
            nn.Linear(clip_dim, clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


class MultiTalkDiT(nn.Module):
    """Video DiT with image, text and per-frame audio conditioning; `state_dict` keys as the published checkpoint."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if tuple(config.window_size) != (-1, -1):
            raise ValueError(f"only full attention is supported, got window_size={config.window_size}")
        if config.dim % config.num_heads:
            raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = FP32Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = FP32Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        # How the block stack runs; `set_block_runner` swaps in streaming from host memory (wan.runtime.streaming).
        self.run_blocks: BlockRunner = run_blocks
        self.head = Head(dim, config.out_dim, config.patch_size, config.eps)
        self.img_emb = ImageProjection(config.clip_dim, dim)
        self.audio_proj = AudioProjModel(
            window=config.audio_window,
            window_vf=config.audio_window + config.vae_scale - 1,
            layers=config.audio_layers,
            channels=config.audio_channels,
            intermediate_dim=config.intermediate_dim,
            output_dim=config.output_dim,
            context_tokens=config.context_tokens,
            norm_output=config.norm_output_audio,
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor,
        y: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor,
        cache: BlockCache | None = None,
        parallel: SequenceParallel | None = None,
    ) -> torch.Tensor:
        """Velocity `[out_dim, T, h, w]` (float32) for one sample.

        x `[16, T, h, w]`; t `[1]` in 0..1000; context `[L_txt, text_dim]` (unpadded T5 output); clip_fea
        `[1, 257, clip_dim]`; y `[1, 20, T, h, w]`; audio `[H_a, 4(T-1)+1, window, layers, channels]` for 1 or 2
        speakers; ref_target_masks `[3, h, w]` (person1, person2, background) at latent resolution.
        `parallel`: the ranks of a process group share the tokens (`wan.model.sequence_parallel`); every rank passes
        the same inputs and gets the whole output.
        """
        config = self.config
        dtype, device = self.dtype, self.patch_embedding.weight.device
        speakers = audio.shape[0]
        if speakers not in (1, 2):
            raise ValueError(f"MultiTalk supports 1 or 2 speakers, got audio for {speakers}")
        if context.shape[0] > config.text_len:
            raise ValueError(f"context has {context.shape[0]} tokens, more than text_len={config.text_len}")

        tokens = self.patch_embedding(torch.cat([x, y[0]]).to(device, dtype)[None])
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)

        e, e0 = self.time_embeddings(t)

        # T5 padding rows are embedded and attended too (no key mask), as in the reference.
        text = context.to(device, dtype)
        text = torch.cat([text, text.new_zeros(config.text_len - text.shape[0], text.shape[1])])
        cross_context = torch.cat([self.img_emb(clip_fea.to(device, dtype)), self.text_embedding(text[None])], dim=1)

        audio_tokens = self.audio_proj(*split_audio_windows(audio.to(device, dtype), config.vae_scale))
        # [T, speakers * context_tokens, output_dim], in the activation dtype (InfiniteTalk's norm returns float32)
        audio_tokens = audio_tokens.transpose(0, 1).flatten(1, 2).to(dtype)

        token_masks = key_positions = None
        if speakers == 2:
            token_masks = speaker_token_masks(ref_target_masks.to(device), grid[1:]).to(dtype)
            key_positions = speaker_key_positions(
                audio_tokens.shape[1], config.class_range, config.class_interval, dtype, device
            )

        rope = grid_rope(config.head_dim, grid, device)
        shard = None
        if parallel is not None:
            # The blocks run on this rank's slice of the tokens; the head's output is gathered below.
            shard = parallel.shard(tokens.shape[1], grid[1] * grid[2])
            tokens = shard.split(tokens, dim=1)
            rope = (shard.split(rope[0], dim=0), shard.split(rope[1], dim=0))
        block_kwargs = dict(
            e0=e0,
            rope=rope,
            context=cross_context,
            audio_tokens=audio_tokens,
            token_masks=token_masks,
            key_positions=key_positions,
            shard=shard,
        )
        if cache is not None and cache.skip(e0):
            tokens = tokens + cache.residual
        else:
            blocks_in = tokens
            tokens = self.run_blocks(self.blocks, tokens, block_kwargs)
            if cache is not None:
                cache.residual = tokens - blocks_in

        out = self.head(tokens, e)
        if shard is not None:
            out = shard.gather(out, dim=1)
        return self.unpatchify(out, grid)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the patch embedding, which fp8 quantisation leaves alone)."""
        return self.patch_embedding.weight.dtype

    def set_self_attention(self, kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """The kernel of every block's full self-attention (`wan.attention.attention` unless set): q, k, v
        `[1, L, heads, head_dim]` -> `[1, L, heads, head_dim]`. Set it before `compile_blocks`."""
        for block in self.blocks:
            block.self_attn.attend = kernel

    def set_block_runner(self, runner: BlockRunner) -> None:
        """What runs the block stack: `runner(blocks, tokens, block_kwargs)` -> tokens (`run_blocks` unless set)."""
        self.run_blocks = runner

    def time_embeddings(
        self, t: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(e `[1, dim]` for the head, e0 `[1, 6, dim]` for the blocks' modulation) of timestep t `[1]`. `weights`:
        other values for `time_embedding.*` / `time_projection.*` (e.g. a request's LoRAs merged), the DiT's own
        left as they are."""
        # t stays float32 whatever the activation dtype (the reference's timesteps are float32 tensors); the sinusoid
        # is taken in float64. Rounding t to bf16 would merge neighbouring steps at high shift.
        sinusoid = sinusoidal_embedding(t.to(self.patch_embedding.weight.device, torch.float32), self.config.freq_dim)
        if weights is None:
            e = self.time_embedding(sinusoid)
            return e, self.time_projection(e).unflatten(1, (6, self.config.dim))
        e = functional_call(self.time_embedding, _under(weights, "time_embedding."), (sinusoid,), strict=True)
        e0 = functional_call(self.time_projection, _under(weights, "time_projection."), (e,), strict=True)
        return e, e0.unflatten(1, (6, self.config.dim))

    def block_code(self) -> str:
        """What the blocks' compiled code depends on besides tensors' shapes and dtypes: the classes of a block's
        modules (fp8 linears or not), its self-attention kernel and the source of the model library that defines
        them (another release of this package). Names a cache of traced graphs, whose guards on which functions a
        block calls are dropped when they are saved (`wan.runtime.compile_cache`)."""
        block = self.blocks[0]
        kinds = sorted({f"{type(module).__module__}.{type(module).__qualname__}" for module in block.modules()})
        attend = block.self_attn.attend
        kernel = f"{getattr(attend, '__module__', '')}.{getattr(attend, '__qualname__', type(attend).__qualname__)}"
        source = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            source.update(path.name.encode() + b"\0" + path.read_bytes())
        return "\n".join([*kinds, kernel, f"wan.model source {source.hexdigest()}"])

    def compile_blocks(self, **options) -> None:
        """Regional compilation: every block compiled on its own, so all 40 share one graph (about 20 s once)."""
        for block in self.blocks:
            block.compile(fullgraph=True, **options)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[1, L, prod(patch) * out_dim]` -> `[out_dim, T*p_t, N_h*p_h, N_w*p_w]`."""
        (f, h, w), (p, q, r) = grid, self.config.patch_size
        return rearrange(x[0], "(f h w) (p q r c) -> c (f p) (h q) (w r)", f=f, h=h, w=w, p=p, q=q, r=r)


# The parameters of the time embedding and its projection: what TeaCache's decisions depend on.
TIME_EMBEDDING_PREFIXES = ("time_embedding.", "time_projection.")


def _under(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in weights.items() if name.startswith(prefix)}
