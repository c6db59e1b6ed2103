"""What the store's per-step validity check costs (:meth:`fasthist.store.HistogramStore._valid_for`:
is every stepped parameter packed, and is its state entry the one its rows were packed for).
Every eager step runs it once over the parameters it steps. CPU, one thread::

    python bench/store_check_cost.py [N_PARAMS]     # default 1000

Prints the best of 7 repeats of 200 checks over ``N_PARAMS`` stepped Adam parameters, in µs
per check. Run it on two checkouts side by side (``PYTHONPATH=CHECKOUT``) to compare them.
"""

from __future__ import annotations

import sys
import timeit

import torch

import fasthist


def main(n: int = 1000) -> None:
    torch.set_num_threads(1)
    params = [torch.zeros(4, requires_grad=True) for _ in range(n)]
    opt = fasthist.Adam(params)
    for p in params:
        p.grad = torch.ones(4)
    opt.step()
    store = opt._hist_store()
    check = lambda: store._valid_for(opt.state, params)  # noqa: E731
    assert check(), "the store should be valid right after a step"
    best = min(timeit.repeat(check, number=200, repeat=7)) / 200
    print(f"{n} parameters: {best * 1e6:.0f} us per check ({best / n * 1e9:.0f} ns per parameter)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
