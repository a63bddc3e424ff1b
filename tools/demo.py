"""One video from the example inputs through the real runner (predict.py), as cog would call it.

    python -m tools.demo --weights DIR        (make demo: the tiny random weights, thumbnails, on a CPU)

Inputs go through cog's own input check (defaults, ranges, choices), then `Runner.setup()` and `run()`;
the mp4 is moved to `.cache/demo/` and its path printed.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from cog import _inspector

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="dir holding the three checkpoint folders, or a tar URL (default: weights/)")
    parser.add_argument("--image", type=Path, default=EXAMPLES / "two_people.png")
    parser.add_argument("--audio", type=Path, default=EXAMPLES / "person1.wav")
    parser.add_argument("--second-audio", type=Path, default=EXAMPLES / "person2.wav")
    parser.add_argument("--one-speaker", action="store_true", help="drive only person 1")
    parser.add_argument("--num-frames", type=int, default=None, help="frames at 25 fps (default: as long as the audio)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "demo")
    args = parser.parse_args()

    from predict import Runner

    inputs = {"image": str(args.image), "audio": str(args.audio), "audio_type": "para", "seed": args.seed}
    inputs |= {k: v for k, v in (("num_frames", args.num_frames), ("sampling_steps", args.sampling_steps)) if v}
    if not args.one_speaker:
        inputs["second_audio"] = str(args.second_audio)
    kwargs = _inspector.check_input(_inspector.create_predictor("predict", "Runner").inputs, inputs)

    started = time.monotonic()
    runner = Runner()
    runner.setup(weights=args.weights)
    print(f"setup: {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    output = Path(runner.run(**kwargs))
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / output.name
    shutil.move(output, target)
    print(f"run: {time.monotonic() - started:.1f}s")
    print(f"video written to {target}")


if __name__ == "__main__":
    main()
