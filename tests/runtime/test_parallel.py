"""Sequence parallelism on CPU with gloo: 2, 3 and 4 processes, Ulysses / Ring / USP / CFG, against
the single-process model (forward and gradients), and the failure modes (never a hang)."""

import copy
import dataclasses
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastdit.models import DiT, PackedBatch, preset
from fastdit.runtime.parallel import (
    Layout,
    all_reduce_gradients,
    apply_sequence_parallel,
    balanced_bounds,
    head_split,
    make_plan,
    pieces,
)

# (cfg, ulysses, ring) per world size: heads = 3, so Ulysses 2 and 4 split them unevenly (4 leaves
# one rank without a head), and 31 / 32 tokens split unevenly over every degree.
CONFIGS = {
    2: [(1, 2, 1), (1, 1, 2), (2, 1, 1)],
    3: [(1, 3, 1), (1, 1, 3)],
    4: [(1, 2, 2), (1, 4, 1), (1, 1, 4), (2, 2, 1), (2, 1, 2)],
}


def _context():
    """Processes forked from one server that imported torch, fastdit and this file once: each rank
    starts in milliseconds instead of re-importing everything (seconds per rank on two cores). The
    server is single-threaded, so its forks are safe, unlike forks of a test process."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(backend="reference", num_layers=None):
    torch.manual_seed(0)
    config = preset("tiny").replace(num_heads=3, head_dim=16)
    model = DiT(config if num_layers is None else config.replace(num_layers=num_layers), backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def make_batch(cfg: int, device="cpu", dtype=torch.float32) -> PackedBatch:
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4, 6), (1, 8, 4), (5, 2, 2)] + ([(1, 2, 2)] if cfg == 2 else [])
    latents = [torch.randn(16, *s, generator=gen).to(device, dtype) for s in shapes]
    texts = [torch.randn(n, 32, generator=gen).to(device, dtype) for n in (4, 7, 1, 3)[: len(shapes)]]
    timesteps = torch.tensor([10.0, 500.0, 999.0, 250.0][: len(shapes)], device=device)
    return PackedBatch.from_samples(latents, timesteps, texts, (1, 2, 2))


def _init(rank, world, port, timeout_s=60):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


# ---- one set of ranks per world size, for the file -------------------------------------------------
# Each spawned rank imports torch and fastdit (seconds on a 2-core machine): the tests whose ranks
# all come back healthy share one spawned world per size (2, 3, 4 ranks), started at its first use
# and kept for the file. The tests that kill or hang a rank keep processes of their own.


def _pool_worker(rank, size, port, inbox, outbox):
    _init(rank, size, port)
    try:
        while (task := inbox.get()) is not None:
            name, args = task
            try:
                outbox.put((rank, "ok", SCENARIOS[name](rank, *args)))
            except BaseException:  # noqa: BLE001 - the test reports every rank's traceback
                outbox.put((rank, traceback.format_exc(), None))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``size`` spawned ranks in one gloo world; ``run(name, *args)`` runs ``SCENARIOS[name]`` on
    every rank and returns each rank's result, raising with the tracebacks of ranks that failed."""

    def __init__(self, size: int):
        ctx = _context()
        port = free_port()
        self.size = size
        self.inboxes, self.outbox = [ctx.Queue() for _ in range(size)], ctx.Queue()
        self.procs = [ctx.Process(target=_pool_worker, args=(rank, size, port, self.inboxes[rank], self.outbox))
                      for rank in range(size)]  # fmt: skip
        for proc in self.procs:
            proc.start()

    def run(self, name: str, *args, timeout_s: float = 600) -> list:
        for inbox in self.inboxes:
            inbox.put((name, args))
        replies = sorted(self.outbox.get(timeout=timeout_s) for _ in range(self.size))
        failed = [f"rank {rank}:\n{status}" for rank, status, _ in replies if status != "ok"]
        assert not failed, "\n".join(failed)
        return [value for _, _, value in replies]

    def close(self):
        for inbox in self.inboxes:
            inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def ranks():
    """``ranks(world)``: the file's pool of ``world`` ranks (spawned at its first use)."""
    pools: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in pools:
            pools[world] = RankPool(world)
        return pools[world]

    yield get
    for pool in pools.values():
        pool.close()


