"""Static cost of every fused kernel on NVIDIA GPUs, read off the SASS, without a GPU.

    python bench/sass_report.py                    # installed Triton -> bench/results/sass-triton-<v>.json
    PYTHONPATH=DIR python bench/sass_report.py     # DIR from `pip install --no-deps --target DIR triton==X`
    python bench/sass_report.py --check            # exit 1 if a target below is missed

Each kernel (Adam, AdamW, RMSprop, Adagrad, AdaBelief × float32/bfloat16/float16 ×
untracked/tracked, and ``<kernel>+staleness``: the kernels whose body defines a staleness,
tracking it beside sqrt(v_hat), against the same untracked kernel) is compiled with ``triton.compile`` for sm_90 (H100/H200; and sm_80 with
``--arch 80``), disassembled with the ``nvdisasm``/``cuobjdump`` that the Triton wheel ships,
and measured:

- ``hot_per_elem``: SASS instructions in the unmasked full-chunk loop (the loop whose global
  loads carry no predicate) per element a thread handles in one trip (``BLOCK / threads``);
- ``whole_per_elem``: (instructions outside every loop, counted once, + ``ITERS`` × the hot
  loop) per element of a full chunk. An upper bound: the tail path's straight-line code is
  counted too. For the shared-memory histogram it is read off the kernel's probe compile
  (the same code without the never-taken branch that reserves the shared memory;
  ``whole_with_reservation_per_elem`` counts that branch too);
- ``registers``, ``stack_bytes`` and ``local_ops`` (``STL``/``LDL``: register spills),
  ``shared_bytes`` (Triton's allocation), and per element of a full chunk: ``barriers``,
  ``shared_atomics``, ``global_atomics`` (static counts, the flush's predicated atomics as if
  every bin were non-zero);
- for the tracked kernel, the histogram strategy the runtime would pick (the structural
  guard ``fasthist.kernels._common.shared_histogram_problems`` on this compiler's PTX and
  TTGIR: barriers on every path, Triton's shared accesses only in the reservation, no
  replicated increments, the words covered; its findings in ``guard_problems``) and the
  ``tl.histogram`` fallback measured the same way.

The H200 prediction is a roofline model, not a measurement: time per element =
max(bytes / 4.3 TB/s measured copy bandwidth, instructions / 29.6 T thread-instructions/s
(132 SMs × 4 schedulers × 32 lanes × 1.755 GHz)), tracked over untracked.

Targets, for the strategy the runtime picks, on every kernel and dtype: hot loop
≤ 1.25× the untracked one, whole kernel ≤ 1.30×, no spills, ≤ 128 registers; with staleness
tracked too: hot loop ≤ 1.35×, whole kernel ≤ 1.40× (the same margin over the hot loop as
above), no spills, ≤ 128 registers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: the interpreter has no SASS
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # a bare checkout: map kernels/ to fasthist.kernels
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fasthist.bins import LogBins  # noqa: E402
from fasthist.catalog import declarations  # noqa: E402


def _kernels_module():
    try:
        import fasthist.kernels as k
    except ImportError:  # not installed: import kernels/ as fasthist.kernels
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "fasthist.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        k = importlib.util.module_from_spec(spec)
        sys.modules["fasthist.kernels"] = k
        spec.loader.exec_module(k)
    return k


K = _kernels_module()
C = K._common

TARGETS = {"hot_ratio": 1.25, "whole_ratio": 1.30, "registers": 128, "stack_bytes": 0, "local_ops": 0}
STALENESS_TARGETS = dict(TARGETS, hot_ratio=1.35, whole_ratio=1.40)
H200 = {"copy_bytes_per_s": 4.3e12, "thread_instructions_per_s": 132 * 4 * 32 * 1.755e9}
DTYPES = {"float32": (tl.float32, 4), "bfloat16": (tl.bfloat16, 2), "float16": (tl.float16, 2)}
DECLS = declarations()


def _kernel_module(optimizer: str):
    """``optimizer``'s declared kernel module (its ``BODY`` runs in ``fused_step_kernel``)."""
    return importlib.import_module(f"{K.__name__}.{DECLS[optimizer].kernel[0]}")


