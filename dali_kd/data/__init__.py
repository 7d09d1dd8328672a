"""Data: images in, batches out. What the rest of dali_kd uses is here; the modules behind it are the backends
(DALI, torchvision), the scan, runtime set-asides, mixing, sampling and the tar shard format (docs/layout.md).

- prepare_data(data section): the splits as ImageIndexes, each file scanned and the bad ones set aside;
- make_train_stream / make_eval_batches(StreamSettings, index, device): batches from the backend data.backend
  names — a TrainStream of Batches for training, every sample once for evaluation;
- QuarantineList: the files the run set aside, gathered from every rank, and the run's quarantine.jsonl.
"""

from dali_kd.data.batch import Batch
from dali_kd.data.dataset import ImageIndex
from dali_kd.data.loaders import make_eval_batches, make_train_stream
from dali_kd.data.prepare import DataSplits, prepare_data
from dali_kd.data.quarantine_list import QuarantineList
from dali_kd.data.stream import TrainStream

__all__ = [
    "Batch", "DataSplits", "ImageIndex", "QuarantineList", "TrainStream", "make_eval_batches", "make_train_stream",
    "prepare_data",
]  # fmt: skip
