"""merge_many, and a two-model merge with collect=, across 2 data-parallel gloo workers equal the same
merge in one process on all the data."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mergekit_vision import merge, merge_many
from mergekit_vision.distributed import all_reduce_statistics, merge_many_distributed
from mergekit_vision.errors import MergeVisionError
from mergekit_vision.merge_many import LocalCollector, Statistics
from mergekit_vision.models import tiny_resnet
from mergekit_vision.testing import randomize_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with the gloo backend is not available in this torch build")]

WORLD = 2


def _setup():
    torch.manual_seed(0)
    x = torch.randn(96, 1, 16, 16)
    models = [randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2, 3)]
    return models, list(x.split(16))  # 6 batches: rank r gets batches r, r+2, r+4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        models, batches = _setup()
        shard = batches[rank::WORLD]
        merged, rep = merge_many_distributed(models, shard, iterations=2, repair=True, return_report=True,
                                             progress=False)
        # a two-model merge takes the same collect: its statistics pooled across the ranks too
        two, rep2 = merge(models[0], models[1], shard, alpha=0.3, return_report=True, progress=False,
                          collect=LocalCollector(shard, reduce=all_reduce_statistics))
        torch.save({"state": merged.state_dict(), "samples": rep.calibration_samples,
                    "changes": rep.changes_per_sweep, "two": two.state_dict(), "two_samples": rep2.calibration_samples},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # least-squares repair: every round of fits all-gathered before it is solved
        lsq, rep3 = merge_many_distributed(models, shard, iterations=2, repair="lsq", return_report=True,
                                           progress=False)
        torch.save({"state": lsq.state_dict(), "samples": rep3.calibration_samples, "bytes": rep3.lsq_round_bytes},
                   os.path.join(out_dir, f"lsq{rank}.pt"))
        # the statistics themselves: the all-reduced sums of the shards
        st = Statistics(samples=len(shard))
        pooled = all_reduce_statistics(st)
        torch.save(pooled.samples, os.path.join(out_dir, f"samples{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization. torch's gloo backend can abort the process there
    # (SIGABRT, "terminate called without an active exception"), after every result above is written:
    # a core dump shows ProcessGroupGloo::runLoop's thread destroying the last AsyncAllgatherWork, whose
    # tensors' decref asks for the GIL while Py_FinalizeEx runs, and CPython ends that thread inside a
    # noexcept destructor. It is a race in torch (pytorch/pytorch PR 179291 describes it), hit about one run
    # in six here under load, not a property of the merge this test checks; the saved files are.
    os._exit(0)


@pytest.mark.slow
def test_two_gloo_workers_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    models, batches = _setup()
    torch.set_num_threads(1)
    ref, rep = merge_many(models, batches, iterations=2, repair=True, return_report=True, progress=False)
    ref2 = merge(models[0], models[1], batches, alpha=0.3, progress=False)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in results:
        assert res["samples"] == rep.calibration_samples == 96  # every rank saw the pooled count
        assert res["changes"] == rep.changes_per_sweep
        for k, v in ref.state_dict().items():
            # the same sums added in another order: equal up to float64 rounding, then cast to float32
            assert torch.allclose(res["state"][k].double(), v.double(), rtol=1e-5, atol=1e-6), k
        assert res["two_samples"] == 96
        for k, v in ref2.state_dict().items():
            assert torch.allclose(res["two"][k].double(), v.double(), rtol=1e-5, atol=1e-6), k
    assert all(torch.load(tmp_path / f"samples{r}.pt") == 6 for r in range(WORLD))
    # repair="lsq": the same G, H sums added in another order, solved in float64, cast to the float32 model;
    # the walk then feeds each fit's float32 output to the next, so a last-bit difference in one fitted
    # weight can move later fits by a few float32 ulps times their conditioning: 1e-5 relative, as above
    lsq, rep3 = merge_many(models, batches, iterations=2, repair="lsq", return_report=True, progress=False)
    got = [torch.load(tmp_path / f"lsq{r}.pt") for r in range(WORLD)]
    assert rep3.lsq_round_bytes and len(rep3.lsq_round_bytes) == 7  # 6 rounds of fits, 1 of BatchNorm moments
    for res in got:
        assert res["samples"] == 96 and res["bytes"] == rep3.lsq_round_bytes
        for k, v in lsq.state_dict().items():
            assert torch.allclose(res["state"][k].double(), v.double(), rtol=1e-5, atol=1e-6), k
    for k, v in got[0]["state"].items():  # the ranks agree bit for bit: they solved the same pooled sums
        assert torch.equal(v, got[1]["state"][k]), k


def test_all_reduce_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(MergeVisionError, match="init_process_group"):
        all_reduce_statistics(Statistics(samples=1))
