"""Golden check of the sampling schedule: shifted timesteps, Euler trajectories, motion-frame re-noising."""

from __future__ import annotations

import pytest
import torch

from support.golden import load_case
from wan.generation.sampling import add_noise, euler_step, timesteps

pytestmark = pytest.mark.golden

CASE = load_case("scheduler")
COMBOS = [(int(steps), float(shift)) for steps, shift in CASE.meta["combos(sample_steps, shift)"]]


def _tag(steps: int, shift: float) -> str:
    return f"s{steps}_shift{shift:g}"


@pytest.mark.parametrize("steps,shift", COMBOS, ids=[_tag(*c) for c in COMBOS])
def test_golden_euler_timesteps_bit_exact(steps: int, shift: float) -> None:
    expected = CASE.outputs()[f"euler.{_tag(steps, shift)}.timesteps"]
    actual = timesteps(steps, shift)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected), (actual - expected).abs().max()


@pytest.mark.parametrize("steps,shift", COMBOS, ids=[_tag(*c) for c in COMBOS])
def test_golden_euler_trajectory(steps: int, shift: float) -> None:
    inputs = CASE.inputs()
    ts = timesteps(steps, shift)
    latent = inputs["latent0"]
    trajectory = [latent]
    for i in range(steps):
        latent = euler_step(latent, inputs["model_outputs"][i], ts[i], ts[i + 1])
        trajectory.append(latent)
    CASE.assert_close(f"euler.{_tag(steps, shift)}.trajectory", torch.stack(trajectory))


@pytest.mark.parametrize("steps,shift", COMBOS, ids=[_tag(*c) for c in COMBOS])
def test_golden_add_noise(steps: int, shift: float) -> None:
    inputs, outputs = CASE.inputs(), CASE.outputs()
    ts = timesteps(steps, shift)
    for j in (0, 1):
        name = f"add_noise.{_tag(steps, shift)}.t{j}"
        actual = add_noise(inputs["motion_latent"], inputs["motion_noise"], ts[j])
        tol = CASE.tolerances().get(name, {}).get("strict_max_abs_err", 0.0)
        assert (actual - outputs[name]).abs().max().item() <= tol, name
