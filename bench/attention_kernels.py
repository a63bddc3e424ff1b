"""The DiT's self-attention (1 x 32928 tokens x 40 heads x 128, non-causal) through every kernel within reach.

torch SDPA's cuDNN backend (what `wan.attention` runs), the cuDNN graph API with each of its engine plans in bf16 and
in fp8 (per-tensor scaled e4m3 Q/K/V), and FlashAttention 4's Hopper kernel (`flash_attn.cute`), when installed.
Each is timed (median of CUDA-event timings after warm-up) and compared with float32 attention on the first rows.

    python -m bench.attention_kernels [--out PATH.json] [--only torch,cudnn,fa4]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_shapes import time_ms

HEADS, HEAD_DIM, TOKENS = 40, 128, 32928
CHECK_ROWS = 512
FP8_MAX = 448.0  # largest finite e4m3 value


def tflops(ms: float) -> float:
    return 4 * TOKENS * TOKENS * HEADS * HEAD_DIM / ms / 1e9


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out[:, :CHECK_ROWS].float() - ref
    return (diff.norm() / ref.norm()).item()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention of the first CHECK_ROWS queries, [B, rows, H, D]."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q[:, :CHECK_ROWS], k, v))
    scores = (qf @ kf.transpose(-1, -2)) * HEAD_DIM**-0.5
    return (scores.softmax(-1) @ vf).transpose(1, 2)


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3 quantisation: (values, descale) with t ~= values * descale."""
    amax = t.abs().amax().float().clamp(min=1e-12)
    return (t.float() * (FP8_MAX / amax)).to(torch.float8_e4m3fn), (amax / FP8_MAX).reshape(1, 1, 1, 1)


def torch_cudnn(q, k, v) -> Callable[[], torch.Tensor]:
    def run():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )

    return run


def cudnn_graph_plans(q, k, v, fp8: bool) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """One runner per engine plan that builds; inputs/outputs in the model's [B, L, H, D] memory layout."""
    torch.backends.cudnn.version()  # load torch's libcudnn first: the frontend binds to an already-loaded one
    import cudnn

    maps = {line.split()[-1] for line in open("/proc/self/maps") if "libcudnn.so" in line}
    print(f"loaded: {sorted(maps)}")
    versions = cudnn.__version__, cudnn.backend_version(), torch.backends.cudnn.version()
    print("cudnn frontend {}, backend {}, torch's {}".format(*versions))
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    io_type = cudnn.data_type.FP8_E4M3 if fp8 else cudnn.data_type.BFLOAT16
    graph = cudnn.pygraph(
        io_data_type=io_type,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    if fp8:
        (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
        inputs = {"q": q8, "k": k8, "v": v8}
    else:
        inputs = {"q": q, "k": k, "v": v}
    tensors = {
        name: graph.tensor(name=name, dim=list(t.transpose(1, 2).shape), stride=list(t.transpose(1, 2).stride()),
                           data_type=io_type)
        for name, t in inputs.items()
    }
    out = torch.empty_like(q)
    o_view = out.transpose(1, 2)
    pack = {}
    if fp8:
        scalar = lambda name: graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                           data_type=cudnn.data_type.FLOAT)
        names = ["descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"]
        scalars = {n: scalar(n) for n in names}
        # P lies in [0, 1]: scale it onto e4m3's range. O is a convex combination of V rows: bounded by amax(V).
        values = {
            "descale_q": dq, "descale_k": dk, "descale_v": dv,
            "descale_s": torch.full((1, 1, 1, 1), 1 / FP8_MAX, device=q.device),
            "scale_s": torch.full((1, 1, 1, 1), FP8_MAX, device=q.device),
            "scale_o": 1 / dv,
        }
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"], **scalars, is_inference=True,
            attn_scale=HEAD_DIM**-0.5, name="sdpa_fp8",
        )
        amax = {n: torch.empty((1, 1, 1, 1), device=q.device) for n in ("amax_s", "amax_o")}
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        pack.update({scalars[n]: values[n] for n in names})
        pack.update({amax_s: amax["amax_s"], amax_o: amax["amax_o"]})
    else:
        o, _ = graph.sdpa(q=tensors["q"], k=tensors["k"], v=tensors["v"], is_inference=True,
                          attn_scale=HEAD_DIM**-0.5, name="sdpa")
    # On Hopper cuDNN's fp8 attention writes O in fp8 only (bf16 output needs Blackwell).
    if fp8:
        out8 = torch.empty_like(q, dtype=torch.float8_e4m3fn)
    o.set_output(True).set_dim(list(o_view.shape)).set_stride(list(o_view.stride())).set_data_type(
        cudnn.data_type.FP8_E4M3 if fp8 else cudnn.data_type.BFLOAT16
    )
    pack.update({tensors[n]: t for n, t in inputs.items()})
    pack[o] = out8 if fp8 else out
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    runners = []
    for index in range(graph.get_execution_plan_count()):
        try:
            graph.build_plan_at_index(index)
            workspace = torch.empty(graph.get_workspace_size_plan_at_index(index), device=q.device, dtype=torch.uint8)
            name = graph.get_plan_name_at_index(index)
        except Exception as error:  # a plan that does not build for this shape
            print(f"  plan {index}: {type(error).__name__}: {str(error)[:120]}")
            continue

        def run(index=index, workspace=workspace):
            graph.execute_plan_at_index(pack, workspace, index, handle=handle)
            return out8 if fp8 else out

        runners.append((f"cudnn-graph {'fp8' if fp8 else 'bf16'} #{index} {name}", run))
    return runners


