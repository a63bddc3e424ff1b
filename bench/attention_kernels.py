"""The DiT's self-attention (1 x 32928 tokens x 40 heads x 128, non-causal) through each kernel the model can run.

torch SDPA's cuDNN backend (`wan.model.attention.attention`), FlashAttention 4
(`wan.model.attention.flash_attention_4`, when `flash_attn.cute` is installed) and cuDNN's fp8 attention
(`wan.model.fp8.fp8_attention`, when `nvidia-cudnn-frontend` is: once with the quantisation of Q, K, V and the
dequantisation of O, once the kernel alone). Each is timed (median of CUDA-event timings after warm-up) and compared
with float32 attention on the first rows.

    python -m bench.attention_kernels [--out results/kernels.json] [--logit-scale 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from wan.model.attention import attention, flash_attention_4, flash_attention_4_available
from wan.model.fp8 import fp8_attention, quantize_tensor

from .attention_shapes import time_ms
from .triton_fp8_attention import fp8_flash_attention, kernel_inputs, triton_fp8_attention

HEADS, HEAD_DIM, TOKENS = 40, 128, 32928
CHECK_ROWS = 512


def tflops(ms: float) -> float:
    return 4 * TOKENS * TOKENS * HEADS * HEAD_DIM / ms / 1e9


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention of the first CHECK_ROWS queries, [B, rows, H, D]."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q[:, :CHECK_ROWS], k, v))
    scores = (qf @ kf.transpose(-1, -2)) * HEAD_DIM**-0.5
    return (scores.softmax(-1) @ vf).transpose(1, 2)


def fp8_kernel_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """cuDNN's fp8 attention on inputs quantised once; the output is dequantised for the error, outside the timing."""
    (q8, descale_q), (k8, descale_k), (v8, descale_v) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    op = torch.ops.multitalk.cudnn_fp8_attention
    return lambda: op(q8, k8, v8, descale_q, descale_k, descale_v)


def triton_kernel_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **config) -> Callable[[], torch.Tensor]:
    """The Triton fp8 kernel on inputs quantised once (V transposed); `config`: its tile sizes, warps and stages."""
    inputs = kernel_inputs(q, k, v)
    return lambda: fp8_flash_attention(*inputs, **config)


def cudnn_fp8_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """Every execution plan cuDNN offers for the model's fp8 attention graph (heuristics A, B and the fallback),
    each on inputs quantised once; the model runs the first of A's (`wan.model.fp8._fp8_attention_plan`)."""
    import cudnn

    from wan.model.fp8 import _bhsd, fp8_attention_graph, fp8_attention_pack

    (q8, descale_q), (k8, descale_k), (v8, descale_v) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    handle = cudnn.create_handle()
    graph, tensors = fp8_attention_graph(cudnn, handle, _bhsd(q8), _bhsd(k8), _bhsd(v8))
    try:
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    except Exception as error:  # heuristics B is not offered for every graph
        print(f"heuristics B: {str(error)[:200]}; A and the fallback only", flush=True)
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    built = []
    for index in range(graph.get_execution_plan_count()):
        try:
            graph.build_plan_at_index(index)
            built.append(index)
        except Exception as error:
            print(f"cuDNN fp8 plan {index}: not built ({str(error)[:200]})", flush=True)
    out = torch.empty_like(q8)
    amax = torch.empty(2, 1, 1, 1, 1, device=q.device)
    pack = fp8_attention_pack(tensors, q8, k8, v8, (descale_q, descale_k, descale_v), out, amax)
    plans = []
    for index in built:
        workspace = torch.empty(graph.get_workspace_size_plan_at_index(index), device=q.device, dtype=torch.uint8)

        def run(index=index, workspace=workspace):
            graph.execute_plan_at_index(pack, workspace, index, handle=handle)
            return out

        plans.append((f"cuDNN fp8 plan {index} {graph.get_plan_name_at_index(index)}", run))
    return plans


# (block_m, block_n, num_warps, num_stages, warp_specialize) tried by --sweep
TRITON_CONFIGS = [(128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 128, 8, 4, False), (128, 64, 4, 3, False),
                  (128, 128, 4, 3, False), (128, 256, 8, 2, False), (256, 128, 8, 2, False), (256, 64, 8, 3, False),
                  (128, 128, 8, 2, True), (128, 128, 4, 2, True), (128, 128, 8, 3, True)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--logit-scale", type=float, default=1.0, help="multiply q: sharper softmax, harder for fp8")
    parser.add_argument("--sweep", action="store_true", help="the Triton fp8 kernel under each of TRITON_CONFIGS")
    parser.add_argument("--cudnn-plans", action="store_true", help="every execution plan cuDNN has for fp8 attention")
    args = parser.parse_args()
    generator = torch.Generator("cuda").manual_seed(0)
    # The model's layout: [B, L, H, D] slices of one [L, 3 * H * D] projection output.
    qkv = torch.randn(1, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
    q, k, v = qkv.unbind(2)
    q = q * args.logit_scale
    ref = reference(q, k, v)
    # The fp8 output of the kernel alone is scaled by 224 / amax(v) (wan.model.fp8._OUT_RANGE).
    out_descale = quantize_tensor(v)[1].reshape(()) * 2

    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = [("torch SDPA, cuDNN, bf16", lambda: attention(q, k, v))]
    if flash_attention_4_available(q.device):
        candidates.append(("FlashAttention 4, bf16", lambda: flash_attention_4(q, k, v)))
    try:
        import cudnn  # noqa: F401  (the frontend of the fp8 path)

        candidates.append(("cuDNN fp8, with (de)quantisation", lambda: fp8_attention(q, k, v)))
        candidates.append(("cuDNN fp8, kernel alone", fp8_kernel_alone(q, k, v)))
    except ImportError:
        print("nvidia-cudnn-frontend is not installed: no cuDNN fp8 rows")
    if args.cudnn_plans:
        candidates.extend(cudnn_fp8_plans(q, k, v))
    candidates.append(("Triton fp8, with (de)quantisation", lambda: triton_fp8_attention(q, k, v)))
    candidates.append(("Triton fp8, kernel alone", triton_kernel_alone(q, k, v)))
    if args.sweep:
        for bm, bn, warps, stages, ws in TRITON_CONFIGS:
            config = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages, warp_specialize=ws)
            name = f"Triton fp8 {bm}x{bn} w{warps} s{stages}" + (" ws" if ws else "")
            candidates.append((name, triton_kernel_alone(q, k, v, **config)))

    rows = []
    for name, run in candidates:
        start = time.perf_counter()
        try:
            out = run()
            torch.cuda.synchronize()
        except Exception as error:  # a sweep's configuration that does not fit the card (shared memory, registers)
            print(f"{name[:60]:60s} failed: {str(error)[:200]}", flush=True)
            rows.append({"kernel": name, "error": str(error)[:500]})
            continue
        first_s = time.perf_counter() - start
        if out.dtype == torch.float8_e4m3fn:
            out = out.float() * out_descale
        err = ((out[:, :CHECK_ROWS].float() - ref).norm() / ref.norm()).item()
        ms = time_ms(run)
        rows.append({"kernel": name, "ms": ms, "tflops": tflops(ms), "rel_err": err, "first_call_s": first_s})
        print(
            f"{name[:60]:60s} {ms:8.2f} ms {tflops(ms):6.0f} TFLOP/s  rel.err {err:.4f}  first {first_s:.1f}s",
            flush=True,
        )
    if args.out:
        info = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version())
        args.out.write_text(json.dumps({**info, "logit_scale": args.logit_scale, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
