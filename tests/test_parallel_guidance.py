"""The pure parts of `wan.parallel.guidance`: which splits of N GPUs exist, which one is chosen from measured pass
times, how passes are assigned to groups, what each branch feeds the DiT, and the guided velocity."""

from __future__ import annotations

import torch

from wan import sampling
from wan.parallel.guidance import (
    ClipConditioning,
    Split,
    assign_branches,
    choose_split,
    combine,
    guidance_branches,
    predicted_step_seconds,
    valid_splits,
)

HEADS = 40


def splits(*pairs: tuple[int, int]) -> set[Split]:
    return {Split(g, d) for g, d in pairs}


def test_valid_splits_of_2_gpus():
    assert set(valid_splits(2, 2, HEADS)) == splits((1, 1), (1, 2), (2, 1))
    assert set(valid_splits(2, 3, HEADS)) == splits((1, 1), (1, 2), (2, 1))


def test_valid_splits_of_8_gpus_keep_degrees_that_divide_the_heads():
    found = set(valid_splits(8, 3, HEADS))
    assert splits((1, 5), (1, 8), (2, 4), (3, 2)) <= found
    # 3, 6 and 7 do not divide 40 heads; 3 groups of 3 or 2 groups of 5 need more than 8 GPUs; no 4th group.
    assert not found & splits((1, 3), (1, 6), (1, 7), (3, 3), (2, 5), (4, 2))
    assert all(s.gpus <= 8 for s in found)


def test_predicted_step_is_the_busiest_group():
    seconds = {1: 3.0, 2: 1.6}
    assert predicted_step_seconds(Split(2, 1), 3, seconds) == 6.0  # 2 of the 3 passes on one GPU
    assert predicted_step_seconds(Split(1, 2), 3, seconds) == 3 * 1.6


def test_two_gpus_run_fast_one_pass_per_gpu_and_quality_sequence_parallel():
    # Sequence parallel loses a little to communication: 1.6 s a pass on 2 GPUs against 3.0 s on one.
    seconds = {1: 3.0, 2: 1.6}
    assert choose_split(2, 2, HEADS, seconds) == Split(2, 1)  # 3.0 s against 3.2 s
    assert choose_split(2, 3, HEADS, seconds) == Split(1, 2)  # 4.8 s against 6.0 s


def test_four_gpus_three_passes():
    assert choose_split(4, 3, HEADS, {1: 3.0, 2: 1.6, 4: 0.85}) == Split(1, 4)  # 2.55 s; 3x1 3.0 s; 2x2 3.2 s
    assert choose_split(4, 3, HEADS, {1: 3.0, 2: 1.6, 4: 1.2}) == Split(3, 1)  # degree 4 scales badly here


def test_ties_go_to_fewer_gpus_then_fewer_groups():
    # 3 GPUs, 3 passes: 1x2 and 3x1 both take 3.0 s; 1x2 leaves a GPU free.
    assert choose_split(3, 3, HEADS, {1: 3.0, 2: 1.0}) == Split(1, 2)
    # 4 GPUs, 2 passes: 1x4 and 2x2 both take 1.5 s on 4 GPUs; one group needs no exchange of velocities.
    assert choose_split(4, 2, HEADS, {1: 3.0, 2: 1.5, 4: 0.75}) == Split(1, 4)


def test_only_measured_degrees_are_chosen():
    assert choose_split(8, 2, HEADS, {1: 3.0, 2: 1.6}) == Split(2, 2)


def test_assign_branches_round_robin():
    three = ("cond", "drop_text", "uncond")
    assert assign_branches(three, 1) == (three,)
    assert assign_branches(three, 2) == (("cond", "uncond"), ("drop_text",))
    assert assign_branches(three, 3) == (("cond",), ("drop_text",), ("uncond",))


def test_guidance_branches_follow_the_text_scale():
    assert guidance_branches(1.0) == ("cond", "drop_audio")
    assert guidance_branches(5.0) == ("cond", "drop_text", "uncond")


def test_branch_inputs():
    text, null_text = torch.ones(3, 2), torch.zeros(3, 2)
    audio = torch.arange(2 * 5 * 1.0).view(2, 5, 1, 1, 1) + 1  # two speakers
    cond = ClipConditioning(text, null_text, torch.ones(1), torch.ones(1), audio, torch.ones(1))
    assert cond.branch_inputs("cond")[0] is text and cond.branch_inputs("cond")[1] is audio
    assert cond.branch_inputs("drop_text")[0] is null_text and cond.branch_inputs("drop_text")[1] is audio
    dropped_text, silent = cond.branch_inputs("drop_audio")
    assert dropped_text is text and silent.shape == (1, 5, 1, 1, 1) and not silent.any()  # one silent speaker
    assert cond.branch_inputs("uncond")[0] is null_text and not cond.branch_inputs("uncond")[1].any()


def test_combine_by_hand():
    v = {name: torch.tensor([value]) for name, value in [("cond", 3.0), ("drop_text", 2.0), ("uncond", 1.0)]}
    # uncond + text (cond - drop_text) + audio (drop_text - uncond) = 1 + 5 + 4
    assert combine(v, text_scale=5.0, audio_scale=4.0).item() == 10.0
    two = {"cond": torch.tensor([3.0]), "drop_audio": torch.tensor([1.0])}
    assert combine(two, text_scale=1.0, audio_scale=2.0).item() == 5.0  # drop_audio + 2 (cond - drop_audio)


def test_combine_with_apg_uses_the_buffers():
    generator = torch.Generator().manual_seed(0)
    v = {name: torch.randn(16, 2, 4, 4, generator=generator) for name in ("cond", "drop_text", "uncond")}
    buffers = [sampling.MomentumBuffer(-0.75) for _ in range(2)]
    expected = sampling.guide_apg(
        v["cond"], v["drop_text"], v["uncond"], 5.0, 4.0, *[sampling.MomentumBuffer(-0.75) for _ in range(2)]
    )
    assert torch.equal(combine(v, 5.0, 4.0, buffers), expected)
    assert buffers[0].running_average is not None and buffers[1].running_average is not None
