"""What a card gets: the memory plan `setup()` would choose (the same function), the memory it needs, and the
time a request would take, for choosing hardware.

    python -m tools.plan                                    # every GPU of this machine
    python -m tools.plan --name "NVIDIA A40" --capability 8.6 --memory 48 [--host 128] [--count 2] [--json]

`--memory` is the card's memory in GB as sold; the plan is chosen for what a process gets of it (the driver keeps
some). Times are scaled from the passes measured on an H100 80GB HBM3 (bench/RESULTS.md) by the card's published
dense bf16 or fp8 tensor rate, and said to be scaled; a card with no published rate here gets no time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from wan.runtime.plans import Card, UnsupportedCard, plan_for_card

# Dense tensor-core TFLOP/s from the vendors' datasheets (bf16, fp8; None: no fp8), by the name torch reports.
PUBLISHED_TFLOPS: dict[str, tuple[float, float | None]] = {
    "NVIDIA H100 80GB HBM3": (989.0, 1979.0),
    "NVIDIA H100 PCIe": (756.0, 1513.0),
    "NVIDIA H200": (989.0, 1979.0),
    "NVIDIA B200": (2250.0, 4500.0),
    "NVIDIA A100-SXM4-80GB": (312.0, None),
    "NVIDIA A100-SXM4-40GB": (312.0, None),
    "NVIDIA A100 80GB PCIe": (312.0, None),
    "NVIDIA A40": (149.7, None),
    "NVIDIA RTX A6000": (154.8, None),
    "NVIDIA A10": (125.0, None),
    "NVIDIA GeForce RTX 3090": (71.0, None),
    "NVIDIA L40S": (362.0, 733.0),
    "NVIDIA L4": (121.0, 242.5),
    "NVIDIA GeForce RTX 4090": (165.2, 330.3),
}
REFERENCE_CARD = "NVIDIA H100 80GB HBM3"
MEASURED_CARDS = {REFERENCE_CARD, "NVIDIA H200"}  # whole requests were measured on both (the same rates)
# Measured there (bench/RESULTS.md; 2 speakers, 81 frames at 448x896, compiled): a DiT pass in bf16 (cuDNN
# attention) and in fp8; a 10 s clip's VAE in bf16 and the rest of a request (both from the H200, same rates).
MEASURED_PASS_SECONDS = {"bf16": 3.274, "fp8": 2.518}
VAE_SECONDS_10S = 13.3
OTHER_SECONDS_10S = 2.9
PASSES_10S = {"fast": 5 * 4 * 2, "turbo": 5 * 40 * 3}  # clips x steps x passes (turbo before TeaCache's skips)
DRIVER_GIB = 1.0  # what the driver and the CUDA context keep of a card's memory


@dataclasses.dataclass(frozen=True)
class CardReport:
    card: str
    capability: str
    count: int
    supported: bool
    plan: str | None
    dit_weights: str | None  # bf16 | fp8
    placement: str | None  # resident | streamed
    gpu_gib: float | None  # what the plan needs of the card
    host_gib: float | None  # what it keeps in host memory
    reason: str
    seconds_per_pass: float | None
    fast_10s_seconds: float | None
    turbo_10s_seconds_at_most: float | None
    figures: str  # measured | scaled | none


def report(card: Card, count: int = 1) -> CardReport:
    """The plan `setup()` chooses for `card` (`plan_for_card`) and the times scaled to it."""
    capability = f"{card.capability[0]}.{card.capability[1]}"
    try:
        plan = plan_for_card(card)
    except UnsupportedCard as refusal:
        return CardReport(card.name, capability, count, False, None, None, None, None, None, str(refusal), None, None,
                          None, "none")  # fmt: skip
    rates = PUBLISHED_TFLOPS.get(card.name)
    per_pass = fast = turbo = None
    figures = "none"
    if rates is not None and (plan.dit_weights == "bf16" or rates[1] is not None):
        reference = PUBLISHED_TFLOPS[REFERENCE_CARD]
        index = 0 if plan.dit_weights == "bf16" else 1
        scale = reference[index] / rates[index]
        per_pass = MEASURED_PASS_SECONDS[plan.dit_weights] * scale
        rest = VAE_SECONDS_10S * reference[0] / rates[0] + OTHER_SECONDS_10S
        # Several GPUs share a step's passes (one pass per GPU at best).
        fast = PASSES_10S["fast"] * per_pass / min(count, 2) + rest
        turbo = PASSES_10S["turbo"] * per_pass / min(count, 3) + rest
        figures = "measured" if card.name in MEASURED_CARDS else "scaled"
    reason = f"the fastest plan {card.name} computes and holds ({plan.describe()})"
    return CardReport(card.name, capability, count, True, plan.name, plan.dit_weights, plan.dit_placement, plan.gpu_gib,
                      plan.host_gib, reason, per_pass, fast, turbo, figures)  # fmt: skip


def this_machine() -> list[tuple[Card, int]]:
    import torch

    from wan.runtime.placement import card_of

    if not torch.cuda.is_available():
        return []
    return [(card_of(f"cuda:{index}"), 1) for index in range(torch.cuda.device_count())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", help="the card's name as torch reports it, e.g. 'NVIDIA A40'")
    parser.add_argument("--capability", help="compute capability, e.g. 8.6")
    parser.add_argument("--memory", type=float, help="the card's memory in GB, as sold")
    parser.add_argument("--host", type=float, default=None, help="host memory available, GiB (default: not checked)")
    parser.add_argument("--count", type=int, default=1, help="GPUs of this kind in the machine")
    parser.add_argument("--json", action="store_true", help="one JSON object per card")
    args = parser.parse_args(argv)
    if args.name or args.capability or args.memory:
        if not (args.capability and args.memory):
            parser.error("a card on the command line needs --capability and --memory (and --name)")
        major, _, minor = args.capability.partition(".")
        gpu_gib = args.memory * 1e9 / 2**30 - DRIVER_GIB
        cards = [(Card(args.name or "this card", (int(major), int(minor or 0)), gpu_gib, args.host), args.count)]
    else:
        cards = this_machine()
        if not cards:
            print("no CUDA GPU here: describe a card with --name, --capability and --memory", file=sys.stderr)
            return 1
    for card, count in cards:
        result = report(card, count)
        if args.json:
            print(json.dumps(dataclasses.asdict(result)))
            continue
        print(f"{result.card} (compute capability {result.capability}) x {result.count}")
        if not result.supported:
            print(f"  not supported: {result.reason}")
            continue
        print(f"  plan {result.plan}: DiT {result.dit_weights}, {result.placement}; needs {result.gpu_gib:.1f} GiB of "
              f"GPU memory and {result.host_gib:.1f} GiB of host memory")  # fmt: skip
        if result.figures == "none":
            print("  times: no published rate for this card here")
        else:
            print(f"  {result.figures}: {result.seconds_per_pass:.2f} s a DiT pass; a 10 s fast request ~"
                  f"{result.fast_10s_seconds:.0f} s, turbo at most ~{result.turbo_10s_seconds_at_most / 60:.0f} min")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
