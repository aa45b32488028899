"""fiddler's counters on the server's ``/metrics``, in vLLM's Prometheus conventions.

The counters live in the worker process; ``/metrics`` is served by the API
server process. The first process that registers the plugin (the frontend)
picks a stats file and exports its path in ``FIDDLER_METRICS_FILE``, which the
engine and worker processes it starts inherit; every process registers a
collector that reads the file at scrape time (only the API server serves
it), and the worker rewrites the file (atomically) at most every
``WRITE_INTERVAL_S``. Servers started side by side from one parent process
share the file: give each its own ``FIDDLER_METRICS_FILE``.

Metrics (counters end in ``_total`` on the wire):
- ``vllm:fiddler_routed_tokens{placement="gpu"|"cpu"}``: (token, expert) pairs
  computed by device-resident / host-resident experts;
- ``vllm:fiddler_weight_copy_bytes``: expert weight bytes copied host->device;
- ``vllm:fiddler_experts_copied``: cold experts computed by copy-and-compute;
- ``vllm:fiddler_experts_split``: cold experts cut between the CPU and a copy;
- ``vllm:fiddler_cpu_expert_seconds``: time the CPU spent on cold experts;
- ``vllm:fiddler_expert_replacements``: online re-placements (a host expert
  swapped onto the GPU for a colder one) that have landed;
- ``vllm:fiddler_replacement_copy_bytes``: weight bytes those swaps copied;
- ``vllm:fiddler_experts{placement=...}`` (gauge): experts resident on each side.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from vllm_fiddler import envs

METRICS_ENV = "FIDDLER_METRICS_FILE"
WRITE_INTERVAL_S = 1.0

_COUNTERS = (
    # (metric, help, stats key, labels)
    ("vllm:fiddler_routed_tokens", "(token, expert) pairs computed by GPU-resident experts",
     "routed_to_gpu", {"placement": "gpu"}),
    ("vllm:fiddler_routed_tokens", "(token, expert) pairs computed by CPU-resident experts",
     "routed_to_cpu", {"placement": "cpu"}),
    ("vllm:fiddler_weight_copy_bytes", "Expert weight bytes copied host to device", "h2d_weight_bytes", {}),
    ("vllm:fiddler_weight_stream_bytes", "Expert weight bytes GPU kernels read in place from host memory "
     "(small steps' streamed chunks)", "streamed_weight_bytes", {}),
    ("vllm:fiddler_cpu_weight_read_bytes", "Expert weight bytes the CPU experts read from host memory",
     "cpu_weight_bytes", {}),
    ("vllm:fiddler_experts_copied", "Cold experts computed by copying their weights to the GPU",
     "experts_copied", {}),
    ("vllm:fiddler_experts_split", "Cold experts computed partly on the CPU and partly copied to the GPU",
     "experts_split", {}),
    ("vllm:fiddler_cpu_expert_seconds", "Time the CPU spent computing cold experts", "cpu_busy_s", {}),
    ("vllm:fiddler_expert_replacements", "Online re-placements: a host expert swapped onto the GPU for a "
     "colder resident one", "replacements", {}),
    ("vllm:fiddler_replacement_copy_bytes", "Expert weight bytes copied host to device by re-placements",
     "replacement_bytes", {}),
)


class FiddlerCollector:
    """A prometheus_client collector reading the worker's stats file."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.read()
        families: dict[str, CounterMetricFamily] = {}
        for name, help_text, key, labels in _COUNTERS:
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(
                    name, help_text.split(" computed by")[0] if labels else help_text, labels=list(labels))
            family.add_metric(list(labels.values()), float(stats.get(key, 0)))
        yield from families.values()
        experts = GaugeMetricFamily("vllm:fiddler_experts", "Experts resident on each side",
                                    labels=["placement"])
        experts.add_metric(["gpu"], float(stats.get("gpu_experts", 0)))
        experts.add_metric(["cpu"], float(stats.get("cpu_experts", 0)))
        yield experts


_collector: FiddlerCollector | None = None


def install_frontend_collector() -> None:
    """Chooses the stats file (first process) and registers its collector (every process, once)."""
    global _collector
    if _collector is not None:
        return
    path = envs.FIDDLER_METRICS_FILE
    if not path:
        path = os.path.join(tempfile.gettempdir(), f"vllm-fiddler-metrics-{os.getpid()}.json")
        os.environ[METRICS_ENV] = path
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _collector = FiddlerCollector(path)
    REGISTRY.register(_collector)


class StatsWriter:
    """Worker side: rewrites the stats file at most every WRITE_INTERVAL_S."""

    def __init__(self):
        self.path = envs.FIDDLER_METRICS_FILE
        self._last = 0.0

    def maybe_write(self, model) -> None:
        now = time.monotonic()
        if self.path is None or now - self._last < WRITE_INTERVAL_S:
            return
        self._last = now
        from vllm_fiddler.stats import model_stats

        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(model_stats(model), f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # metrics must never fail a step
