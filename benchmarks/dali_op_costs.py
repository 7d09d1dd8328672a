"""Where the DALI training pipeline spends its time: the same graph cut after each stage, images/s of each cut.

Stages, cumulative: decode whole image → decode crop window only → + resize → + flip/normalise → + colour jitter
(the full pipeline). The drop from one row to the next is that stage's cost. Every decoder gets the GPU decoder's
tuning of pipelines.params.DecodeParams (DALI's defaults; the CPU decoders take none) and the normalising stages
write --output-dtype, as the training pipeline does.

    python benchmarks/dali_op_costs.py [--device cpu|gpu] [--threads 2] [--output-dtype float32|float16] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types

from dali_kd.data.dataset import ImageIndex
from pipelines.augment import draw_view, image_hw, normalize, render_view, to_pixels
from pipelines.params import OUTPUT_DTYPES, AugmentParams, DecodeParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import make_dataset  # noqa: E402

CUTS = ("decode whole image", "decode crop window", "+ resize", "+ flip, normalise", "+ colour jitter (full)")


def build(
    files,
    params: AugmentParams,
    cut: int,
    batch_size: int,
    threads: int,
    device_id,
    decode_params: DecodeParams,
):
    decode = "cpu" if device_id is None else "mixed"
    tuning = decode_params.decoder_options(decode)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=0)
    def pipe():
        encoded, _ = fn.readers.file(files=files, shuffle_after_epoch=True)
        if cut == 0:
            return fn.decoders.image(encoded, device=decode, **tuning)
        view = draw_view(encoded, params)
        if cut == 4:
            return render_view(encoded, view, params, decode, decode=decode_params)
        hw = image_hw(encoded)
        anchor, shape = to_pixels(view.crop_anchor, hw), to_pixels(view.crop_shape, hw)
        images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", device=decode, **tuning)
        if cut >= 2:
            size = [params.image_size, params.image_size]
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        if cut >= 3:
            images = normalize(images, params.mean, params.std, mirror=view.flip, dtype=decode_params.dtype)
        return images

    p = pipe()
    p.build()
    return p


def rate(pipe, batch_size: int, batches: int, repeats: int) -> float:
    for _ in range(3):
        pipe.run()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            out = pipe.run()
        if hasattr(out[0], "as_cpu"):
            out[0].as_cpu()  # wait for the GPU
        best = max(best, batches * batch_size / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default="float32")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batches, repeats = (2, 1) if args.quick else (8, 3)
    if args.quick:
        args.num_images, args.batch_size = 48, 16
    params = AugmentParams(image_size=224)
    decode = DecodeParams(dtype=args.output_dtype)  # window decode: the cuts below are the window pipeline's
    with tempfile.TemporaryDirectory() as tmp:
        files = ImageIndex.from_folder(make_dataset(Path(tmp) / "data", args.num_images)).files
        print(f"| stage (cumulative) | img/s, DALI {args.device}, {args.threads} threads |\n|---|---|")
        for cut, name in enumerate(CUTS):
            device_id = None if args.device == "cpu" else 0
            pipe = build(files, params, cut, args.batch_size, args.threads, device_id, decode)
            print(f"| {name} | {rate(pipe, args.batch_size, batches, repeats):.0f} |", flush=True)


if __name__ == "__main__":
    main()
