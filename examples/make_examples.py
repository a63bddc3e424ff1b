"""Regenerate the demo inputs: a drawing of two faces and two short speech-like recordings, all synthetic.

    python examples/make_examples.py

Deterministic (fixed seeds, no global RNG), so rerunning reproduces the committed files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw
from scipy.signal import lfilter

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
# First three formants (Hz) of five vowels, average adult values.
VOWELS = {
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (270, 2290, 3010),
    "o": (570, 840, 2410),
    "u": (300, 870, 2240),
}


def draw_face(draw: ImageDraw.ImageDraw, cx: int, cy: int, skin: str, hair: str, shirt: str) -> None:
    draw.rectangle((cx - 52, cy + 58, cx + 52, 256), fill=shirt)  # shoulders
    draw.rectangle((cx - 14, cy + 40, cx + 14, cy + 64), fill=skin)  # neck
    draw.ellipse((cx - 46, cy - 62, cx + 46, cy + 24), fill=hair)
    draw.ellipse((cx - 40, cy - 50, cx + 40, cy + 50), fill=skin)
    for dx in (-16, 16):
        draw.ellipse((cx + dx - 7, cy - 14, cx + dx + 7, cy - 4), fill="white")
        draw.ellipse((cx + dx - 3, cy - 12, cx + dx + 3, cy - 6), fill="#3b2a1a")
        draw.line((cx + dx - 9, cy - 22, cx + dx + 9, cy - 24), fill=hair, width=3)
    draw.line((cx, cy - 4, cx - 4, cy + 12), fill="#b07050", width=2)
    draw.chord((cx - 16, cy + 14, cx + 16, cy + 34), 0, 180, fill="#a0404a")


def make_image(path: Path) -> None:
    image = Image.new("RGB", (256, 256), "#cfd8e3")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 170, 256, 256), fill="#8a9bb0")  # a table line behind them
    draw_face(draw, 68, 120, skin="#e8b896", hair="#2e1f14", shirt="#3f6fa0")
    draw_face(draw, 188, 116, skin="#c98e6a", hair="#6b3e1f", shirt="#a04848")
    image.save(path, optimize=True)


def resonator(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    """Second-order all-pole resonance (a formant) with unit gain at 0 Hz."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    a = [1.0, -2 * r * np.cos(2 * np.pi * frequency / SAMPLE_RATE), r * r]
    return lfilter([sum(a)], a, signal)


def speech_like(seconds: float, f0: float, vowels: str, seed: int) -> np.ndarray:
    """Voiced syllables (harmonic source, vowel formants, falling pitch) with noisy onsets and short pauses."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    t = 0.08
    for k, vowel in enumerate(vowels):
        length = rng.uniform(0.14, 0.24)
        if t + length > seconds - 0.05:
            break
        start, stop = int(t * SAMPLE_RATE), int((t + length) * SAMPLE_RATE)
        time = np.arange(stop - start) / SAMPLE_RATE
        pitch = f0 * (1.1 - 0.2 * (t / seconds)) * (1 + 0.04 * np.sin(2 * np.pi * 3 * time + k))
        phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
        source = sum(np.cos(h * phase) / h for h in range(1, int(3800 / f0)))
        voiced = source
        for formant, bandwidth in zip(VOWELS[vowel], (80, 100, 140)):
            voiced = voiced + 0.6 * resonator(source, formant, bandwidth)
        envelope = np.sin(np.pi * np.linspace(0, 1, stop - start)) ** 0.7
        out[start:stop] += voiced * envelope
        burst = min(int(0.03 * SAMPLE_RATE), stop - start)  # a consonant-like noise onset
        out[start : start + burst] += 0.3 * np.diff(rng.standard_normal(burst + 1)) * np.hanning(burst) * voiced.std()
        t += length + (rng.uniform(0.15, 0.3) if k % 4 == 3 else rng.uniform(0.01, 0.05))
    return 0.5 * out / np.abs(out).max()


def main() -> None:
    make_image(HERE / "two_people.png")
    soundfile.write(HERE / "person1.wav", speech_like(2.0, 120, "aeoiuaoeaiu", seed=1), SAMPLE_RATE, "PCM_16")
    soundfile.write(HERE / "person2.wav", speech_like(2.0, 210, "ioaeuiaoei", seed=2), SAMPLE_RATE, "PCM_16")


if __name__ == "__main__":
    main()
