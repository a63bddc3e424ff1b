"""Audio input: decoding by content, 16 kHz resampling, loudness, two-speaker mixing, wav2vec2 loading and forward.

Every fixture file is written with PyAV's encoders / soundfile into pytest's tmp_path; the decoded samples are
also checked against what the ffmpeg program decodes (`support.ffmpeg_tools`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import librosa
import numpy as np
import pyloudnorm
import pytest
import scipy.signal
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model

from src.audio import (
    AudioInputError,
    audio_prepare_multi,
    audio_prepare_single,
    combine_speakers,
    get_embedding,
    load_audio,
    load_wav2vec,
    normalize_loudness,
)
from src.audio.decode import decode_native
from src.audio.wav2vec import encoder_hidden_states
from support.ffmpeg_tools import ffmpeg_tool
from support.synthetic_media import write_media

SOURCE_RATE = 44100
SECONDS = 1.2


def chirp_plus_noise(sample_rate: int, seconds: float = SECONDS, seed: int = 0) -> np.ndarray:
    """0.3 * chirp 150 -> 3000 Hz (below 4 kHz, so every tested rate holds it) + 0.02 * white noise."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    chirp = np.sin(2 * np.pi * (150 * t + (3000 - 150) / (2 * seconds) * t**2))
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * chirp + 0.02 * noise).astype(np.float32)


def aligned_correlation(decoded: np.ndarray, reference: np.ndarray, oversample: int = 8) -> tuple[float, float]:
    """Correlation coefficient after removing the codec's delay, and that delay in samples.

    Codec delays are fractional at 16 kHz (AAC: 1024 samples at 44.1 kHz), so both signals are aligned and compared
    at `oversample` times the rate.
    """
    decoded, reference = (scipy.signal.resample_poly(x, oversample, 1) for x in (decoded, reference))
    lag = int(np.argmax(scipy.signal.correlate(decoded, reference, mode="full"))) - (len(reference) - 1)
    a, b = (decoded[lag:], reference) if lag >= 0 else (decoded, reference[-lag:])
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1]), lag / oversample


# --- decoding ------------------------------------------------------------------------------------------------------

BLUE = np.zeros((int(SECONDS * 10), 32, 32, 3), np.uint8) + np.array([0, 0, 255], np.uint8)
FORMATS = {  # file name -> (write_media arguments, lossless)
    "a.flac": ({"audio_codec": "flac"}, True),
    "a.ogg": ({"audio_codec": "libopus"}, False),
    "a.mp3": ({"audio_codec": "libmp3lame"}, False),
    "a.m4a": ({"audio_codec": "aac"}, False),
    "a.aac": ({"audio_codec": "aac", "container_format": "adts"}, False),
    "a.mp4": ({"frames": BLUE, "fps": 10}, False),
    "a.mov": ({"frames": BLUE, "fps": 10}, False),
    "a.mkv": ({"frames": BLUE, "fps": 10, "audio_codec": "libopus"}, False),
    "a.webm": ({"frames": BLUE, "fps": 10, "video_codec": "libvpx", "audio_codec": "libopus"}, False),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    mono = chirp_plus_noise(SOURCE_RATE)
    sf.write(folder / "source.wav", np.stack([mono, 0.5 * mono], axis=1), SOURCE_RATE, subtype="PCM_16")
    source, _ = sf.read(folder / "source.wav", dtype="float32", always_2d=True)
    for file_name, (arguments, _) in FORMATS.items():
        write_media(folder / file_name, audio=source.T, sample_rate=SOURCE_RATE, **arguments)
    return folder


@pytest.mark.slow  # librosa's first load compiles its numba kernels
def test_wav_equals_librosa_load(media: Path) -> None:
    decoded = load_audio(media / "source.wav")
    expected, _ = librosa.load(media / "source.wav", sr=16000)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("file_name", list(FORMATS))
def test_every_format_decodes_to_the_same_16k_signal(media: Path, file_name: str) -> None:
    reference, _ = librosa.load(media / "source.wav", sr=16000)
    decoded = load_audio(media / file_name)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - len(reference)) <= 0.05 * 16000
    if FORMATS[file_name][1]:
        np.testing.assert_array_equal(decoded, reference)
    else:
        correlation, lag = aligned_correlation(decoded, reference)
        assert abs(lag) < 0.05 * 16000, lag
        assert correlation > 0.95, correlation


