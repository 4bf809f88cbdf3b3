"""Every ```python block of the README runs as written, in order and in one namespace, in a
directory holding tiny stand-ins for the files it names (the Wan checkpoints' diffusers layout,
two LoRAs). A block that cannot run here says so right above its fence:
``<!-- readme-test: skip (the reason) -->``."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.runtime.test_parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")

pytest.importorskip("diffusers", reason="the stand-in checkpoints are written with diffusers")
pytest.importorskip("onnx", reason="the export block needs the [export] extra")


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) of every ```python block, in order."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            skip = SKIP.match(lines[i - 1].strip()) if i > 0 else None
            i += 1
            code = []
            while lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            blocks.append((start + 1, "\n".join(code) + "\n", skip.group(1) if skip else None))
        i += 1
    return blocks


def test_every_skip_has_a_reason_and_most_blocks_run():
    """Catches a block silently dropped from the run (a skip marker without a reason, or the
    parser missing blocks)."""
    blocks = readme_blocks()
    assert len(blocks) >= 8
    skipped = [reason for _, _, reason in blocks if reason is not None]
    assert all(len(reason) > 20 for reason in skipped)
    assert len(skipped) <= 2, skipped


def _lora(path, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(rank, 24, generator=gen),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(24, rank, generator=gen)},
              str(path))  # fmt: skip


def test_the_readme_python_blocks_run_as_written(tmp_path):
    """Catches a README example that uses a name it never defines (they printed placeholders and
    raised NameError), calls an API with arguments it does not take, or expects files it does not
    name. The blocks run in a subprocess (their own process group for the sequence-parallel one)."""
    from tests.runtime.test_generate import tiny_checkpoint

    tiny_checkpoint(tmp_path / "Wan2.1-T2V-1.3B-Diffusers")
    tiny_checkpoint(tmp_path / "Wan2.1-I2V-14B-480P-Diffusers", i2v=True)
    _lora(tmp_path / "lightx2v_4step.safetensors", 4, 0)
    _lora(tmp_path / "style.safetensors", 2, 1)
    runner = (
        "import sys\n"
        "from tests.test_readme_python import readme_blocks\n"
        "namespace = {'__name__': '__readme__'}\n"
        "for line, code, skip in readme_blocks():\n"
        "    if skip is None:\n"
        "        print('block at line', line, flush=True)\n"
        "        exec(compile(code, f'README.md:{line}', 'exec'), namespace)\n"
        "import torch.distributed as dist\n"
        "dist.destroy_process_group()\n"
        "print('all blocks ran')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "all blocks ran" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "dit.onnx").exists()
