"""The shared-memory histogram's guard: what the compiler made of a ``HIST_SHARED`` kernel,
checked by structure before the kernel first runs.

The histogram's words live in Triton's dynamic shared memory (``global_smem``), reserved by a
never-taken branch that starts with the :data:`RESERVED_MARK` instruction. Nothing in
Triton promises that this stays sound, so every compiled specialisation is read back
(its PTX and TTGIR) and must satisfy five rules; the first one broken is named in the
fallback warning:

- ``declaration``: ``global_smem`` is declared, the reservation mark appears once, and the
  histogram's own instructions (quad zeroing ``st.shared.v4``, increments ``red.shared.add``,
  quad read-back ``ld.shared.v4``, recognised by their ``%fh_`` registers) are all there.
- ``barriers``: on the PTX's control-flow graph, every path from one of the histogram's
  accesses to one of another kind (zero, increment, read-back, in any order) crosses an
  unpredicated, whole-CTA ``bar.sync``/``barrier.sync`` outside the reservation. A count of
  barriers cannot tell this: the reservation brings barriers of its own.
- ``foreign shared access``: every other instruction that may touch shared memory (any
  ``.shared`` state space, ``ldmatrix``/``stmatrix``/``cp.async``/``mbarrier``/``wgmma``/
  ``tcgen05``, and generic loads, stores and atomics, which could address it) runs only
  inside the reservation: it is dominated by the mark (unreachable from the entry once the
  mark is removed).
- ``replicated increment``: in the TTGIR, the operand of every histogram access has a 1-D
  blocked layout that covers its tensor at least once (``sizePerThread * threadsPerWarp *
  warpsPerCTA <= size``), so no element sits in two threads and is counted twice.
- ``coverage``: the shared memory the kernel declares (``metadata.shared``) spans every word
  the histogram touches: ``SLAB``-wide rounds of quads up to the dump word.

A kernel that also counts staleness adds to the high halves of the same words
(``red.shared.add.u32 [..], 65536``): the same kind of access, under the same rules, so the
guard needs no new one; that no word counts 65,536 times in a program (which would carry one
half into the other) is the launch's check on the chunk size, not a property of the code.

What it cannot check: that the reservation's condition is false at run time (that is the
source's ``start < 0`` on a chunk table of non-negative offsets), and that no barrier sits
under thread-divergent control flow (Triton's code branches on uniform values only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["RESERVED_MARK", "shared_bytes_needed", "shared_histogram_problems"]

#: The comment of the first instruction of the never-taken reservation branch.
RESERVED_MARK = "fasthist: reservation"

_SMEM_SYMBOL = re.compile(r"\.extern\s+\.shared\s+\.align\s+\d+\s+\.b8\s+global_smem\[\]")
_LABEL = re.compile(r"^\s*(\$?[\w.$]+):")
_STMT = re.compile(r"^(@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*)$", re.S)
_BARRIER = re.compile(r"^(bar|barrier)(\.cta)?\.sync(\.aligned)?$")
_MAY_TOUCH_SHARED = re.compile(r"\.shared|^(ldmatrix|stmatrix|cp\.async|mbarrier|wgmma|tcgen05)")
_GENERIC_ACCESS = re.compile(r"^(ld|st|atom|red)(\.(?!global|param|local|const|shared)\w+)*$")
_KINDS = {"st.shared.v4.u32": "zero", "red.shared.add.u32": "increment", "ld.shared.v4.u32": "read-back"}


class _Stmt:
    __slots__ = ("pred", "op", "args", "ours", "mark", "labels")

    def __init__(self, pred: str, op: str, args: str, ours: bool, mark: bool, labels: list[str]) -> None:
        self.pred, self.op, self.args, self.ours, self.mark, self.labels = pred, op, args, ours, mark, labels


def _statements(ptx: str) -> list[_Stmt]:
    """The kernel body's instructions in order, each with its predicate, whether it belongs
    to the histogram's inline PTX, and the labels just before it."""
    body = ptx[ptx.index("{", ptx.index(".entry")) + 1 :] if ".entry" in ptx else ptx
    out: list[_Stmt] = []
    labels: list[str] = []
    for line in body.splitlines():
        mark = RESERVED_MARK in line
        code = line.split("//", 1)[0]
        m = _LABEL.match(code)
        if m:
            labels.append(m.group(1))
            code = code[m.end() :]
        ours = "%fh_" in code
        for part in code.replace("{", ";").replace("}", ";").split(";"):
            s = _STMT.match(part.strip())
            if not s or s.group(2).startswith("."):
                continue
            out.append(_Stmt((s.group(1) or "").strip(), s.group(2), s.group(3), ours, mark, labels))
            labels, mark = [], False
    return out


def _successors(stmts: list[_Stmt]) -> list[list[int]]:
    where = {label: i for i, s in enumerate(stmts) for label in s.labels}
    succ: list[list[int]] = []
    for i, s in enumerate(stmts):
        nxt = [i + 1] if i + 1 < len(stmts) else []
        if s.op.startswith("bra"):
            target = where.get(s.args.strip().split(",")[0].strip())
            if target is None:
                raise ValueError(f"branch to an unknown label: {s.op} {s.args}")
            nxt = [target, *nxt] if s.pred else [target]
        elif s.op.startswith("brx"):
            raise ValueError("an indirect branch (brx.idx)")
        elif s.op in ("ret", "exit", "trap") and not s.pred:
            nxt = []
        succ.append(nxt)
    return succ


