"""GPU telemetry through nvidia-ml-py (`import pynvml`), sampled in a background thread about twice a second.

Without NVML (no driver, a CPU run) every gpu_* field is present as null and `unavailable_reason` says why.
"""

from __future__ import annotations

import threading
from typing import Any

GPU_FIELDS = (
    "gpu_util_pct",
    "gpu_mem_used_mb",
    "gpu_mem_total_mb",
    "gpu_power_w",
    "gpu_temp_c",
    "gpu_sm_clock_mhz",
    "gpu_jpeg_util_pct",
)
# How the samples of one log interval are folded into one value.
_FOLD = {
    "gpu_util_pct": "mean",
    "gpu_mem_used_mb": "max",
    "gpu_mem_total_mb": "max",
    "gpu_power_w": "mean",
    "gpu_temp_c": "max",
    "gpu_sm_clock_mhz": "mean",
    "gpu_jpeg_util_pct": "mean",
}


def jpeg_utilisation(reading: Any) -> float | None:
    """The JPEG decoder's utilisation % out of nvmlDeviceGetJpgUtilization's reply: nvidia-ml-py returns the list
    [utilisation %, sampling period µs] (a tuple or a bare number elsewhere); anything else is null, never an
    exception, which would end the sampling thread and with it every gpu_* field of the run."""
    if isinstance(reading, (list, tuple)):
        reading = reading[0] if reading else None
    try:
        return None if reading is None else float(reading)
    except (TypeError, ValueError):
        return None


def _load_nvml():
    import pynvml

    return pynvml


class GpuSampler:
    """Samples the given local GPUs (NVML indices) every `interval_s` until `close()`."""

    def __init__(self, device_indices: list[int], interval_s: float = 0.5, nvml: Any | None = None):
        self.interval_s = interval_s
        self.unavailable_reason: str | None = None
        self._samples: dict[int, list[dict[str, float | None]]] = {i: [] for i in device_indices}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: dict[int, Any] = {}
        if not device_indices:
            self.unavailable_reason = "no GPU in use"
            return
        try:
            self.nvml = nvml if nvml is not None else _load_nvml()
            self.nvml.nvmlInit()
            self._handles = {i: self.nvml.nvmlDeviceGetHandleByIndex(i) for i in device_indices}
        except Exception as e:  # noqa: BLE001 - any NVML failure means "no GPU telemetry", never a failed run
            self.unavailable_reason = f"NVML unavailable ({type(e).__name__}: {e})"
            self._handles = {}
            return
        self._thread = threading.Thread(target=self._run, name="dali_kd-nvml", daemon=True)
        self._thread.start()

    @property
    def device_indices(self) -> list[int]:
        """The NVML indices it was asked to sample."""
        return list(self._samples)

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def _query(self, call, *args):
        try:
            return call(*args)
        except Exception:  # noqa: BLE001 - a counter this GPU does not expose is reported as null
            return None

    def sample_once(self) -> None:
        nv = self.nvml
        for index, handle in self._handles.items():
            util = self._query(nv.nvmlDeviceGetUtilizationRates, handle)
            mem = self._query(nv.nvmlDeviceGetMemoryInfo, handle)
            power = self._query(nv.nvmlDeviceGetPowerUsage, handle)
            jpeg = self._query(getattr(nv, "nvmlDeviceGetJpgUtilization", None) or (lambda h: None), handle)
            sample = {
                "gpu_util_pct": None if util is None else float(util.gpu),
                "gpu_mem_used_mb": None if mem is None else mem.used / 2**20,
                "gpu_mem_total_mb": None if mem is None else mem.total / 2**20,
                "gpu_power_w": None if power is None else power / 1000.0,
                "gpu_temp_c": self._query(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
                "gpu_sm_clock_mhz": self._query(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_SM),
                "gpu_jpeg_util_pct": jpeg_utilisation(jpeg),
            }
            with self._lock:
                self._samples[index].append(sample)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval_s)

    def collect(self) -> dict[int, dict[str, float | None]]:
        """Per GPU, the samples since the last collect folded into one value per field (null where none)."""
        with self._lock:
            samples, self._samples = self._samples, {i: [] for i in self._samples}
        out = {}
        for index, rows in samples.items():
            folded: dict[str, float | None] = {}
            for field in GPU_FIELDS:
                values = [v for r in rows if (v := r.get(field)) is not None]
                if not values:
                    folded[field] = None
                elif _FOLD[field] == "max":
                    folded[field] = float(max(values))
                else:
                    folded[field] = float(sum(values) / len(values))
            out[index] = folded
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._handles:
            self._query(self.nvml.nvmlShutdown)
            self._handles = {}
