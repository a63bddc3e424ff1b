"""Text to speech (`src/audio/speech.py`, the runner's `text` inputs): the script's turns against the reference's own
parsing, the dialogue's layout and the 16 kHz path against hand-built and recorded tracks, Kokoro-82M's loading and
synthesis on the tiny set, and the runner's errors for bad text."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from src.audio import audio_prepare_single, get_embedding, load_speech, load_wav2vec, read_script, speak_tts_audio
from service.weights import SpeechPaths, speech_missing
from src.audio.kokoro_layout import (
    KOKORO_DIR_NAME,
    KOKORO_SAMPLE_RATE,
    KOKORO_WEIGHTS_NAME,
    TAGGER_DIR_NAME,
    VOICES,
    kokoro_files,
)
from src.video import probe_video
from src.audio.speech import MAX_TEXT_CHARS, SpeechInputError, Turn, dialogue_tracks, parse_script, to_model_rate
from support.cog_inputs import run_inputs
from support.synthetic_media import write_media

# The reference's examples (MeiGen-AI/MultiTalk examples/*_tts_1.json) and its dialogue pattern (process_tts_multi).
SINGLE = "Welcome to multi-talk, this is an audio-driven video generation model for multiple person."
DIALOGUE = "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too."
REFERENCE_PATTERN = r"\(s(\d+)\)\s*(.*?)(?=\s*\(s\d+\)|$)"
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def speech(tiny_weights):
    return load_speech(tiny_weights / KOKORO_DIR_NAME, tiny_weights / TAGGER_DIR_NAME)


def test_a_script_without_marks_is_person_1s_whole_text():
    assert parse_script(f"  {SINGLE}\nSecond line.  ") == [Turn(0, f"{SINGLE}\nSecond line.")]
    assert read_script(SINGLE, "af_heart", "am_adam").speakers == 1


@pytest.mark.parametrize("text", [DIALOGUE, "(s2) first\n(s1) second\n\n(s2) third, and (more)", "(s1)solo"])
def test_dialogue_turns_are_the_references(text):
    expected = [(int(speaker) - 1, content.strip()) for speaker, content in re.findall(REFERENCE_PATTERN, text, re.S)]
    assert [(turn.speaker, turn.text) for turn in parse_script(text)] == expected
    assert read_script(text, "af_heart", "am_adam").speakers == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "text: empty"),
        (" \n\t", "text: empty"),
        ("Hello (s1) there", "text: words before the first speaker mark"),
        ("(s1) Hi (s3) you", "text: '(s3)' is not a speaker mark"),
        ("(s1) Hi (s2)  ", "text: the turn after '(s2)' is empty"),
        ("a" * (MAX_TEXT_CHARS + 1), f"text: {MAX_TEXT_CHARS + 1} characters"),
    ],
)
def test_bad_scripts_are_refused_naming_the_input(text, message):
    with pytest.raises(SpeechInputError) as error:
        parse_script(text)
    assert str(error.value).startswith(message)


def test_an_unknown_voice_is_refused_naming_the_input():
    with pytest.raises(SpeechInputError, match=r"^second_voice: 'jf_alpha' is not a Kokoro voice"):
        read_script(DIALOGUE, "af_heart", "jf_alpha")


def test_each_turn_is_on_its_speakers_track_with_silence_on_the_other():
    spoken = {"a": np.array([1, 2, 3], np.float32), "bb": np.array([4, 5, 6, 7, 8], np.float32), "c": np.ones(2)}
    turns = [Turn(0, "a"), Turn(1, "bb"), Turn(0, "c")]
    first, second = dialogue_tracks(turns, lambda turn: spoken[turn.text], speakers=2)
    np.testing.assert_array_equal(first, [1, 2, 3, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(second, [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])
    (only,) = dialogue_tracks(turns[:1], lambda turn: spoken[turn.text], speakers=1)
    np.testing.assert_array_equal(only, [1, 2, 3])


def test_synthesised_speech_reaches_the_model_as_a_recorded_file_would(tmp_path):
    """24 kHz speech resampled and normalised as a 24 kHz recording of it goes through `audio_prepare_single`."""
    t = np.arange(int(1.3 * KOKORO_SAMPLE_RATE)) / KOKORO_SAMPLE_RATE
    speech = (0.05 * np.sin(2 * np.pi * 210 * t) * np.sin(np.pi * 3 * t) ** 2).astype(np.float32)
    path = tmp_path / "speech.wav"
    soundfile.write(path, speech, KOKORO_SAMPLE_RATE, subtype="FLOAT")
    recorded = audio_prepare_single(path)
    synthesised = to_model_rate(speech)
    assert synthesised.dtype == np.float32 and len(synthesised) == round(1.3 * 16000)
    np.testing.assert_allclose(synthesised, recorded, atol=1e-6)


def test_kokoro_is_loaded_strictly(tiny_weights, tmp_path):
    folder = tmp_path / KOKORO_DIR_NAME
    shutil.copytree(tiny_weights / KOKORO_DIR_NAME, folder)
    published = torch.load(folder / KOKORO_WEIGHTS_NAME, weights_only=True)
    published["decoder"].pop(next(iter(published["decoder"])))
    torch.save(published, folder / KOKORO_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"does not fit Kokoro-82M: .*decoder: missing \['encode"):
        load_speech(folder, tiny_weights / TAGGER_DIR_NAME)


def test_a_dialogue_is_spoken_turn_by_turn_in_each_voice(speech):
    tracks, mix = speech.say(read_script(DIALOGUE, "af_heart", "bm_george"))
    turns = [("af_heart", "do you know multi-talk?"), ("bm_george", "yes, I know it, that's amazing!")]
    turns.append(("af_heart", "Me too."))
    spoken = [speech.speak(text, voice) for voice, text in turns]  # each turn alone, 24 kHz
    assert len(tracks) == 2 and len(tracks[0]) == len(tracks[1]) == len(mix)
    boundaries = np.cumsum([0] + [len(audio) for audio in spoken]) * 16000 // KOKORO_SAMPLE_RATE
    assert abs(len(mix) - boundaries[-1]) <= 1
    # Person 2 is silent in person 1's turns and the reverse.
    for index, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        quiet = tracks[1] if turns[index][0] == "af_heart" else tracks[0]
        loud = tracks[0] if turns[index][0] == "af_heart" else tracks[1]
        inner = slice(start + 400, end - 400)  # 25 ms: the resampler's filter reaches across a turn's edge
        assert np.abs(quiet[inner]).max() < 1e-3 * np.abs(loud[inner]).max()
    np.testing.assert_allclose(mix, tracks[0] + tracks[1], atol=1e-7)
    # In another voice the same words sound different.
    assert not np.array_equal(speech.speak(turns[0][1], "am_adam"), spoken[0])


def test_the_references_tts_audio_input(speech):
    """The reference's `tts_audio` (voices as its paths) speaks what the runner's inputs speak."""
    tts_audio = {
        "text": DIALOGUE,
        "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
        "human2_voice": "weights/Kokoro-82M/voices/am_adam.pt",
    }
    tracks, mix = speak_tts_audio(tts_audio, speech, seed=5)
    expected_tracks, expected_mix = speech.say(read_script(DIALOGUE, "af_heart", "am_adam"), seed=5)
    np.testing.assert_array_equal(mix, expected_mix)
    assert len(tracks) == 2
    (single,), _ = speak_tts_audio({"text": "Hello there.", "human1_voice": "af_heart"}, speech)
    assert len(single) > 16000 // 4  # words last a while


def test_mandarin_is_spoken_in_a_mandarin_voice(speech):
    audio = speech.speak("你好，欢迎使用多人对话视频生成模型。", "zf_xiaoxiao")
    assert audio.dtype == np.float32 and len(audio) > KOKORO_SAMPLE_RATE // 2
    phonemes = [result.phonemes for result in speech.pipelines["z"]("你好", voice=speech.voices["zm_yunxi"])]
    assert phonemes == ["ni↓xau↓"]  # pypinyin's ni3 hao3 in misaki's notation: third tones


@pytest.mark.slow
def test_loading_leaves_no_file_in_the_temp_dir(tmp_path):
    """jieba writes a cache of its dictionary where the temp dir is: building the Mandarin pipeline and reading Chinese
    with it leave that dir as it was (a new process: jieba builds its dictionary once per process)."""
    code = (
        "from src.audio.speech import mandarin_pipeline; "
        "assert mandarin_pipeline(model=None).g2p('你好')[0] == 'ni↓xau↓'"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True)
    assert list(tmp_path.iterdir()) == []


def test_text_without_speakable_words_is_refused(speech):
    with pytest.raises(SpeechInputError, match=r"^text: nothing in '!!! ...' can be spoken"):
        speech.speak("!!! ...", "af_heart")


def test_a_seed_speaks_the_same_samples_and_leaves_torchs_generator_alone(speech):
    script = read_script("Hello there.", "af_heart", "am_adam")
    state = torch.random.get_rng_state()
    (first,), _ = speech.say(script, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    (again,), _ = speech.say(script, seed=11)
    (other,), _ = speech.say(script, seed=12)
    np.testing.assert_array_equal(first, again)
    assert len(other) == len(first) and not np.array_equal(other, first)  # the vocoder's noise, not the timing


def _run(runner, **inputs):
    defaults = {"image": str(EXAMPLES / "two_people.png"), "sampling_steps": 2, "seed": 3, "fast": True}
    return runner.run(**run_inputs(**{**defaults, **inputs}))


@pytest.mark.slow
def test_the_runner_speaks_text_into_a_video_as_long_as_the_speech(runner, speech):
    output = _run(runner, text="(s1) Hi there. (s2) Hello!", voice="af_bella", second_voice="am_michael")
    _, mix = speech.say(read_script("(s1) Hi there. (s2) Hello!", "af_bella", "am_michael"), seed=3)
    assert probe_video(output)["frames"] == int(len(mix) / 16000 * 25)


@pytest.mark.slow
def test_a_video_is_dubbed_with_text_instead_of_its_own_sound(runner, speech, tmp_path):
    """InfiniteTalk dubbing with words: the video's own soundtrack (longer than the speech) gives way to the text."""
    frames = np.zeros((60, 48, 64, 3), np.uint8)
    frames[..., 1] = np.arange(60)[:, None, None] * 4
    t = np.arange(int(2.4 * 44100)) / 44100
    video = write_media(tmp_path / "source.mp4", frames=frames, audio=(0.2 * np.sin(2 * np.pi * 200 * t))[None])
    output = _run(runner, image=None, video=str(video), model="infinitetalk", text="Good morning!", fast=False)
    _, mix = speech.say(read_script("Good morning!", "af_heart", "am_adam"), seed=3)
    assert probe_video(output)["frames"] == int(len(mix) / 16000 * 25) < 60


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"text": "Hello", "audio": "examples/person1.wav"}, "text, audio: give the speech as text or as recordings"),
        ({"text": "  "}, "text: empty"),
        ({"text": "(s1) a (s4) b"}, "text: '(s4)' is not a speaker mark"),
        ({"text": "Hello", "person2_bbox": "1,1,5,5"}, "person2_bbox: given without a second speaker"),
        ({}, "audio: give the speech of person 1: a recording as audio, the words as text"),
    ],
)
def test_bad_text_requests_fail_naming_the_input_before_any_work(runner, inputs, message):
    if "audio" in inputs:
        inputs = {**inputs, "audio": str(REPO / inputs["audio"])}
    with pytest.raises(ValueError) as error:
        _run(runner, **inputs)
    assert str(error.value).startswith(message), str(error.value)


