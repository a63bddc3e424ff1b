"""`python -m tools.plan`: the plan `setup()` chooses (the same function) and its needs for a card described on the
command line, as one JSON object, with times scaled from the measured card by published rates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from support import REPO_ROOT
from tools.plan import DRIVER_GIB, main
from wan.runtime.plans import Card, plan_for_card

KEYS = {"supported", "plan", "dit_weights", "placement", "gpu_gib", "host_gib", "reason"}


def run(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "name, capability, memory, plan, weights, placement",
    [
        ("NVIDIA A40", "8.6", 48, "streamed_bf16", "bf16", "streamed"),
        ("NVIDIA L40S", "8.9", 48, "fp8", "fp8", "resident"),
        ("NVIDIA H100 80GB HBM3", "9.0", 80, "resident", "bf16", "resident"),
    ],
)
def test_a_described_card_gets_the_plan_setup_would_choose(capsys, name, capability, memory, plan, weights, placement):
    result = run(capsys, "--name", name, "--capability", capability, "--memory", str(memory))
    assert KEYS <= set(result) and result["supported"] is True
    assert (result["plan"], result["dit_weights"], result["placement"]) == (plan, weights, placement)
    major, minor = map(int, capability.split("."))
    chosen = plan_for_card(Card(name, (major, minor), memory * 1e9 / 2**30 - DRIVER_GIB))
    assert (
        result["plan"] == chosen.name and result["gpu_gib"] == chosen.gpu_gib and result["host_gib"] == chosen.host_gib
    )
    assert result["figures"] == ("measured" if name == "NVIDIA H100 80GB HBM3" else "scaled")
    assert run(capsys, "--name", "NVIDIA H200", "--capability", "9.0", "--memory", "141")["figures"] == "measured"


def test_the_measured_card_gets_its_measured_pass_and_others_scale_by_their_rate(capsys):
    h100 = run(capsys, "--name", "NVIDIA H100 80GB HBM3", "--capability", "9.0", "--memory", "80")
    a100 = run(capsys, "--name", "NVIDIA A100-SXM4-80GB", "--capability", "8.0", "--memory", "80")
    assert h100["seconds_per_pass"] == pytest.approx(3.274)  # bench/RESULTS.md, 2 speakers, bf16
    assert a100["seconds_per_pass"] == pytest.approx(3.274 * 989 / 312)  # the published bf16 rates
    two = run(capsys, "--name", "NVIDIA A100-SXM4-80GB", "--capability", "8.0", "--memory", "80", "--count", "2")
    assert two["fast_10s_seconds"] < a100["fast_10s_seconds"]


def test_an_unsupported_card_says_why(capsys):
    result = run(capsys, "--name", "Tesla T4", "--capability", "7.5", "--memory", "16")
    assert result["supported"] is False and result["plan"] is None
    assert "no bfloat16" in result["reason"] and "smallest card that works" in result["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command reports it")
def test_this_machine_without_a_gpu_is_told_what_to_give():
    done = subprocess.run([sys.executable, "-m", "tools.plan"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "--capability and --memory" in done.stderr