def _parity(rank, world, backend="reference", configs=None, num_layers=None):
    """Every (cfg, ulysses, ring) of ``configs`` on a world of ``world`` ranks: output and gradients
    against the single-process model, the model alone, and the dense call."""
    for cfg, ulysses, ring in configs or CONFIGS[world]:
        model = make_model(backend, num_layers)
        reference = make_model("reference", num_layers)  # the oracle, on the same weights
        batch = make_batch(cfg)
        weight = torch.randn(batch.tokens.shape[0], 64, generator=torch.Generator().manual_seed(2))
        expect = reference.forward_packed(batch)
        (expect * weight).sum().backward()
        sp = apply_sequence_parallel(model, ulysses=ulysses, ring=ring, cfg=cfg)
        out = sp.forward_packed(batch)
        where = f"rank {rank}, cfg={cfg} ulysses={ulysses} ring={ring}"
        err = ((out - expect).norm() / expect.norm()).item()
        assert out.shape == expect.shape and err <= 1e-5, f"{where}: output error {err}"
        (out * weight).sum().backward()
        all_reduce_gradients(model)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            gerr = ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)).item()
            assert gerr <= 1e-4, f"{where}: gradient of {name} error {gerr}"
        with torch.no_grad():
            # the wrapped model still works on its own (single process, plain attention) ...
            alone = model.forward_packed(batch)
            assert ((alone - expect).norm() / expect.norm()).item() <= 1e-5, f"{where}: model alone"
            # ... and the wrapper takes DiT.forward's dense call
            latents = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(3))
            text, timestep = torch.randn(2, 5, 32), torch.tensor([3.0, 700.0])
            dense, want = sp(latents, timestep, text), reference(latents, timestep, text)
            assert dense.shape == want.shape, f"{where}: dense shape {tuple(dense.shape)}"
            assert ((dense - want).norm() / want.norm()).item() <= 1e-5, f"{where}: dense call"
    return "ok"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sequence_parallel_matches_single_process(ranks, world):
    assert ranks(world).run("parity", world) == ["ok"] * world


@pytest.mark.triton_cpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs the interpreter")
def test_sequence_parallel_on_triton_kernels(ranks):
    """Ring and Ulysses over the Triton attention (forward, LSE, backward) and RoPE kernels: one
    block (the interpreter's time grows with every layer; a layer's collectives are the same)."""
    assert ranks(2).run("parity", 2, "triton", [(1, 1, 2), (1, 2, 1)], 1) == ["ok", "ok"]


def _mismatch(rank, kinds):
    """Each kind in turn on one group of two ranks: a mismatch raises on every rank before any
    collective of the forward, so the group stays usable for the next kind."""
    results = []
    for kind in kinds:
        try:
            model = make_model()
            if kind == "config":
                apply_sequence_parallel(model, ulysses=2 if rank == 0 else 1, ring=1 if rank == 0 else 2)
            else:
                sp = apply_sequence_parallel(model, ulysses=2)
                batch = make_batch(1) if rank == 0 or kind != "batch" else PackedBatch.from_samples(
                    [torch.randn(16, 1, 2, 2)], torch.tensor([1.0]), [torch.randn(2, 32)], (1, 2, 2)
                )  # fmt: skip
                if rank == 1 and kind != "batch":
                    batch = _same_shapes_other(batch, kind)
                sp.forward_packed(batch)
            results.append((kind, "no error"))
        except Exception as err:  # noqa: BLE001 - the test inspects what every rank raised
            results.append((kind, f"{type(err).__name__}: {err}"))
    return results


def _same_shapes_other(batch: PackedBatch, kind: str) -> PackedBatch:
    """The batch with every shape kept and one thing changed (rank 0 keeps the original)."""
    if kind == "latents":  # one token value
        tokens = batch.tokens.clone()
        tokens[5, 3] += 1.0
        return dataclasses.replace(batch, tokens=tokens)
    if kind == "timesteps":
        return dataclasses.replace(batch, timestep=batch.timestep.flip(0))
    if kind == "grids":  # the first sample's (t, h, w) = (3, 2, 3) read as (3, 3, 2): same token count
        grid = batch.grid_thw.clone()
        grid[0] = grid[0, [0, 2, 1]]
        return dataclasses.replace(batch, grid_thw=grid)
    if kind == "text":
        text = batch.text.clone()
        text[-1, -1] -= 1.0
        return dataclasses.replace(batch, text=text)
    raise ValueError(kind)


def _dying_worker(rank, world, port, queue):
    _init(rank, world, port, timeout_s=20)
    if rank == 1:
        dist.barrier()
        os._exit(3)  # dies without a word
    dist.barrier()
    start = time.monotonic()
    try:
        sp = apply_sequence_parallel(make_model(), ulysses=2)
        sp.forward_packed(make_batch(1))
        queue.put((rank, "no error", time.monotonic() - start))
    except Exception as err:  # noqa: BLE001
        queue.put((rank, f"{type(err).__name__}: {err}"[:300], time.monotonic() - start))


