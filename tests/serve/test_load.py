"""The bounded load test (benchmarks/serve_load.py) at a small scale: real ``fastdit serve``
subprocesses, a SIGKILL and a restart on the same store in the middle, deletions."""

from fastdit.benchmarks.serve_load import main


def test_no_accepted_job_is_lost_across_a_kill_and_packed_equals_one_at_a_time(tmp_path):
    """Catches: a restart that drops queued or running jobs (lost > 0), a half-written MP4 served
    after the kill, a deleted job that comes back after the restart, and a packed run whose
    videos differ from the same requests served one at a time."""
    result = main(["--requests", "6", "--steps", "6", "--cancel", "2", "--timeout", "120", "--out", str(tmp_path)])
    assert result["packed_equal_one_at_a_time"] == 6
    assert result["packed"]["samples_per_forward"] > 2  # requests shared forwards (one alone is 2: CFG)
    chaos = result["chaos"]
    assert chaos["accepted"] == 6 and chaos["lost"] == 0 and chaos["completed"] == 4
    assert chaos["deleted_gone"] == 2 and chaos["equal_one_at_a_time"] == 4
    assert result["throughput_ratio"] > 0 and (tmp_path / "serve_load_cpu.json").exists()
