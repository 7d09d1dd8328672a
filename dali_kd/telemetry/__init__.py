"""Telemetry: per-stage step timing, GPU (NVML) and process sampling, the bottleneck verdict, metric sinks."""