HUNG_TIMEOUT_S = 5


def _hung_worker(rank, world, port, ulysses, ring, explicit, queue):
    """Rank 1 stays alive but stops taking part after the batch check: its first all-to-all or
    ring shift never starts. The others must fail within the group timeout, not torch's 30 min
    (``explicit``: the world waits 30x longer, apply_sequence_parallel(timeout=) is the bound)."""
    from fastdit.runtime import parallel

    _init(rank, world, port, timeout_s=HUNG_TIMEOUT_S * (30 if explicit else 1))
    timeout = timedelta(seconds=HUNG_TIMEOUT_S) if explicit else None
    sp = apply_sequence_parallel(make_model(), ulysses=ulysses, ring=ring, timeout=timeout)
    if rank == 1:

        def hang(*args, **kwargs):
            time.sleep(600)

        parallel._all_to_all_padded = parallel._shift = hang
    start = time.monotonic()
    try:
        sp.forward_packed(make_batch(1))
        message = "no error"
    except Exception as err:  # noqa: BLE001
        message = f"{type(err).__name__}: {err}"[:300]
    queue.put((rank, message, time.monotonic() - start))
    queue.close()
    queue.join_thread()  # the message is written before the process goes
    os._exit(0)  # a clean shutdown would wait for the hung rank


def _run_processes(target, world, *args, expect=None, join_timeout=30):
    return _run_worlds([(target, world, args, expect)], join_timeout)[0]


def _run_worlds(worlds, join_timeout=30):
    """Several worlds at once, each ``(target, size, args, expected replies)`` on its own port:
    the failure tests wait out timeouts, which overlap when the worlds run side by side."""
    ctx = _context()
    started = []
    for target, world, args, expect in worlds:
        queue, port = ctx.Queue(), free_port()
        procs = [ctx.Process(target=target, args=(rank, world, port, *args, queue)) for rank in range(world)]
        for p in procs:
            p.start()
        started.append((queue, procs, expect or world))
    results = []
    for queue, _, expect in started:
        replies = []
        try:
            for _ in range(expect):
                replies.append(queue.get(timeout=120))
        except Exception:
            traceback.print_exc()
        results.append(sorted(replies))
    for _, procs, _ in started:
        for p in procs:
            p.join(timeout=join_timeout)
            if p.is_alive():
                p.kill()
    return results


MISMATCHES = {"config": "differs across ranks", "batch": "different batch", "latents": "different batch",
              "timesteps": "different batch", "grids": "different batch", "text": "different batch"}  # fmt: skip


@pytest.mark.bad_input
def test_mismatch_raises_on_every_rank(ranks):
    """A differing configuration, a differing batch, and same-shaped batches that differ in one
    token value, the timesteps, a grid or one text value: every rank raises."""
    results = list(enumerate(ranks(2).run("mismatch", list(MISMATCHES))))
    assert len(results) == 2, results
    for rank, outcomes in results:
        assert [kind for kind, _ in outcomes] == list(MISMATCHES), outcomes
        for kind, message in outcomes:
            assert MISMATCHES[kind] in message, (rank, kind, message)


@pytest.mark.bad_input
def test_a_dead_rank_ends_the_others_with_an_error_not_a_hang():
    results = _run_processes(_dying_worker, 2, expect=1)
    assert len(results) == 1, results
    rank, message, elapsed = results[0]
    assert rank == 0 and message != "no error" and elapsed < 60, results


# world, ulysses, ring, whether the bound is apply_sequence_parallel(timeout=) (else the world's,
# inherited by USP's Ulysses subgroups)
HUNG_LAYOUTS = {"ulysses, timeout=": (2, 2, 1, True), "ring": (2, 1, 2, False), "usp": (4, 2, 2, False)}


@pytest.mark.bad_input
def test_a_hung_rank_ends_the_others_within_the_timeout():
    """Ulysses (bounded by apply_sequence_parallel(timeout=), not its world's 30x longer one: catches
    the argument not reaching the subgroups), Ring and USP (the group's own timeout, inherited by
    its Ulysses subgroups), side by side: each waits out its timeout."""
    worlds = [(_hung_worker, world, (ulysses, ring, explicit), world - 1)
              for world, ulysses, ring, explicit in HUNG_LAYOUTS.values()]  # fmt: skip
    for (name, (world, *_)), results in zip(HUNG_LAYOUTS.items(), _run_worlds(worlds, join_timeout=2)):
        assert len(results) == world - 1, (name, results)
        for rank, message, elapsed in results:
            assert rank != 1 and message != "no error", (name, results)
            assert elapsed < HUNG_TIMEOUT_S + 30, f"{name}: rank {rank} waited {elapsed:.0f} s: {message}"


