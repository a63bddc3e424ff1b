"""The pure parts of `wan.parallel.guidance`: which splits of N GPUs exist, which one is chosen from measured pass
times, how passes are assigned to groups."""

from __future__ import annotations

from wan.parallel.guidance import Split, assign_branches, choose_split, predicted_step_seconds, valid_splits

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
