"""Timesteps, Euler step, guidance (plain and APG) and TeaCache against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from wan.generation.sampling import (
    MomentumBuffer,
    TeaCache,
    add_noise,
    apg_direction,
    euler_step,
    guide,
    guide_apg,
    guide_apg_one,
    guide_audio_only,
    guide_text_only,
    passes_per_step,
    timesteps,
)


# The reference's documented schedule for 40 steps at shift 7 (spec §4.5).
def test_timesteps_documented_values() -> None:
    ts = timesteps(40, 7.0)
    assert ts.shape == (41,)
    assert ts[0].item() == 1000.0 and ts[-1].item() == 0.0
    assert ts[1].item() == pytest.approx(996.26, abs=0.01)
    assert ts[2].item() == pytest.approx(992.35, abs=0.01)
    assert ts[-3].item() == pytest.approx(160.65, abs=0.01)
    assert ts[-2].item() == pytest.approx(6.958, abs=0.001)


def test_timesteps_shift_one_is_linspace() -> None:
    assert torch.allclose(timesteps(4, 1.0), torch.tensor([1000.0, 667.0, 334.0, 1.0, 0.0]))


def test_euler_step_and_add_noise_by_hand() -> None:
    x = torch.tensor([1.0, -2.0])
    v = torch.tensor([0.5, 4.0])
    # x - v·(800 - 600)/1000 = x - 0.2·v
    assert torch.allclose(euler_step(x, v, torch.tensor(800.0), torch.tensor(600.0)), torch.tensor([0.9, -2.8]))
    assert torch.allclose(euler_step(x, v, 800.0, 600.0), torch.tensor([0.9, -2.8]))
    noise = torch.tensor([3.0, 3.0])
    assert torch.allclose(add_noise(x, noise, torch.tensor(250.0)), torch.tensor([0.75 + 0.75, -1.5 + 0.75]))
    assert torch.equal(add_noise(x, noise, torch.tensor(0.0)), x)
    assert torch.equal(add_noise(x, noise, torch.tensor(1000.0)), noise)


def test_passes_per_step() -> None:
    assert passes_per_step(1.0, 4.0) == 2
    assert passes_per_step(1.0 + 1e-12, 4.0) == 2
    assert passes_per_step(5.0, 4.0) == 3
    assert passes_per_step(1.1, 4.0) == 3
    assert passes_per_step(5.0, 1.0) == 2 and passes_per_step(1.0, 1.0) == 1


def test_guidance_formulas_by_hand() -> None:
    cond, drop_text, uncond = torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([0.5])
    # 0.5 + 5·(2 - 1.5) + 4·(1.5 - 0.5) = 7
    assert guide(cond, drop_text, uncond, 5.0, 4.0).item() == pytest.approx(7.0)
    # 1 + 4·(2 - 1) = 5
    assert guide_audio_only(cond, torch.tensor([1.0]), 4.0).item() == pytest.approx(5.0)
    # scales of 1 leave the conditional prediction
    assert guide(cond, drop_text, uncond, 1.0, 1.0).item() == pytest.approx(2.0)
    # audio scale 1: 1.5 + 5·(2 - 1.5) = 4
    assert guide_text_only(cond, drop_text, 5.0).item() == pytest.approx(4.0)


def _vec(*values: float) -> torch.Tensor:
    """A [C=1, T=1, H=1, W=n] tensor: APG norms run over all four dims."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_apg_projection_by_hand() -> None:
    # v_cond = (3, 4): unit (0.6, 0.8). d = (1, 0): parallel 0.6·(0.6, 0.8) = (0.36, 0.48), orthogonal (0.64, -0.48).
    out = apg_direction(_vec(1.0, 0.0), _vec(3.0, 4.0), MomentumBuffer(-0.75), norm_threshold=55.0)
    assert torch.allclose(out, _vec(0.64, -0.48), atol=1e-7)
    # eta keeps that share of the parallel part
    out = apg_direction(_vec(1.0, 0.0), _vec(3.0, 4.0), None, norm_threshold=0.0, eta=0.5)
    assert torch.allclose(out, _vec(0.64 + 0.18, -0.48 + 0.24), atol=1e-7)


def test_apg_momentum_and_norm_clamp_by_hand() -> None:
    buffer = MomentumBuffer(-0.75)
    cond = _vec(3.0, 4.0)
    apg_direction(_vec(1.0, 0.0), cond, buffer, norm_threshold=1.0)
    # second call: r = (0, 2) - 0.75·(1, 0) = (-0.75, 2); |r| = sqrt(4.5625) > 1 -> scaled to unit norm
    out = apg_direction(_vec(0.0, 2.0), cond, buffer, norm_threshold=1.0)
    assert torch.allclose(buffer.running_average, _vec(-0.75, 2.0))
    n = math.sqrt(0.75**2 + 4.0)
    d = (-0.75 / n, 2.0 / n)
    dot = 0.6 * d[0] + 0.8 * d[1]
    expected = _vec(d[0] - dot * 0.6, d[1] - dot * 0.8)
    assert torch.allclose(out, expected, atol=1e-7)
    # below the threshold nothing is scaled: r = (0, 0.1) - 0.75·(-0.75, 2) = (0.5625, -1.4)
    out = apg_direction(_vec(0.0, 0.1), cond, buffer, norm_threshold=55.0)
    dot = 0.6 * 0.5625 - 0.8 * 1.4
    assert torch.allclose(out, _vec(0.5625 - dot * 0.6, -1.4 - dot * 0.8), atol=1e-6)


