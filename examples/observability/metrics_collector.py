"""Basic metrics collection with MetricsCollector (the guide's "Using MetricsCollector").

Run: python examples/observability/metrics_collector.py

Without PROMETHEUS_MULTIPROC_DIR the figures are this process's; with it they are the
whole deployment's (every process that wrote to the directory).
"""

from __future__ import annotations

from victor_mp_metrics.collector import MetricsCollector


def main() -> None:
    collector = MetricsCollector()

    # Record metrics
    collector.tool_calls.increment()
    collector.model_requests.increment(labels={"provider": "anthropic"})
    collector.model_latency.observe(45.2)

    # A few more, with labels, so the summary has something to say
    collector.tool_calls.increment(labels={"tool_name": "read_file"})
    collector.tool_calls.increment(labels={"tool_name": "read_file", "status": "error"})
    collector.tool_errors.increment(labels={"tool_name": "read_file", "error_type": "not_found"})
    collector.model_latency.observe(850.0, labels={"provider": "anthropic"})

    # Get summary
    summary = collector.get_summary()
    print(f"Tool calls: {summary['tool_calls']:.0f}")
    print(f"Error rate: {summary['tool_error_rate']:.2%}")
    print(f"Model requests: {summary['model_requests']:.0f}")
    print(
        f"Model latency: {summary['model_latency_count']:.0f} calls, "
        f"avg {summary['model_latency_avg_ms']:.1f} ms, "
        f"p50 {summary['model_latency_p50_ms']:.1f} ms, "
        f"p95 {summary['model_latency_p95_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
