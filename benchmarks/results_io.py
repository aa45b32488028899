"""Shared by the benchmark scripts: how a run's command line and results are recorded.

Results rows are flat, one measured figure each (ROW_FIELDS): what ran (system,
scenario), the figure (value, unit), what explains it (GPU hit rate, share of the
roofline measured in the same run) and where it came from (device, vLLM version,
command, commit). One file per benchmark and device kind holds a run's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

ROW_FIELDS = ("system", "scenario", "value", "unit", "gpu_hit_rate", "roofline_share",
              "device", "vllm_version", "command", "commit")


def row(system: str, scenario: str, value: float, unit: str, *, gpu_hit_rate: float | None = None,
        roofline_share: float | None = None, **provenance: str | None) -> dict:
    """One flat results row; `provenance` holds device, vllm_version, command and commit."""
    unknown = set(provenance) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown row fields {sorted(unknown)}")
    out = dict(system=system, scenario=scenario, value=value, unit=unit, gpu_hit_rate=gpu_hit_rate,
               roofline_share=roofline_share)
    out.update({k: provenance.get(k) for k in ROW_FIELDS[6:]})
    return out


def git_commit(path: str) -> str | None:
    """The commit of the checkout `path` is in (None outside git, or on a dirty tree's copy)."""
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, no checkout: the row says so
        return None


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ("out",)) -> str:
    """The command that reruns `script` with `args` (every option spelled out, `skip` left out)."""
    return f"python benchmarks/{script} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip)


def write_result(path: str, result: dict) -> None:
    """`result` as indented JSON at `path`, its folder made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