def test_apg_guidance_forms_by_hand() -> None:
    cond, drop_text, uncond = _vec(3.0, 4.0), _vec(2.0, 4.0), _vec(2.0, 2.0)
    # text diff (1, 0) -> (0.64, -0.48); audio diff (0, 2) -> parallel 1.6·(0.6, 0.8), orthogonal (-0.96, 0.72)
    out = guide_apg(cond, drop_text, uncond, 5.0, 4.0, MomentumBuffer(-0.75), MomentumBuffer(-0.75))
    expected = _vec(3.0 + 4 * 0.64 + 3 * -0.96, 4.0 + 4 * -0.48 + 3 * 0.72)
    assert torch.allclose(out, expected, atol=1e-6)
    out = guide_apg_one(cond, drop_text, 4.0, MomentumBuffer(-0.75))
    assert torch.allclose(out, _vec(3.0 + 3 * 0.64, 4.0 + 3 * -0.48), atol=1e-6)


def test_apg_keeps_dtype_and_batch_dims() -> None:
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(2, 4, 3, 2, 2, generator=g)
    cond = torch.randn(2, 4, 3, 2, 2, generator=g)
    out = apg_direction(diff, cond, None, norm_threshold=0.0)
    assert out.dtype == torch.float32 and out.shape == diff.shape
    # orthogonal to v_cond sample by sample
    assert torch.allclose((out * cond).sum(dim=(1, 2, 3, 4)), torch.zeros(2), atol=1e-5)


# TeaCache: poly values of the 480p coefficients, worked out by hand.
POLY480_AT_0 = 1.32517977e-01
# 2.57151496e5·1e-8 - 3.54229917e4·1e-6 + 1.40286849e3·1e-4 - 1.35890334e1·1e-2 + 1.32517977e-1
POLY480_AT_001 = 0.00257151496 - 0.0354229917 + 0.140286849 - 0.135890334 + 0.132517977
POLY720_AT_0 = -4.17769401e-02


def _run(branch, e0s, residual=torch.zeros(1)) -> str:
    """Skip pattern as a string ('C' computed, 'S' skipped), storing a residual whenever the DiT would compute."""
    pattern = ""
    for e0 in e0s:
        skipped = branch.skip(e0)
        if not skipped:
            branch.residual = residual
        pattern += "S" if skipped else "C"
    return pattern


def _const(n: int) -> list[torch.Tensor]:
    return [torch.full((1, 6, 8), 0.5) for _ in range(n)]


def test_teacache_constant_inputs_skip_pattern() -> None:
    # rel_l1 = 0 each call: acc grows by 0.1325 -> below 0.2 once (skip), then 0.265 (compute, reset).
    cache = TeaCache(0.2, "multitalk-480")
    assert _run(cache.branch("cond"), _const(11)) == "CCCCC" + "SCSCSC"
    # thresh 0.3: 0.1325, 0.265 skip; 0.3975 compute.
    cache = TeaCache(0.3, "multitalk-480")
    assert _run(cache.branch("cond"), _const(11)) == "CCCCC" + "SSCSSC"


def test_teacache_accumulates_polynomial_of_rel_l1() -> None:
    cache = TeaCache(0.25, "multitalk-480")
    branch = cache.branch("cond")
    # e0 grows by 1 % per call: rel_l1 = mean|0.01·e| / mean|e| = 0.01 (up to float32 rounding)
    e0s = [torch.full((1, 6, 8), 2.0) * 1.01**k for k in range(8)]
    assert _run(branch, e0s[:6]) == "CCCCCS"
    assert branch.accumulated == pytest.approx(POLY480_AT_001, rel=1e-4)
    assert _run(branch, e0s[6:7]) == "S"
    assert branch.accumulated == pytest.approx(2 * POLY480_AT_001, rel=1e-4)
    assert _run(branch, e0s[7:8]) == "C"  # 3·0.104 >= 0.25
    assert branch.accumulated == 0.0


def test_teacache_coefficients_follow_size_bucket() -> None:
    # 720p polynomial is negative at 0: constant inputs keep skipping after the warm-up.
    cache = TeaCache(0.2, "multitalk-720")
    branch = cache.branch("cond")
    assert _run(branch, _const(8)) == "CCCCC" + "SSS"
    assert branch.accumulated == pytest.approx(3 * POLY720_AT_0)
    with pytest.raises(ValueError):
        TeaCache(0.2, "multitalk-1080")


def test_teacache_branches_independent_in_two_pass_mode() -> None:
    cache = TeaCache(0.2, "multitalk-480")
    cond, drop_audio = cache.branch("cond"), cache.branch("drop_audio")
    assert cache.branch("cond") is cond
    pattern_cond, pattern_drop = "", ""
    for k in range(9):
        pattern_cond += _run(cond, [torch.full((1, 6, 8), 0.5)])
        # the other branch changes a lot every call: 10 % -> poly(0.1) is large, always computed
        pattern_drop += _run(drop_audio, [torch.full((1, 6, 8), 1.1**k)])
    assert pattern_cond == "CCCCC" + "SCSC"
    assert pattern_drop == "C" * 9
    with pytest.raises(ValueError):
        cache.branch("negative")


def test_teacache_needs_a_residual_and_resets_per_clip() -> None:
    cache = TeaCache(0.2, "multitalk-480")
    branch = cache.branch("uncond")
    for e0 in _const(6):  # the DiT never stored a residual: nothing to reuse
        assert branch.skip(e0) is False
    cache.reset()
    assert _run(cache.branch("uncond"), _const(7)) == "CCCCC" + "SC"
    # a second instance (another pipeline / generation) shares nothing
    other = TeaCache(0.2, "multitalk-480")
    assert other.branch("uncond").decisions == [] and other.branch("uncond").residual is None
