"""Check what one scripts/gpu_check.sh call left in OUT_DIR: what the device machine returns (at
most 8 files), a complete report with rows from every suite, no failed step or row.

    python scripts/check_gpu_result.py OUT_DIR
"""

import json
import os
import sys

SUITES = {"attention", "memory_ops", "vae_ops", "dit_step", "vae"}
MAX_FILES = 8  # what the device machine sends back from one call


def check(out_dir: str) -> list[str]:
    problems = []
    files = [f for f in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, f))]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than the {MAX_FILES} the device machine returns: {sorted(files)}")
    for required in ("gpu_check.json", "gpu_check.log", "causal_conv3d.json", "attention_policy.json"):
        if required not in files:
            problems.append(f"{required} is missing")
    if problems:
        return problems
    with open(os.path.join(out_dir, "gpu_check.json")) as f:
        report = json.load(f)
    if report.get("complete") is not True:
        problems.append("the report is not complete")
    failed_steps = [s["step"] for s in report.get("steps", []) if s["exit"] != 0]
    if failed_steps:
        problems.append(f"failed steps: {failed_steps}")
    if report.get("failed"):
        problems.append(f"failed rows: {[(r['benchmark'], r['provider'], r['shape']) for r in report['failed']]}")
    missing = SUITES - {r["benchmark"] for r in report.get("rows", [])}
    if missing:
        problems.append(f"no rows from {sorted(missing)}")
    for row in report.get("rows", []):
        # a same-bytes copy is the ceiling a memory-bound row is held to: timed, nothing to check
        unchecked = row["benchmark"] == "attention" or row.get("provider") == "copy"
        if row.get("status") == "ok" and ("ms" not in row or "error" not in row and not unchecked):
            problems.append(f"row without its time or check: {row}")
            break
    return problems


if __name__ == "__main__":
    problems = check(sys.argv[1])
    for p in problems:
        print(f"gpu_check result: {p}")
    if not problems:
        print(f"gpu_check result in {sys.argv[1]}: complete, every suite measured and checked, <= {MAX_FILES} files")
    sys.exit(1 if problems else 0)
