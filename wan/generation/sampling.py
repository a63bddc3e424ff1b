"""Flow-matching sampling: shifted timesteps, the Euler step, classifier-free guidance (plain and APG), TeaCache.

All functions are pure tensor code. The stateful helpers (`MomentumBuffer`, `TeaCache`) keep their state on the
instance; make new ones (or `reset()`) for every clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch

from ..configs import NUM_TRAIN_TIMESTEPS, TEACACHE_COEFFICIENTS

GUIDANCE_BRANCHES = ("cond", "drop_text", "drop_audio", "uncond")


def timesteps(steps: int, shift: float) -> torch.Tensor:
    """`[steps + 1]` float32: linspace(1000, 1, steps) plus a final 0, each mapped through the shift transform.

    Evaluated in float32 in the reference's operation order, which makes the result bit-exact.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # np.linspace (float64 math, then float32) matches the reference; torch.linspace can differ in the last bit.
    grid = np.linspace(NUM_TRAIN_TIMESTEPS, 1, steps, dtype=np.float32)
    t = torch.cat([torch.from_numpy(grid), torch.zeros(1, dtype=torch.float32)])
    sigma = t / NUM_TRAIN_TIMESTEPS
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    return shifted * NUM_TRAIN_TIMESTEPS


def _as_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=like.device)


