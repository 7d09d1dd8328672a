"""Where the DALI training pipeline spends its time: the same graph cut after each stage, images/s of each cut.

Stages, cumulative: decode whole image → decode crop window only → + resize → + flip/normalise → + colour jitter
(the full pipeline). The drop from one row to the next is that stage's cost. Every decoder gets the GPU decoder's
tuning of pipelines.params.DecodeParams (DALI's defaults; the CPU decoders take none) and the normalising stages
write --output-dtype, as the training pipeline does.

Beside img/s each cut has its CPU cost per image (process CPU time over the images: every DALI thread's work),
and each stage its share of the full pipeline's CPU cost — what decides the DALI CPU mode against torchvision's
CPU cost per image (augment_throughput.py). The stage that costs most is named with what would cut it (FIXES).

    python benchmarks/dali_op_costs.py [--device cpu|gpu] [--threads 2] [--output-dtype float32|float16] [--quick]
        [--data DIR] [--json costs.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types

from dali_kd.data.dataset import ImageIndex
from dali_kd.pipelines.augment import draw_view, image_hw, normalize, render_view, to_pixels
from dali_kd.pipelines.params import OUTPUT_DTYPES, AugmentParams, DecodeParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import make_dataset  # noqa: E402

CUTS = ("decode whole image", "decode crop window", "+ resize", "+ flip, normalise", "+ colour jitter (full)")
# What each stage of the window pipeline is, and what would make it cheaper on the CPU.
STAGES = {
    "decode crop window": "decode: libjpeg-turbo, the library PIL uses, so no cheaper than torchvision's; only the "
    "GPU decoder or decoding fewer pixels (a reduced-scale DCT decode) cut it",
    "+ resize": "resize: an antialiased resize from the full-resolution crop; decoding at a reduced scale first "
    "would shrink its input",
    "+ flip, normalise": "normalise: float conversion of every pixel; data.output_dtype=float16 halves what it "
    "writes",
    "+ colour jitter (full)": "colour jitter: brightness/contrast and HSV as separate full-image passes in float; "
    "one fused colour-twist pass (fn.color_twist), or jitter on the GPU, would cut it",
}


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
            size = [params.view_size, params.view_size]
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        if cut >= 3:
            images = normalize(images, params.mean, params.std, mirror=view.flip, dtype=decode_params.dtype)
        return images

    p = pipe()
    p.build()
    return p


def rate(pipe, batch_size: int, batches: int, repeats: int) -> tuple[float, float]:
    """(best img/s over the repeats, CPU ms per image over all of them: every thread of this process)."""
    for _ in range(3):
        pipe.run()
    best, cpu_s, images = 0.0, 0.0, 0
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            out = pipe.run()
        if hasattr(out[0], "as_cpu"):
            out[0].as_cpu()  # wait for the GPU
        best = max(best, batches * batch_size / (time.perf_counter() - start))
        cpu_s += time.process_time() - cpu_start
        images += batches * batch_size
    return best, 1000 * cpu_s / images


def stage_costs(rows: list[dict]) -> list[dict]:
    """The window pipeline's stages (each cut minus the one before; the whole-image decode stands apart) as CPU ms
    per image and share of the full pipeline's."""
    by_cut = {r["stage"]: r["cpu_ms_per_image"] for r in rows}
    window = list(CUTS[1:])
    full = by_cut[window[-1]]
    out, before = [], 0.0
    for cut in window:
        cost = max(0.0, by_cut[cut] - before)
        out.append(
            {"stage": cut, "cpu_ms_per_image": cost, "share_pct": 100 * cost / full, "fix": STAGES[cut]}
        )
        before = by_cut[cut]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default="float32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, help="an image tree (default: a generated one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches, repeats = (2, 1) if args.quick else (8, 3)
    if args.quick:
        args.num_images, args.batch_size = 48, 16
    params = AugmentParams(view_size=224)
    decode = DecodeParams(dtype=args.output_dtype)  # window decode: the cuts below are the window pipeline's
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_dataset(Path(tmp) / "data", args.num_images)
        files = ImageIndex.from_folder(data).files
        print(
            f"| stage (cumulative) | img/s, DALI {args.device}, {args.threads} threads | CPU ms/image |\n|---|---|---|"
        )
        for cut, name in enumerate(CUTS):
            device_id = None if args.device == "cpu" else 0
            pipe = build(files, params, cut, args.batch_size, args.threads, device_id, decode)
            img_s, cpu_ms = rate(pipe, args.batch_size, batches, repeats)
            rows.append({"stage": name, "img_per_s": img_s, "cpu_ms_per_image": cpu_ms})
            print(f"| {name} | {img_s:.0f} | {cpu_ms:.2f} |", flush=True)
            del pipe
    stages = stage_costs(rows)
    top = max(stages, key=lambda r: r["cpu_ms_per_image"])
    print("\n| stage | CPU ms/image | share |\n|---|---|---|")
    for r in stages:
        print(f"| {r['stage'].removeprefix('+ ')} | {r['cpu_ms_per_image']:.2f} | {r['share_pct']:.0f}% |")
    print(f"\nmost CPU: {top['fix']}")
    if args.json:
        report = {
            "device": args.device,
            "threads": args.threads,
            "cuts": rows,
            "stages": stages,
            "top_stage": top,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