# ---- the plan, without processes ---------------------------------------------------------------------


def test_plan_balances_tokens_and_keeps_pieces_in_order():
    assert balanced_bounds(0, 31, 4) == [0, 7, 15, 23, 31]
    assert head_split(12, 8) == [2, 2, 2, 2, 1, 1, 1, 1] and head_split(3, 4) == [1, 1, 1, 0]
    cu = [0, 18, 26, 31]
    plan = make_plan(Layout(cfg=1, ulysses=2, ring=2, rank=0), cu)
    assert plan.ring_shard == {(0, 0): (0, 15), (0, 1): (15, 31)}
    assert plan.sub[(0, 1, 0)] == (15, 23) and plan.sub[(0, 1, 1)] == (23, 31)
    shard = pieces(cu, 15, 31)  # sample 0 straddles: its tail starts at offset 15
    assert [(p.sample, p.start, p.end, p.offset) for p in shard] == [(0, 15, 18, 15), (1, 18, 26, 0), (2, 26, 31, 0)]
    with pytest.raises(ValueError, match="divisible"):
        make_plan(Layout(cfg=2, ulysses=1, ring=1, rank=0), cu)


def test_apply_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_sequence_parallel(make_model(), ulysses=2)


def test_comm_model_volumes():
    from fastdit.benchmarks.sp_scaling import comm_bytes_per_rank

    # Ulysses 8 at 1.3B / 480p: 4 N C / P elements per layer per rank, 7/8 of it leaves the rank
    got = comm_bytes_per_rank(32760, 1536, 30, ulysses=8, ring=1, itemsize=2)
    assert got["ring_bytes"] == 0 and abs(got["ulysses_bytes"] - 4 * 32760 * 1536 / 8 * 7 / 8 * 30 * 2) < 1
    got = comm_bytes_per_rank(32760, 1536, 30, ulysses=1, ring=8, itemsize=2)
    assert got["ulysses_bytes"] == 0 and abs(got["ring_bytes"] - 2 * 32760 * 1536 * 7 / 8 * 30 * 2) < 1


def test_scaling_benchmark_runs_under_torchrun(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "fastdit.benchmarks.sp_scaling", "--ring", "2", "--ulysses", "1", "--out", str(tmp_path),
           "--budget-s", "0.2"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "sp_scaling_cpu.json").read_text())["rows"]
    assert [r["provider"] for r in rows] == ["1 device", "2 ranks U=1 R=2 cfg=1"]
    assert rows[1]["ring_bytes"] > 0 and rows[1]["efficiency"] > 0


