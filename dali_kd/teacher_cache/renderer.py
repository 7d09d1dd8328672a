"""Rendering recorded views again: the replay pipeline fed with file bytes and view records gives the same pixels."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import feed_ndarray

from dali_kd.data.batch import ViewRecord
from dali_kd.data.dali_loader import dali_device_id
from dali_kd.data.dataset import ImageIndex
from dali_kd.pipelines.graphs import REPLAY_INPUTS, replay_pipeline
from dali_kd.pipelines.params import DEFAULT_DECODE, AugmentParams, DecodeParams

# The replay pipeline's output types (see pipelines.params.DecodeParams.dtype).
_TORCH_DTYPES = {types.DALIDataType.FLOAT: torch.float32, types.DALIDataType.FLOAT16: torch.float16}


def view_columns(view: ViewRecord) -> dict[str, np.ndarray]:
    """A one-view record as the replay pipelines' record inputs (REPLAY_INPUTS after "encoded"), on the host."""
    return {
        "crop_anchor": view.crop_anchor.cpu().numpy().astype(np.float32),
        "crop_shape": view.crop_shape.cpu().numpy().astype(np.float32),
        "flip": view.flip.cpu().numpy().astype(np.int32),
        "jitter": view.jitter.cpu().numpy().astype(np.float32),
    }


def copy_out(images, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """One copy of a pipeline's dense output out of DALI's buffer (reused at a later run) into memory torch owns:
    on a GPU device to device on torch's current stream, with the event after which DALI may reuse its buffer
    (synchronize it before the pipeline's next run); on the CPU a host copy (and no event)."""
    tensor = images.as_tensor()
    on_gpu = device.type == "cuda"
    out = torch.empty(tensor.shape(), dtype=_TORCH_DTYPES[tensor.dtype], device=device if on_gpu else "cpu")
    if not on_gpu:
        feed_ndarray(tensor, out)
        return out, None
    stream = torch.cuda.current_stream(device)
    feed_ndarray(tensor, out, cuda_stream=stream)
    copied = torch.cuda.Event()
    copied.record(stream)
    return out, copied


class DaliViewRenderer:
    """Renders recorded views again (same pixels): the replay pipeline fed with file bytes and view records."""

    def __init__(
        self,
        index: ImageIndex,
        params: AugmentParams,
        batch_size: int,
        device: torch.device | str = "cpu",
        full_decode: bool = False,
        decode: DecodeParams = DEFAULT_DECODE,
        num_threads: int = 2,
        multi_crop_graph: str = "auto",
    ):
        """decode: the DecodeParams the records were made with (same mode and dtype: same pixels).
        full_decode: True for records made by multi-crop (each crop is cut from the whole decoded image), through
        multi_crop_graph, the MultiCropParams.graph they were drawn with (on a stream of the same device)."""
        self.index = index
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._pipe_args: dict[str, Any] = dict(
            params=params, batch_size=batch_size, device_id=dali_device_id(self.device), full_decode=full_decode,
            decode=decode, num_threads=num_threads, multi_crop_graph=multi_crop_graph,
        )  # fmt: skip
        self._build()

    def _build(self) -> None:
        self.pipe = replay_pipeline(**self._pipe_args)
        self.pipe.build()
        # On a GPU: the event after which the pipeline's output buffer may be reused.
        self._copied: torch.cuda.Event | None = None

    def _run(self, columns: dict[str, list | np.ndarray]):
        if self._copied is not None:
            # The previous batch's copy out of DALI's buffer must be done before run() reuses that buffer.
            self._copied.synchronize()
            self._copied = None
        for name in REPLAY_INPUTS:
            self.pipe.feed_input(name, columns[name])
        (images,) = self.pipe.run()  # host-synchronous: the output is ready when run() returns
        return images

    def render(self, sample_ids: np.ndarray | torch.Tensor, view: ViewRecord) -> torch.Tensor:
        """The views of these samples' files, [B, 3, S, S] on the renderer's device (B up to the batch size).

        sample_ids and view are read on the host (pass host copies: a device tensor costs a device read). On a GPU
        DALI's output is copied once, device to device, into a torch tensor on torch's current stream; nothing
        crosses to the host. Safe to call from a background thread (one call at a time).

        A file that cannot be read or decoded raises RuntimeError naming it (fed bytes carry no file name in
        DALI's own message, so the failing samples are found one by one); the renderer stays usable.
        """
        ids = sample_ids.cpu().numpy() if isinstance(sample_ids, torch.Tensor) else np.asarray(sample_ids)
        if not 0 < len(ids) <= self.batch_size:
            raise ValueError(f"render takes 1 to {self.batch_size} views, got {len(ids)}")
        encoded = []
        for i in ids.tolist():
            try:
                encoded.append(np.frombuffer(self.index.read_bytes(i), dtype=np.uint8))
            except OSError as e:
                raise RuntimeError(f"failed to read {self.index.files[i]} ({e.strerror})") from None
        columns: dict[str, list | np.ndarray] = {"encoded": encoded, **view_columns(view)}
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            try:
                images = self._run(columns)
            except RuntimeError as e:
                self._build()  # a pipeline that failed stays dead
                raise RuntimeError(self._name_failures(ids, columns, str(e))) from None
            out, self._copied = copy_out(images, self.device)
        return out.to(self.device)  # only where the device is a stand-in (tests' meta) for a CPU pipeline

    def _name_failures(self, ids: np.ndarray, columns: dict[str, list | np.ndarray], error: str) -> str:
        """Render each distinct file alone to find the ones that fail: a message naming each, one per line."""
        first: dict[int, int] = {}  # sample id -> its first position in the batch
        for k, i in enumerate(ids.tolist()):
            first.setdefault(i, k)
        lines = []
        for i, k in first.items():
            try:
                self._run({name: column[k : k + 1] for name, column in columns.items()})
            except RuntimeError as e:
                self._build()
                # The path stands alone (space after it), so RuntimeQuarantine.culprits finds it.
                lines.append(f"failed to decode {self.index.files[i]} ({_dali_reason(str(e))})")
        return "\n".join(lines) if lines else error


def _dali_reason(error: str) -> str:
    """The line of a DALI error that says what went wrong (not the traceback, not the pipeline's epitaph)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip() and "no longer valid" not in ln]
    return lines[-1][:150] if lines else "decode error"
