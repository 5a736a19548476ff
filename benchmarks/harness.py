"""Shared timing and memory harness for the benchmarks: warm-up, median of repeated runs,
device events on GPU, peak memory above the inputs, a table on stdout and JSON beside it."""

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


def _fix_malloc_mmap_threshold() -> None:
    """Serve every allocation above 64 KiB with its own mmap, returned to the OS on free.

    glibc otherwise raises its mmap threshold after large frees (up to 32 MiB) and keeps later
    tensors in the heap, so resident memory, and the peak read from it, would not follow the
    tensors. Tensors of the benchmark shapes are far above 32 MiB and were mmap-backed anyway,
    so their timings do not change; small shapes pay page faults they otherwise would not."""
    try:
        import ctypes

        m_mmap_threshold = -3
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 64 * 1024)
    except OSError:  # not glibc: the CPU peak is then an upper bound
        pass


_fix_malloc_mmap_threshold()


@dataclass
class Result:
    """One measured configuration."""

    name: str
    median_ms: float
    min_ms: float
    peak_mb: float


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(run: Callable[[], None], device: str, warmup: int, reps: int,
            setup: Optional[Callable[[], None]] = None) -> list:
    """Milliseconds of `run` for each of `reps` runs after `warmup`; `setup` runs untimed first."""
    times = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        _synchronize(device)
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - begin) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


def peak_memory_mb(run: Callable[[], None], device: str, setup: Optional[Callable[[], None]] = None,
                   release: Optional[Callable[[], None]] = None) -> float:
    """Peak bytes allocated while `run` executes, above what was allocated before it, in MB.

    `release` frees what an implementation keeps between calls for reuse (a cache), so that
    the peak counts the memory a call needs and not only what it adds to the cache."""
    if setup is not None:
        setup()
    if release is not None:
        release()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # CPU: Linux resets the resident-set high-water mark (VmHWM) on "5" to clear_refs. Large
    # tensors are mmap-backed and returned on free, so RSS follows the allocations.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    run()
    return max(_status_kb("VmHWM") - before, 0) / 1024


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure(name: str, run, device: str, warmup: int, reps: int, setup=None, release=None) -> Result:
    times = time_ms(run, device, warmup, reps, setup)
    peak = peak_memory_mb(run, device, setup, release)
    return Result(name, statistics.median(times), min(times), peak)


def print_table(rows: list, columns: list) -> None:
    """rows: dicts; columns: (key, header, format) triples."""
    headers = [header for _, header, _ in columns]
    cells = [[("" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)), flush=True)


def write_json(path: Path, rows: list, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


__all__ = ["Result", "environment", "measure", "print_table", "write_json"]


# `distillm` in its own process, then the process's peak resident set (Linux: KiB) on stderr.
_WITH_PEAK_RSS = ("import resource, sys; from distillm_ext.recipe.cli import main; code = main(sys.argv[1:]); "
                  "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr); "
                  "sys.exit(code)")


def run_distillm(arguments: list, log_path: Path) -> float:
    """Runs `distillm ARGUMENTS` in a fresh process, its output in log_path; returns its peak RSS
    in MB (exits with a pointer to the log if it fails)."""
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-c", _WITH_PEAK_RSS, *arguments], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"distillm {arguments[0]} failed; see {log_path}")
    return int(log_path.read_text().rsplit("peak_rss_kb=", 1)[1].split()[0]) / 1024


def compare_trainings(modes: list, steps: int, repeats: int, work: Path) -> list[dict]:
    """Short `distillm train` runs of the built-in default, one per (name, overrides) mode and
    repeat, alternating the order against drift; per mode: median tokens/s, each run's, and the
    largest peak RSS (MB)."""
    common = [f"train.max_steps={steps}", "eval.num_examples=8", "eval.teacher=false",
              "output.checkpoint_interval=0", "output.plots=false"]
    runs = {name: [] for name, _ in modes}
    for repeat in range(repeats):
        for index, (name, overrides) in enumerate(modes if repeat % 2 == 0 else modes[::-1]):
            run_dir = work / f"run{repeat}-{index}"
            rss = run_distillm(["train", *common, *overrides, f"output.dir={run_dir}"], run_dir.with_suffix(".log"))
            runs[name].append((training_tokens_per_s(run_dir), rss))
    return [{"mode": name, "tokens_per_s": statistics.median(rate for rate, _ in results),
             "tokens_per_s_runs": [round(rate) for rate, _ in results],
             "peak_rss_mb": max(rss for _, rss in results)} for name, results in runs.items()]


def training_tokens_per_s(run_dir: Path, skip: int = 2) -> float:
    """The median tokens/s of a run's logged steps after the first `skip` (metrics.jsonl: the
    training time alone, evaluations and checkpoints excluded)."""
    from distillm_ext.recipe.metrics import read_metrics

    rates = [r["tokens_per_s"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    return statistics.median(rates[skip:])
