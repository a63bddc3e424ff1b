"""Time the DiT's attention shapes under each SDPA backend (and a plain matmul-softmax for the short ones).

python -m bench.attention_shapes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
HEADS, HEAD_DIM, TOKENS, FRAMES = 40, 128, 32928, 21
# (name, batch, q tokens, k tokens): the self-attention, the two cross-attentions, audio per latent frame.
SHAPES = [
    ("self", 1, TOKENS, TOKENS),
    ("text", 1, TOKENS, 512),
    ("image", 1, TOKENS, 257),
    ("audio_1p", FRAMES, TOKENS // FRAMES, 32),
    ("audio_2p", FRAMES, TOKENS // FRAMES, 64),
    ("ref_map", 1, TOKENS, TOKENS // FRAMES),
]


def matmul_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.float().softmax(-1).to(q.dtype) @ v


def time_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    print(f"{'shape':10s} " + " ".join(f"{n:>10s}" for n in [*BACKENDS, "matmul", "cudnn_BLHD"]))
    for name, batch, lq, lk in SHAPES:
        q = torch.randn(batch, HEADS, lq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        k = torch.randn(batch, HEADS, lk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        v = torch.randn(batch, HEADS, lk, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        row = []
        for backend in BACKENDS.values():
            try:
                with sdpa_kernel(backend):
                    row.append(time_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
            except RuntimeError:
                row.append(float("nan"))
        row.append(time_ms(lambda: matmul_softmax(q, k, v)) if lk <= 2048 else float("nan"))
        # The same tensors in the sequence-major layout the DiT's linears produce ([B, L, H, D] viewed as BHLD).
        qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(BACKENDS["cudnn"]):
            row.append(time_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs)))
        print(f"{name:10s} " + " ".join(f"{t:10.3f}" for t in row), flush=True)


if __name__ == "__main__":
    main()
