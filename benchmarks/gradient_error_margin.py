"""How much of the float64 test bound the CUDA kernel's skew-KL gradient uses.

    python benchmarks/gradient_error_margin.py --device cuda                  # the kernel, on a GPU
    DISTILLM_CUDA_EMULATION=high python benchmarks/gradient_error_margin.py   # its host emulation

Prints, per alpha and logit scale, the worst gradient error over three seeds as a fraction of
the bound the float64 tests hold it to: the larger of 1e-5 of the gradient's scale and 3x
PyTorch float32's own error (python_tests/ops/test_skew_kl.py, assert_grad_close). Below 1
passes; the number shows how much room a formula change leaves. On the CPU it needs the
emulation (each MUFU result at its documented worst-case error: `hashed`, `high` or `low`, see
csrc/approx_math.h); on a GPU the same table shows the hardware's real errors.
"""

import argparse
import os

import torch

import distillm_ext
from distillm_ext.reference import skew_kl_reference


def gradient(function, student, teacher, weights, **options):
    leaf = student.detach().clone().requires_grad_()
    (function(leaf, teacher, **options).double() * weights).sum().backward()
    return leaf.grad.double()


def error_over_bound(alpha, scale, reverse, rows, vocab, seed, device):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator) * scale
    teacher = torch.randn(rows, vocab, generator=generator) * scale
    weights = torch.rand(rows, generator=generator).double()
    options = dict(alpha=alpha, reverse=reverse, temperature=1.0, reduction="none")
    reference = gradient(skew_kl_reference, student.double(), teacher.double(), weights, **options)
    fused = gradient(distillm_ext.skew_kl, student.to(device), teacher.to(device), weights.to(device),
                     **options).cpu()
    float32 = gradient(skew_kl_reference, student, teacher, weights, **options)
    bound = max(1e-5 * reference.abs().max().item(), 3 * (float32 - reference).abs().max().item())
    return (fused - reference).abs().max().item() / bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.9, 0.95, 0.99])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0])
    parser.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=True,
                        help="SRKL (default) or SKL (--no-reverse)")
    parser.add_argument("--shape", type=int, nargs=2, default=[16, 2001], metavar=("ROWS", "VOCAB"))
    parser.add_argument("--device", default="cpu", help="cuda: the kernel itself (default cpu: the emulation)")
    args = parser.parse_args()
    model = os.environ.get("DISTILLM_CUDA_EMULATION", "")
    if args.device == "cpu" and not model:
        parser.error("on the CPU set DISTILLM_CUDA_EMULATION=hashed|high|low; without it this measures the "
                     "CPU kernel, not the CUDA formulas")
    source = f"error model {model}" if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    print(f"{'SRKL' if args.reverse else 'SKL'}, {source}, {args.shape[0]} x {args.shape[1]}, tau = 1")
    print("| alpha | " + " | ".join(f"scale {s:g}" for s in args.scales) + " |")
    print("| --- |" + " --- |" * len(args.scales))
    for alpha in args.alphas:
        worst = [max(error_over_bound(alpha, scale, args.reverse, *args.shape, seed, args.device) for seed in range(3))
                 for scale in args.scales]
        print(f"| {alpha:g} | " + " | ".join(f"{w:.2f}" for w in worst) + " |")


if __name__ == "__main__":
    main()
