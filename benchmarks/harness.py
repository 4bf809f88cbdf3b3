"""Benchmark plumbing: ceilings measured in the same run, interleaved timing, JSON rows, plots, tables.

Every result file says where it came from: the device (and on CPUs its cache sizes), torch /
triton / CUDA / diffusers versions, the threads, the load average before and after, the date and
the command line. Providers of one comparison are timed in one interleaved run
(:func:`time_interleaved`): round-robin, one call each per round, so a slow spell of the machine
lands on every provider alike; each row gives the median and the interquartile spread. A
memory-bound comparison carries a copy of the same bytes, timed in the same rounds, so its
``pct_of_copy`` compares like with like (same cache level, same moment).
"""

import datetime
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fastdit import settings


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_caches() -> dict[str, int]:
    """This CPU's cache sizes in bytes by level (``L1d``, ``L2``, ``L3``), read from sysfs; empty
    where the kernel does not say (a row is then not checked against them)."""
    caches = {}
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        size = int(text.rstrip("KMG")) * scale
        if kind != "Instruction":
            caches["L1d" if level == "1" else f"L{level}"] = size
    return caches


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict:
    """Where a result came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("fastdit", "diffusers", "transformers", "numpy")},
        "threads": torch.get_num_threads(),
        "loadavg_start": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "switches": settings.as_environ(),
    }
    if device.type == "cpu":
        env["cpu_caches"] = cpu_caches()
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 2, min_runs: int = 5, budget_s: float = 2.0
):
    """Median milliseconds of ``fn()``; do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(100, int(budget_s * 1000 / 4)), return_mode="median"))
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Bytes written before each timed CUDA call to empty the L2 (as triton's do_bench does).
L2_FLUSH_BYTES = 256 << 20


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 2.0,
) -> dict[str, list[float]]:
    """Milliseconds of every call of every ``fns[name]()``, measured round-robin.

    Each round calls every provider once, in an order rotated by one each round, and times each
    call alone: a neighbour's pause or a clock dip lands on whichever provider runs then, so over
    the rounds it lands on all of them alike instead of on one provider's whole window. Rounds go
    on until ``budget_s`` has passed and ``min_rounds`` are done (at most ``max_rounds``). CUDA:
    events around each call, the L2 emptied before it; CPU: ``time.perf_counter``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            if flush is not None:
                flush.zero_()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def summarize(times: list[float]) -> dict:
    """Median milliseconds and the spread of one provider's calls: the interquartile range as a
    percentage of the median (``spread_pct``) and the number of calls."""
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (median,) * 3
    return {"ms": median, "spread_pct": significant(100 * (q3 - q1) / median, 3) if median > 0 else 0.0,
            "runs": len(times)}  # fmt: skip


@dataclass
class Candidate:
    """One provider of a comparison: ``fn()`` computes what the others compute, on the same bytes."""

    provider: str
    fn: Callable[[], object]
    flops: float | None = None
    nbytes: float | None = None
    extra: dict = field(default_factory=dict)


def same_bytes_copy(nbytes: float, device: torch.device) -> Candidate:
    """A ``copy`` provider that moves ``nbytes`` (reads half, writes half), the ceiling a
    memory-bound op of the same traffic is held to, timed with it."""
    elems = max(1, int(nbytes) // 8)  # float32: 4 bytes read + 4 written per element
    src = torch.randn(elems, device=device)
    dst = torch.empty_like(src)
    return Candidate("copy", lambda: dst.copy_(src), nbytes=8 * elems)


def _copy_ms(elems: int, dtype: torch.dtype, device: torch.device, budget_s: float) -> float:
    src = torch.randn(elems, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, budget_s=budget_s)


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth (read + write bytes) and matmul rate on this device, measured now.

    CUDA: a 1 GiB bf16 device-to-device copy and a bf16 8192^3 matmul (4096^3 when quick).
    CPU: a 256 MiB fp32 copy and an fp32 1024^3 matmul.
    """
    if device.type == "cuda":
        copy_elems, dtype, n, budget_s = 1 << 29, torch.bfloat16, 4096 if quick else 8192, 2.0
    else:  # the table's headline only: memory-bound rows are held to a copy of their own bytes
        copy_elems, dtype, n, budget_s = 1 << 26, torch.float32, 1024, 0.1 if quick else 0.5
    copy_ms = _copy_ms(copy_elems, dtype, device, budget_s)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, device, budget_s=budget_s)
    return {
        "copy_gbps": 2 * copy_elems * dtype.itemsize / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_n": n,
    }