@pytest.mark.parametrize("file_name", ["source.wav", *FORMATS])
def test_format_is_found_by_content_not_extension(media: Path, tmp_path: Path, file_name: str) -> None:
    wrong = ".mp3" if file_name.endswith(".wav") else ".wav"
    shutil.copy(media / file_name, tmp_path / f"renamed{wrong}")
    shutil.copy(media / file_name, tmp_path / "no_extension")
    expected = load_audio(tmp_path / f"renamed{wrong}")
    np.testing.assert_array_equal(load_audio(tmp_path / "no_extension"), expected)
    reference, _ = librosa.load(media / "source.wav", sr=16000)
    if file_name.endswith((".wav", ".flac")):
        np.testing.assert_array_equal(expected, reference)
    else:
        assert aligned_correlation(expected, reference)[0] > 0.95


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_any_rate_and_channel_count(tmp_path: Path, rate: int, channels: int) -> None:
    signal = chirp_plus_noise(rate, seconds=0.5)
    path = tmp_path / "in.wav"
    sf.write(path, np.stack([signal, 0.5 * signal], axis=1)[:, :channels], rate, subtype="PCM_16")
    decoded = load_audio(path)
    np.testing.assert_array_equal(decoded, librosa.load(path, sr=16000)[0])
    # Independent of librosa: the chirp drawn directly at 16 kHz (noise differs, so only the chirp correlates).
    truth = chirp_plus_noise(16000, seconds=0.5)
    assert len(decoded) == len(truth)
    assert np.corrcoef(decoded, truth)[0, 1] > 0.97


def test_mono_is_the_mean_of_the_channels(tmp_path: Path) -> None:
    left, right = chirp_plus_noise(16000, 0.3, seed=1), chirp_plus_noise(16000, 0.3, seed=2)[::-1]
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "st.wav"), (left + right) / np.float32(2))


def test_streamed_wav_with_unknown_length_is_valid(media: Path, tmp_path: Path) -> None:
    data = bytearray((media / "source.wav").read_bytes())
    assert data[36:40] == b"data"  # soundfile's 44-byte header: RIFF size at 4, data size at 40
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # sizes unknown, as a pipe writes them
    (tmp_path / "streamed.wav").write_bytes(bytes(data))
    np.testing.assert_array_equal(load_audio(tmp_path / "streamed.wav"), load_audio(media / "source.wav"))


