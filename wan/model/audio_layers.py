"""MultiTalk's audio path inside the DiT: audio windowing, `AudioProjModel`, the per-frame audio cross-attention and
the two-speaker routing (reference attention map -> label-RoPE positions)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import attention
from .rope import apply_rope, label_rope_table


def latter_audio_slots(audio_window: int, vae_scale: int) -> list[tuple[int, int]]:
    """(pixel frame within a latent frame's group, window position) feeding each `proj1_vf` slot, in slot order.

    First frame of the group: window positions up to the centre; middle frames: the centre only; last frame: the
    centre onwards. With a window of 5 and 4 frames per latent frame that is 3 + 1 + 1 + 3 = 8 slots.
    """
    middle = audio_window // 2
    first = [(0, w) for w in range(middle + 1)]
    middles = [(f, middle) for f in range(1, vae_scale - 1)]
    last = [(vae_scale - 1, w) for w in range(middle, audio_window)]
    return first + middles + last


def split_audio_windows(audio: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed audio `[H_a, F, window, layers, channels]` -> first latent frame `[H_a, 1, window, layers, channels]`
    and later latent frames `[H_a, T-1, slots, layers, channels]`, with F = vae_scale*(T-1) + 1."""
    speakers, frames, window = audio.shape[:3]
    if (frames - 1) % vae_scale:
        raise ValueError(f"audio has {frames} frames; expected {vae_scale}*(T-1)+1")
    grouped = rearrange(audio[:, 1:], "h (t n) w l c -> h t n w l c", n=vae_scale)  # n pixel frames per latent
    latter = torch.stack([grouped[:, :, f, w] for f, w in latter_audio_slots(window, vae_scale)], dim=2)
    return audio[:, :1], latter


class AudioProjModel(nn.Module):
    """wav2vec2 windows -> `context_tokens` audio tokens per latent frame and speaker."""

    def __init__(
        self,
        window: int,
        window_vf: int,
        layers: int,
        channels: int,
        intermediate_dim: int,
        output_dim: int,
        context_tokens: int,
        norm_output: bool,
    ):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.proj1 = nn.Linear(window * layers * channels, intermediate_dim)
        self.proj1_vf = nn.Linear(window_vf * layers * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output else nn.Identity()
        # InfiniteTalk's audio weights were trained with the output norm in float32 (the reference's autocast); set by
        # `wan.loading.audio_layers.AudioLayers` with those weights. A no-op for float32 parameters.
        self.float32_norm = False

    def forward(self, first: torch.Tensor, latter: torch.Tensor) -> torch.Tensor:
        """first `[H_a, 1, window, layers, channels]`, latter `[H_a, T-1, slots, layers, channels]`
        -> `[H_a, T, context_tokens, output_dim]`."""
        first = F.relu(self.proj1(first.flatten(2)))
        latter = F.relu(self.proj1_vf(latter.flatten(2)))
        hidden = F.relu(self.proj2(torch.cat([first, latter], dim=1)))
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        if self.float32_norm and isinstance(self.norm, nn.LayerNorm):
            norm = self.norm
            return F.layer_norm(tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        return self.norm(tokens)


def speaker_token_masks(ref_target_masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Latent-resolution masks `[3, h, w]` -> token masks `[3, N_h*N_w]` (bool) by `nearest` resizing."""
    resized = F.interpolate(ref_target_masks[None].float(), size=grid_hw, mode="nearest")[0]
    return (resized > 0).flatten(1)


def reference_attention_map(q: torch.Tensor, k: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """How much each video token attends to each speaker region of the first latent frame.

    q, k: roped self-attention `[1, L, heads, head_dim]`; token_masks `[classes, R]` over the first frame's R tokens.
    Returns `[classes, L]`: per head softmax(q k_ref^T / sqrt(d)) summed inside each mask, divided by the mask size,
    then averaged over heads.

    The reference materialises the `[heads, L, R]` probabilities (2 GB per half of the heads at 480p); the same sums
    are one attention call whose values are the normalised masks, zero-padded to head_dim.
    """
    classes, ref_tokens = token_masks.shape
    heads, head_dim = q.shape[2], q.shape[3]
    masks = token_masks.to(torch.float32)
    weights = (masks / masks.sum(dim=1, keepdim=True)).T.to(q.dtype)  # [R, classes]
    values = q.new_zeros(1, ref_tokens, heads, head_dim)
    values[..., :classes] = weights[None, :, None, :]
    per_head = attention(q, k[:, :ref_tokens], values)[0, :, :, :classes]  # [L, heads, classes]
    return per_head.float().mean(dim=1).T.to(q.dtype)


def _rescale(values: torch.Tensor, low_v: torch.Tensor, high_v: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return (values - low_v) / (high_v - low_v + 1e-8) * (high - low) + low


def speaker_query_positions(
    attn_map: torch.Tensor,
    class_range: int,
    class_interval: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Label-RoPE position per video token `[L]` from the attention map `[3, L]` (person1, person2, background).

    Person rows are min-max scaled to [0, interval] and [range - interval, range]; the background is range // 2;
    each token takes the value of its argmax row. `bounds`: the person rows' (min, max), two `[2]` tensors, taken
    over the whole sequence when `attn_map` holds only a slice of it (sequence parallel); default: `attn_map`'s own.
    """
    low, high = bounds if bounds is not None else (attn_map[:2].amin(dim=1), attn_map[:2].amax(dim=1))
    person1 = _rescale(attn_map[0], low[0], high[0], 0, class_interval)
    person2 = _rescale(attn_map[1], low[1], high[1], class_range - class_interval, class_range)
    background = torch.full_like(person1, class_range // 2)
    choices = torch.stack([person1, person2, background])
    return choices.gather(0, attn_map.argmax(dim=0, keepdim=True))[0]


def speaker_key_positions(
    num_tokens: int, class_range: int, class_interval: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Label-RoPE position per audio token of one frame `[num_tokens]`: centre of person1's range for the first
    half (speaker 1), centre of person2's range for the second half."""
    first = torch.full((num_tokens // 2,), class_interval / 2, dtype=dtype, device=device)
    second = torch.full((num_tokens - num_tokens // 2,), class_range - class_interval / 2, dtype=dtype, device=device)
    return torch.cat([first, second])


class AudioCrossAttention(nn.Module):
    """Each latent frame's video tokens attend to that frame's audio tokens (frames as the attention batch).

    With two speakers, q and k get a 1-D label RoPE so that tokens of a speaker's region prefer that speaker.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        q_positions: torch.Tensor | None = None,
        k_positions: torch.Tensor | None = None,
        first_token: int = 0,
        frame_tokens: int | None = None,
    ) -> torch.Tensor:
        """x `[1, n, dim]` (or its `Fp8Rows`, for an fp8 q projection), audio_tokens `[T, N_a, audio_dim]`, positions
        `[n]` / `[N_a]` or None.

        x holds tokens `first_token .. first_token + n - 1` of the frame-major video sequence of T frames with
        `frame_tokens` tokens each (default: the whole sequence, n / T per frame). A slice (sequence parallel) may
        start and end inside a frame: its rows are laid into whole frames for the per-frame attention; rows past the
        last frame (the sequence's padding) come out as zeros.
        """
        frames, n_audio = audio_tokens.shape[:2]
        tokens = x.shape[1]
        frame_tokens = tokens // frames if frame_tokens is None else frame_tokens
        valid = min(tokens, frames * frame_tokens - first_token)
        if valid <= 0:  # a slice of padding only
            return audio_tokens.new_zeros(1, tokens, self.proj.out_features)
        first_frame, lead = first_token // frame_tokens, first_token % frame_tokens
        span = math.ceil((lead + valid) / frame_tokens)  # frames this slice touches

        q = self.q_linear(x)[0, :valid].unflatten(-1, (self.num_heads, self.head_dim))
        audio = audio_tokens[first_frame : first_frame + span]
        k, v = self.kv_linear(audio).view(span, n_audio, 2, self.num_heads, self.head_dim).unbind(2)
        if q_positions is not None:
            q = apply_rope(q, *label_rope_table(q_positions[:valid], self.head_dim)).to(v.dtype)
            k = apply_rope(k, *label_rope_table(k_positions, self.head_dim)).to(v.dtype)
        if lead or valid % frame_tokens:
            q = F.pad(q, (0, 0, 0, 0, lead, span * frame_tokens - lead - valid))
        out = attention(q.view(span, frame_tokens, self.num_heads, self.head_dim), k, v).flatten(2)
        out = self.proj(out.flatten(0, 1)[lead : lead + valid])
        if valid < tokens:
            out = F.pad(out, (0, 0, 0, tokens - valid))
        return out[None]
