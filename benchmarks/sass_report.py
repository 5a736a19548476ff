"""Static cost of the CUDA skew-KL kernel, read from its compiled SASS: no GPU needed.

    python benchmarks/sass_report.py                  # sm_90 and sm_80, bf16 student and teacher
    python benchmarks/sass_report.py --arch 90 --dtypes float float

For each kernel variant (fkl, rkl: alpha = 0; skl, srkl: alpha > 0) it compiles
csrc/skew_kl/skew_kl_cuda.cu with the build's flags (`nvcc -cubin`, ptxas -v for registers and
spills), disassembles it (`cuobjdump -sass`) and finds the per-entry loops: the innermost loops
(a backward branch) whose body loads from global memory with 16-byte vector loads. Entries per
iteration = bytes those loads read / (student + teacher bytes per entry). Reported per loop and
summed per variant: SASS instructions per vocabulary entry.

The count is static: every instruction of a loop body once, both sides of a branch inside it
included, NOPs excluded. Subroutine calls inside a body (CALL.REL, e.g. a slow division path)
are listed, not followed. It is a cost model to compare kernel versions, not a timing.

Tools: nvcc (CUDA_HOME or PATH) and cuobjdump (PATH, CUDA_HOME/bin, or NVIDIA's PyPI package:
pip install nvidia-cuda-cuobjdump).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "csrc" / "skew_kl" / "skew_kl_cuda.cu"
# The flags setup.py gives nvcc (torch's cpp_extension adds the -D and --expt ones).
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]
DTYPE_BYTES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}
DTYPE_NAMES = {"float": "float", "half": "__half", "fp16": "__half", "bf16": "__nv_bfloat16",
               "bfloat16": "__nv_bfloat16", "fp32": "float"}
VARIANTS = {(False, False): "fkl", (True, False): "rkl", (False, True): "skl", (True, True): "srkl"}
LOAD_BYTES = {"LDG.E.128": 16, "LDG.E.64": 8, "LDG.E": 4, "LDG.E.U16": 2, "LDG.E.S16": 2}


def find_tool(name: str) -> str:
    """A CUDA tool from PATH, CUDA_HOME/bin, or an NVIDIA PyPI package's bin/ folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name]
    try:
        import nvidia  # the namespace package NVIDIA's PyPI wheels install into

        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob(f"*/bin/{name}"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    sys.exit(f"sass_report: {name} not found; pip install nvidia-cuda-{name} (or set CUDA_HOME)")


@dataclasses.dataclass
class Loop:
    start: int  # address of the branch target (first instruction of the body)
    end: int  # address of the backward branch
    instructions: int
    load_bytes: int  # bytes read by 16-byte global loads in one iteration
    calls: int


@dataclasses.dataclass
class Kernel:
    student: str
    teacher: str
    reverse: bool
    mixed: bool
    registers: int = 0
    spill_bytes: int = 0
    loops: list = dataclasses.field(default_factory=list)

    @property
    def variant(self) -> str:
        return VARIANTS[(self.reverse, self.mixed)]

    @property
    def entry_bytes(self) -> int:
        return DTYPE_BYTES[self.student] + DTYPE_BYTES[self.teacher]

    def per_entry(self, loop: Loop) -> float:
        return loop.instructions / (loop.load_bytes / self.entry_bytes)

    @property
    def instructions_per_entry(self) -> float:
        return sum(self.per_entry(loop) for loop in self.loops)


KERNEL_NAME = re.compile(r"forward_kernel<(\w+), (\w+), (true|false), (true|false)>")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def demangle(names: list[str]) -> list[str]:
    output = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return output.stdout.splitlines()


def compile_cubin(arch: str, folder: Path) -> tuple[Path, str]:
    cubin = folder / f"skew_kl_sm{arch}.cubin"
    command = [find_tool("nvcc"), "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", *NVCC_FLAGS,
               f"-I{REPO / 'csrc'}", "-Xptxas", "-v", "-o", str(cubin), str(SOURCE)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nvcc failed:\n{done.stderr}")
    return cubin, done.stderr


def resources(ptxas_log: str) -> dict[str, tuple[int, int]]:
    """{mangled kernel: (registers, spill store + load bytes)} from ptxas -v."""
    found, current, spills = {}, None, 0
    for line in ptxas_log.splitlines():
        if match := re.search(r"Function properties for (\S+)", line):
            current = match.group(1)
        elif current and (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills = int(match.group(1)) + int(match.group(2))
        elif current and (match := re.search(r"Used (\d+) registers", line)):
            found[current] = (int(match.group(1)), spills)
            current = None
    return found


def parse_loops(body: list[tuple[int, str]]) -> list[Loop]:
    """Innermost backward-branch loops of one function that read 16-byte vectors."""
    address_index = {address: i for i, (address, _) in enumerate(body)}
    loops = []
    for index, (address, text) in enumerate(body):
        match = re.match(r"(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if not match or match.group(1) is None or int(match.group(1), 16) >= address:
            continue
        first = address_index[int(match.group(1), 16)]
        instructions = [t for _, t in body[first:index + 1] if not t.startswith("NOP")]
        opcodes = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in instructions]
        vector_bytes = sum(16 for op in opcodes if op == "LDG.E.128")
        if vector_bytes:
            loops.append(Loop(body[first][0], address, len(instructions), vector_bytes,
                              sum(op.startswith("CALL") for op in opcodes)))
    # Keep the innermost: drop a loop that contains another one.
    return [a for a in loops if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]


def kernels(arch: str, folder: Path) -> list[Kernel]:
    cubin, log = compile_cubin(arch, folder)
    sass = subprocess.run([find_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    usage = resources(log)
    pieces = re.split(r"\n\s*Function : (\S+)\n", sass)
    mangled_names, bodies = pieces[1::2], pieces[2::2]
    found = []
    for mangled, name, text in zip(mangled_names, demangle(mangled_names), bodies):
        match = KERNEL_NAME.search(name)
        if not match:
            continue
        kernel = Kernel(match.group(1), match.group(2), match.group(3) == "true", match.group(4) == "true")
        kernel.registers, kernel.spill_bytes = usage.get(mangled, (0, 0))
        body = [(int(a, 16), t.strip()) for a, t in INSTRUCTION.findall(text)]
        kernel.loops = parse_loops(body)
        found.append(kernel)
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["90", "80"], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtypes", nargs=2, default=["bf16", "bf16"], metavar=("STUDENT", "TEACHER"),
                        help="bf16, fp16 or fp32 (default bf16 bf16)")
    parser.add_argument("--loops", action="store_true", help="also list every per-entry loop")
    args = parser.parse_args(argv)
    student, teacher = (DTYPE_NAMES[d] for d in args.dtypes)
    print("| arch | variant | SASS instructions per entry | per-entry loops (instr. / entries per iteration) "
          "| registers | spill bytes |\n| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            chosen = [k for k in kernels(arch, Path(folder)) if (k.student, k.teacher) == (student, teacher)]
            for kernel in sorted(chosen, key=lambda k: list(VARIANTS.values()).index(k.variant)):
                loops = ", ".join(f"{loop.instructions}/{loop.load_bytes // kernel.entry_bytes}"
                                  + (f" ({loop.calls} calls)" if loop.calls else "") for loop in kernel.loops)
                print(f"| sm_{arch} | {kernel.variant} | {kernel.instructions_per_entry:.1f} | {loops} | "
                      f"{kernel.registers} | {kernel.spill_bytes} |")
                if args.loops:
                    for loop in kernel.loops:
                        print(f"|   | loop 0x{loop.start:x}-0x{loop.end:x} | {kernel.per_entry(loop):.1f} | | | |")


if __name__ == "__main__":
    main()