# Where reports save their rows as they come (``fastdit bench`` sets it to --out): a run killed
# half way (a hung kernel, a machine's time limit) still leaves the rows it measured on disk,
# marked "complete": false. None: only the final write.
AUTOSAVE_DIR: str | None = None


def default_out_dir() -> str:
    """Where ``fastdit bench`` writes without ``--out``: the user's cache (``$XDG_CACHE_HOME`` or
    ``~/.cache``)/fastdit/bench, never inside a checkout, where it would overwrite committed results."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastdit", "bench")


def matplotlib_missing() -> str | None:
    """Why no PNG is drawn (None when matplotlib is installed)."""
    if importlib.util.find_spec("matplotlib") is None:
        return 'no PNG plots: matplotlib is not installed (pip install "fastdit[bench]")'
    return None


def switches(values: dict, keys: Sequence[str]):
    """Run with exactly ``values`` among the settings ``keys`` (fastdit.settings field names; the
    others at their defaults, so a stray override cannot relabel a baseline); restored after."""
    reset = {key: getattr(settings.DEFAULTS, key) for key in keys}
    return settings.override(**{**reset, **values})


@dataclass
class Report:
    """Rows of one benchmark run, with the run's environment and ceilings."""

    name: str
    device: torch.device
    ceilings: dict
    rows: list[dict] = field(default_factory=list)
    autosave_dir: str | None = field(default_factory=lambda: AUTOSAVE_DIR)
    _environment: dict | None = field(default=None, init=False, repr=False)

    @property
    def env(self) -> dict:
        """This run's :func:`environment`, queried once (it asks the device and the clock)."""
        if self._environment is None:
            self._environment = environment(self.device)
        return self._environment

    def add(
        self,
        provider: str,
        shape: str,
        ms: float,
        *,
        flops: float | None = None,
        nbytes: float | None = None,
        copy_ms: float | None = None,
        **extra,
    ):
        """A measured row. ``copy_ms``: the time of a copy of the same bytes in the same rounds;
        ``pct_of_copy`` is then against it (else against the run's large-copy ceiling)."""
        row = {"benchmark": self.name, "provider": provider, "shape": shape, "status": "ok", "ms": significant(ms)}
        if flops is not None:
            tflops = flops / ms / 1e9
            row["flops"] = flops  # the work counted, so rows of one shape can be seen to count the same
            row["tflops"] = significant(tflops)
            row["pct_of_matmul"] = significant(100 * tflops / self.ceilings["matmul_tflops"])
        if nbytes is not None:
            gbps = nbytes / ms / 1e6
            row["gbps"] = significant(gbps)
            if copy_ms is not None:
                row["pct_of_copy"] = significant(100 * copy_ms / ms)
                row["copy_same_bytes_ms"] = significant(copy_ms)
                if provider != "copy" and ms < copy_ms:  # beats a physical limit: the byte count is suspect
                    row["note"] = "faster than a copy of the same bytes: the byte count is wrong or the work is cached"
                    print(f"  WARNING {provider} {shape}: {row['note']}", flush=True)
            else:
                row["pct_of_copy"] = significant(100 * gbps / self.ceilings["copy_gbps"])
        row.update({k: v for k, v in extra.items() if v is not None})
        self.rows.append(row)
        if self.autosave_dir:
            self._write_json(self.autosave_dir, complete=False)
        return row

    def compare(
        self,
        shape: str,
        candidates: Sequence[Candidate],
        *,
        reference: object = None,
        tolerance: float | None = None,
        timing: dict | None = None,
        first_call: bool = False,
        copy_bytes: float | None = None,
    ) -> dict[str, dict]:
        """Check every candidate's output against ``reference``, then time the correct ones
        together (:func:`time_interleaved`); one row each, returned by provider.

        A provider that raises, or whose error exceeds ``tolerance`` (NaN included), gets a
        ``"failed"`` row and is not timed: a wrong kernel must never appear fast. A baseline (not
        ``fastdit-*``) that raises a "no kernel for this shape" or out-of-memory error is
        ``"unsupported"`` instead, a limit of that provider. ``first_call=True`` records how long
        the checked (first) call took, compiles included. ``copy_bytes``: time a copy of that
        many bytes in the same rounds (a ``copy`` row) and hold each row's ``pct_of_copy`` to it.
        """
        rows: dict[str, dict] = {}
        timed: list[tuple[Candidate, dict]] = []
        for cand in candidates:
            try:
                start = time.perf_counter()
                out = cand.fn()
                synchronize(self.device)
                first_call_s = time.perf_counter() - start
            except Exception as err:  # noqa: BLE001 - the row says what went wrong
                rows[cand.provider] = self.fail(cand.provider, shape, err)
                continue
            extra = dict(cand.extra)
            if first_call:
                extra["first_call_s"] = significant(first_call_s, 3)
            if reference is not None:
                error = output_error(out, reference)
                del out
                if not error <= tolerance:
                    msg = f"error {error:.3g} > tolerance {tolerance:.3g}"
                    rows[cand.provider] = self.fail(cand.provider, shape, msg, error=error)
                    continue
                extra["error"] = _error_value(error)
            timed.append((cand, extra))
        if copy_bytes is not None and timed:
            timed.append((same_bytes_copy(copy_bytes, self.device), {}))
        if not timed:
            return rows
        try:
            times = time_interleaved({c.provider: c.fn for c, _ in timed}, self.device, **(timing or {}))
        except Exception as err:  # noqa: BLE001 - one provider raised on a later call
            for cand, _ in timed:
                rows[cand.provider] = self.fail(cand.provider, shape, err)
            return rows
        copy_ms = summarize(times["copy"])["ms"] if copy_bytes is not None else None
        for cand, extra in timed:
            stats = summarize(times[cand.provider])
            rows[cand.provider] = self.add(cand.provider, shape, stats.pop("ms"), flops=cand.flops, nbytes=cand.nbytes,
                                           copy_ms=copy_ms, **stats, **extra)  # fmt: skip
        return rows

    def measure(
        self,
        provider: str,
        shape: str,
        fn: Callable[[], object],
        *,
        reference: object = None,
        tolerance: float | None = None,
        timing: dict | None = None,
        flops: float | None = None,
        nbytes: float | None = None,
        first_call: bool = False,
        **extra,
    ) -> dict:
        """One provider alone: :meth:`compare` with a single candidate (for runs with nothing
        to compare against, such as one rank's share of a sequence-parallel step)."""
        candidate = Candidate(provider, fn, flops=flops, nbytes=nbytes, extra=extra)
        rows = self.compare(shape, [candidate], reference=reference, tolerance=tolerance, timing=timing,
                            first_call=first_call)  # fmt: skip
        return rows[provider]

    def fail(self, provider: str, shape: str, reason: object, **extra) -> dict:
        """A row for a provider that could not be measured, with why (an exception or a message)."""
        if isinstance(reason, BaseException):
            status = "unsupported" if _unsupported(provider, reason) else "failed"
            reason = f"{type(reason).__name__}: {str(reason).strip().splitlines()[0][:300] if str(reason) else ''}"
        else:
            status = "failed"
        row = {"benchmark": self.name, "provider": provider, "shape": shape, "status": status, "reason": reason}
        row.update({k: _error_value(v) if k == "error" else v for k, v in extra.items() if v is not None})
        self.rows.append(row)
        print(f"  {provider} {shape}: {status.upper()}: {reason}", flush=True)
        if self.autosave_dir:
            self._write_json(self.autosave_dir, complete=False)
        return row

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") == "failed"]

    def to_json(self, complete: bool = True) -> dict:
        env = {**self.env, "loadavg_end": load_average()}
        return {"environment": env, "ceilings": self.ceilings, "complete": complete, "rows": self.rows}

    def _write_json(self, out_dir: str, complete: bool) -> str:
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, f"{self.name}_{device_slug(self.device)}.json")
        partial = json_path + ".partial"
        with open(partial, "w") as f:
            json.dump(self.to_json(complete), f, indent=2)
            f.write("\n")
        os.replace(partial, json_path)  # never a half-written file, even when killed mid-write
        return json_path

    def write(self, out_dir: str) -> list[str]:
        """``<name>_<device>.json`` and, when matplotlib is installed, ``<name>_<device>.png``."""
        paths = [self._write_json(out_dir, complete=True)]
        png = self.plot(os.path.join(out_dir, f"{self.name}_{device_slug(self.device)}.png"))
        if png:
            paths.append(png)
        return paths

    def plot(self, path: str) -> str | None:
        rows = [r for r in self.rows if "ms" in r]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        if not rows:
            return None
        labels = [f"{r['provider']}\n{r['shape']}" for r in rows]
        values = [r["ms"] for r in rows]
        fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows) + 3), 5.5))
        bars = ax.bar(range(len(values)), values, color="#4c72b0")
        for bar, row in zip(bars, rows):
            note = f"{row['ms']:.3g} ms"
            if "tflops" in row:
                note += f"\n{row['tflops']:.3g} TF/s ({row['pct_of_matmul']}%)"
            if "gbps" in row:
                note += f"\n{row['gbps']:.4g} GB/s ({row['pct_of_copy']}%)"
            ax.annotate(
                note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(range(len(values)), labels, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_ylabel("ms (median, lower is better)")
        env = self.env
        ax.set_title(f"{self.name} on {env['device']} (torch {env['torch']})", fontsize=11)
        ax.margins(y=0.25)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def table(self) -> str:
        columns = [
            "provider",
            "shape",
            "status",
            "error",
            "ms",
            "tflops",
            "pct_of_matmul",
            "gbps",
            "pct_of_copy",
            "peak_gib",
            "first_call_s",
        ]
        present = [c for c in columns if any(c in r for r in self.rows)]
        cells = [[str(r.get(c, "")) for c in present] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(present)]
        lines = [
            f"{self.name} on {self.env['device']}: copy {self.ceilings['copy_gbps']:.0f} GB/s, "
            f"{self.ceilings['matmul_dtype']} matmul {self.ceilings['matmul_tflops']:.1f} TFLOP/s (measured now)",
            "  ".join(c.ljust(w) for c, w in zip(present, widths)),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)


def output_error(got: object, want: object) -> float:
    """The largest relative (Frobenius-norm) error of ``got`` against ``want``, tensor by tensor
    (tuples / lists compared element-wise), in float64; inf for a shape or arity mismatch."""
    gots = list(got) if isinstance(got, (tuple, list)) else [got]
    wants = list(want) if isinstance(want, (tuple, list)) else [want]
    if len(gots) != len(wants):
        return math.inf
    worst = 0.0
    for g, w in zip(gots, wants):
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return math.inf
        g, w = g.detach().to(w.device, torch.float64), w.detach().double()
        err = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        if math.isnan(err):
            return math.nan
        worst = max(worst, err)
    return worst


def _error_value(error: float | None) -> float | str | None:
    """Errors as JSON can hold them: NaN and inf as strings."""
    if error is None or math.isfinite(error):
        return None if error is None else significant(error, 3)
    return str(error)


_UNSUPPORTED = ("no available kernel", "not supported", "out of memory", "unsupported")


def _unsupported(provider: str, err: BaseException) -> bool:
    """A baseline's own limit (no kernel for this shape, out of memory); never for fastdit."""
    text = f"{type(err).__name__}: {err}".lower()
    return not provider.startswith("fastdit") and any(m in text for m in _UNSUPPORTED)


def selectable_backends(op: str, inputs: dict) -> list[str]:
    """The fastdit backends of ``op`` that the dispatcher may pick by itself for ``inputs`` on
    this device: what a user can get. Not the reference (the oracle, never a contender), and not
    a backend that only runs when forced (Triton under its CPU interpreter); prints why each
    other one is left out."""
    from fastdit.ops import dispatch

    names = []
    for name, backend in dispatch.backends(op).items():
        if name == "reference":
            continue
        if not backend.auto_selectable(inputs["device"]):
            print(f"  {op}: {name} left out: never chosen on {inputs['device'].type} (runs there only when forced)")
            continue
        reasons = backend.not_supported_reasons(inputs)
        if reasons:
            print(f"  {op}: {name} left out: {'; '.join(reasons)}")
        else:
            names.append(name)
    return names


def significant(value: float, digits: int = 4) -> float:
    """Round to significant digits, so a slow run's 0.0004 GB/s does not print as 0."""
    return float(f"{value:.{digits}g}")


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
