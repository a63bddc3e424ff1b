"""Decode any audio or video file, recognised by its content, to mono float32 at 16 kHz.

PyAV (libav in this process: no ffmpeg binary, no subprocess, no temporary file) demuxes the file and decodes its
first audio stream to float32 at the decoder's own rate and channel count; librosa mixes to mono and resamples,
exactly as `librosa.load(path, sr=16000)` does.
"""

from __future__ import annotations

import math
import os

import av
import librosa
import numpy as np

TARGET_SAMPLE_RATE = 16000
DEFAULT_MAX_SECONDS = 600.0
# libav only logs a file that ends before the duration its header declares (a download or upload cut short), so that
# is checked here: data ending more than this before the declared end means a truncated file.
TRUNCATION_TOLERANCE_SECONDS = 0.25
FORMATS_HINT = "upload e.g. wav, flac, mp3, ogg/opus, m4a/aac, or a video with sound (mp4, mov, mkv, webm)"


class AudioInputError(ValueError):
    """An audio input that cannot be used; the message names the input and says what to do."""


def open_media(
    path: str | os.PathLike, name: str, hint: str = FORMATS_HINT, error: type[ValueError] = AudioInputError
) -> av.container.InputContainer:
    """Open `path` for demuxing; the format is found from the content (the extension is ignored). Failures raise
    `error` with a message that names the input (`name`) and ends with `hint` (what to upload)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{name}: the file does not exist; {hint}")
    if os.path.getsize(path) == 0:
        raise error(f"{name}: the file is empty (0 bytes); {hint}")
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as failure:
        raise error(
            f"{name}: the file could not be read as audio or video ({failure.strerror}): it is not a media file, or it "
            f"is damaged; {hint}"
        ) from failure


def packet_end(packet: av.Packet, data_end: float | None) -> float | None:
    """`data_end` (seconds) extended to the end of `packet`, where the packet has a timestamp."""
    if packet.pts is None or packet.time_base is None:
        return data_end
    end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
    return end if data_end is None else max(data_end, end)


def cut_short(container: av.container.InputContainer, data_end: float | None) -> str | None:
    """Why the file looks cut short (its packets, read to the end, stop well before the duration its header
    declares), or None."""
    if not container.duration or data_end is None:
        return None
    header_end = container.duration / av.time_base
    data_seconds = data_end - (container.start_time or 0) / av.time_base
    if data_seconds < header_end - TRUNCATION_TOLERANCE_SECONDS:
        return f"its data ends at {data_seconds:.2f} s, its header declares {header_end:.2f} s"
    return None


def decode_native(
    path: str | os.PathLike, name: str = "audio", max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `path` to float32 samples [channels, frames] at its native sample rate.

    Decoder errors and files cut short are reported, not skipped over. Decoding stops once `max_seconds` is exceeded,
    so an over-long input costs no more memory than an allowed one.
    """
    path = os.fspath(path)
    with open_media(path, name) as container:
        if not container.streams.audio:
            raise AudioInputError(
                f"{name}: the file ({container.format.name}) has no audio stream; upload a file that contains sound"
            )
        stream = container.streams.audio[0]
        if stream.rate <= 0 or stream.channels <= 0:
            raise AudioInputError(
                f"{name}: the file's audio stream has no valid sample rate or channel count; "
                "the file is corrupt, re-export it"
            )
        declared = _declared_seconds(container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise _too_long(name, declared, max_seconds)
        if _wav_is_cut_short(path):
            raise AudioInputError(
                f"{name}: the wav file is truncated (its header declares more audio than the file holds); "
                "re-export or re-upload it"
            )
        codec = stream.codec_context.codec.canonical_name
        try:
            chunks, sample_rate, data_end = _decode(container, stream, max_seconds)
        except av.FFmpegError as error:
            raise _corrupt(name, codec, path, error.strerror) from error
        seconds = sum(chunk.shape[1] for chunk in chunks) / sample_rate
        if max_seconds is not None and seconds > max_seconds:
            raise _too_long(name, seconds, max_seconds)
        if problem := cut_short(container, data_end):
            raise _corrupt(name, codec, path, problem)
    if not chunks:
        raise AudioInputError(f"{name}: the file contains no audio samples; upload a file with sound in it")
    samples = np.concatenate(chunks, axis=1)
    if not np.isfinite(samples).all():
        raise AudioInputError(f"{name}: the file contains NaN or infinite samples; re-export it as ordinary audio")
    return samples, sample_rate


def _decode(
    container: av.container.InputContainer, stream: av.AudioStream, max_seconds: float | None
) -> tuple[list[np.ndarray], int, float | None]:
    """Float32 chunks [channels, n] of `stream`, their sample rate, and where the file's data ends (seconds)."""
    # Sample format only: the decoder's rate and channel layout stay (libswresample, as ffmpeg's `-f f32le` uses).
    to_float = av.AudioResampler(format="fltp")
    chunks, sample_rate, decoded, data_end = [], stream.rate, 0, None
    # Packets of every stream are read (not decoded) to find where the file's data ends: see cut_short.
    for packet in container.demux():
        data_end = packet_end(packet, data_end)
        if packet.stream.index != stream.index:
            continue
        for frame in packet.decode():
            for converted in to_float.resample(frame):
                chunks.append(converted.to_ndarray())
                sample_rate, decoded = converted.sample_rate, decoded + converted.samples
        if max_seconds is not None and decoded > max_seconds * sample_rate:
            return chunks, sample_rate, None
    chunks += [converted.to_ndarray() for converted in to_float.resample(None)]
    return chunks, sample_rate, data_end


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if seconds is None and container.duration:
        seconds = container.duration / av.time_base
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


def _wav_is_cut_short(path: str) -> bool:
    """A RIFF/WAVE file whose `data` chunk declares more bytes than the file holds (libav estimates the duration of
    such a file from its size, so the check above cannot see it). Streamed wavs declare 0 or 0xFFFFFFFF."""
    with open(path, "rb") as file:
        header = file.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return False
        while chunk := file.read(8):
            if len(chunk) < 8:
                return False
            chunk_id, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if chunk_id == b"data":
                return size not in (0, 0xFFFFFFFF) and file.tell() + size > os.path.getsize(path)
            file.seek(size + size % 2, os.SEEK_CUR)
    return False


def _corrupt(name: str, codec: str, path: str, detail: str) -> AudioInputError:
    return AudioInputError(
        f"{name}: the {codec} audio in the file could not be decoded cleanly ({detail}); "
        "the file is truncated or corrupt, re-export or re-upload it"
    )


def _too_long(name: str, seconds: float, max_seconds: float) -> AudioInputError:
    return AudioInputError(
        f"{name}: audio is {seconds:.1f} s long, more than the maximum of {max_seconds:g} s; trim it and upload again"
    )


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = TARGET_SAMPLE_RATE,
    name: str = "audio",
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Mono float32 audio at `sample_rate`, as `librosa.load(path, sr=sample_rate)` gives it.

    Mono is the mean of the channels (`librosa.to_mono`); resampling is `librosa.resample` with librosa's default
    resampler, which is what `librosa.load` uses too.
    """
    samples, native_rate = decode_native(path, name, max_seconds)
    mono = librosa.to_mono(samples)
    return librosa.resample(mono, orig_sr=native_rate, target_sr=sample_rate).astype(np.float32, copy=False)
