"""Histograms across processes: 2 ranks with gloo on the CPU.

All scenarios run in one spawn of 2 processes (a spawn costs seconds); each rank saves
what it measured and the tests below compare it with a single-process run here:

- DDP (replicated state): the global histograms equal each rank's own (a tensor is not
  counted twice), are identical on both ranks, and match one process on the full batch
  up to the rounding of the all-reduced gradients (quantiles within the bins' accuracy).
- FSDP2 ``fully_shard`` (DTensor shards, uneven: 5 rows over 2 ranks): the merged
  histogram equals, exactly, the histogram of the full tensor's values.
- Manually sharded plain tensors (``sharded=True``), a replicated DTensor, tensors owned
  by one rank each (ZeRO-like), ``fasthist.distributed.all_reduce``, and the errors for
  different bins on different ranks and for one name given to tensors of different shapes.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fasthist
from fasthist.distributed import all_reduce

WORLD = 2
DDP_STEPS = 8
QS = [0.02, 0.25, 0.5, 0.75, 0.98]

STALENESS = ("sqrt_v", "staleness")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5 output rows: FSDP2 shards them 3 + 2 (uneven), the last layer 2 + 1.
    return torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def sqrt_vhat(opt, p, full: bool = False) -> torch.Tensor:
    """float32(sqrt_rn(v)) / float32(sqrt(1 - beta2**t)): the value fasthist.Adam bins."""
    st = opt.state[p]
    v = st["exp_avg_sq"].full_tensor() if full else st["exp_avg_sq"]
    c = (1 - opt.param_groups[0]["betas"][1] ** float(st["step"])) ** 0.5
    return v.double().sqrt().float() / torch.tensor(c, dtype=torch.float32)


def counts_of(hists: dict) -> dict:
    return {k: h.counts.clone() for k, h in hists.items()}


def _kernels_importable() -> bool:
    try:
        import fasthist.kernels.adam  # noqa: F401
        import fasthist.kernels.rmsprop  # noqa: F401
    except ImportError:
        return False
    return True


def _worker(rank: int, port: int, outdir: str) -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fasthist.kernels is imported
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = dist.group.WORLD
    out: dict = {}
    x, y = full_batch()

    # DDP: each rank trains on its half of the batch; gradients are averaged.
    model = DDP(make_model())
    opt = fasthist.Adam(model.parameters(), lr=1e-2, track=STALENESS)  # staleness beside: sqrt_v unchanged
    half = slice(rank * 8, (rank + 1) * 8)
    train(model, opt, x[half], y[half], DDP_STEPS)
    out["ddp_stale_local"] = counts_of(opt.histograms(quantity="staleness"))
    out["ddp_stale_global"] = counts_of(opt.histograms(quantity="staleness", process_group=world))
    out["ddp_local"] = counts_of(opt.histograms())
    out["ddp_global"] = counts_of(opt.histograms(process_group=world))
    out["ddp_global_total"] = counts_of(opt.histograms(window="total", process_group=world))
    out["ddp_quantiles"] = opt.quantiles(QS, process_group=world)
    out["ddp_merged_count"] = opt.histogram(process_group=world).count
    out["ddp_eps_range"] = opt.eps_range(process_group=world).to_dict()
    out["ddp_params"] = [p.detach().clone() for p in model.parameters()]

    # FSDP2: every rank holds a shard; both train on the full batch.
    mesh = init_device_mesh("cpu", (WORLD,))
    fsdp = make_model()
    fully_shard(fsdp, mesh=mesh)
    fopt = fasthist.Adam(fsdp.parameters(), lr=1e-2, track=STALENESS)
    train(fsdp, fopt, x, y, 3)
    out["fsdp_stale_local"] = counts_of(fopt.histograms(window="total", quantity="staleness"))
    out["fsdp_stale_global"] = counts_of(fopt.histograms(window="total", quantity="staleness", process_group=world))
    params = list(fsdp.parameters())
    out["fsdp_placements"] = [str(p.placements) for p in params]
    out["fsdp_local_numel"] = [p.to_local().numel() for p in params]
    out["fsdp_global"] = counts_of(fopt.histograms(process_group=world))
    out["fsdp_as_replicated"] = counts_of(fopt.histograms(process_group=world, sharded=False))
    out["fsdp_expected"] = [fopt.bins.count(sqrt_vhat(fopt, p, full=True)) for p in params]
    out["fsdp_merged_param"] = fopt.histogram(params[0], process_group=world).counts.clone()
    out["fsdp_eps_range"] = fopt.eps_range(process_group=world).to_dict()

    # The same under the Triton kernels (interpreted on the CPU): they get the local shards.
    out["fsdp_triton"] = None
    if _kernels_importable():
        results = {}
        with fasthist.backend.use("triton"):
            for name, make in (
                ("adam", lambda ps: fasthist.Adam(ps, lr=1e-2)),
                ("rmsprop", lambda ps: fasthist.RMSprop(ps, lr=1e-3, centered=True, momentum=0.9)),
            ):
                tmodel = make_model()
                fully_shard(tmodel, mesh=mesh)
                topt = make(tmodel.parameters())
                train(tmodel, topt, x, y, 2)
                assert {c.backend for c in topt.backends().values()} == {"triton"}, topt.backends()
                tparams = list(tmodel.parameters())
                if name == "adam":
                    expected = [topt.bins.count(sqrt_vhat(topt, p, full=True)) for p in tparams]
                else:
                    expected = []
                    for p in tparams:
                        st = topt.state[p]
                        v, ga = st["square_avg"].full_tensor(), st["grad_avg"].full_tensor()
                        expected.append(topt.bins.count(v.addcmul(ga, ga, value=-1).double().sqrt().float()))
                results[name] = (list(counts_of(topt.histograms(process_group=world)).values()), expected)
        out["fsdp_triton"] = results

    # A replicated DTensor is counted once.
    rep = distribute_tensor(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), mesh, [Replicate()])
    rep = torch.nn.Parameter(rep)
    ropt = fasthist.Adam([rep])
    rep.grad = distribute_tensor(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)), mesh, [Replicate()])
    ropt.step()
    out["replicated_dtensor_count"] = ropt.histogram(process_group=world).count

    # HSDP-style placements (Replicate over ranks, Shard over a size-1 dim): each rank holds
    # the whole tensor as its "shard"; only mesh coordinate 0 of the replicate dim counts.
    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    hsdp = torch.nn.Parameter(
        distribute_tensor(torch.randn(5, 4, generator=torch.Generator().manual_seed(5)), mesh2, [Replicate(), Shard(0)])
    )
    hopt = fasthist.Adam([hsdp])
    hsdp.grad = distribute_tensor(torch.ones(5, 4), mesh2, [Replicate(), Shard(0)])
    hopt.step()
    out["hsdp_count"] = hopt.histogram(process_group=world).count

    # Manual sharding: rank r holds rows r::2 of one plain tensor.
    g = torch.Generator().manual_seed(4)
    full_w, full_g = torch.randn(7, 3, generator=g), torch.randn(5, 7, 3, generator=g)
    shard = full_w[rank::WORLD].clone().requires_grad_()
    sopt = fasthist.RMSprop([shard], centered=True)
    for t in range(5):
        shard.grad = full_g[t, rank::WORLD].clone()
        sopt.step()
    st = sopt.state[shard]
    out["manual_value"] = st["square_avg"].addcmul(st["grad_avg"], st["grad_avg"], value=-1).double().sqrt().float()
    out["manual_sharded"] = sopt.histogram(shard, process_group=world, sharded=True).counts.clone()
    try:  # by default plain tensors are replicas: pieces of different shapes cannot be
        sopt.histogram(shard, process_group=world)
    except ValueError as e:
        out["manual_default"] = str(e)
    out["manual_local"] = sopt.histogram(shard).counts.clone()

    # ZeRO-like: each rank owns a different named tensor.
    own = torch.randn(3 + rank, requires_grad=True)
    zopt = fasthist.Adagrad([(f"w{rank}", own)])
    own.grad = torch.ones_like(own)
    zopt.step()
    out["zero_global"] = {k: h.count for k, h in zopt.histograms(process_group=world).items()}

    # all_reduce of a plain Histogram sums; different bins on different ranks fail cleanly.
    h = fasthist.Histogram.from_values(torch.full((10 * (rank + 1),), 0.5))
    out["all_reduce"] = all_reduce(h, world).counts.clone()
    try:
        all_reduce(fasthist.Histogram.from_values(torch.ones(3), fasthist.LogBins(mantissa_bits=4 + rank)))
    except ValueError as e:
        out["bins_error"] = str(e)
    big = torch.zeros(h.bins.num_bins, dtype=torch.int64)
    big[100] = 2**62 + 1  # valid on each rank; the sum over two ranks wraps
    try:
        all_reduce(fasthist.Histogram(big, h.bins), world)
    except ValueError as e:
        out["overflow_error"] = str(e)
    mismatched = fasthist.Adam([torch.zeros(2, requires_grad=True)], bins=fasthist.LogBins(mantissa_bits=4 + rank))
    mismatched.param_groups[0]["params"][0].grad = torch.ones(2)
    mismatched.step()
    try:
        mismatched.histograms(process_group=world)
    except ValueError as e:
        out["query_bins_error"] = str(e)

    # model.parameters() names by position: rank 0's "0.0" (3 elements) and rank 1's "0.0"
    # (4 elements) are different tensors; merged as replicas, rank 1's counts were dropped.
    # Manual shards (sharded=True) of different sizes under one name are what shards are.
    unnamed = fasthist.Adam([torch.zeros(3 + rank, requires_grad=True)])
    unnamed.param_groups[0]["params"][0].grad = torch.ones(3 + rank)
    unnamed.step()
    try:
        unnamed.histograms(process_group=world)
    except ValueError as e:
        out["shape_error"] = str(e)
    out["shards_of_two_sizes"] = unnamed.histogram("0.0", process_group=world, sharded=True).count

    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_staleness_merges_like_sqrt_v(ranks):
    """Replicated (DDP) staleness rows count once; FSDP2 shards add up, as the sqrt(v_hat) ones."""
    for r in ranks:
        assert set(r["ddp_stale_global"]) == set(r["ddp_local"])
        for name, counts in r["ddp_stale_global"].items():
            assert torch.equal(counts, r["ddp_stale_local"][name]), name
    first, second = (r["fsdp_stale_local"] for r in ranks)
    for name, counts in ranks[0]["fsdp_stale_global"].items():
        assert torch.equal(counts, first[name] + second[name]), name
        assert torch.equal(counts, ranks[1]["fsdp_stale_global"][name]), name
    numel = sum(p.numel() for p in make_model().parameters())
    assert sum(int(c.sum()) for c in ranks[0]["fsdp_stale_global"].values()) == 3 * numel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("dist"))
    sys.path.insert(0, os.path.dirname(__file__))  # the spawned ranks import this module
    mp.spawn(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def single_process_ddp_reference():
    model = make_model()
    opt = fasthist.Adam(model.parameters(), lr=1e-2)
    x, y = full_batch()
    train(model, opt, x, y, DDP_STEPS)
    return model, opt


def test_ddp_replicated_state_is_counted_once(ranks):
    for r in ranks:
        assert set(r["ddp_global"]) == set(r["ddp_local"])
        for name, counts in r["ddp_global"].items():
            assert torch.equal(counts, r["ddp_local"][name]), name
        numel = sum(p.numel() for p in make_model().parameters())
        assert r["ddp_merged_count"] == numel
        assert sum(int(c.sum()) for c in r["ddp_global_total"].values()) == DDP_STEPS * numel
    for name in ranks[0]["ddp_global"]:
        assert torch.equal(ranks[0]["ddp_global"][name], ranks[1]["ddp_global"][name])
    assert ranks[0]["ddp_eps_range"] == ranks[1]["ddp_eps_range"]


def test_ddp_matches_one_process_on_the_full_batch(ranks):
    model, opt = single_process_ddp_reference()
    names, q_single = opt.quantiles(QS)
    rel = opt.bins.relative_accuracy
    for r in ranks:
        for p_ddp, p_single in zip(r["ddp_params"], model.parameters(), strict=True):
            torch.testing.assert_close(p_ddp, p_single.detach(), rtol=1e-5, atol=1e-6)
        ddp_names, q_ddp = r["ddp_quantiles"]
        assert ddp_names == names
        # The all-reduced gradients differ from the full-batch ones by rounding only; an
        # element may cross into the next bin, so a quantile may move by one bin width
        # (2 * relative_accuracy of the representative), never more.
        torch.testing.assert_close(q_ddp, q_single, rtol=2.05 * rel, atol=0.0)


def test_fsdp2_merged_histogram_is_exactly_the_full_tensors(ranks):
    for r in ranks:
        assert all("Shard(dim=0)" in s for s in r["fsdp_placements"])
        for counts, expected in zip(r["fsdp_global"].values(), r["fsdp_expected"], strict=True):
            assert torch.equal(counts, expected)
        assert torch.equal(r["fsdp_merged_param"], r["fsdp_expected"][0])
    # uneven shards: 5 rows of 8 -> 3 + 2 rows
    assert ranks[0]["fsdp_local_numel"][0] == 24 and ranks[1]["fsdp_local_numel"][0] == 16
    # treating shards as replicas would keep rank 0's piece only: a different histogram
    first = next(iter(ranks[0]["fsdp_as_replicated"].values()))
    assert int(first.sum()) == 24 != int(ranks[0]["fsdp_expected"][0].sum())
    assert ranks[0]["fsdp_eps_range"] == ranks[1]["fsdp_eps_range"]


def test_fsdp2_on_the_triton_kernels(ranks):
    """DTensor parameters reach the kernels as their local shards (a DTensor's data_ptr()
    is 0): the merged histograms are again exactly the full tensors'."""
    if ranks[0]["fsdp_triton"] is None:
        pytest.skip("fasthist.kernels is not importable here")
    for r in ranks:
        assert set(r["fsdp_triton"]) == {"adam", "rmsprop"}
        for name, (got, expected) in r["fsdp_triton"].items():
            assert len(got) == len(expected) == 4
            for g, e in zip(got, expected, strict=True):
                assert torch.equal(g, e), name


