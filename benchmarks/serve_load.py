"""A bounded load test of ``fastdit serve``: throughput packed against one at a time, and no job lost
across a kill.

    python -m fastdit.benchmarks.serve_load --requests 60 --out benchmarks/results

Every server is ``fastdit serve`` in a subprocess on 127.0.0.1 (a free port), the requests go
over HTTP (the standard library's client). Requests cycle through four sizes with their own
seeds and prompts. In one run:

1. **one at a time**: server A takes each request after the previous one finished (a warm-up
   request first); the seconds from the first request to the last video;
2. **packed**: the same requests sent at once to server A; the same seconds. The ratio of (1) to
   (2) is the throughput the step batcher buys on this machine; every video must be bitwise the
   one-at-a-time run's (SHA-256 of the MP4s);
3. **chaos**: server B gets the requests at staggered times, a few are deleted right after they
   are accepted, and B is killed (SIGKILL) halfway and started again on the same job store. Every
   accepted, undeleted job must complete, with the video of (1); the deleted ones must be gone.

The JSON (``serve_load_<device>.json`` under ``--out``) holds the timings, the ratio, the mean
samples and tokens per forward from the servers' /metrics, ``dit_only`` (the same requests' DiT
work alone through one StepBatcher in this process, one at a time and packed: the part packing
speeds up) and the chaos run's counts.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time

SIZES = [(64, 64, 9), (96, 64, 9), (128, 96, 9), (128, 128, 17)]  # (width, height, frames)


def call(url: str, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60.0):
    """One request: ``(status, parsed JSON or the raw bytes)``."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    kind = response.getheader("content-type", "")
    return response.status, (json.loads(data) if kind.startswith("application/json") else data)


def post(url: str, fields: dict) -> dict:
    status, answer = call(url, "POST", "/v1/videos", json.dumps(fields).encode(), {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"POST /v1/videos -> {status}: {answer}")
    return answer


def wait_all(url: str, ids, timeout: float) -> dict:
    """Each job's final video object, polled until all ended; a TimeoutError past ``timeout``."""
    deadline, final = time.monotonic() + timeout, {}
    pending = list(ids)
    while pending:
        for job_id in list(pending):
            status, video = call(url, "GET", f"/v1/videos/{job_id}")
            if status == 200 and video["status"] in ("completed", "failed"):
                final[job_id] = video
                pending.remove(job_id)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} job(s) still open after {timeout} s")
            time.sleep(0.05)
    return final


def digest(url: str, job_id: str) -> str:
    status, data = call(url, "GET", f"/v1/videos/{job_id}/content")
    if status != 200:
        raise RuntimeError(f"GET content of {job_id} -> {status}")
    return hashlib.sha256(data).hexdigest()


