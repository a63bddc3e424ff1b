"""The time estimate against what the tiny set's requests take on this machine, for every preset and model: the
costs the runner measured at start, scaled by the plan's clips and passes, land near the model time the request then
takes (a wrong count of clips, steps or passes would be off by a factor of two or more)."""

from __future__ import annotations

import re

import pytest

from support.cog_inputs import run_inputs

pytestmark = pytest.mark.slow  # twelve requests on a CPU

ESTIMATE = re.compile(r"^estimate: (\d+(?:\.\d+)?) s")
WROTE = re.compile(r"^wrote \d+ frames \d+x\d+ in [\d.]+s \((.*)\)$")
NOT_MODEL_TIME = ("decode", "wav2vec2", "weights", "mp4")  # what the estimate leaves to its margin


@pytest.mark.parametrize("model", ["multitalk", "infinitetalk"])
@pytest.mark.parametrize("preset", ["fast", "turbo", "quality"])
def test_the_estimate_is_near_the_model_time(runner, caplog, preset, model):
    # Eight steps of turbo and quality (the estimate scales the steps; the GPU figures were taken so too).
    flags = {"fast": {"fast": True}, "turbo": {"sampling_steps": 8}, "quality": {"turbo": False, "sampling_steps": 8}}[
        preset
    ]
    inputs = run_inputs(image="examples/two_people.png", audio="examples/person1.wav", model=model, seed=5, **flags)
    runner.run(**inputs)  # once for the weights' switch, which the estimate counts apart
    caplog.clear()
    with caplog.at_level("INFO"):
        runner.run(**inputs)
    lines = [record.getMessage() for record in caplog.records]
    estimate = float(next(m[1] for m in map(ESTIMATE.match, lines) if m))
    stages = next(m[1] for m in map(WROTE.match, lines) if m)
    model_time = sum(
        float(s.rsplit(" ", 1)[1].rstrip("s")) for s in stages.split(", ") if s.split(" ")[0] not in NOT_MODEL_TIME
    )
    assert 0.5 < estimate / model_time < 2.0, (estimate, model_time, stages)
