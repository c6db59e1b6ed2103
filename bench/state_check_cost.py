"""What the step's state check (:func:`fasthist.backend.check_states`) costs: the same
optimizer stepped with the check and with it replaced by a no-op, alternately, 15 times
each; medians. One thread, CPU::

    python bench/state_check_cost.py [N_PARAMS] [SIDE]     # default 1000 16

Prints, per flag set, the median step time both ways, their ratio and the difference per
parameter. A ``fused=True`` step of one param group runs the compiled CPU op where a
compiler exists, which checks its own tensors: there the check does not run at all.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import fasthist
import fasthist.backend as backend


def main(n: int = 1000, side: int = 16) -> None:
    torch.set_num_threads(1)
    real = backend.check_states
    for flags in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        params = [torch.nn.Parameter(torch.randn(side, side)) for _ in range(n)]
        opt = fasthist.Adam(params, **flags)
        for p in params:
            p.grad = torch.randn_like(p)
        for _ in range(3):
            opt.step()
        times: dict[bool, list[float]] = {True: [], False: []}
        try:
            for _ in range(15):
                for checked in (True, False):
                    backend.check_states = real if checked else (lambda *a, **k: None)
                    start = time.perf_counter()
                    opt.step()
                    times[checked].append(time.perf_counter() - start)
        finally:
            backend.check_states = real
        on, off = statistics.median(times[True]), statistics.median(times[False])
        ran = sorted({c.backend for c in opt.backends().values()})
        print(
            f"{n} x {side}x{side} {flags} {'/'.join(ran)}: checked {on * 1e3:.2f} ms, unchecked {off * 1e3:.2f} ms, "
            f"ratio {on / off:.3f}, {(on - off) * 1e6 / n:+.2f} us per parameter"
        )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
