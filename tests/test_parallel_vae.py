"""The VAE in bands of rows (`wan.runtime.vae_bands`), on CPU replicas: the golden `vae` case's encode, decode and
round trip from 2, 3 and 4 bands (uneven ones included) against the reference's outputs, and against bands that run
without their neighbours' rows (which must not match: the exchange is what makes it exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.golden import cases_with_prefix, load_case
from test_golden_encoders import write_pth

from wan.encoders.vae import VideoVAE
from wan.runtime import vae_bands
from wan.runtime.vae_bands import BandedVAE, band_rows, banded_model

CASES = cases_with_prefix("vae") or ["vae"]


def golden_vae(case_name: str, folder: Path):
    case = load_case(case_name)
    return case, VideoVAE.from_checkpoint(write_pth(case, folder))


def tallest_case() -> str:
    """The case whose latent has the most rows (the most room for bands)."""
    return max(CASES, key=lambda name: load_case(name).inputs()["latent"].shape[-2])


def record_band_rows(vae: BandedVAE) -> list[list[int]]:
    """The latent rows each band's decoder takes in, per call."""
    seen: list[list[int]] = [[] for _ in vae._banded]
    for index, banded in enumerate(vae._banded):
        banded.model.decoder.conv_in.register_forward_pre_hook(
            lambda module, args, index=index: seen[index].append(args[0].shape[-2])
        )
    return seen


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("bands", [2, 3, 4])
def test_bands_match_the_reference(case_name: str, bands: int, tmp_path: Path) -> None:
    case, vae = golden_vae(case_name, tmp_path)
    inputs, outputs = case.inputs(), case.outputs()
    bands = min(bands, inputs["latent"].shape[-2])  # a band is at least one latent row
    banded = BandedVAE.over(vae, ["cpu"] * bands)
    seen = record_band_rows(banded)
    latent = banded.encode(inputs["video"])
    case.assert_close("encode_latent", latent)
    case.assert_close("decode_video", banded.decode(inputs["latent"]))
    if "roundtrip_decode_of_encode" in outputs:
        case.assert_close("roundtrip_decode_of_encode", banded.decode(latent))
    # Each band decoded its own rows, every latent frame of them.
    if bands > 1:
        rows = band_rows(inputs["latent"].shape[-2], bands)
        assert [set(s) for s in seen] == [{r} for r in rows]
        assert sum(rows) == inputs["latent"].shape[-2] and min(rows) >= 1
    # Float rounding away from the unsplit VAE (which is within the golden tolerance itself).
    torch.testing.assert_close(latent, vae.encode(inputs["video"]), rtol=0, atol=1e-5)


def test_bands_without_their_neighbours_rows_are_wrong(tmp_path: Path) -> None:
    """The halo exchange is what the result rests on: bands decoded alone (zero rows at every band edge, the
    attention over their own rows) miss the reference by far more than its tolerance."""
    case, vae = golden_vae(tallest_case(), tmp_path)
    latent = case.inputs()["latent"]
    rows = band_rows(latent.shape[-2], 2)
    alone = torch.cat([vae.decode(part) for part in latent.split(rows, dim=-2)], dim=-2)
    error = (alone - case.outputs()["decode_video"]).abs().max().item()
    assert error > 100 * case.strict_tolerance("decode_video")


def test_a_failing_band_fails_the_call_and_the_next_call_runs(tmp_path: Path) -> None:
    case, vae = golden_vae(tallest_case(), tmp_path)
    banded = BandedVAE.over(vae, ["cpu"] * 3)

    def fail(module, args):
        raise RuntimeError("band 1 broke")

    hook = banded._banded[1].model.decoder.mid_block.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="band 1 broke"):  # its own error, not the others' broken barrier
        banded.decode(case.inputs()["latent"])
    hook.remove()
    case.assert_close("decode_video", banded.decode(case.inputs()["latent"]))


def test_cast_bands_every_replica_and_small_frames_run_unsplit(tmp_path: Path) -> None:
    case, vae = golden_vae(tallest_case(), tmp_path)
    banded = BandedVAE.over(vae, ["cpu"] * 2)
    double = banded.cast(torch.float64)
    assert double is banded.cast(torch.float64) and double.dtype == torch.float64
    assert all(replica.dtype == torch.float64 for replica in double.replicas)
    latent = case.inputs()["latent"]
    case.assert_close("decode_video", double.decode(latent))
    # float64 in bands against float64 unsplit: nothing but rounding in the last bits.
    torch.testing.assert_close(double.decode(latent), vae.cast(torch.float64).decode(latent), rtol=0, atol=1e-12)
    # More bands than latent rows: the first replica decodes the whole frame.
    many = BandedVAE.over(vae, ["cpu"] * (latent.shape[-2] + 1))
    case.assert_close("decode_video", many.decode(latent))
    # A height that is no multiple of 8 has no whole latent rows to cut: it is encoded unsplit, as VideoVAE does.
    video = case.inputs()["video"][..., :-4, :]
    torch.testing.assert_close(banded.encode(video), vae.encode(video), rtol=0, atol=0)


def test_layers_without_a_banded_form_are_refused(tmp_path: Path) -> None:
    _, vae = golden_vae(tallest_case(), tmp_path)
    vae.model.decoder.mid_block.add_module("extra", torch.nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match="decoder.mid_block.extra"):
        banded_model(vae.model, vae_bands.Band(0, 2))


def test_channels_last_bands_match_the_reference(tmp_path: Path) -> None:
    """The GPU's layout (`VideoVAE.channels_last`): each band's padded buffer keeps it."""
    case, vae = golden_vae(tallest_case(), tmp_path)
    banded = BandedVAE.over(vae.channels_last(), ["cpu"] * 2)
    inputs = case.inputs()
    case.assert_close("encode_latent", banded.encode(inputs["video"]))
    case.assert_close("decode_video", banded.decode(inputs["latent"]))