def _reach(succ: list[list[int]], starts: Iterable[int], stop) -> set[int]:
    """Statements reachable from ``starts`` (included) without passing one where ``stop``."""
    seen: set[int] = set()
    todo = [i for i in starts if not stop(i)]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(j for j in succ[i] if j not in seen and not stop(j))
    return seen


def _is_barrier(s: _Stmt) -> bool:
    # a whole-CTA barrier: unpredicated, and no thread count after the barrier id
    return not s.pred and bool(_BARRIER.match(s.op)) and "," not in s.args


def _ptx_problems(ptx: str) -> list[str]:
    stmts = _statements(ptx)
    kinds = {i: _KINDS.get(s.op) for i, s in enumerate(stmts) if s.ours and s.op in _KINDS}
    marks = [i for i, s in enumerate(stmts) if s.mark]
    missing = sorted(set(_KINDS.values()) - set(kinds.values()))
    if not _SMEM_SYMBOL.search(ptx) or len(marks) != 1 or missing:
        what = "no global_smem declared" if not _SMEM_SYMBOL.search(ptx) else ""
        what = what or (f"{len(marks)} reservation marks" if len(marks) != 1 else f"no {', '.join(missing)}")
        return [f"declaration: {what} in the PTX"]
    try:
        succ = _successors(stmts)
    except ValueError as e:
        return [f"declaration: cannot follow the PTX's control flow ({e})"]
    mark = marks[0]
    reservation = _reach(succ, [0], lambda i: False) - _reach(succ, [0], lambda i: i == mark)
    problems = []
    for i, kind in kinds.items():
        if i in reservation:
            return [f"declaration: the histogram's {kind} lies inside the reservation"]
    for kind in sorted(set(kinds.values())):
        starts = [j for i, k in kinds.items() if k == kind for j in succ[i]]
        fence = lambda j: _is_barrier(stmts[j]) and j not in reservation  # noqa: E731
        hit = [j for j in _reach(succ, starts, fence) if kinds.get(j, kind) != kind]
        if hit:
            problems.append(f"barriers: a path from the histogram's {kind} to its {kinds[hit[0]]} crosses no barrier")
            break
    for i, s in enumerate(stmts):
        if not s.ours and i not in reservation and (_MAY_TOUCH_SHARED.search(s.op) or _GENERIC_ACCESS.match(s.op)):
            problems.append(f"foreign shared access: {s.op} outside the reservation")
            break
    return problems


_LAYOUT = re.compile(r"^(#\w+) = #(?:ttg|triton_gpu)\.blocked<\{(.*?)\}>", re.M)
_OUR_ASM = re.compile(r'tt\.elementwise_inline_asm "[^"]*%fh_a[^"]*" \{[^}]*\} [^:]*: ([^-]*?) ->')
_TENSOR = re.compile(r"tensor<(\d+)x\w+, (#\w+)>")


def _ttgir_problems(ttgir: str) -> list[str]:
    layouts = {}
    for name, attrs in _LAYOUT.findall(ttgir):
        dims = dict(re.findall(r"(\w+) = \[([\d, ]*)\]", attrs))
        layouts[name] = [
            [int(v) for v in dims.get(k, "").split(",") if v.strip()]
            for k in ("sizePerThread", "threadsPerWarp", "warpsPerCTA")
        ]
    operands = _OUR_ASM.findall(ttgir)
    if not operands:
        return ["replicated increment: the histogram's operands are not in the TTGIR"]
    for types in operands:
        for size, layout in _TENSOR.findall(types) or [("0", types.strip())]:
            dims = layouts.get(layout)
            if dims is None or any(len(d) != 1 for d in dims):
                return [f"replicated increment: cannot read the layout {layout} of an operand"]
            per_tile = dims[0][0] * dims[1][0] * dims[2][0]
            if per_tile > int(size):
                return [f"replicated increment: {size} elements over {per_tile} lanes, some counted twice"]
    return []


def shared_bytes_needed(dump: int, slab: int) -> int:
    """Bytes of shared memory the histogram touches: ``slab``-wide rounds of 16-byte quads
    zeroed and read back, up to the quad of the dump word ``dump``."""
    quads = dump // 4 + 1
    return 16 * slab * -(-quads // slab)


def shared_histogram_problems(ptx: str, ttgir: str, shared_bytes: int, dump: int, slab: int) -> list[str]:
    """What stops the shared-memory histogram from running safely in this compiled kernel
    (empty: nothing), one line per broken rule (module docstring). ``ptx``/``ttgir``: the
    ``HIST_SHARED`` specialisation that will launch; ``shared_bytes``: its declared shared
    memory; ``dump``/``slab``: its ``DUMP`` and ``SLAB`` constexprs."""
    problems = _ptx_problems(ptx)
    if problems and problems[0].startswith("declaration"):
        return problems
    problems += _ttgir_problems(ttgir)
    needed = shared_bytes_needed(dump, slab)
    if shared_bytes < needed:
        problems.append(f"coverage: {shared_bytes} bytes of shared memory declared, the histogram uses {needed}")
    return problems
