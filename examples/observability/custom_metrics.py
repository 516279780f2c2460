"""Custom metric definitions with the registry (the guide's "Custom Metrics").

Run: python examples/observability/custom_metrics.py

Prints the custom metrics as a Prometheus scrape would show them.
"""

from __future__ import annotations

from victor_mp_metrics import render
from victor_mp_metrics.registry import get_prometheus_registry

CUSTOM = ("custom_operations", "queue_size", "operation_latency_ms")


def _is_custom(line: str) -> bool:
    name = line.split(" ")[2] if line.startswith("#") else line
    return name.startswith(CUSTOM)


def main() -> None:
    registry = get_prometheus_registry()

    # Create counter
    counter = registry.counter(
        name="custom_operations_total",
        help="Total custom operations",
        labels={"service": "my_service"},
    )
    counter.inc()

    # Create gauge
    gauge = registry.gauge(
        name="queue_size",
        help="Current queue size",
    )
    gauge.set(10)

    # Create histogram
    histogram = registry.histogram(
        name="operation_latency_ms",
        help="Operation latency",
        buckets=[10, 50, 100, 500, 1000],
    )
    histogram.observe(75)

    _status, _headers, body = render({})
    print("\n".join(line for line in body.decode().splitlines() if _is_custom(line)))


if __name__ == "__main__":
    main()