@pytest.mark.parametrize("file_name", ["source.wav", *FORMATS])
def test_same_samples_as_the_ffmpeg_binary(media: Path, file_name: str) -> None:
    """The same libav decoders as the ffmpeg binary, maybe another version: equal to within float32 rounding
    (measured: lossless formats bit-equal, lossy ones at most 1.2e-7 apart, ffmpeg 5.1 against PyAV's libav 8.0)."""
    samples, rate = decode_native(media / file_name)
    command = [
        ffmpeg_tool("ffmpeg"),
        "-v",
        "error",
        "-i",
        str(media / file_name),
        "-map",
        "0:a:0",
        "-ac",
        str(len(samples)),
    ]
    command += ["-ar", str(rate), "-f", "f32le", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    expected = np.frombuffer(raw, "<f4").reshape(-1, len(samples)).T
    assert samples.shape == expected.shape
    tolerance = 0 if file_name.endswith((".wav", ".flac")) else 2.5e-7
    np.testing.assert_allclose(samples, expected, rtol=0, atol=tolerance)


def test_nothing_is_written_to_the_working_directory(media: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    audio_prepare_single(media / "a.mp4")
    assert list(tmp_path.iterdir()) == []


def test_audio_shorter_than_its_video_is_whole(tmp_path: Path) -> None:
    """The truncation check compares where the file's data ends (every stream) with its declared duration, so a
    soundtrack that stops before the picture is not mistaken for a file cut short."""
    speech = chirp_plus_noise(SOURCE_RATE, 0.6)
    frames = np.zeros((30, 32, 32, 3), np.uint8)  # 3 s at 10 fps
    write_media(tmp_path / "v.mkv", frames=frames, fps=10, audio=speech[None], sample_rate=SOURCE_RATE)
    decoded = load_audio(tmp_path / "v.mkv")
    assert abs(len(decoded) - 0.6 * 16000) < 0.05 * 16000
    assert aligned_correlation(decoded, librosa.resample(speech, orig_sr=SOURCE_RATE, target_sr=16000))[0] > 0.95


def test_silence_is_valid(tmp_path: Path) -> None:
    sf.write(tmp_path / "silence.wav", np.zeros(8000, np.float32), 16000)
    np.testing.assert_array_equal(audio_prepare_single(tmp_path / "silence.wav"), np.zeros(8000, np.float32))


# --- bad input ------------------------------------------------------------------------------------------------------


def _write_bad_input(kind: str, media: Path, folder: Path) -> tuple[Path, dict]:
    """A bad file of the given kind, and extra arguments to load_audio."""
    path = folder / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        pass
    elif kind == "zero_length_wav":
        sf.write(path, np.zeros(0, np.float32), 16000)
    elif kind == "text_named_wav":
        path.write_text("this is a text file, not audio\n" * 40)
    elif kind == "video_without_audio":
        path = folder / "video.mp4"
        write_media(path, frames=np.zeros((5, 32, 32, 3), np.uint8), fps=10)
    elif kind.startswith("truncated_"):
        data = (media / f"{kind.removeprefix('truncated_')}").read_bytes()
        path = folder / kind
        path.write_bytes(data[: 44 + (len(data) - 44) // 8 * 4])  # cut on a whole sample frame
    elif kind == "corrupt_mp3":
        data = bytearray((media / "a.mp3").read_bytes())
        data[len(data) // 2 : len(data) // 2 + 1500] = np.random.default_rng(0).bytes(1500)
        path = folder / "corrupt.mp3"
        path.write_bytes(bytes(data))
    elif kind in ("nan_samples", "inf_samples"):
        samples = chirp_plus_noise(16000, 0.3)
        samples[100] = np.nan if kind == "nan_samples" else np.inf
        sf.write(path, samples, 16000, subtype="FLOAT")
    elif kind == "too_long":
        shutil.copy(media / "source.wav", path)
        return path, {"max_seconds": 1.0}
    return path, {}


BAD_INPUTS = {
    "empty": "empty",
    "missing": "does not exist",
    "zero_length_wav": "contains no audio samples",
    "text_named_wav": "could not be read as audio or video",
    "video_without_audio": "no audio stream",
    "truncated_source.wav": "truncated",
    "truncated_a.mp3": "truncated or corrupt",
    "truncated_a.flac": "truncated or corrupt",
    "truncated_a.m4a": "could not be read as audio or video",
    "truncated_a.webm": "truncated or corrupt",
    "truncated_a.mkv": "its header declares 1.2",
    "corrupt_mp3": "truncated or corrupt",
    "nan_samples": "NaN or infinite",
    "inf_samples": "NaN or infinite",
    "too_long": "more than the maximum of 1 s",
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_naming_the_input(media: Path, tmp_path: Path, kind: str) -> None:
    path, kwargs = _write_bad_input(kind, media, tmp_path)
    with pytest.raises(AudioInputError, match=BAD_INPUTS[kind]) as error:
        audio_prepare_single(path, name="second_audio", **kwargs)
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith("second_audio: ")


# --- loudness -------------------------------------------------------------------------------------------------------


def tone(seconds: float, amplitude: float = 0.05, rate: int = 16000) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * 1000 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_normalised_tone_measures_minus_23_lufs() -> None:
    normalised = normalize_loudness(tone(2.0), 16000)
    assert normalised.dtype == np.float32
    assert pyloudnorm.Meter(16000).integrated_loudness(normalised) == pytest.approx(-23.0, abs=0.01)


def test_prepared_file_measures_minus_23_lufs(media: Path) -> None:
    prepared = audio_prepare_single(media / "source.wav")
    assert pyloudnorm.Meter(16000).integrated_loudness(prepared) == pytest.approx(-23.0, abs=0.01)


def test_clip_shorter_than_a_meter_block_gets_the_gain_of_its_repetition() -> None:
    short = tone(0.2)  # 200 whole periods, so repeating it is the same tone
    expected_gain = 10 ** ((-23.0 - pyloudnorm.Meter(16000).integrated_loudness(tone(1.0))) / 20)
    np.testing.assert_allclose(normalize_loudness(short, 16000), short * expected_gain, rtol=1e-4, atol=1e-7)


def test_silence_is_left_unchanged() -> None:
    silence = np.zeros(16000, np.float32)
    np.testing.assert_array_equal(normalize_loudness(silence, 16000), silence)


# --- two speakers ---------------------------------------------------------------------------------------------------


def test_add_puts_the_speakers_one_after_the_other() -> None:
    track1, track2, mix = combine_speakers(np.array([1, 2, 3], np.float32), np.array([4, 5], np.float32), "add")
    np.testing.assert_array_equal(track1, [1, 2, 3, 0, 0])
    np.testing.assert_array_equal(track2, [0, 0, 0, 4, 5])
    np.testing.assert_array_equal(mix, [1, 2, 3, 4, 5])
    assert track1.dtype == track2.dtype == mix.dtype == np.float32


def test_para_pads_the_shorter_speaker_with_silence() -> None:
    track1, track2, mix = combine_speakers(np.array([1, 2, 3], np.float32), np.array([4, 5], np.float32), "para")
    np.testing.assert_array_equal(track1, [1, 2, 3])
    np.testing.assert_array_equal(track2, [4, 5, 0])
    np.testing.assert_array_equal(mix, [5, 7, 3])


def test_unknown_audio_type_is_named() -> None:
    with pytest.raises(ValueError, match="'sequential'"):
        combine_speakers(np.zeros(3, np.float32), np.zeros(3, np.float32), "sequential")


def test_audio_prepare_multi_from_files(tmp_path: Path) -> None:
    sf.write(tmp_path / "one.wav", tone(0.5, 0.1), 16000)
    sf.write(tmp_path / "two.flac", tone(0.7, 0.02), 16000)
    one, two = audio_prepare_single(tmp_path / "one.wav"), audio_prepare_single(tmp_path / "two.flac")
    track1, track2, mix = audio_prepare_multi(tmp_path / "one.wav", tmp_path / "two.flac", "add")
    assert len(track1) == len(track2) == len(mix) == 8000 + 11200
    np.testing.assert_array_equal(mix, np.concatenate([one, two]))
    track1, track2, mix = audio_prepare_multi(tmp_path / "one.wav", tmp_path / "two.flac", "para")
    assert len(track1) == len(track2) == 11200
    np.testing.assert_array_equal(track1[8000:], 0)
    np.testing.assert_array_equal(mix[:8000], one + two[:8000])


@pytest.mark.parametrize("absent", [None, "None"])
def test_absent_speaker_is_silent(tmp_path: Path, absent: str | None) -> None:
    sf.write(tmp_path / "one.wav", tone(0.5, 0.1), 16000)
    track1, track2, mix = audio_prepare_multi(absent, tmp_path / "one.wav", "para")
    np.testing.assert_array_equal(track1, np.zeros(8000, np.float32))
    np.testing.assert_array_equal(mix, track2)
    with pytest.raises(AudioInputError, match="both speakers are missing"):
        audio_prepare_multi(absent, absent, "para")


def test_multi_errors_name_the_right_input(tmp_path: Path) -> None:
    sf.write(tmp_path / "one.wav", tone(0.5, 0.1), 16000)
    (tmp_path / "bad.wav").write_bytes(b"")
    with pytest.raises(AudioInputError, match="^right_voice: "):
        audio_prepare_multi(tmp_path / "one.wav", tmp_path / "bad.wav", "add", names=("left_voice", "right_voice"))
    with pytest.raises(ValueError, match="'both'"):
        audio_prepare_multi(tmp_path / "one.wav", tmp_path / "one.wav", "both")


# --- wav2vec2 -------------------------------------------------------------------------------------------------------


def tiny_config(stable_layer_norm: bool = False) -> Wav2Vec2Config:
    return Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=stable_layer_norm,
        feat_extract_norm="layer" if stable_layer_norm else "group",
        codevector_dim=8,
        proj_codevector_dim=8,
        num_codevectors_per_group=4,
    )


def _old_weight_norm_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        renamed[key.replace("parametrizations.weight.original1", "weight_v")] = value
    return renamed


@pytest.mark.parametrize("file_format", ["safetensors", "bin_old_weight_norm"])
def test_load_wav2vec_reads_a_pretraining_dump(tmp_path: Path, file_format: str) -> None:
    pretraining = Wav2Vec2ForPreTraining(tiny_config()).eval()
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(tmp_path)
    if file_format == "safetensors":
        pretraining.save_pretrained(tmp_path)
    else:
        pretraining.config.save_pretrained(tmp_path)
        state_dict = _old_weight_norm_names(pretraining.state_dict())
        assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in state_dict
        torch.save(state_dict, tmp_path / "pytorch_model.bin")
    _, info = Wav2Vec2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()

    feature_extractor, encoder = load_wav2vec(tmp_path)
    assert not encoder.training
    dumped = {k.removeprefix("wav2vec2."): v for k, v in pretraining.state_dict().items() if k.startswith("wav2vec2.")}
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, dumped[key], rtol=0, atol=0, msg=key)
    speech = chirp_plus_noise(16000, 0.5)
    torch.testing.assert_close(
        get_embedding(speech, feature_extractor, encoder),
        get_embedding(speech, feature_extractor, pretraining.wav2vec2),
        rtol=0,
        atol=0,
    )


def test_load_wav2vec_refuses_an_incomplete_dump(tmp_path: Path) -> None:
    model = Wav2Vec2Model(tiny_config())
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.layers.1.")}
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="encoder.layers.1"):
        load_wav2vec(tmp_path)


@pytest.mark.parametrize("stable_layer_norm", [False, True])
def test_hidden_states_match_the_stock_forward_without_interpolation(stable_layer_norm: bool) -> None:
    model = Wav2Vec2Model(tiny_config(stable_layer_norm)).eval()
    waveform = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(waveform, output_hidden_states=True)
        n_conv_frames = model.feature_extractor(waveform).shape[-1]
        ours = encoder_hidden_states(model, waveform, n_conv_frames)  # same length: interpolation is the identity
    assert len(ours) == len(stock.hidden_states) == 3
    for index in range(2):
        torch.testing.assert_close(ours[index], stock.hidden_states[index], rtol=0, atol=0)
    # The last state is the encoder output (after the final LayerNorm for pre-norm models, as in transformers 4.x).
    torch.testing.assert_close(ours[-1], stock.last_hidden_state, rtol=0, atol=0)


def test_get_embedding_shape_and_no_state_left_on_the_model() -> None:
    model = Wav2Vec2Model(tiny_config()).eval()
    feature_extractor = Wav2Vec2FeatureExtractor()
    long, short = chirp_plus_noise(16000, 1.3), chirp_plus_noise(16000, 0.5, seed=1)
    first = get_embedding(long, feature_extractor, model)
    assert first.shape == (32, 2, 16) and first.dtype == torch.float32  # int(1.3 * 25) = 32 frames
    assert get_embedding(short, feature_extractor, model).shape == (12, 2, 16)
    torch.testing.assert_close(get_embedding(long, feature_extractor, model), first, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(AudioInputError, match="shorter than one video frame"):
        get_embedding(np.zeros(500, np.float32), feature_extractor, model)
