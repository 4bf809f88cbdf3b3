"""``fastdit serve`` under torchrun on two CPU ranks (gloo): rank 0 serves HTTP, both ranks run every
packed forward sequence-parallel (Ulysses over the two heads of the tiny preset)."""

import io

import numpy as np

from fastdit.benchmarks.serve_load import Server, call, post, wait_all

ASKS = [{"prompt": "two ranks", "size": "96x64", "frames": 9, "steps": 30, "seed": 3},
        {"prompt": "two ranks", "size": "64x64", "frames": 9, "steps": 30, "seed": 4}]  # fmt: skip


def _frames(data: bytes):
    import imageio.v3 as iio

    return iio.imread(io.BytesIO(data), extension=".mp4").astype(np.float64)


def test_two_ranks_serve_packed_requests_like_one(server, tmp_path):
    """Catches: a follower whose batch differs from rank 0's (the sequence-parallel forward compares
    fingerprints and raises: the jobs would fail), a follower that never steps (rank 0 hangs in
    the Ulysses all-to-all, the wait times out), text keys / values not cut to each rank's pieces
    (a shape error or a wrong video), and a shutdown that leaves a rank waiting."""
    url, _engine = server
    single = [post(url, ask)["id"] for ask in ASKS]
    wait_all(url, single, 60)
    two = Server(str(tmp_path / "jobs.sqlite"), "cpu", ranks=2)
    try:
        assert call(two.url, "GET", "/health")[1]["ranks"] == 2
        ids = [post(two.url, ask)["id"] for ask in ASKS]
        final = wait_all(two.url, ids, 120)
        assert all(v["status"] == "completed" for v in final.values()), final
        # the second joins while the first has most of its 30 steps to go: forwards of both requests' samples
        assert two.metric("fastdit_samples_per_forward_sum") > two.metric("fastdit_samples_per_forward_count") * 2
        for mine, theirs in zip(ids, single):
            got = _frames(call(two.url, "GET", f"/v1/videos/{mine}/content")[1])
            want = _frames(call(url, "GET", f"/v1/videos/{theirs}/content")[1])
            assert got.shape == want.shape
            # sharded attention and matmuls round differently: equal up to a few 8-bit levels after H.264
            assert np.abs(got - want).mean() < 1.0, np.abs(got - want).mean()
    finally:
        two.stop()
    assert two.process.returncode == 0  # every rank left cleanly
