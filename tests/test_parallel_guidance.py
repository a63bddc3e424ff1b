"""The pure parts of `wan.runtime.schedule`: which splits of N GPUs exist, which schedule of rounds is chosen from
measured pass times, which branches each round runs. Expected values are worked out by hand in the comments."""

from __future__ import annotations

from wan.runtime.schedule import (
    Split,
    candidate_schedules,
    choose_schedule,
    predicted_step_seconds,
    schedule_rounds,
    valid_splits,
)

HEADS = 40
S11, S12, S21, S14, S22, S31 = Split(1, 1), Split(1, 2), Split(2, 1), Split(1, 4), Split(2, 2), Split(3, 1)


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


def test_candidates_of_2_gpus_and_3_passes_cover_every_pass_without_idle_groups():
    found = set(candidate_schedules(2, 3, HEADS, {1, 2}))
    assert found == {
        (S11, S11, S11),
        (S11, S11, S12),
        (S11, S12, S11),
        (S12, S11, S11),
        (S11, S12, S12),
        (S12, S11, S12),
        (S12, S12, S11),
        (S12, S12, S12),
        (S21, S11),
        (S21, S12),
        (S11, S21),
        (S12, S21),
    }


def test_predicted_step_is_the_sum_of_its_rounds():
    seconds = {1: 3.0, 2: 1.6}
    assert predicted_step_seconds((S21, S11), seconds) == 6.0  # 2 passes at once, then 1
    assert predicted_step_seconds((S12, S12, S12), seconds) == 3 * 1.6
    assert predicted_step_seconds((S21, S12), seconds) == 3.0 + 1.6


def test_two_gpus_run_fast_one_pass_per_gpu_and_quality_one_per_gpu_then_over_both():
    # Sequence parallel loses a little to communication: 1.6 s a pass on 2 GPUs against 3.0 s on one.
    seconds = {1: 3.0, 2: 1.6}
    assert choose_schedule(2, 2, HEADS, seconds) == (S21,)  # 3.0 s against 3.2 s over both
    assert choose_schedule(2, 3, HEADS, seconds) == (S21, S12)  # 4.6 s; 4.8 s all over both; 6.0 s 2x1 then 1x1
    # The H200 figures (bench/RESULTS.md): 3.23 s and 1.81 s: 5.04 s a quality step, 1.92x one GPU's 9.69 s.
    assert choose_schedule(2, 3, HEADS, {1: 3.23, 2: 1.81}) == (S21, S12)


def test_four_gpus_three_passes():
    # 2x2 then 1x4: 1.6 + 0.85 = 2.45 s; 1x4 thrice 2.55 s; 3x1 3.0 s.
    assert choose_schedule(4, 3, HEADS, {1: 3.0, 2: 1.6, 4: 0.85}) == (S22, S14)
    # Degree 4 scales badly: 3x1 (3.0 s) against 2x2 then 1x4 (1.6 + 1.5 = 3.1 s, not within 2 %).
    assert choose_schedule(4, 3, HEADS, {1: 3.0, 2: 1.6, 4: 1.5}) == (S31,)


def test_ties_go_to_fewer_gpus_then_fewer_rounds():
    # 3 GPUs, 3 passes: 1x2 thrice and 3x1 both take 3.0 s; 1x2 leaves a GPU free.
    assert choose_schedule(3, 3, HEADS, {1: 3.0, 2: 1.0}) == (S12, S12, S12)
    # 4 GPUs, 2 passes: 1x4 twice and 2x2 once both take 1.5 s on 4 GPUs; one round is one exchange of velocities.
    assert choose_schedule(4, 2, HEADS, {1: 3.0, 2: 1.5, 4: 0.75}) == (S22,)


def test_only_measured_degrees_are_chosen():
    assert choose_schedule(8, 2, HEADS, {1: 3.0, 2: 1.6}) == (S22,)


def test_rounds_give_each_group_one_branch_and_repeat_the_last_split():
    three = ("cond", "drop_text", "uncond")
    assert schedule_rounds((S11,), three) == [(S11, ("cond",)), (S11, ("drop_text",)), (S11, ("uncond",))]
    assert schedule_rounds((S21,), three) == [(S21, ("cond", "drop_text")), (S21, ("uncond",))]
    assert schedule_rounds((S21, S12), three) == [(S21, ("cond", "drop_text")), (S12, ("uncond",))]
    assert schedule_rounds((S31,), three) == [(S31, three)]
    assert schedule_rounds((S21, S12), ("cond",)) == [(S21, ("cond",))]
