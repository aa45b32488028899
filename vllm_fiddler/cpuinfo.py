"""The host CPU's model name and feature flags, from /proc/cpuinfo (Linux)."""

from __future__ import annotations

import platform


def _field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    return _field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    return set((_field("flags") or "").split())