def _cuda_degree_one_worker(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = make_model(backend=None).cuda().to(torch.bfloat16)
        reference = copy.deepcopy(model)
        batch = make_batch(1, "cuda", torch.bfloat16)
        sp = apply_sequence_parallel(model)
        with torch.no_grad():
            out, expect = sp.forward_packed(batch), reference.forward_packed(batch)
        assert ((out.float() - expect.float()).norm() / expect.float().norm()).item() <= 1e-2
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_degree_one_on_the_gpu_with_nccl():
    """With one GPU: the sequence-parallel path (NCCL collectives, Triton kernels) at degree 1."""
    mp.spawn(_cuda_degree_one_worker, args=(1, free_port()), nprocs=1, join=True)


def _vae_split(rank, world):
    from fastdit.models.wan.vae import SpatialTiling
    from fastdit.runtime.parallel import parallel_vae_decode
    from tests.models.test_vae_fast import random_vae

    vae = random_vae()
    tiling = SpatialTiling(min_height=32, min_width=32, stride_height=24, stride_width=24)
    z = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = vae.decode(z, tiling=tiling)
        got = parallel_vae_decode(vae, z, tiling)
        small = torch.randn(1, 16, 2, 3, 3)
        assert torch.equal(parallel_vae_decode(vae, small, tiling), vae.decode(small))  # one tile
    assert got.shape == expect.shape == (1, 3, 5, 48, 64)
    assert torch.equal(got, expect), (got - expect).abs().max()
    return "ok"


def _vae22_split(rank, world):
    """Wan 2.2's VAE (16 pixels per latent, 12 patchified channels) over the ranks."""
    from fastdit.models.wan.vae import CausalVAE, SpatialTiling
    from fastdit.runtime.parallel import parallel_vae_decode
    from tests.models.test_vae_diffusers_parity import WAN22, make_wan

    vae = CausalVAE.from_diffusers(make_wan(**WAN22)).eval()
    tiling = SpatialTiling(min_height=32, min_width=32, stride_height=16, stride_width=16)
    z = torch.randn(1, 12, 2, 3, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = vae.decode(z, tiling=tiling)
        got = parallel_vae_decode(vae, z, tiling)
    assert got.shape == expect.shape == (1, 3, 5, 48, 80)
    assert torch.equal(got, expect), (got - expect).abs().max()
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_vae_decode_split_over_ranks_equals_the_tiled_decode(ranks, world):
    assert ranks(world).run("vae_split", world) == ["ok"] * world


@pytest.mark.parametrize("world", [2, 4])
def test_wan22_vae_decode_split_over_ranks_equals_the_tiled_decode(ranks, world):
    """Catches the 8x / 3-channel assumptions of Wan 2.1 in the split decode (a Wan 2.2 latent
    failed with ``expanded size (3) must match (12)``)."""
    pytest.importorskip("diffusers", reason="the Wan 2.2 VAE is built from diffusers' AutoencoderKLWan here")
    assert ranks(world).run("vae22_split", world) == ["ok"] * world


def _timed_steps(rank):
    """Rank 1 starts timing 0.1 s after rank 0 (as a rank still building its model would); returns
    how many steps the rank ran and the timing. A rank left alone in a step's collective raises
    after 5 s instead of waiting for the world's timeout."""
    import time

    from fastdit.benchmarks.sp_scaling import time_collective_ms

    calls = [0]

    def step():
        time.sleep(0.01)
        dist.all_reduce(torch.ones(1), async_op=True).wait(timeout=timedelta(seconds=5))
        calls[0] += 1

    if rank == 1:
        time.sleep(0.1)
    ms = time_collective_ms(step, torch.device("cpu"), budget_s=0.1)
    return calls[0], ms


def test_sp_scaling_ranks_time_the_same_number_of_steps(ranks):
    """Catches the scaling benchmark timing each rank with its own budget loop (``time_ms``): a rank
    that starts later runs more steps than the others and is left alone in a collective (gloo
    aborts the rank, NCCL hangs; the torchrun test above failed that way once under load)."""
    (calls0, ms0), (calls1, ms1) = ranks(2).run("timed_steps", timeout_s=60)
    assert calls0 == calls1 >= 3
    assert 10 <= ms0 < 100 and 10 <= ms1 < 100  # the median step, not the first (late) one


def _precomputed_text_kv(rank):
    """``forward_packed(batch, text_kv=...)`` with the whole batch's keys / values (as a sampler or
    the step batcher precomputes them) against the reference-backend model alone; the keys passed as
    offset, non-contiguous views; keys with a block or a row missing refused on every rank."""
    model, reference = make_model(), make_model("reference")
    batch = make_batch(1)
    expect = reference.forward_packed(batch)
    sp = apply_sequence_parallel(model, ulysses=2)
    with torch.no_grad():
        kv = sp.text_kv(batch.text, **sp.conditioning_bounds(batch))
        views = [tuple(_offset_view(t) for t in block) for block in kv]
        out = sp.forward_packed(batch, text_kv=views)
        err = ((out - expect).norm() / expect.norm()).item()
        assert err <= 1e-5, f"rank {rank}: precomputed text_kv error {err}"
        with pytest.raises(ValueError, match="text_kv must hold"):  # a block short: zip would skip the last block
            sp.forward_packed(batch, text_kv=kv[:-1])
        with pytest.raises(ValueError, match="text_kv must hold"):  # a row short: a sample's keys misaligned
            sp.forward_packed(batch, text_kv=[tuple(t[:-1] for t in block) for block in kv])
    return "ok"


def _offset_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a view with a storage offset and doubled row stride."""
    wide = torch.zeros(t.shape[0] + 1, 2, *t.shape[1:], dtype=t.dtype)
    wide[1:, 1] = t
    view = wide[1:, 1]
    assert view.storage_offset() > 0 and not view.is_contiguous()
    return view


def test_precomputed_text_kv_under_sequence_parallelism(ranks):
    assert ranks(2).run("text_kv") == ["ok", "ok"]


SCENARIOS = {
    "text_kv": _precomputed_text_kv,
    "parity": _parity,
    "mismatch": _mismatch,
    "vae_split": _vae_split,
    "vae22_split": _vae22_split,
    "timed_steps": _timed_steps,
}
