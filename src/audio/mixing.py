"""Speaker tracks: one input, or two combined one after the other (`add`) or at the same time (`para`)."""

from __future__ import annotations

import os

import numpy as np

from .decode import DEFAULT_MAX_SECONDS, TARGET_SAMPLE_RATE, AudioInputError, load_audio
from .loudness import normalize_loudness

AUDIO_TYPES = ("add", "para")


def audio_prepare_single(
    path: str | os.PathLike,
    sample_rate: int = TARGET_SAMPLE_RATE,
    name: str = "audio",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode `path` (any audio or video file) to mono float32 at `sample_rate`, loudness-normalised to -23 LUFS."""
    return normalize_loudness(load_audio(path, sample_rate, name=name, max_seconds=max_seconds), sample_rate)


def pad_to_length(audio: np.ndarray, length: int) -> np.ndarray:
    """`audio` followed by silence up to `length` samples."""
    return np.concatenate([audio, np.zeros(length - audio.shape[0], dtype=audio.dtype)])


def check_audio_type(audio_type: str) -> None:
    if audio_type not in AUDIO_TYPES:
        raise ValueError(f"audio_type {audio_type!r} is not supported; use one of: {', '.join(AUDIO_TYPES)}")


def combine_speakers(
    track1: np.ndarray, track2: np.ndarray, audio_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-speaker tracks of equal length and their mix (the soundtrack).

    `add`: speaker 1 talks, then speaker 2 (each is silent while the other talks).
    `para`: both talk at once; the shorter track is padded with silence at the end.
    """
    check_audio_type(audio_type)
    if audio_type == "add":
        total = track1.shape[0] + track2.shape[0]
        track1, track2 = pad_to_length(track1, total), np.concatenate([np.zeros(track1.shape[0], track2.dtype), track2])
    else:
        length = max(track1.shape[0], track2.shape[0])
        track1, track2 = pad_to_length(track1, length), pad_to_length(track2, length)
    return track1, track2, track1 + track2


def _is_absent(path: str | os.PathLike | None) -> bool:
    # The reference CLI spells a silent speaker as the string 'None'.
    return path is None or (isinstance(path, str) and path == "None")


def audio_prepare_multi(
    left_path: str | os.PathLike | None,
    right_path: str | os.PathLike | None,
    audio_type: str,
    sample_rate: int = TARGET_SAMPLE_RATE,
    names: tuple[str, str] = ("audio", "second_audio"),
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two speakers' tracks (person1 = left, person2 = right) and their mix, as float32 at `sample_rate`.

    A path given as None (or the string 'None') is a silent speaker: zeros as long as the other speaker's audio.
    """
    check_audio_type(audio_type)
    if _is_absent(left_path) and _is_absent(right_path):
        raise AudioInputError(f"{names[0]}, {names[1]}: both speakers are missing; give at least one audio file")
    left = None if _is_absent(left_path) else audio_prepare_single(left_path, sample_rate, names[0], max_seconds)
    right = None if _is_absent(right_path) else audio_prepare_single(right_path, sample_rate, names[1], max_seconds)
    if left is None:
        left = np.zeros_like(right)
    if right is None:
        right = np.zeros_like(left)
    return combine_speakers(left, right, audio_type)
