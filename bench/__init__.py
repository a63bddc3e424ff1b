"""GPU benchmarks (bench/README.md, figures in bench/RESULTS.md); helpers shared by the scripts and tests/gpu.

The scripts are clients of `wan`: they import it as any user does (`wan.model.*` needs only torch, so the DiT scripts
run without the service's libraries). Two revisions are compared in separate processes by `bench.compare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import statistics
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from wan.configs import MULTITALK_14B, DiTConfig
from wan.runtime.placement import place_dit
from wan.runtime.plans import RESIDENT, MemoryPlan
from wan.model.attention import attention, flash_attention_4, flash_attention_4_available
from wan.model.dit import MultiTalkDiT

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

# The golden cases' tiny DiT (tests/data/golden/dit_1p), with the fields the reference fixes in code.
TINY_DIT = dict(
    text_len=24, dim=64, ffn_dim=128, text_dim=32, num_heads=4, num_layers=2, intermediate_dim=8, output_dim=64
)

# SDPA backends; "fa4": FlashAttention 4 for the blocks' self-attention (`MultiTalkDiT.set_self_attention`), SDPA's
# own choice for the rest; "fp8-triton" (with fp8 blocks): the Triton fp8 self-attention of bench/triton_fp8_attention.
ATTENTION_CHOICES = ("sdpa", "cudnn", "flash", "efficient", "math", "fa4", "fp8-triton")


def tiny_config() -> DiTConfig:
    return DiTConfig(**TINY_DIT)


def full_config() -> DiTConfig:
    return MULTITALK_14B


@torch.no_grad()
def fill_random_(name: str, param: torch.Tensor, generator: torch.Generator) -> None:
    """One parameter's random values, by its role: matrices N(0, 1/fan_in), biases N(0, 0.02²), norm scales
    1 + N(0, 0.02²). Keeps activations O(1) through many layers, so timings are taken on realistic values."""
    if name.endswith("bias"):
        param.normal_(0.0, 0.02, generator=generator)
    elif param.numel() == param.shape[0]:  # a per-channel scale, whatever its trailing singleton dims
        param.normal_(1.0, 0.02, generator=generator)
    else:
        param.normal_(0.0, (param.numel() // param.shape[0]) ** -0.5, generator=generator)


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def init_random_(model: nn.Module, generator: torch.Generator, seed: int | None = None) -> None:
    """Fill every parameter in place on its own device (`fill_random_`), drawing from `generator` in turn or, with
    `seed`, each from its own stream (the seed and its name), so that one can be drawn again alone
    (`RandomSource.tensor_reader`)."""
    for name, param in model.named_parameters():
        if seed is not None:
            generator.manual_seed(parameter_seed(seed, name))
        fill_random_(name, param, generator)
    if any(True for _ in model.buffers()):
        raise RuntimeError("model has buffers, which to_empty() leaves uninitialised")


def build_random(
    make: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
    seed: int | None = None,
) -> nn.Module:
    """Construct on the meta device, cast, then allocate once on `device` and fill with random values (no CPU copy;
    `seed`: see `init_random_`)."""
    with torch.device("meta"):
        model = make()
    model = model.to(dtype).to_empty(device=device)
    init_random_(model, generator, seed)
    return model.eval().requires_grad_(False)


@dataclasses.dataclass(frozen=True)
class RandomSource:
    """Random DiT weights, the same on every device (one seed), for `wan.runtime.workers.WorkerGroup` and the
    in-process DiT: picklable, so each worker process builds its own copy on its GPU, placed by the group's memory
    plan. Each tensor has its own random stream, so `tensor_reader` draws it again as the checkpoint reader reads it
    back: LoRA merges are undone, and merged into fp8 weights, as with the published files."""

    config: DiTConfig
    dtype: torch.dtype
    seed: int = 1234

    def build(self, device: torch.device, plan: MemoryPlan = RESIDENT) -> MultiTalkDiT:
        model = build_random(lambda: MultiTalkDiT(self.config), device, self.dtype, torch.Generator(device), self.seed)
        place_dit(model, plan, device)
        return model

    def tensor_reader(self, device: torch.device) -> Callable[[str], torch.Tensor]:
        with torch.device("meta"):
            shapes = {name: p.shape for name, p in MultiTalkDiT(self.config).named_parameters()}
        generator = torch.Generator(device)

        def read(name: str) -> torch.Tensor:
            tensor = torch.empty(shapes[name], dtype=self.dtype, device=device)
            generator.manual_seed(parameter_seed(self.seed, name))
            fill_random_(name, tensor, generator)
            return tensor

        return read

    def audio_layer_sets(self) -> dict:
        return {}


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """SDPA restricted to one backend, falling back (in this order) to flash, efficient, math for shapes or dtypes
    the chosen one does not take. `sdpa` (and `fa4`, whose other attentions use SDPA) leaves torch's own choice."""
    if name in ("sdpa", "fa4", "fp8-triton"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    backends = [order[name]] + [b for key, b in order.items() if key not in (name, "cudnn")]
    try:
        context = sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without priorities: the set is still restricted, the order is torch's
        context = sdpa_kernel(backends)
    with context:
        yield


def backend_supports(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """'ok' if SDPA with only backend `name` runs on these `[B, L, heads, d]` tensors, else the error's first line."""
    if name in ("sdpa", "fa4", "fp8-triton"):
        return "ok"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    try:
        with sdpa_kernel([backend]), torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        return "ok"
    except RuntimeError as err:
        return str(err).strip().splitlines()[0][:200]


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls and convolutions without TF32 inside the block; the previous settings are restored."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclasses.dataclass
class Timing:
    first_s: float  # the first call, wall clock: includes compilation, autotuning and handle creation
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def summary(self) -> dict:
        return dict(
            first_s=self.first_s,
            startup_s=self.first_s - self.median_s,  # compile, autotuning, first-call costs
            median_s=self.median_s,
            min_s=min(self.times_s),
            max_s=max(self.times_s),
            times_s=self.times_s,
        )


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[Timing, object]:
    """`warmup` untimed calls (at least one), then `repeats` calls timed one by one (CUDA events on a GPU, the
    host clock after a synchronize elsewhere). Returns the timing and the last call's result."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup, 1) - 1):
        result = fn()
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        else:
            begin_s = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - begin_s)
    return Timing(first, times), result


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> dict:
    """‖a − t‖ / ‖t‖ and max |a − t| in float64; non-finite values make both infinite."""
    a, t = actual.detach().double(), truth.detach().double().to(actual.device)
    if not torch.isfinite(a).all():
        return dict(rel=float("inf"), max_abs=float("inf"), finite=False)
    diff = a - t
    return dict(rel=(diff.norm() / t.norm()).item(), max_abs=diff.abs().max().item(), finite=True)


def environment(device: torch.device) -> dict:
    """What ran: card, software, date, commit."""
    import datetime
    import subprocess

    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        fa3_installed=importlib.util.find_spec("flash_attn_interface") is not None,
    )

    def git(*args: str) -> str:
        command = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    try:  # a copy of the tree (git archive) has no .git
        info["commit"] = git("rev-parse", "HEAD")
        info["wan_dirty"] = bool(git("status", "--porcelain", "wan"))
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def set_self_attention(model: nn.Module, name: str) -> str | None:
    """Give the model's blocks the self-attention kernel that attention choice `name` means; None, or why not."""
    if name != "fa4":
        model.set_self_attention(attention)
        return None
    if not flash_attention_4_available(next(model.parameters()).device):
        return "flash_attn.cute (FA4) is not installed or not usable on this device"
    model.set_self_attention(flash_attention_4)
    return None
