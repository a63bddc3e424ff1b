"""Loudness normalisation to -23 LUFS (ITU-R BS.1770 integrated loudness, as the reference does it)."""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm

from .decode import TARGET_SAMPLE_RATE

TARGET_LUFS = -23.0
METER_BLOCK_SECONDS = 0.4  # pyloudnorm's default gating block; the meter refuses shorter input


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS; -inf for silence.

    Audio shorter than one 0.4 s meter block is measured on the clip repeated end to end until it fills a block:
    a periodic extension has the loudness of the clip itself, whereas zero-padding would report it quieter than
    it is and over-amplify it.
    """
    block = math.ceil(METER_BLOCK_SECONDS * sample_rate)
    if audio.size == 0:
        return -math.inf
    if audio.shape[0] < block:
        audio = np.tile(audio, math.ceil(block / audio.shape[0]))
    return float(pyloudnorm.Meter(sample_rate, block_size=METER_BLOCK_SECONDS).integrated_loudness(audio))


def normalize_loudness(
    audio: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE, target_lufs: float = TARGET_LUFS
) -> np.ndarray:
    """Gain `audio` (mono float32) to `target_lufs` integrated loudness, without a limiter.

    As in the reference, audio whose measured loudness is beyond +-100 LUFS (silence measures -inf) is returned
    unchanged. Clips shorter than 0.4 s are measured as described in `integrated_loudness`.
    """
    loudness = integrated_loudness(audio, sample_rate)
    if abs(loudness) > 100:
        return audio
    return pyloudnorm.normalize.loudness(audio, loudness, target_lufs).astype(np.float32, copy=False)