def euler_step(
    latent: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of the flow ODE from `t` to `t_next` (timesteps on the 0..1000 scale, float32 math)."""
    dt = (_as_time(t, latent) - _as_time(t_next, latent)) / NUM_TRAIN_TIMESTEPS
    return latent + (-velocity) * dt


def add_noise(latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Flow-matching interpolation `(1 - t/1000)·x + (t/1000)·noise`, used to re-noise motion-frame latents."""
    sigma = _as_time(t, latent) / NUM_TRAIN_TIMESTEPS
    return (1 - sigma) * latent + sigma * noise


def is_unit(scale: float) -> bool:
    """A guidance scale of 1: its contrast adds nothing, so the pass it needs is not run."""
    return math.isclose(scale, 1.0)


def guidance_branches(text_scale: float, audio_scale: float) -> tuple[str, ...]:
    """The DiT passes of one step. Both scales guide: cond, drop_text, uncond. Text scale 1: cond, drop_audio (the
    reference's mode for step-distilled LoRAs). Audio scale 1: cond, drop_text. Both 1: cond alone."""
    if is_unit(text_scale):
        return ("cond",) if is_unit(audio_scale) else ("cond", "drop_audio")
    return ("cond", "drop_text") if is_unit(audio_scale) else ("cond", "drop_text", "uncond")


def passes_per_step(text_scale: float, audio_scale: float) -> int:
    """Model calls per step (`guidance_branches`)."""
    return len(guidance_branches(text_scale, audio_scale))


def guide(
    v_cond: torch.Tensor, v_drop_text: torch.Tensor, v_uncond: torch.Tensor, text_scale: float, audio_scale: float
) -> torch.Tensor:
    """Three-pass CFG: text guidance between cond/drop_text, audio guidance between drop_text/uncond."""
    return v_uncond + text_scale * (v_cond - v_drop_text) + audio_scale * (v_drop_text - v_uncond)


def guide_audio_only(v_cond: torch.Tensor, v_drop_audio: torch.Tensor, audio_scale: float) -> torch.Tensor:
    """Two-pass CFG (text scale 1): audio guidance between cond and drop_audio."""
    return v_drop_audio + audio_scale * (v_cond - v_drop_audio)


def guide_text_only(v_cond: torch.Tensor, v_drop_text: torch.Tensor, text_scale: float) -> torch.Tensor:
    """Two-pass CFG (audio scale 1): text guidance between cond and drop_text."""
    return v_drop_text + text_scale * (v_cond - v_drop_text)


class MomentumBuffer:
    """Running average `r <- d + momentum·r` of an APG guidance direction (r starts at 0)."""

    def __init__(self, momentum: float = -0.75):
        self.momentum = momentum
        self.running_average: torch.Tensor | None = None

    def update(self, value: torch.Tensor) -> torch.Tensor:
        if self.running_average is None:
            self.running_average = value.clone()
        else:
            self.running_average = value + self.momentum * self.running_average
        return self.running_average


_APG_DIMS = (-1, -2, -3, -4)  # C, T, H, W of one sample


def apg_direction(
    diff: torch.Tensor,
    v_cond: torch.Tensor,
    buffer: MomentumBuffer | None,
    norm_threshold: float = 55.0,
    eta: float = 0.0,
) -> torch.Tensor:
    """Adaptive projected guidance (arXiv 2410.02416): momentum, norm clamp, then drop the part parallel to v_cond."""
    if buffer is not None:
        diff = buffer.update(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=_APG_DIMS, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    # The projection is done in float64: the parallel part nearly cancels in low precision.
    d, c = diff.double(), v_cond.double()
    c_unit = c / c.norm(p=2, dim=_APG_DIMS, keepdim=True).clamp_min(1e-12)
    parallel = (d * c_unit).sum(dim=_APG_DIMS, keepdim=True) * c_unit
    orthogonal = d - parallel
    return orthogonal.to(diff.dtype) + eta * parallel.to(diff.dtype)


def guide_apg(
    v_cond: torch.Tensor,
    v_drop_text: torch.Tensor,
    v_uncond: torch.Tensor,
    text_scale: float,
    audio_scale: float,
    text_buffer: MomentumBuffer,
    audio_buffer: MomentumBuffer,
    norm_threshold: float = 55.0,
    eta: float = 0.0,
) -> torch.Tensor:
    """Three-pass APG guidance; the buffers belong to one clip."""
    text = apg_direction(v_cond - v_drop_text, v_cond, text_buffer, norm_threshold, eta)
    audio = apg_direction(v_drop_text - v_uncond, v_cond, audio_buffer, norm_threshold, eta)
    return v_cond + (text_scale - 1) * text + (audio_scale - 1) * audio


def guide_apg_one(
    v_cond: torch.Tensor,
    v_dropped: torch.Tensor,
    scale: float,
    buffer: MomentumBuffer,
    norm_threshold: float = 55.0,
    eta: float = 0.0,
) -> torch.Tensor:
    """Two-pass APG guidance along one contrast: cond against drop_audio (text scale 1) or drop_text (audio scale
    1)."""
    direction = apg_direction(v_cond - v_dropped, v_cond, buffer, norm_threshold, eta)
    return v_cond + (scale - 1) * direction


def _polyval(coefficients: list[float], x: float) -> float:
    """Horner evaluation, highest degree first (as numpy.poly1d)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


class TeaCacheDecision(NamedTuple):
    """One DiT call's TeaCache arithmetic; `rel_l1`/`rescaled`/`accumulated` are None during the warm-up calls."""

    rel_l1: float | None
    rescaled: float | None
    accumulated: float | None
    skipped: bool


class TeaCacheBranch:
    """Skip decisions of one guidance branch; the DiT reads `skip(e0)` and maintains `residual`.

    Protocol: the DiT calls `skip(e0)` once per forward with the time-projection output `e0` `[1, 6, dim]`. If it
    returns True the DiT reuses `x + residual` instead of running its blocks; otherwise it runs them and stores
    `residual = x_out - x_in`. Every call's arithmetic is kept in `decisions`, for the log and for tests.
    """

    def __init__(self, coefficients: list[float], thresh: float, warmup_steps: int):
        self.coefficients = coefficients
        self.thresh = thresh
        self.warmup_steps = warmup_steps
        self.residual: torch.Tensor | None = None
        self.accumulated = 0.0
        self.previous_e0: torch.Tensor | None = None
        self.decisions: list[TeaCacheDecision] = []

    def skip(self, e0: torch.Tensor) -> bool:
        if len(self.decisions) < self.warmup_steps or self.previous_e0 is None:
            self.accumulated = 0.0
            decision = TeaCacheDecision(None, None, None, skipped=False)
        else:
            prev = self.previous_e0
            # As the reference: the relative L1 change in the activation dtype's float32 math, the polynomial in
            # float64 (Python floats).
            rel_l1 = ((e0 - prev).abs().mean() / prev.abs().mean()).item()
            rescaled = _polyval(self.coefficients, rel_l1)
            self.accumulated += rescaled
            skipped = self.accumulated < self.thresh and self.residual is not None
            decision = TeaCacheDecision(rel_l1, rescaled, self.accumulated, skipped)
            if not skipped:
                self.accumulated = 0.0
        self.previous_e0 = e0.detach().clone()
        self.decisions.append(decision)
        return decision.skipped


class TeaCache:
    """TeaCache for one generation: an independent `TeaCacheBranch` per named guidance branch.

    `size_bucket` (e.g. "multitalk-480") picks the rescale polynomial. Call `reset()` (or make a new instance)
    before each clip so every clip gets its own warm-up.
    """

    def __init__(self, thresh: float, size_bucket: str, warmup_steps: int = 5):
        if size_bucket not in TEACACHE_COEFFICIENTS:
            known = list(TEACACHE_COEFFICIENTS)
            raise ValueError(f"no TeaCache coefficients for size bucket {size_bucket!r}; known: {known}")
        if thresh < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {thresh}")
        self.thresh = thresh
        self.coefficients = list(TEACACHE_COEFFICIENTS[size_bucket])
        self.warmup_steps = warmup_steps
        self.branches: dict[str, TeaCacheBranch] = {}

    def branch(self, name: str) -> TeaCacheBranch:
        if name not in GUIDANCE_BRANCHES:
            raise ValueError(f"unknown guidance branch {name!r}; expected one of {GUIDANCE_BRANCHES}")
        if name not in self.branches:
            self.branches[name] = TeaCacheBranch(self.coefficients, self.thresh, self.warmup_steps)
        return self.branches[name]

    def reset(self) -> None:
        self.branches = {}

    def skipped_fraction(self) -> float:
        """Share of DiT calls whose blocks were skipped, over all branches."""
        decisions = [d for branch in self.branches.values() for d in branch.decisions]
        return sum(d.skipped for d in decisions) / max(len(decisions), 1)


def teacache_computed_steps(e0_per_step: Iterable[torch.Tensor], thresh: float, size_bucket: str) -> int:
    """How many steps of a clip run the DiT's blocks under TeaCache, from each step's time modulation e0
    (`MultiTalkDiT.time_embeddings`). TeaCache decides from e0 alone, never from the content, so the count is known
    before the clip runs; every branch and every clip of a request gets the same pattern."""
    branch = TeaCache(thresh, size_bucket).branch("cond")
    computed = 0
    for e0 in e0_per_step:
        if not branch.skip(e0):
            computed += 1
            branch.residual = e0  # stands for the blocks' residual: a decision only asks whether there is one
    return computed