def _body(optimizer: str, **flags) -> tuple:
    """``(body, flags)``: ``optimizer``'s kernel body (``BODY``) and its switches, by name."""
    body = _kernel_module(optimizer).BODY
    return body, body.flags(**flags)


# The kernels with the flags of their optimizer's defaults (AdamW: decoupled weight decay),
# and the global accesses per element of a step (read p, g, states; write p, states).
KERNELS = {
    "adam": (_body("adam", AMSGRAD=False, MAXIMIZE=False, WD_MODE=0, LERP_SMALL=True), 7),
    "adamw": (_body("adam", AMSGRAD=False, MAXIMIZE=False, WD_MODE=2, LERP_SMALL=True), 7),
    "rmsprop": (_body("rmsprop", CENTERED=False, MOMENTUM=False, MAXIMIZE=False, HAS_WD=False, LERP_SMALL=False,
                      LR_FROM_PTR=False), 5),
    "adagrad": (_body("adagrad", MAXIMIZE=False, HAS_WD=False), 5),
    "adabelief": (_body("adabelief", AMSGRAD=False, RECTIFY=True, WD_MODE=0), 7),
}  # fmt: skip
# The specialisations that also histogram staleness: every kernel whose body declares one
# (StepBody.staleness), measured against the same untracked kernel.
STALENESS = {f"{name}+staleness": name for name, ((body, _), _) in KERNELS.items() if body.staleness is not None}
# (kernel, dtype) pairs its optimizer's declaration has no kernel for (another backend runs them)
NO_KERNEL = {
    (name, d) for name, decl in declarations().items() for d in DTYPES if getattr(torch, d) not in decl.kernel_dtypes
}
NO_KERNEL |= {(name, d) for name, base in STALENESS.items() for d in DTYPES if (base, d) in NO_KERNEL}
_I64_PTRS = {"table_ptr", "chunk_ptr", "scratch_ptr"}
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_kernel(constexprs: dict, arch: int, num_warps: int, fn=None):
    """``fn`` (default: the shared ``fused_step_kernel``) compiled for ``sm_<arch>``."""
    fn = fn if fn is not None else C.fused_step_kernel
    sig = {
        a: "constexpr" if a in constexprs else ("*i64" if a in _I64_PTRS else "*fp32") if a.endswith("_ptr") else "fp32"
        for a in fn.arg_names
    }
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": False}
    )


def parse_sass(sass: str) -> list[tuple[str, str, str]]:
    """``(label or '', predicate, opcode)`` per instruction, labels attached to the next one."""
    out, label = [], ""
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            label = m.group(1)
            continue
        m = _INSTR.match(line)
        if m:
            out.append((label, (m.group(2) or "").strip(), m.group(3) + m.group(4)))
            label = ""
    return out


def loops(instrs: list[tuple[str, str, str]]) -> list[tuple[int, int]]:
    """``[first, last]`` instruction indices of every loop (a branch back to an earlier label)."""
    where = {lab: i for i, (lab, _, _) in enumerate(instrs) if lab}
    found = []
    for i, (_, _, op) in enumerate(instrs):
        m = re.match(r"BRA\S*\s+`?\(?(\.L_x_\d+)", op)
        if m and m.group(1) in where and where[m.group(1)] < i:
            found.append((where[m.group(1)], i))
    return found


def _count(instrs, pattern: str) -> int:
    return sum(1 for _, _, op in instrs if re.match(pattern, op))


