"""Memory plans: the choice from a free-memory figure, and block streaming against the resident model."""

from __future__ import annotations

import math

import pytest

from wan.memory import GIB, MEMORY_PLAN_ENV, choose_memory_plan, plan_for_device

# Worked by hand from the component sizes (GiB): weights that stay + the largest phase + 2.0 margin.
# resident: 35.17 DiT + 10.58 T5 + 1.18 CLIP + 0.47 VAE + 0.35 wav2vec = 47.75, + 9.8 decode + 2.0 = 59.55
# fp8:      18.19 DiT + 1.18 + 0.47 + 0.35 = 20.19, + 10.58 T5 while encoding + 2.0 = 32.77
# streamed: 0.59 non-block DiT + 2 x 0.44 slots + 1.18 + 0.47 + 0.35 = 3.47, + 10.58 T5 + 2.0 = 16.05
RESIDENT_NEEDS, FP8_NEEDS, STREAMED_NEEDS = 59.55, 32.77, 16.05


@pytest.mark.parametrize(
    "free_gib, expected",
    [
        (79.1, "resident"),  # an 80 GB card, nothing else on it
        (RESIDENT_NEEDS, "resident"),
        (RESIDENT_NEEDS - 0.01, "fp8"),
        (46.0, "fp8"),  # the 46 GiB cap of the device check
        (44.3, "fp8"),  # a 48 GB card
        (39.4, "fp8"),  # a 40 GB card
        (FP8_NEEDS, "fp8"),
        (FP8_NEEDS - 0.01, "streamed"),
        (31.3, "streamed"),  # a 32 GB card
        (24.0, "streamed"),  # the 24 GiB cap of the device check
        (22.5, "streamed"),  # a 24 GB card with a display attached
        (STREAMED_NEEDS, "streamed"),
    ],
)
def test_plan_chosen_from_free_memory(free_gib, expected):
    plan = choose_memory_plan(math.ceil(free_gib * GIB))
    assert plan.name == expected


def test_plan_fields_follow_the_issue():
    resident, fp8, streamed = (choose_memory_plan(int(g * GIB)) for g in (80, 46, 24))
    assert (resident.dit_weights, resident.dit_placement, resident.text_encoder, resident.vae_tiled) == (
        "bf16", "resident", "resident", False)
    assert (fp8.dit_weights, fp8.dit_placement, fp8.text_encoder, fp8.vae_tiled) == (
        "fp8", "resident", "while_encoding", False)
    assert (streamed.dit_weights, streamed.dit_placement, streamed.text_encoder, streamed.vae_tiled) == (
        "fp8", "streamed", "while_encoding", True)
    # Host: 40 fp8 blocks (18.19 - 0.59 = 17.6) + the parked text encoder (10.58).
    assert streamed.host_gib == pytest.approx(28.18) and fp8.host_gib == pytest.approx(10.58)


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(ValueError, match=r"16\.05 GiB.*MULTITALK_MEMORY_PLAN=streamed"):
        choose_memory_plan(int((STREAMED_NEEDS - 0.01) * GIB))


@pytest.mark.parametrize("override, expected", [("resident", "resident"), ("fp8", "fp8"), (" Streamed ", "streamed")])
def test_override_wins_over_free_memory(override, expected):
    assert choose_memory_plan(int(8 * GIB), override).name == expected
    assert choose_memory_plan(int(80 * GIB), override).name == expected


def test_empty_override_means_choose():
    assert choose_memory_plan(int(46 * GIB), "").name == "fp8"


def test_bad_override_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"MULTITALK_MEMORY_PLAN='fast' is not a memory plan; use one of resident, "
                                         r"fp8, streamed"):
        choose_memory_plan(int(80 * GIB), "fast")


def test_cpu_device_runs_resident_unless_overridden(monkeypatch):
    monkeypatch.delenv(MEMORY_PLAN_ENV, raising=False)
    assert plan_for_device("cpu").name == "resident"
    monkeypatch.setenv(MEMORY_PLAN_ENV, "streamed")
    assert plan_for_device("cpu").name == "streamed"
    monkeypatch.setenv(MEMORY_PLAN_ENV, "tiny")
    with pytest.raises(ValueError, match="MULTITALK_MEMORY_PLAN='tiny'"):
        plan_for_device("cpu")
