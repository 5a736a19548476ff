"""benchmarks/sass_report.py reads loops, loads and resources from SASS and ptxas text as it
should (on made-up text: the report itself needs nvcc and cuobjdump)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sass_report  # noqa: E402

SASS = [  # (address, instruction)
    (0x00, "MOV R1, c[0x0][0x28]"),
    (0x10, "@P0 LDG.E.128 R4, desc[UR4][R2.64]"),  # outer loop start
    (0x20, "LDG.E.128 R8, desc[UR4][R6.64]"),  # inner loop start
    (0x30, "@!P1 LDG.E.128 R12, desc[UR4][R10.64]"),
    (0x40, "FADD R1, R1, R4"),
    (0x50, "NOP"),
    (0x60, "CALL.REL.NOINC 0x200"),
    (0x70, "@P2 BRA 0x20"),  # inner loop end
    (0x80, "BRA 0x10"),  # outer loop end
    (0x90, "@P3 BRA 0xa0"),  # forward branch: not a loop
    (0xa0, "EXIT"),
]


def test_innermost_vector_loops_are_found():
    (loop,) = sass_report.parse_loops(SASS)
    assert (loop.start, loop.end, loop.instructions, loop.load_bytes, loop.calls) == (0x20, 0x70, 5, 32, 1)
    kernel = sass_report.Kernel("__nv_bfloat16", "__nv_bfloat16", reverse=False, mixed=True, loops=[loop])
    assert kernel.variant == "skl" and kernel.per_entry(loop) == 5 / 8  # 32 bytes = 8 bf16 pairs


def test_registers_and_spills_from_ptxas():
    log = """ptxas info    : Function properties for _Z1kv
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers
ptxas info    : Function properties for _Z1jv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers"""
    assert sass_report.resources(log) == {"_Z1kv": (64, 12), "_Z1jv": (40, 0)}
