"""Fused-linear skew KL (torch.ops.distillm.fused_linear_skew_kl) against materializing the
logits first: forward + backward time and peak memory above the inputs, then a training step of
the trainer's loss with loss.fused_linear on and off at a large vocabulary.

    python benchmarks/bench_fused_linear.py                        # the rows of RESULTS.md
    python benchmarks/bench_fused_linear.py --skip-step --shapes 2048x512x32768 --chunks 0 64 256
    python benchmarks/bench_fused_linear.py --devices cuda --shapes 8192x4096x128256 --dtypes bfloat16 --skip-step

Op rows (shape TOKENSxHIDDENxVOCAB, both models' hidden size alike, every token a response
token unless --prompt-fraction says otherwise):
- fused_linear: the op, a chunk of tokens at a time (--chunks; 0 = automatic);
- logits+skew_kl: both logits materialized (float32 GEMM output), then the fused skew_kl;
- logits+eager: the same logits, then the eager float64-style reference in float32;
- logits+compile: torch.compile of matmul + reference (--impls to skip it: compiling takes a while).

Step rows: the trainer's micro-batch loss (recipe/kd_loss.py) on a 2-layer teacher and a
1-layer student (hidden 64, vocabulary 128,256, tied embeddings), 8 x 1024 tokens of which half
are prompt, then backward and an AdamW step: median seconds, tokens per second, and peak RSS
above the models, optimizer state and batch.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, measure, peak_memory_mb, print_table, time_ms, write_json  # noqa: E402

import distillm_ext  # noqa: E402
from distillm_ext.reference import skew_kl_reference  # noqa: E402

CPU_SHAPES = ["2048x512x32768"]
GPU_SHAPES = ["8192x4096x128256"]
IMPLEMENTATIONS = ("fused_linear", "logits+skew_kl", "logits+eager", "logits+compile")
LOSS = dict(alpha=0.1, reverse=False)


def materialized(loss_fn):
    def run(hs, ws, ht, wt, labels):
        with torch.no_grad():
            u = ht @ wt.T
        return loss_fn(hs @ ws.T, u, labels, **LOSS)
    return run


def implementations(names, chunk):
    compiled = torch.compile(materialized(skew_kl_reference)) if "logits+compile" in names else None
    every = {
        "fused_linear": lambda hs, ws, ht, wt, labels: distillm_ext.fused_linear_skew_kl(
            hs, ws, ht, wt, labels, **LOSS, chunk_size=chunk),
        "logits+skew_kl": materialized(distillm_ext.skew_kl),
        "logits+eager": materialized(skew_kl_reference),
        "logits+compile": compiled,
    }
    return {name: every[name] for name in names}


def op_case(device, tokens, hidden, vocab, dtype, prompt_fraction, chunk, impls, warmup, reps):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype)

    hs = randn(tokens, hidden).requires_grad_()
    ws = randn(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    ht, wt = randn(tokens, hidden), randn(vocab, hidden, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < prompt_fraction] = -100
    labels = labels.to(device)
    rows = []
    for name, fn in implementations(impls, chunk).items():
        def full():
            fn(hs, ws, ht, wt, labels).backward()
            hs.grad = ws.grad = None

        result = measure(name, full, device, warmup, reps, release=distillm_ext.release_cached_gradients)
        rows.append(dict(device=device, shape=f"{tokens}x{hidden}x{vocab}", dtype=str(dtype).replace("torch.", ""),
                         prompt=prompt_fraction, chunk=chunk if name == "fused_linear" else None, impl=name,
                         median_ms=result.median_ms, peak_mb=result.peak_mb))
    baseline = next((r for r in rows if r["impl"] == "logits+skew_kl"), None)
    for row in rows:
        if baseline is not None:
            row["time_vs_logits"] = row["median_ms"] / baseline["median_ms"]
            row["memory_vs_logits"] = row["peak_mb"] / baseline["peak_mb"]
    return rows


def step_case(fused, warmup, reps, vocab=128256, batch=8, length=1024):
    """One training step of the trainer's loss with loss.fused_linear on or off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillm_ext.recipe.config import LossConfig
    from distillm_ext.recipe.forwards import make_kd_path

    def model(layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=length, tie_word_embeddings=True))

    teacher, student = model(2, 0).eval().requires_grad_(False), model(1, 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    forwards, loss = make_kd_path(LossConfig(type="skl", fused_linear=fused), student, student, teacher, vocab)
    assert forwards.fused_linear == fused
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = input_ids.clone()
    labels[:, : length // 2] = -100  # the prompt half
    data = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    def step():
        teacher_signal = forwards.teacher_signal(data)
        total, _, _ = loss(**forwards.student_outputs(data), teacher=teacher_signal, targets=labels[:, 1:])
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on, in both variants alike
    times = time_ms(step, "cpu", warmup, reps)
    peak = peak_memory_mb(step, "cpu")
    seconds = statistics.median(times) / 1e3
    return dict(fused_linear=fused, shape=f"{batch}x{length} tokens, V={vocab}", median_s=seconds,
                tokens_per_s=batch * length / seconds, peak_rss_mb=peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--shapes", nargs="+", help="TOKENSxHIDDENxVOCAB; default: per device, see RESULTS.md")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--prompt-fraction", type=float, default=0.0, help="share of tokens labelled -100")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0], help="fused_linear chunk sizes (0 = automatic)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--skip-step", action="store_true", help="only the op rows")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_fused_linear.json")
    args = parser.parse_args()

    columns = [("device", "device", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
               ("prompt", "prompt", "{:.0%}"), ("impl", "impl", "{}"), ("chunk", "chunk", "{}"),
               ("median_ms", "median ms", "{:.1f}"), ("peak_mb", "peak MB", "{:.0f}"),
               ("time_vs_logits", "time / logits+skew_kl", "{:.2f}"),
               ("memory_vs_logits", "memory / logits+skew_kl", "{:.2f}")]
    rows = []
    for device in args.devices:
        for shape in args.shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES):
            tokens, hidden, vocab = (int(x) for x in shape.split("x"))
            for dtype in args.dtypes:
                impls = list(args.impls)
                for chunk in args.chunks:
                    case = op_case(device, tokens, hidden, vocab, getattr(torch, dtype), args.prompt_fraction,
                                   chunk, impls, args.warmup, args.reps)
                    print_table(case, columns)
                    print()
                    rows += case
                    impls = ["fused_linear", "logits+skew_kl"]  # the baselines once; their ratio again
    steps = []
    if not args.skip_step:
        steps = [step_case(fused, args.warmup, args.reps) for fused in (True, False)]
        print_table(steps, [("fused_linear", "loss.fused_linear", "{}"), ("shape", "step", "{}"),
                            ("median_s", "median s", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
                            ("peak_rss_mb", "peak RSS MB", "{:.0f}")])
    meta = environment() | {"build": distillm_ext.build_info(), "warmup": args.warmup, "reps": args.reps}
    write_json(args.out, rows + steps, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
