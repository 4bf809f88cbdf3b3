"""One report for one ``scripts/gpu_check.sh`` call: every suite's rows in one JSON, one plot,
one table, and the targets the run decides, each as a ratio measured in the same run.

The device machine returns at most 8 files per call, so the per-suite JSONs that ``fastdit
bench`` writes stay in a scratch directory and this merges them (again after every step, so a
step cut by its time cap still leaves its saved rows in the result):

    python -m fastdit.benchmarks.gpu_report SUITE_DIR OUT_JSON --steps STEPS_TSV [--plot OUT_PNG] [--final]
"""

import argparse
import glob
import json
import os

# Targets of the first GPU run (the issue that planned it): each is fastdit's best provider
# against a baseline measured in the same run. (suite, shape prefix, metric, baseline or None,
# threshold): pct_of_copy >= 85 for the memory-bound ops; attention >= cuDNN; packed >= the
# per-sample cuDNN loop; the step <= 0.75 x diffusers eager.
TARGETS = [
    ("memory_ops", "rope3d_qk fwd", "pct_of_copy", None, 85.0),
    ("memory_ops", "adaln_modulate fwd", "pct_of_copy", None, 85.0),
    ("memory_ops", "gated_residual fwd", "pct_of_copy", None, 85.0),
    ("memory_ops", "gated_residual_modulate fwd", "pct_of_copy", None, 85.0),
    ("attention", "fwd dense S=32760 H=24 D=128", "tflops", "sdpa-cudnn", 1.0),
    ("attention", "fwd packed", "tflops", "cudnn-per-sample-loop", 1.0),
    ("dit_step", "wan2.1-1.3b", "speedup", "diffusers-eager", 1 / 0.75),
]


def load_suites(suite_dir: str) -> dict[str, dict]:
    suites = {}
    for path in sorted(glob.glob(os.path.join(suite_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        rows = data.get("rows") or []
        name = rows[0]["benchmark"] if rows else os.path.basename(path).split("_")[0]
        suites[name] = data
    return suites


def read_steps(path: str | None) -> list[dict]:
    """``name<TAB>exit code<TAB>seconds<TAB>note`` lines written by gpu_check.sh."""
    steps = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, rc, seconds, *note = line.rstrip("\n").split("\t")
                steps.append({"step": name, "exit": int(rc), "seconds": int(seconds), "note": "".join(note)})
    return steps


def targets(suites: dict[str, dict]) -> list[dict]:
    """Each target: fastdit's best row against the baseline row of the same shape."""
    out = []
    for suite, prefix, metric, baseline, threshold in TARGETS:
        rows = [r for r in suites.get(suite, {}).get("rows", []) if r.get("status") == "ok"]
        rows = [r for r in rows if r["shape"].startswith(prefix)]
        ours = [r for r in rows if r["provider"].startswith("fastdit") and "one-by-one" not in r["provider"]]
        if not ours:
            continue
        if metric == "speedup":
            base = next((r for r in rows if r["provider"] == baseline), None)
            if base is None:
                continue
            best = min(ours, key=lambda r: r["ms"])
            value = base["ms"] / best["ms"]
        else:
            best = max(ours, key=lambda r: r.get(metric, 0))
            value = best.get(metric, 0)
            if baseline is not None:
                base = next((r for r in rows if r["provider"] == baseline and r["shape"] == best["shape"]), None)
                if base is None:
                    continue
                value = value / base[metric]
        out.append({"suite": suite, "shape": best["shape"], "provider": best["provider"], "metric": metric,
                    "against": baseline, "value": round(value, 3), "target": round(threshold, 3),
                    "met": value >= threshold})  # fmt: skip
    return out


def merge(suite_dir: str, steps_path: str | None, final: bool) -> dict:
    suites = load_suites(suite_dir)
    steps = read_steps(steps_path)
    environment = next((s["environment"] for s in suites.values() if "environment" in s), {})
    rows = [row for s in suites.values() for row in s.get("rows", [])]
    complete = final and all(s.get("complete") for s in suites.values()) and all(s["exit"] == 0 for s in steps)
    return {
        "environment": environment,
        "ceilings": {name: s.get("ceilings") for name, s in suites.items()},
        "complete": complete,
        "steps": steps,
        "targets": targets(suites),
        "failed": [r for r in rows if r.get("status") == "failed"],
        "rows": rows,
    }


def plot(report: dict, path: str) -> str | None:
    """One horizontal bar per measured row: % of the ceiling measured in the same run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if r.get("status") == "ok" and ("pct_of_copy" in r or "pct_of_matmul" in r)]
    if not rows:
        return None
    labels = [f"{r['benchmark']}: {r['provider']} | {r['shape']}"[:90] for r in rows]
    values = [r.get("pct_of_copy", r.get("pct_of_matmul")) for r in rows]
    colors = ["#c44e52" if r["provider"].startswith("fastdit") else "#4c72b0" for r in rows]
    fig, ax = plt.subplots(figsize=(11, max(3, 0.22 * len(rows) + 1)))
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("% of the ceiling measured in the same run (copy bandwidth or bf16 matmul); red: fastdit")
    env = report["environment"]
    ax.set_title(f"gpu_check on {env.get('device', '?')} (torch {env.get('torch', '?')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(report: dict) -> str:
    lines = [f"gpu_check on {report['environment'].get('device', '?')}: complete={report['complete']}"]
    for s in report["steps"]:
        lines.append(f"  step {s['step']:<16} exit {s['exit']:<4} {s['seconds']:>4} s  {s['note']}")
    for t in report["targets"]:
        against = f" vs {t['against']}" if t["against"] else ""
        lines.append(f"  target {t['suite']} {t['shape']}: {t['provider']} {t['metric']}{against} = {t['value']} "
                     f"(target >= {t['target']}): {'met' if t['met'] else 'MISSED'}")  # fmt: skip
    for r in report["failed"]:
        lines.append(f"  FAILED {r['benchmark']} {r['provider']} {r['shape']}: {r.get('reason')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("suite_dir")
    parser.add_argument("out_json")
    parser.add_argument("--steps", default=None, help="the step table gpu_check.sh writes")
    parser.add_argument("--plot", default=None, help="PNG to write (needs matplotlib)")
    parser.add_argument("--final", action="store_true", help="the last merge of the call: may mark it complete")
    args = parser.parse_args(argv)
    report = merge(args.suite_dir, args.steps, args.final)
    partial = args.out_json + ".partial"
    with open(partial, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(partial, args.out_json)
    if args.plot:
        plot(report, args.plot)
    if args.final:
        print(summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
