"""Speech from text: Kokoro-82M, as MultiTalk's reference runs it in its TTS mode (`--audio_mode tts`), in American
and British English (the reference's) and Mandarin Chinese.

A script is one speaker's text, or a dialogue whose turns are marked `(s1)` and `(s2)`. Each turn is spoken by its
speaker's voice (hexgrad/kokoro's `KPipeline` at speed 1, split on newlines) while the other speaker's track holds
silence of the same length, so the two tracks run side by side (`para`). The 24 kHz speech then takes the path of a
recorded file: resampled to 16 kHz as `librosa.load` does and loudness-normalised to -23 LUFS (the reference skips
the loudness step for synthesised speech; wav2vec2's input normalisation makes that a no-op for the embeddings, and
the soundtrack comes out as loud as a recorded one).

Everything is read from the weights folder: the model, its voices, and the English part-of-speech tagger that
misaki's grapheme-to-phoneme step needs (spaCy's `en_core_web_sm`, which misaki would otherwise download on first
use).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import librosa
import numpy as np
import torch

from .decode import TARGET_SAMPLE_RATE
from .kokoro_layout import (
    DEFAULT_VOICES,
    KOKORO_CONFIG_NAME,
    KOKORO_REPO,
    KOKORO_SAMPLE_RATE,
    KOKORO_WEIGHTS_NAME,
    LANGUAGES,
    TAGGER_COMPONENTS,
    VOICES,
)
from .loudness import normalize_loudness

MAX_TEXT_CHARS = 10_000  # about 10 minutes of speech, the longest audio a request takes
SPLIT_PATTERN = r"\n+"  # the reference's: each paragraph is synthesised on its own
# A speaker mark: the reference's `(s1)`, `(s2)`; any `(s<digits>)` is read as one so that `(s3)` is refused, not spoken.
SPEAKER_MARK = re.compile(r"\(\s*s\s*(\d+)\s*\)", re.IGNORECASE)


class SpeechInputError(ValueError):
    """A script or voice that cannot be spoken; the message names the input."""


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: int  # 0: person 1, 1: person 2
    text: str


def parse_script(text: str, name: str = "text") -> list[Turn]:
    """The turns of a script: the whole text for person 1, or the `(s1)`/`(s2)` turns of a dialogue, in order."""
    if not text or not text.strip():
        raise SpeechInputError(f"{name}: empty; write what person 1 says (or send a recording as audio)")
    if len(text) > MAX_TEXT_CHARS:
        raise SpeechInputError(
            f"{name}: {len(text)} characters; at most {MAX_TEXT_CHARS} (about 10 minutes of speech) are spoken"
        )
    marks = list(SPEAKER_MARK.finditer(text))
    if not marks:
        return [Turn(0, text.strip())]
    if text[: marks[0].start()].strip():
        raise SpeechInputError(
            f"{name}: words before the first speaker mark ({text[: marks[0].start()].strip()[:40]!r}); a dialogue "
            "starts with (s1) or (s2) and marks every turn"
        )
    turns = []
    for mark, following in zip(marks, marks[1:] + [None], strict=True):
        number = int(mark.group(1))
        if number not in (1, 2):
            raise SpeechInputError(
                f"{name}: {mark.group(0)!r} is not a speaker mark; a dialogue has two speakers, (s1) and (s2)"
            )
        spoken = text[mark.end() : following.start() if following else len(text)].strip()
        if not spoken:
            raise SpeechInputError(f"{name}: the turn after {mark.group(0)!r} is empty; give every turn its words")
        turns.append(Turn(number - 1, spoken))
    return turns


def dialogue_tracks(turns: Sequence[Turn], speak: Callable[[Turn], np.ndarray], speakers: int) -> list[np.ndarray]:
    """One track per speaker, all as long as the whole script: each turn's speech on its speaker's track and silence
    of the same length on the others' (the reference's layout)."""
    spoken = [speak(turn) for turn in turns]
    tracks = []
    for speaker in range(speakers):
        pieces = [audio if turn.speaker == speaker else np.zeros_like(audio) for turn, audio in zip(turns, spoken)]
        tracks.append(np.concatenate(pieces).astype(np.float32, copy=False))
    return tracks


def to_model_rate(track: np.ndarray, sample_rate: int = KOKORO_SAMPLE_RATE) -> np.ndarray:
    """A synthesised track as a recorded one reaches the model: 16 kHz (librosa's default resampler, as
    `load_audio`), -23 LUFS."""
    resampled = librosa.resample(track, orig_sr=sample_rate, target_sr=TARGET_SAMPLE_RATE).astype(np.float32)
    return normalize_loudness(resampled, TARGET_SAMPLE_RATE)


def check_voice(voice: str, name: str) -> str:
    if voice not in VOICES:
        raise SpeechInputError(
            f"{name}: {voice!r} is not a Kokoro voice served here; use one of {', '.join(VOICES)} (a = American "
            "English, b = British English, z = Mandarin Chinese; f = female, m = male)"
        )
    return voice


@dataclasses.dataclass(frozen=True)
class Script:
    """What to say and in which voices: the turns, how many speakers' tracks, each speaker's voice."""

    turns: tuple[Turn, ...]
    speakers: int  # 1, or 2 for a dialogue (marked turns), even if one speaker never talks
    voices: tuple[str, str]


def read_script(text: str, voice: str, second_voice: str, names=("text", "voice", "second_voice")) -> Script:
    """A request's script, checked: the turns, the speaker count, and the voices (each a served voice name)."""
    turns = tuple(parse_script(text, names[0]))
    speakers = 2 if SPEAKER_MARK.search(text) else 1
    return Script(turns, speakers, (check_voice(voice, names[1]), check_voice(second_voice, names[2])))