class Server:
    """``fastdit serve --preset tiny`` in a subprocess on a free port of 127.0.0.1; ``ranks`` > 1:
    under ``torchrun --standalone`` with that many ranks (rank 0 serves HTTP)."""

    def __init__(self, db: str, device: str, timeout: float = 120.0, ranks: int = 1, batch_invariant: bool = True):
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
        command = [sys.executable, *launch, "-m", "fastdit", "serve", "--preset", "tiny", "--port", "0", "--db", db,
                   "--device", device, "--log-level", "warning"]  # fmt: skip
        env = {**os.environ, "FASTDIT_BATCH_INVARIANT": "1" if batch_invariant else "0"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + timeout
        line = ""
        while "http://" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"fastdit serve did not start (exit status {self.process.poll()})")
            if select.select([self.process.stdout], [], [], left)[0]:
                line = self.process.stdout.readline()
        self.url = "http://" + line.split("http://")[1].split()[0]
        self.pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))  # the serving process (rank 0 under torchrun)
        while call(self.url, "GET", "/health")[0] != 200:  # bounded by the same deadline
            if time.monotonic() > deadline:
                raise RuntimeError("fastdit serve answered no /health")
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        _, text = call(self.url, "GET", "/metrics")
        for line in text.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """Interrupt the serving process (under torchrun, rank 0: it tells the other ranks to leave);
        killed after 30 s."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def requests_of(count: int, steps: int) -> list[dict]:
    return [{"prompt": f"load test request {i}", "size": f"{w}x{h}", "frames": f, "seed": i, "steps": steps}
            for i, (w, h, f) in ((i, SIZES[i % len(SIZES)]) for i in range(count))]  # fmt: skip


def _forward_means(server: Server, before: dict) -> dict:
    now = {k: server.metric(k) for k in before}
    forwards = now["fastdit_samples_per_forward_count"] - before["fastdit_samples_per_forward_count"]
    return {
        "forwards": forwards,
        "samples_per_forward": (now["fastdit_samples_per_forward_sum"] - before["fastdit_samples_per_forward_sum"])
        / max(forwards, 1),
        "tokens_per_forward": (now["fastdit_tokens_per_forward_sum"] - before["fastdit_tokens_per_forward_sum"])
        / max(forwards, 1),
    }


FORWARD_METRICS = (
    "fastdit_samples_per_forward_count",
    "fastdit_samples_per_forward_sum",
    "fastdit_tokens_per_forward_sum",
)


def dit_only(count: int, steps: int, batch_invariant: bool, device: str = "cpu") -> dict:
    """The part packing speeds up, alone: the same requests' DiT work (the tiny preset, random
    512-token text like the UMT5's) through one StepBatcher, one job at a time then all at once,
    in this process (its one thread)."""
    import torch

    from fastdit import settings
    from fastdit.models.wan import DiT
    from fastdit.runtime import modes
    from fastdit.runtime.batcher import StepBatcher

    torch.manual_seed(0)
    model = DiT.from_preset("tiny").to(device).eval()
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    text = torch.randn(512, model.config.text_dim)
    jobs = [modes.text_to_video(text, model.config.in_channels, 1 + (f - 1) // 4, h // 8, w // 8, seed=i)
            for i, (w, h, f) in ((i, SIZES[i % len(SIZES)]) for i in range(count))]  # fmt: skip
    with settings.override(batch_invariant=batch_invariant):
        warm = StepBatcher(model)
        warm.submit(jobs[0], num_steps=2)
        warm.run()

        def timed(together: bool) -> float:
            batcher, start = StepBatcher(model), time.perf_counter()
            for job in jobs:
                batcher.submit(job, num_steps=steps)
                if not together:
                    batcher.run()
            batcher.run()
            sync()
            return time.perf_counter() - start

        alone, packed = timed(together=False), timed(together=True)
    return {"one_at_a_time_s": alone, "packed_s": packed, "throughput_ratio": alone / packed}


def run(count: int, steps: int, cancel: int, device: str, seed: int, timeout: float, work: str,
        batch_invariant: bool = True) -> dict:  # fmt: skip
    asks = requests_of(count, steps)
    result = {"requests": count, "sizes": [f"{w}x{h}x{f}" for w, h, f in SIZES], "steps": steps, "device": device,
              "batch_invariant": batch_invariant}  # fmt: skip
    server = Server(os.path.join(work, "a", "jobs.sqlite"), device, batch_invariant=batch_invariant)
    try:
        warm = post(server.url, {**asks[0], "prompt": "warm-up"})
        wait_all(server.url, [warm["id"]], timeout)
        before = {k: server.metric(k) for k in FORWARD_METRICS}
        start, single = time.perf_counter(), []
        for ask in asks:
            job = post(server.url, ask)
            wait_all(server.url, [job["id"]], timeout)
            single.append(job["id"])
        result["one_at_a_time_s"] = time.perf_counter() - start
        result["one_at_a_time"] = _forward_means(server, before)
        expected = [digest(server.url, i) for i in single]
        before = {k: server.metric(k) for k in FORWARD_METRICS}
        start = time.perf_counter()
        packed = [post(server.url, ask)["id"] for ask in asks]
        wait_all(server.url, packed, timeout)
        result["packed_s"] = time.perf_counter() - start
        result["packed"] = _forward_means(server, before)
        result["packed_equal_one_at_a_time"] = sum(digest(server.url, i) == e for i, e in zip(packed, expected))
    finally:
        server.stop()
    result["throughput_ratio"] = result["one_at_a_time_s"] / result["packed_s"]
    result["dit_only"] = dit_only(count, steps, batch_invariant, device)
    if batch_invariant:  # (without it, packed videos may differ from one-at-a-time ones: nothing to compare)
        result["chaos"] = chaos(asks, expected, cancel, device, seed, timeout, os.path.join(work, "b", "jobs.sqlite"))
    return result


def chaos(asks: list[dict], expected: list[str], cancel: int, device: str, seed: int, timeout: float, db: str) -> dict:
    """Staggered arrivals, ``cancel`` deletions, one SIGKILL and restart halfway (see the module docstring)."""
    rng = random.Random(seed)
    deleted = set(rng.sample(range(len(asks)), min(cancel, len(asks))))
    server, accepted, start = Server(db, device), {}, time.perf_counter()
    try:
        for n, ask in enumerate(asks):
            if n == len(asks) // 2:
                server.kill()  # mid-run: some jobs queued, some sampling, some decoding
                server = Server(db, device)
            accepted[n] = post(server.url, ask)["id"]
            if n in deleted:
                status, _ = call(server.url, "DELETE", f"/v1/videos/{accepted[n]}")
                if status != 200:
                    raise RuntimeError(f"DELETE -> {status}")
            time.sleep(rng.uniform(0.0, 0.05))
        kept = [n for n in accepted if n not in deleted]
        final = wait_all(server.url, [accepted[n] for n in kept], timeout)
        completed = [n for n in kept if final[accepted[n]]["status"] == "completed"]
        equal = sum(digest(server.url, accepted[n]) == expected[n] for n in completed)
        gone = sum(call(server.url, "GET", f"/v1/videos/{accepted[n]}")[0] == 404 for n in deleted)
    finally:
        server.stop()
    return {"accepted": len(accepted), "deleted": len(deleted), "deleted_gone": gone, "completed": len(completed),
            "lost": len(kept) - len(completed), "equal_one_at_a_time": equal, "restarts": 1,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--steps", type=int, default=8, help="sampler steps of every request")
    parser.add_argument("--cancel", type=int, default=4, help="requests deleted right after they are accepted (chaos)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrival gaps and which requests are deleted")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any wait may take")
    parser.add_argument("--batch-invariant", default="on", choices=["on", "off"],
                        help="the servers' FASTDIT_BATCH_INVARIANT (off: batched matmuls, no bitwise promise; "
                        "no chaos run)")  # fmt: skip
    parser.add_argument("--out", default=None, help="directory for serve_load_<device>[_variant].json (none: print)")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.steps < 1 or args.cancel < 0 or args.cancel >= args.requests:
        parser.error("need --requests >= 2, --steps >= 1 and 0 <= --cancel < --requests")
    with tempfile.TemporaryDirectory(prefix="fastdit-serve-load-") as work:
        result = run(args.requests, args.steps, args.cancel, args.device, args.seed, args.timeout, work,
                     args.batch_invariant == "on")  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suffix = "" if args.batch_invariant == "on" else "_variant_batch_invariant_off"
        with open(os.path.join(args.out, f"serve_load_{args.device.split(':')[0]}{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