def test_the_loudness_step_does_not_reach_the_embeddings(tiny_weights, speech):
    """wav2vec2's feature extractor normalises each utterance (`do_normalize`), so levelling synthesised speech to
    -23 LUFS, which the reference skips, changes the soundtrack only."""
    extractor, encoder = load_wav2vec(tiny_weights / "chinese-wav2vec2-base")
    assert extractor.do_normalize
    (track,), _ = speech.say(read_script("Hello there, how are you?", "af_heart", "am_adam"), seed=1)
    quieter = get_embedding(track * 0.1, extractor, encoder)
    torch.testing.assert_close(get_embedding(track, extractor, encoder), quieter, rtol=1e-4, atol=1e-4)


def test_the_tiny_speech_set_is_the_published_layout(tiny_weights):
    """Every file the service reads for text (`resolve_speech` downloads a folder only when it is missing), and in the
    Kokoro folder nothing else."""
    paths = SpeechPaths(tiny_weights / KOKORO_DIR_NAME, tiny_weights / TAGGER_DIR_NAME)
    assert speech_missing(paths) == []
    written = {str(p.relative_to(paths.kokoro)) for p in paths.kokoro.rglob("*") if p.is_file()}
    assert written == set(kokoro_files()) and len(written) == 2 + len(VOICES)