def measure(ck, block: int, iters: int, num_warps: int) -> dict:
    """The static figures of one compiled kernel (module docstring)."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True)
    instrs = [x for x in parse_sass(sass) if not x[2].startswith("NOP")]
    found = loops(instrs)
    found = [(a, b) for a, b in found if b > a]  # not the self-branch after EXIT
    hot = [(a, b) for a, b in found if any(op.startswith("LDG") and not pred for _, pred, op in instrs[a : b + 1])]
    if not hot:
        raise RuntimeError("no unmasked loop with global loads found in the SASS")
    a, b = max(hot, key=lambda r: r[1] - r[0])
    body = instrs[a : b + 1]
    in_loops = {i for lo, hi in found for i in range(lo, hi + 1)}
    outside = [x for i, x in enumerate(instrs) if i not in in_loops]
    threads = 32 * num_warps
    per_trip = block / threads
    per_chunk = block * iters / threads

    def per_elem(pattern: str) -> float:
        return (_count(outside, pattern) + iters * _count(body, pattern)) / per_chunk

    usage = res.stdout
    return {
        "hot_per_elem": len(body) / per_trip,
        "whole_per_elem": (len(outside) + iters * len(body)) / per_chunk,
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "local_ops": _count(instrs, r"(STL|LDL)\b"),
        "shared_bytes": int(ck.metadata.shared),
        "barriers": per_elem(r"BAR\b"),
        "shared_atomics": per_elem(r"ATOMS\b"),
        "global_atomics": per_elem(r"(REDG?|ATOMG|ATOM)\b"),
        "instructions": len(instrs),
    }


def predicted_ratio(tracked: float, untracked: float, bytes_per_elem: int) -> float:
    """H200 roofline model: max(memory, issue) time per element, tracked over untracked."""
    mem = bytes_per_elem / H200["copy_bytes_per_s"]
    issue = H200["thread_instructions_per_s"]
    return max(mem, tracked / issue) / max(mem, untracked / issue)


def report_kernel(name: str, dtype: str, arch: int, fallback: bool) -> dict:
    (body, flags), accesses = KERNELS[STALENESS.get(name, name)]
    shape = C.SHAPE
    tl_dt, size = DTYPES[dtype]
    spec = C.BinSpec(LogBins()).kwargs()

    def run(hist: int, bins: dict):
        layout = C.bin_layout(bins, shape.num_warps)
        tracked = {"staleness": True} if hist != C.HIST_OFF and name in STALENESS else {}
        return compile_kernel(C.constexprs(body, flags, tl_dt, layout, hist=hist, **tracked), arch, shape.num_warps)

    def figures(ck) -> dict:
        return measure(ck, shape.block, shape.iters, shape.num_warps)

    off = figures(run(C.HIST_OFF, C.NO_BINS))
    shared_ck = run(C.HIST_SHARED, spec)
    probe = run(C.HIST_PROBE, spec)
    layout = C.bin_layout(spec, shape.num_warps)
    problems = C.shared_histogram_problems(
        shared_ck.asm["ptx"], shared_ck.asm["ttgir"], shared_ck.metadata.shared, layout.DUMP, layout.SLAB
    )
    row = {"kernel": name, "dtype": dtype, "bytes_per_elem": accesses * size, "untracked": off}
    row["targets"] = STALENESS_TARGETS if name in STALENESS else TARGETS
    shared = figures(shared_ck)
    # What runs is the probe's instruction stream (the same code, less the never-taken branch
    # that reserves the shared memory): per-element figures from it, registers from the kernel.
    runs = figures(probe)
    shared["whole_with_reservation_per_elem"] = shared["whole_per_elem"]
    for key in ("whole_per_elem", "barriers", "shared_atomics", "global_atomics"):
        shared[key] = runs[key]
    row["strategies"] = {"shared": shared}
    if fallback or problems:
        row["strategies"]["tl"] = figures(run(C.HIST_TL, spec))
    row["strategy"] = "tl" if problems else "shared"
    row["guard_problems"] = problems
    chosen = row["strategies"][row["strategy"]]
    row["tracked"] = chosen
    row["hot_ratio"] = chosen["hot_per_elem"] / off["hot_per_elem"]
    row["whole_ratio"] = chosen["whole_per_elem"] / off["whole_per_elem"]
    row["h200_model_ratio"] = predicted_ratio(chosen["whole_per_elem"], off["whole_per_elem"], row["bytes_per_elem"])
    row["misses"] = misses(row)
    return row


def misses(row: dict) -> list[str]:
    t, out, targets = row["tracked"], [], row["targets"]
    if row["hot_ratio"] > targets["hot_ratio"]:
        out.append(f"hot loop x{row['hot_ratio']:.2f} > x{targets['hot_ratio']}")
    if row["whole_ratio"] > targets["whole_ratio"]:
        out.append(f"whole kernel x{row['whole_ratio']:.2f} > x{targets['whole_ratio']}")
    if t["registers"] > targets["registers"]:
        out.append(f"{t['registers']} registers > {targets['registers']}")
    if t["stack_bytes"] or t["local_ops"]:
        out.append(f"spills: {t['stack_bytes']} B stack, {t['local_ops']} STL/LDL")
    return out


def table(rows: list[dict]) -> str:
    head = f"{'kernel':16} {'dtype':9} {'strategy':8} {'hot/el':>13} {'whole/el':>13} {'reg':>7} {'stack':>5} {'smem':>6} {'H200 model':>10}  misses"
    lines = [head]
    for r in rows:
        u, t = r["untracked"], r["tracked"]
        lines.append(
            f"{r['kernel']:16} {r['dtype']:9} {r['strategy']:8} "
            f"{u['hot_per_elem']:5.1f}>{t['hot_per_elem']:5.1f} x{r['hot_ratio']:.2f} "
            f"{u['whole_per_elem']:5.1f}>{t['whole_per_elem']:5.1f} x{r['whole_ratio']:.2f} "
            f"{u['registers']:3d}>{t['registers']:3d} {t['stack_bytes']:5d} {t['shared_bytes']:6d} "
            f"x{r['h200_model_ratio']:9.3f}  {'; '.join(r['misses']) or '-'}"
        )
    return "\n".join(lines)


def markdown(paths: list[Path]) -> str:
    """One markdown table of committed reports: per kernel and dtype, the sm_90 hot-loop and
    whole-kernel ratios (tracked / untracked) on each Triton version."""
    reports = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: [int(x) for x in r["triton"].split(".")])
    versions = [r["triton"] for r in reports]
    cells: dict[tuple[str, str], list[str]] = {}
    for r in reports:
        for row in r["archs"]["sm_90"]:
            t = row["tracked"]
            mark = " **miss**" if row["misses"] else ""
            cells.setdefault((row["kernel"], row["dtype"]), []).append(
                f"{row['hot_ratio']:.2f} / {row['whole_ratio']:.2f} ({t['registers']} reg){mark}"
            )
    head = "| kernel | dtype | " + " | ".join(f"Triton {v}" for v in versions) + " |"
    rule = "|---|---|" + "---|" * len(versions)
    body = [f"| {k} | {d} | " + " | ".join(v) + " |" for (k, d), v in cells.items()]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="SM architecture(s), default 90 and 80")
    ap.add_argument("--kernels", nargs="*", default=[*KERNELS, *STALENESS], choices=[*KERNELS, *STALENESS])
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--no-fallback", action="store_true", help="skip measuring the tl.histogram fallback")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/sass-triton-<version>.json)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a sm_90 target is missed")
    ap.add_argument("--markdown", nargs="+", type=Path, metavar="JSON", help="print a table of these reports and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    archs = args.arch or [90, 80]
    result = {
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "launch_shape": {"block": C.SHAPE.block, "iters": C.SHAPE.iters, "num_warps": C.SHAPE.num_warps},
        "targets": TARGETS,
        "staleness_targets": STALENESS_TARGETS,
        "h200_model": H200,
        "method": __doc__,
        "archs": {},
    }
    failed = False
    for arch in archs:
        rows = [
            report_kernel(k, d, arch, fallback=not args.no_fallback and arch == 90)
            for k in args.kernels
            for d in args.dtypes
            if (k, d) not in NO_KERNEL
        ]
        result["archs"][f"sm_{arch}"] = rows
        print(f"Triton {triton.__version__}, sm_{arch}, SASS instructions per element (untracked > tracked)")
        print(table(rows))
        failed |= arch == 90 and any(r["misses"] for r in rows)
    out = args.out or ROOT / "bench" / "results" / f"sass-triton-{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
