"""The hand-written Prometheus exposition."""

from lightllm_plugin.server.metrics import ServerMetrics


def test_render_counters_gauges_and_cumulative_histograms():
    m = ServerMetrics()
    m.requests_finished.inc(finish_reason="stop")
    m.requests_finished.inc(2, finish_reason="length")
    m.kv_slots_total.set(8192)
    for v in (0.004, 0.02, 7.0):
        m.inter_token_latency.observe(v)
    text = m.render()
    assert 'lightllm_requests_finished_total{finish_reason="length"} 2' in text
    assert 'lightllm_requests_finished_total{finish_reason="stop"} 1' in text
    assert "lightllm_kv_slots_total 8192" in text
    assert 'lightllm_inter_token_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'lightllm_inter_token_latency_seconds_bucket{le="0.025"} 2' in text
    assert 'lightllm_inter_token_latency_seconds_bucket{le="+Inf"} 3' in text
    assert "lightllm_inter_token_latency_seconds_count 3" in text
    assert "# TYPE lightllm_time_to_first_token_seconds histogram" in text
    assert text.endswith("\n")
    # every sample line is "name{labels} value"
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))