def test_replicated_dtensor_is_counted_once(ranks):
    assert [r["replicated_dtensor_count"] for r in ranks] == [24, 24]
    assert [r["hsdp_count"] for r in ranks] == [20, 20]


def test_manual_shards_merge_exactly_with_sharded_true(ranks):
    bins = fasthist.LogBins()
    full = torch.cat([r["manual_value"].reshape(-1) for r in ranks])
    assert full.numel() == 21
    for r in ranks:
        assert torch.equal(r["manual_sharded"], bins.count(full))
        # default (plain tensors are replicas): pieces of different shapes are refused, where
        # rank 1's piece was dropped without a word
        assert "'0.0' is a tensor of shape (4, 3) on rank 0 and of shape (3, 3) on rank 1" in r["manual_default"]


def test_tensors_owned_by_one_rank_each(ranks):
    for r in ranks:
        assert r["zero_global"] == {"w0": 3, "w1": 4}


def test_all_reduce_sums_and_checks_bins(ranks):
    for r in ranks:
        assert int(r["all_reduce"].sum()) == 30
        assert "different bins" in r["bins_error"] and "rank 1" in r["bins_error"]
        assert "different bins" in r["query_bins_error"]


def test_one_name_for_tensors_of_different_shapes_refused(ranks):
    for r in ranks:
        assert r["shape_error"] == (
            "cannot merge histograms across ranks: '0.0' is a tensor of shape (3,) on rank 0 and of shape (4,) "
            "on rank 1; a name must identify one tensor on every rank (unnamed parameters are named by position, "
            "'{group}.{index}': give the optimizer model.named_parameters())"
        )
        assert r["shards_of_two_sizes"] == 3 + 4


def test_all_reduce_detects_overflow(ranks):
    for r in ranks:
        assert "all_reduce: the histograms of the ranks together overflow int64" in r.get("overflow_error", "")


def test_all_reduce_rejects_non_histograms():
    with pytest.raises(TypeError, match="fasthist.Histogram"):
        all_reduce(torch.zeros(3))
