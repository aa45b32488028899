"""Shared by the benchmark scripts: how a run's command line and results are recorded."""

from __future__ import annotations

import argparse
import json
import os


def command_line(script: str, args: argparse.Namespace, skip: tuple[str, ...] = ("out",)) -> str:
    """The command that reruns `script` with `args` (every option spelled out, `skip` left out)."""
    return f"python benchmarks/{script} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip)


def write_result(path: str, result: dict) -> None:
    """`result` as indented JSON at `path`, its folder made if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
