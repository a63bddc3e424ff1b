"""Sequence parallelism on 2 CPU ranks (gloo): the split/exchange/gather arithmetic of `wan.model.sequence_parallel`, and
the tiny DiT split over the ranks against the unsplit forward and the golden output.

Each group of checks spawns the ranks once; the ranks compute only the split results, the truth is computed here in
one process by the plain code (hand-made slices, unsplit attention, unsplit DiT).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from support.golden import cases_with_prefix, load_case
from support.parallel_ranks import run_ranks

from wan.model.attention import attention
from wan.model.sequence_parallel import SequenceParallel

pytestmark = pytest.mark.slow  # gloo process groups: each start is seconds
WORLD = 2
LENGTHS = (10, 11, 13)  # 2 ranks: no padding, then one padding row
LEADING = 7  # more than one rank's chunk for 11 and 13 tokens
MODEL_INPUTS = ("x", "t", "context", "clip_fea", "y", "audio", "ref_target_masks")


def random_tensors(length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    q, k, v = torch.randn(3, 1, length, 4, 8, generator=generator)
    return dict(q=q, k=k, v=v, rows=torch.randn(2, length, generator=generator))


def _arithmetic_on_rank(rank: int, world: int) -> dict:
    parallel = SequenceParallel.over(dist.group.WORLD)
    results = {}
    for length in LENGTHS:
        shard = parallel.shard(length, frame_tokens=4)
        full = random_tensors(length)
        part = {name: shard.split(full[name], dim=1) for name in ("q", "k", "v")}
        results[length] = dict(
            split=part["q"],
            gathered=shard.gather(part["q"], dim=1),
            attention=shard.attention(part["q"], part["k"], part["v"], attention),
            leading=shard.leading_tokens(part["k"], LEADING),
            bounds=shard.row_bounds(shard.split(full["rows"], dim=1)),
        )
    return results


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    return run_ranks(_arithmetic_on_rank, WORLD, tmp_path_factory.mktemp("arithmetic"))


@pytest.mark.parametrize("length", LENGTHS)
def test_split_pads_the_last_chunk_and_gather_restores(arithmetic, length):
    q = random_tensors(length)["q"]
    chunk = (length + 1) // 2
    first, second = arithmetic[0][length]["split"], arithmetic[1][length]["split"]
    assert torch.equal(first, q[:, :chunk])
    assert torch.equal(second[:, : length - chunk], q[:, chunk:])
    assert second.shape[1] == chunk and not second[:, length - chunk :].any()
    for rank in range(WORLD):
        assert torch.equal(arithmetic[rank][length]["gathered"], q)


@pytest.mark.parametrize("length", LENGTHS)
def test_ulysses_attention_equals_full_attention(arithmetic, length):
    t = random_tensors(length)
    full = attention(t["q"], t["k"], t["v"])
    chunk = (length + 1) // 2
    torch.testing.assert_close(arithmetic[0][length]["attention"], full[:, :chunk], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        arithmetic[1][length]["attention"][:, : length - chunk], full[:, chunk:], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("length", LENGTHS)
def test_leading_tokens_and_row_bounds_cover_the_whole_sequence(arithmetic, length):
    t = random_tensors(length)
    for rank in range(WORLD):
        result = arithmetic[rank][length]
        assert torch.equal(result["leading"], t["k"][:, :LEADING])
        low, high = result["bounds"]
        # The padding row of the split is zero; bounds must come from the real tokens only.
        assert torch.equal(low, t["rows"].amin(dim=1)) and torch.equal(high, t["rows"].amax(dim=1))


def dit_cases() -> list[str]:
    return [name for name in cases_with_prefix("dit_") if name in ("dit_1p", "dit_2p")]


@functools.cache
def model_inputs(case_name: str, crop: bool) -> dict[str, torch.Tensor]:
    """The golden inputs; `crop` cuts the latent to 6 x 10 (45 tokens: odd, frames cut mid-way by the split). The
    speaker masks stay whole: the DiT resizes them to its token grid."""
    inputs = {k: v for k, v in load_case(case_name).inputs().items() if k in MODEL_INPUTS}
    if crop:
        inputs["x"] = inputs["x"][..., :6, :10]
        inputs["y"] = inputs["y"][..., :6, :10]
    return inputs


def _dit_on_rank(rank: int, world: int, case_names: list[str]) -> dict:
    parallel = SequenceParallel.over(dist.group.WORLD)
    results = {}
    for case_name in case_names:
        model = load_case(case_name).dit()
        for crop in (False, True):
            with torch.inference_mode():
                results[case_name, crop] = model(**model_inputs(case_name, crop), parallel=parallel)
        # The block with its shard compiles to one graph and computes what it computes eagerly.
        calls = []
        hook = model.blocks[0].register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
        with torch.inference_mode():
            model(**model_inputs(case_name, crop=True), parallel=parallel)
        hook.remove()
        args, kwargs = calls[0]
        compiled = torch.compile(model.blocks[0], fullgraph=True, backend="aot_eager")
        with torch.inference_mode():
            results[case_name, "compiled"] = (compiled(*args, **kwargs), model.blocks[0](*args, **kwargs))
    return results


@pytest.fixture(scope="module")
def split_dit(tmp_path_factory):
    if not dit_cases():
        pytest.skip("golden dit_1p/dit_2p cases not found")
    return run_ranks(_dit_on_rank, WORLD, tmp_path_factory.mktemp("dit"), dit_cases())


@pytest.mark.parametrize("case_name", ["dit_1p", "dit_2p"])
@pytest.mark.parametrize("crop", [False, True])
def test_split_dit_equals_unsplit(split_dit, case_name, crop):
    model = load_case(case_name).dit()
    with torch.inference_mode():
        unsplit = model(**model_inputs(case_name, crop))
    for rank in range(WORLD):
        # Only the summation order of the attention differs: float32 noise.
        torch.testing.assert_close(split_dit[rank][case_name, crop], unsplit, rtol=1e-5, atol=2e-5)
    if not crop:
        case = load_case(case_name)
        case.assert_close("out", split_dit[0][case_name, crop][None])


@pytest.mark.parametrize("case_name", ["dit_1p", "dit_2p"])
def test_split_block_compiles_fullgraph(split_dit, case_name):
    compiled, eager = split_dit[0][case_name, "compiled"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
