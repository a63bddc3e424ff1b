"""Text to speech on a GPU: Kokoro-82M at its published size (random weights), as a request speaks 10 s of text.

    python -m bench.speech_check --out results/speech.json        # < 1 min on an H100
    python -m bench.speech_check --tiny --out /tmp/speech.json    # the script itself, on the CPU

The model is written in the published layout (`src/audio/kokoro_layout.py`'s `write_kokoro` at the published size,
81.7 M parameters) and loaded by kokoro's `KModel`, then parked in page-locked host memory as the service keeps it. Timed,
median of 5 after 2 warm-ups: bringing the weights to the GPU and back, and Kokoro's forward pass over the phonemes
of a paragraph, fp32 as kokoro runs it. Random weights speak at whatever rate they draw, so the duration head is set
to 2 frames (50 ms) a phoneme: the paragraph's 199 phonemes and its two boundary tokens are 10.05 s of audio.

The phonemes are given, not derived: misaki's G2P (spaCy's tagger, the lexicon) runs on the CPU in milliseconds for
a paragraph, and where kokoro's phonemisers are not installed (a bare GPU machine) the script imports kokoro's model
alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from wan.runtime.streaming import ParkedWeights

from . import environment

REPO = Path(__file__).resolve().parents[1]

# misaki's American English for: "Welcome to MultiTalk. This video was made from one photo and a few lines of text:
# the speech you hear was synthesised first, and the faces move in time with every word of it. Thanks for watching!"
PHONEMES = (
    "wˈɛlkəm tə mˈʌltI tˈɔk. ðˌɪs vˈɪdiO wʌz mˌAd fɹʌm wˈʌn fˈOTO ænd ˈA fjˈu lˈInz ʌv tˈɛkst: ðə spˈiʧ ju hˈɪɹ "
    "wʌz sˈɪnθəsˌIzd fˈɜɹst ænd ðə fˈAsᵻz mˈuv ˈɪn tˈIm wɪð ˈɛvəɹi wˈɜɹd ʌv ɪt θˈæŋks fɔɹ wˈɑʧɪŋ!"
)
FRAMES_PER_PHONEME = 2  # 25 ms frames (600 samples at 24 kHz)


def import_kokoro_model():
    """kokoro's `KModel`; without its phonemisers installed, from its module alone (the package's `__init__` imports
    the pipeline, which imports spaCy and espeak)."""
    try:
        from kokoro import KModel

        return KModel
    except ImportError:
        spec = importlib.util.find_spec("kokoro")
        package = types.ModuleType("kokoro")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kokoro"] = package
        return importlib.import_module("kokoro.model").KModel


def module_from_file(name: str, path: Path) -> types.ModuleType:
    """One module of the repository by its path, without its package's `__init__` (`src.audio` imports the media
    libraries, which a bare GPU machine lacks)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny Kokoro on the CPU: checks the script")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    layout = module_from_file("kokoro_layout", REPO / "src" / "audio" / "kokoro_layout.py")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    env = environment(device)
    print(f"{env['device_name']} | torch {env['torch']} | {env['date']} | commit {env['commit']}", flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    KModel = import_kokoro_model()
    with tempfile.TemporaryDirectory(prefix="kokoro-") as folder:
        folder = Path(folder)
        started = time.perf_counter()
        layout.write_kokoro(folder, layout.kokoro_config(sorted(set(PHONEMES)), published_size=not args.tiny))
        model = KModel(layout.KOKORO_REPO, str(folder / layout.KOKORO_CONFIG_NAME), folder / layout.KOKORO_WEIGHTS_NAME)
        voice = torch.load(folder / "voices" / "af_heart.pt", weights_only=True)
        written_s = time.perf_counter() - started
    model = model.eval()
    head = model.predictor.duration_proj.linear_layer
    with torch.no_grad():  # every phoneme FRAMES_PER_PHONEME frames: sigmoid(b) x max_dur = that, rounded
        head.weight.zero_()
        head.bias.fill_(torch.logit(torch.tensor((FRAMES_PER_PHONEME + 0.1) / head.out_features)).item())
    parameters = sum(p.numel() for p in model.parameters())
    # As the service keeps it (`SpeakerOnDevice`): in page-locked host memory, on the GPU for each script.
    parked = ParkedWeights(model, device) if device.type == "cuda" else None

    def speak() -> tuple[int, float]:
        """The weights to the GPU, one pass over the paragraph, the audio back to the host: samples, seconds."""
        sync()
        started = time.perf_counter()
        with parked.on_device() if parked else contextlib.nullcontext(), torch.inference_mode():
            audio = model(PHONEMES, voice[len(PHONEMES) - 1].to(model.device), 1).float().cpu()
        sync()
        return audio.numel(), time.perf_counter() - started

    def round_trip() -> float:
        sync()
        started = time.perf_counter()
        if parked:
            with parked.on_device():
                sync()
        return time.perf_counter() - started

    for _ in range(2):
        speak()
    runs = [speak() for _ in range(args.repeats)]
    samples = runs[0][0]
    trips = [round_trip() for _ in range(args.repeats)]
    result = dict(
        env=env,
        parameters=parameters,
        phonemes=len(PHONEMES),
        audio_s=samples / layout.KOKORO_SAMPLE_RATE,
        synthesis_s=statistics.median(seconds for _, seconds in runs),
        times_s=[seconds for _, seconds in runs],
        weights_round_trip_s=statistics.median(trips),
        written_and_loaded_s=written_s,
        peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    result["real_time_factor"] = result["synthesis_s"] / result["audio_s"]
    print(
        f"Kokoro ({parameters / 1e6:.1f} M parameters): {result['audio_s']:.2f} s of speech in "
        f"{result['synthesis_s'] * 1000:.0f} ms (weights in and out {result['weights_round_trip_s'] * 1000:.0f} ms), "
        f"{1 / result['real_time_factor']:.0f}x real time; peak {result['peak_GiB'] or 0:.2f} GiB",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
