"""Audio in, embeddings out: decode any audio/video by content (or speak a script: Kokoro-82M), 16 kHz mono, -23 LUFS,
two-speaker mixing, wav2vec2."""

from .decode import DEFAULT_MAX_SECONDS, TARGET_SAMPLE_RATE, AudioInputError, load_audio
from .loudness import TARGET_LUFS, normalize_loudness
from .mixing import audio_prepare_multi, audio_prepare_single, combine_speakers
from .speech import DEFAULT_VOICES, VOICES, SpeechInputError, load_speech, read_script, speak_tts_audio
from .wav2vec import get_embedding, load_wav2vec, video_frame_count

__all__ = [
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_VOICES",
    "TARGET_LUFS",
    "TARGET_SAMPLE_RATE",
    "VOICES",
    "AudioInputError",
    "SpeechInputError",
    "audio_prepare_multi",
    "audio_prepare_single",
    "combine_speakers",
    "get_embedding",
    "load_audio",
    "load_speech",
    "load_wav2vec",
    "normalize_loudness",
    "read_script",
    "speak_tts_audio",
    "video_frame_count",
]