def speak_tts_audio(
    tts_audio: Mapping[str, str], speech: Speech, seed: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """The reference's TTS input, `input_data["tts_audio"]` = `{"text": ..., "human1_voice": ...[, "human2_voice":
    ...]}`, spoken: each speaker's track (16 kHz, -23 LUFS) and the mix. A voice is a name (`af_heart`) or, as the
    reference writes it, the path of its file in the Kokoro folder (`weights/Kokoro-82M/voices/af_heart.pt`). With
    `human2_voice` the text is a `(s1)`/`(s2)` dialogue on two tracks, as the reference's `process_tts_multi`."""
    voices = [
        Path(tts_audio.get(key, default)).stem for key, default in zip(("human1_voice", "human2_voice"), DEFAULT_VOICES)
    ]
    script = read_script(tts_audio.get("text", ""), *voices, names=("text", "human1_voice", "human2_voice"))
    if "human2_voice" in tts_audio:
        script = dataclasses.replace(script, speakers=2)
    return speech.say(script, seed)


class Speech:
    """Kokoro-82M with a pipeline per language (kokoro's `KPipeline`) and the voices, all loaded at start.

    `say(script)` returns each speaker's track at 16 kHz, loudness-normalised, and their mix (the soundtrack).
    """

    def __init__(self, model, pipelines: dict[str, object], voices: dict[str, torch.Tensor]):
        self.model = model
        self.pipelines = pipelines  # by the voice's first letter: its language (LANGUAGES)
        self.voices = voices

    @property
    def device(self) -> torch.device:
        return self.model.device

    def speak(self, text: str, voice: str, name: str = "text") -> np.ndarray:
        """`text` in `voice`, 24 kHz float32: the reference's `KPipeline(...)(text, voice=..., speed=1,
        split_pattern=r'\\n+')`, its chunks joined."""
        pipeline = self.pipelines[voice[0]]
        with torch.inference_mode():
            results = list(pipeline(text, voice=self.voices[voice], speed=1, split_pattern=SPLIT_PATTERN))
        if not any(character.isalpha() for result in results for character in result.phonemes):
            raise SpeechInputError(
                f"{name}: nothing in {text[:40]!r} can be spoken in {LANGUAGES[voice[0]]} (no words the phonemiser "
                "reads); write the words out, in the voice's language"
            )
        chunks = [result.audio.float().cpu() for result in results if result.audio is not None]
        return torch.cat(chunks).numpy()

    def say(self, script: Script, seed: int | None = None, name: str = "text") -> tuple[list[np.ndarray], np.ndarray]:
        """Each speaker's track at 16 kHz, -23 LUFS, and their sum (the soundtrack). Kokoro's vocoder draws its noise
        and phases from torch's default generator: with a `seed` they are drawn from a fork of it seeded so (the
        caller's generator state is put back), and the same script speaks the same samples."""

        def speak(turn: Turn) -> np.ndarray:
            return self.speak(turn.text, script.voices[turn.speaker], name)

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            spoken = dialogue_tracks(script.turns, speak, script.speakers)
        tracks = [to_model_rate(track) for track in spoken]
        return tracks, np.sum(tracks, axis=0).astype(np.float32)


def load_speech(kokoro_dir: str | Path, tagger_dir: str | Path, device: str | torch.device = "cpu") -> Speech:
    """Kokoro-82M from `kokoro_dir` (config, weights checked key by key, the served voices), misaki's English G2P with
    spaCy's tagger from `tagger_dir`, and its Mandarin G2P; nothing is fetched."""
    from kokoro import KModel  # spaCy and the phonemiser load with it: only where text is served

    kokoro_dir, tagger_dir = Path(kokoro_dir), Path(tagger_dir)
    config = json.loads((kokoro_dir / KOKORO_CONFIG_NAME).read_text())
    weights = kokoro_dir / KOKORO_WEIGHTS_NAME
    model = KModel(repo_id=KOKORO_REPO, config=config, model=str(weights))
    check_loaded(model, torch.load(weights, map_location="cpu", weights_only=True, mmap=True), weights)
    model = model.to(device).eval()
    nlp = load_tagger(tagger_dir)
    pipelines = {code: english_pipeline(model, nlp, british=code == "b") for code in "ab"}
    pipelines["z"] = mandarin_pipeline(model)
    voices = {voice: load_voice(kokoro_dir, voice) for voice in VOICES}
    return Speech(model, pipelines, voices)


def check_loaded(model: torch.nn.Module, published: dict, path: Path) -> None:
    """Strict loading: kokoro falls back to `strict=False` for its published files (each key starts with
    DataParallel's `module.`), so every tensor of the model must have come from `path`, and nothing in it may go
    unused."""
    problems = []
    for part, state in published.items():
        names = {key.removeprefix("module.") for key in state}
        expected = set(getattr(model, part).state_dict())
        if names != expected:
            problems.append(
                f"{part}: missing {sorted(expected - names)[:3]}, unexpected {sorted(names - expected)[:3]}"
            )
    absent = {"bert", "bert_encoder", "predictor", "text_encoder", "decoder"} - set(published)
    if absent or problems:
        raise ValueError(f"{path} does not fit Kokoro-82M: parts absent {sorted(absent)}; {'; '.join(problems)}")


def load_tagger(folder: Path):
    """spaCy's English pipeline from `folder` with only the parts misaki runs (the others are not read)."""
    import spacy

    pipeline = spacy.util.load_config(folder / "config.cfg")["nlp"]["pipeline"]
    return spacy.load(folder, exclude=[name for name in pipeline if name not in TAGGER_COMPONENTS])


def english_pipeline(model, nlp, british: bool):
    """kokoro's `KPipeline` for American (`a`) or British (`b`) English around `model`, with misaki's G2P built on
    the given tagger: `KPipeline.__init__` and `misaki.en.G2P.__init__` would look the tagger up as an installed
    package and download it when missing, and look voices up on the Hub."""
    from kokoro import KPipeline
    from misaki import en, espeak

    class LocalG2P(en.G2P):
        def __init__(self):  # the attributes `en.G2P.__init__` sets (misaki 0.9.4), the tagger given
            self.version, self.british, self.nlp, self.unk = None, british, nlp, ""
            self.lexicon = en.Lexicon(british)
            self.fallback = espeak.EspeakFallback(british=british)  # words outside the lexicon, as the reference

    class LocalPipeline(KPipeline):
        def __init__(self):  # the attributes `KPipeline.__init__` sets (kokoro 0.9.4)
            self.repo_id, self.lang_code, self.model, self.voices = KOKORO_REPO, "b" if british else "a", model, {}
            self.g2p = LocalG2P()

    return LocalPipeline()


def mandarin_pipeline(model):
    """kokoro's `KPipeline` for Mandarin around `model` (misaki's G2P for Kokoro v1.0: jieba's words, pypinyin's
    readings). jieba builds its dictionary here rather than at the first Chinese text, and writes the cache it makes
    of it into a folder removed straight after (its default is a file left in the temp dir)."""
    import jieba
    from kokoro import KPipeline

    with tempfile.TemporaryDirectory(prefix="jieba-") as folder:
        jieba.dt.tmp_dir = folder
        try:
            jieba.initialize()
        finally:
            jieba.dt.tmp_dir = None
    return KPipeline(lang_code="z", repo_id=KOKORO_REPO, model=model)


def load_voice(kokoro_dir: Path, voice: str) -> torch.Tensor:
    """A voice's style table (`[510, 1, 2 x style_dim]`, one row per phoneme count), on the CPU as kokoro takes it."""
    return torch.load(kokoro_dir / "voices" / f"{voice}.pt", map_location="cpu", weights_only=True).float()
