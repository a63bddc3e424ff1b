"""One step's guidance passes: what each branch feeds the DiT, and the guided velocity (plain CFG and APG), by hand."""

from __future__ import annotations

import torch

from wan import GuidanceOptions
from wan.generation import sampling
from wan.generation.backend import ClipInputs
from wan.generation.sampling import guidance_branches
from wan.generation.denoise import GuidedVelocity


def guided(text_scale: float, audio_scale: float, use_apg: bool = False) -> GuidedVelocity:
    return GuidedVelocity(None, text_scale, audio_scale, GuidanceOptions(use_apg=use_apg))


def test_guidance_branches_follow_the_scales():
    assert guidance_branches(1.0, 4.0) == ("cond", "drop_audio")
    assert guidance_branches(5.0, 4.0) == ("cond", "drop_text", "uncond")
    # A scale of exactly 1 adds nothing: the pass its contrast needs is dropped.
    assert guidance_branches(5.0, 1.0) == ("cond", "drop_text")
    assert guidance_branches(1.0, 1.0) == ("cond",)


def test_branch_inputs():
    text, null_text = torch.ones(3, 2), torch.zeros(3, 2)
    audio = torch.arange(2 * 5 * 1.0).view(2, 5, 1, 1, 1) + 1  # two speakers
    cond = ClipInputs(text, null_text, torch.ones(1), torch.ones(1), audio, torch.ones(1))
    assert cond.branch_inputs("cond")[0] is text and cond.branch_inputs("cond")[1] is audio
    assert cond.branch_inputs("drop_text")[0] is null_text and cond.branch_inputs("drop_text")[1] is audio
    dropped_text, silent = cond.branch_inputs("drop_audio")
    assert dropped_text is text and silent.shape == (1, 5, 1, 1, 1) and not silent.any()  # one silent speaker
    assert cond.branch_inputs("uncond")[0] is null_text and not cond.branch_inputs("uncond")[1].any()


def test_combine_by_hand():
    v = {name: torch.tensor([value]) for name, value in [("cond", 3.0), ("drop_text", 2.0), ("uncond", 1.0)]}
    # uncond + text (cond - drop_text) + audio (drop_text - uncond) = 1 + 5 + 4
    assert guided(5.0, 4.0).combine(v).item() == 10.0
    two = {"cond": torch.tensor([3.0]), "drop_audio": torch.tensor([1.0])}
    assert guided(1.0, 2.0).combine(two).item() == 5.0  # drop_audio + 2 (cond - drop_audio)


def test_combine_with_apg_uses_its_buffers():
    generator = torch.Generator().manual_seed(0)
    v = {name: torch.randn(16, 2, 4, 4, generator=generator) for name in ("cond", "drop_text", "uncond")}
    expected = sampling.guide_apg(
        v["cond"], v["drop_text"], v["uncond"], 5.0, 4.0, *[sampling.MomentumBuffer(-0.75) for _ in range(2)]
    )
    velocity = guided(5.0, 4.0, use_apg=True)
    assert torch.equal(velocity.combine(v), expected)
    assert all(buffer.running_average is not None for buffer in velocity.buffers)
