"""Fused skew KL (torch.ops.distillm.skew_kl) against the eager PyTorch reference and
torch.compile of the same reference: forward, backward and full (forward + backward) time and
peak memory, SKL and SRKL, float32 and bfloat16, CPU always and CUDA when present.

    python benchmarks/bench_skew_kl.py                 # the shapes of RESULTS.md
    python benchmarks/bench_skew_kl.py --shapes 256x32000 --reps 5
    python benchmarks/bench_skew_kl.py --cpu-capability avx2     # the fused op's AVX2 copy
    python benchmarks/bench_skew_kl.py --impls fused topk --top-k 32   # the sparse teacher's op

`topk` is skew_kl_topk against the teacher's top-k (int32 ids, log-probabilities in the
logits' dtype), with "x dense fused" its speed relative to skew_kl on the same student logits.

--cpu-capability picks the fused op's CPU copy (DISTILLM_CPU_CAPABILITY). The baselines run
PyTorch's own choice, which ATEN_CPU_CAPABILITY=avx2 (set in the environment) lowers too:
both together time this machine as an AVX2-only one.

Peak memory is measured above the inputs, with the fused op's CPU gradient cache emptied
first, so it is what a first call needs. Times are of later calls, which reuse the cached
gradient as every training step after the first does. GPU rows of the full mode also report
the bandwidth against the bytes-moved floor (read both logits once, write the gradient once),
as a fraction of the copy bandwidth measured on the same device in the same run.

    python benchmarks/bench_skew_kl.py --devices cuda --shapes 8192x128256 --dtypes bfloat16 --impls fused eager
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, measure, print_table, time_ms, write_json  # noqa: E402

import distillm_ext  # noqa: E402
from distillm_ext.reference import skew_kl_reference  # noqa: E402

CPU_SHAPES = ["2048x32000", "4096x50257"]
GPU_SHAPES = ["2048x32000", "4096x50257", "8192x128256"]
IMPLEMENTATIONS = ("fused", "eager", "compile", "topk")
compiled_reference = torch.compile(skew_kl_reference)


def implementations(loss_kwargs, names, sparse_teacher):
    """`topk`: skew_kl_topk against the teacher's top-k (ids, log-probabilities), taken once."""
    every = {"fused": lambda s, t: distillm_ext.skew_kl(s, t, **loss_kwargs),
             "eager": lambda s, t: skew_kl_reference(s, t, **loss_kwargs),
             "compile": lambda s, t: compiled_reference(s, t, **loss_kwargs),
             "topk": lambda s, t: distillm_ext.skew_kl_topk(s, *sparse_teacher, **loss_kwargs)}
    return {name: every[name] for name in names}


def copy_gbps(device: str, gib: float = 1.0, reps: int = 20) -> float:
    """Bandwidth of a plain device copy (bytes read + written per second): the practical
    ceiling a memory-bound kernel is measured against, on this very device."""
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    median_ms = statistics.median(time_ms(lambda: target.copy_(source), device, 3, reps))
    return 2 * source.numel() / (median_ms * 1e-3) / 1e9


def bench_case(device, rows, vocab, dtype, loss_name, warmup, reps, impls, ceiling_gbps=None, top_k=32):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=generator).to(device, dtype).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=generator).to(device, dtype)
    loss_kwargs = dict(alpha=0.1, reverse=loss_name == "srkl")
    sparse_teacher = None
    if "topk" in impls:
        top = torch.log_softmax(teacher.float(), dim=-1).topk(top_k, dim=-1)
        sparse_teacher = (top.indices.to(torch.int32), top.values.to(dtype))
    results = []
    for impl, fn in implementations(loss_kwargs, impls, sparse_teacher).items():
        state = {}

        def forward():
            state["loss"] = fn(student, teacher)

        def backward():
            state["loss"].backward()
            student.grad = None

        def full():
            fn(student, teacher).backward()
            student.grad = None

        for mode, run, setup in (("forward", forward, None), ("backward", backward, forward), ("full", full, None)):
            result = measure(impl, run, device, warmup, reps, setup, release=distillm_ext.release_cached_gradients)
            state.clear()
            results.append(dict(device=device, shape=f"{rows}x{vocab}", dtype=str(dtype).replace("torch.", ""),
                                loss=loss_name, mode=mode, impl=impl, median_ms=result.median_ms,
                                min_ms=result.min_ms, peak_mb=result.peak_mb))
    by_key = {(r["mode"], r["impl"]): r for r in results}
    for row in results:
        for baseline in ("eager", "compile"):
            if (row["mode"], baseline) in by_key:
                row[f"vs_{baseline}"] = by_key[(row["mode"], baseline)]["median_ms"] / row["median_ms"]
        if row["impl"] == "topk" and (row["mode"], "fused") in by_key:
            row["vs_dense"] = by_key[(row["mode"], "fused")]["median_ms"] / row["median_ms"]
        if ceiling_gbps and row["mode"] == "full":
            # Read the logits once (both, when the teacher is dense), write the gradient once.
            floor_bytes = (2 if row["impl"] == "topk" else 3) * rows * vocab * student.element_size()
            row["gbps"] = floor_bytes / (row["median_ms"] * 1e-3) / 1e9
            row["pct_copy"] = 100 * row["gbps"] / ceiling_gbps
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--shapes", nargs="+", help="ROWSxVOCAB; default: per device, see RESULTS.md")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--losses", nargs="+", default=["skl", "srkl"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--top-k", type=int, default=32, help="K of the topk implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpu-capability", choices=["avx512", "avx2", "default"],
                        help="the fused op's CPU copy (default: the best this CPU runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_skew_kl.json")
    args = parser.parse_args()
    if args.cpu_capability:
        # Read once, at the op's first call, which is still to come.
        os.environ["DISTILLM_CPU_CAPABILITY"] = args.cpu_capability
    print(f"fused op CPU copy: {distillm_ext.build_info()['cpu_capability']}, "
          f"PyTorch CPU capability: {torch.backends.cpu.get_cpu_capability()}")

    columns = [("device", "device", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
               ("loss", "loss", "{}"), ("mode", "mode", "{}"), ("impl", "impl", "{}"),
               ("median_ms", "median ms", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}"),
               ("vs_eager", "x eager", "{:.1f}"), ("vs_compile", "x compile", "{:.2f}"),
               ("vs_dense", "x dense fused", "{:.2f}"),
               ("gbps", "GB/s (floor bytes)", "{:.0f}"), ("pct_copy", "% of copy BW", "{:.0f}")]
    rows, ceilings = [], {}
    for device in args.devices:
        if device == "cuda":
            ceilings[device] = copy_gbps(device)
            print(f"cuda copy bandwidth: {ceilings[device]:.0f} GB/s (read + write)")
        for shape in args.shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES):
            n, v = (int(x) for x in shape.split("x"))
            for dtype in args.dtypes:
                for loss_name in args.losses:
                    case = bench_case(device, n, v, getattr(torch, dtype), loss_name, args.warmup, args.reps,
                                      args.impls, ceilings.get(device), args.top_k)
                    print_table(case, columns)
                    print()
                    rows += case
    meta = environment() | {"build": distillm_ext.build_info(), "warmup": args.warmup, "reps": args.reps,
                            "copy_gbps": ceilings}
    write_json(args.out, rows, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