def fa4(q, k, v) -> Callable[[], torch.Tensor]:
    from flash_attn.cute import flash_attn_func

    def run():
        out = flash_attn_func(q, k, v, softmax_scale=HEAD_DIM**-0.5, causal=False)
        return out[0] if isinstance(out, tuple) else out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", default="torch,cudnn,fa4")
    parser.add_argument("--logit-scale", type=float, default=1.0, help="multiply q: sharper softmax, harder for fp8")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    generator = torch.Generator("cuda").manual_seed(0)
    # The model's layout: [B, L, H, D] slices of one [L, 3 * H * D] projection output.
    qkv = torch.randn(1, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
    q, k, v = qkv.unbind(2)
    q = q * args.logit_scale
    ref = reference(q, k, v)
    candidates: list[tuple[str, Callable[[], torch.Tensor]]] = []
    if "torch" in wanted:
        candidates.append(("torch sdpa cudnn bf16", torch_cudnn(q, k, v)))
    if "cudnn" in wanted:
        for fp8 in (False, True):
            try:
                candidates += cudnn_graph_plans(q, k, v, fp8)
            except Exception as error:
                print(f"cudnn graph {'fp8' if fp8 else 'bf16'}: {type(error).__name__}: {error}")
    if "fa4" in wanted:
        try:
            candidates.append(("flash_attn.cute (FA4) bf16", fa4(q, k, v)))
        except Exception as error:
            print(f"fa4: {type(error).__name__}: {error}")
    rows = []
    if "cudnn" in wanted:  # the fp8 kernels' inputs were quantised once; this is what that costs per call
        quant_ms = time_ms(lambda: [quantize(t) for t in (q, k, v)])
        rows.append({"kernel": "quantise q, k, v (eager)", "ms": quant_ms})
        print(f"{'quantise q, k, v to e4m3 (eager, unfused)':60s} {quant_ms:8.2f} ms")
    for name, run in candidates:
        try:
            start = time.perf_counter()
            out = run()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            if out.dtype == torch.float8_e4m3fn:  # every fp8 output here was scaled by 448 / amax(v)
                out = out.float() * (v.abs().amax().float() / FP8_MAX)
            err = rel_error(out, ref)
            ms = time_ms(run)
        except Exception as error:
            print(f"{name}: {type(error).__name__}: {str(error)[:300]}")
            continue
        rows.append({"kernel": name, "ms": ms, "tflops": tflops(ms), "rel_err": err, "first_call_s": first_s})
        print(f"{name:60s} {ms:8.2f} ms {tflops(ms):6.0f} TFLOP/s  rel.err {err:.4f}  first {first_s:.1f}s", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "cudnn": torch.backends.cudnn.version(), "logit_scale": args.logit_scale,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
