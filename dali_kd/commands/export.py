"""`python -m dali_kd.export RUN_DIR --format onnx|torchscript|safetensors`: the trained student as a file to ship,
with preprocess.json beside it, checked against the torch model on a batch.

Exit codes: 0 written and checked, 1 the exported model disagrees with torch beyond --tolerance, 2 a user error.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dali_kd.commands.cli import CommandLineParser, finite_at_least, int_in_range
from dali_kd.commands.export_heads import max_abs_diff
from dali_kd.errors import UserError

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
ONNX_PIP = "pip install onnx onnxruntime onnxscript (or: pip install 'dali_kd[export]')"
# The batch the model is traced or exported with; the check uses another size (the batch axis is dynamic).
TRACE_BATCH = 2
# The check batch is random images at the model's input size, all in memory at once: a few are enough to compare.
MAX_CHECK_BATCH = 1024
EXIT_MISMATCH = 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m dali_kd.export",
        description="Write a run's student as ONNX, TorchScript or safetensors, with preprocess.json (resize, crop, "
        "mean, std, class names) beside it; the exported model is checked against torch on a random batch.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a dali_kd run directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--ema", action="store_true", help="the EMA of the student instead of its raw weights"
    )
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/export, RUN_DIR/export_ema)")
    parser.add_argument(
        "--heads",
        action="store_true",
        help="also the student's adaptor heads: after the backbone's output, each teacher's adapted pooled "
        "embedding (and logits, tokens where it has them); preprocess.json says which output is which",
    )
    parser.add_argument(
        "--check-batch",
        type=int_in_range(1, MAX_CHECK_BATCH),
        default=4,
        help=f"images in the check batch (default 4, at most {MAX_CHECK_BATCH})",
    )
    parser.add_argument(
        "--tolerance",
        type=finite_at_least(0),
        default=1e-3,
        help="largest max abs diff allowed vs torch, a finite number >= 0 (default 1e-3)",
    )
    return parser


def check_batch(spec: dict[str, Any], num_images: int) -> torch.Tensor:
    """Random pixels in [0, 1], normalised as preprocess.json says: the values the model meets in use."""
    generator = torch.Generator().manual_seed(0)
    size = spec["image_size"]
    pixels = torch.rand(num_images, 3, size, size, generator=generator)
    mean, std = torch.tensor(spec["mean"]).view(1, 3, 1, 1), torch.tensor(spec["std"]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _quiet(call: Callable[[], Any]) -> Any:
    """call() without torch's tracer and deprecation warnings, and the exporter's progress lines on stdout:
    the check below is what tells whether the export is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from contextlib import redirect_stdout

        with redirect_stdout(io.StringIO()):
            return call()


def write_safetensors(model: nn.Module, path: Path, batch: torch.Tensor) -> float:
    """The bare state dict; read back into a fresh model as a user would (the one-liner printed) and compared."""
    from safetensors.torch import load_file

    from dali_kd.io import save_safetensors_atomic

    save_safetensors_atomic(path, model.state_dict())
    import copy

    fresh = copy.deepcopy(model)
    for p in fresh.state_dict().values():
        p.zero_()  # so that the comparison shows the file's weights, not the copy's
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return max_abs_diff(fresh(batch), model(batch))


def write_torchscript(model: nn.Module, path: Path, batch: torch.Tensor) -> float:
    """torch.jit.trace of the eval-mode model (scripting fails on many timm models), loaded back and compared."""
    from dali_kd.io import atomic_write

    example = batch[:TRACE_BATCH]
    with torch.no_grad():
        traced = _quiet(lambda: torch.jit.trace(model, example))
    buffer = io.BytesIO()
    _quiet(lambda: torch.jit.save(traced, buffer))
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    loaded = _quiet(lambda: torch.jit.load(str(path), map_location="cpu"))
    with torch.no_grad():
        return max_abs_diff(loaded(batch), model(batch))


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
    except ImportError as e:
        raise UserError(f"--format onnx needs {e.name}: {ONNX_PIP}") from None
    return onnx, onnxruntime


def write_onnx(model: nn.Module, path: Path, batch: torch.Tensor) -> float:
    """torch.onnx.export (torch.export-based) with a dynamic batch axis; run by onnxruntime and compared."""
    onnx, onnxruntime = _import_onnx()
    from dali_kd.io import atomic_write

    example = (batch[:TRACE_BATCH],)
    program = _quiet(
        lambda: torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=["images"],
            output_names=getattr(model, "output_names", ["output"]),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    )
    # One self-contained file (weights inline); protobuf caps that at 2 GB, far above a distilled student.
    data = program.model_proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(out) for out in session.run(None, {"images": batch.numpy()})]
    with torch.no_grad():
        want = model(batch)
    return max_abs_diff(got if isinstance(want, tuple) else got[0], want)


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript, "safetensors": write_safetensors}


def _check_same_weights(out: Path, spec: dict[str, Any]) -> None:
    """One folder, one set of weights: another format of other weights would leave preprocess.json describing
    only one of them."""
    existing = out / "preprocess.json"
    if not existing.is_file():
        return
    try:
        old = json.loads(existing.read_text())
    except (OSError, ValueError):
        return  # unreadable: it is rewritten below
    if (old.get("weights"), old.get("source")) != (spec["weights"], spec["source"]):
        raise UserError(
            f"--out {out}: holds an export of other weights ({old.get('weights')}, {old.get('source')}); "
            "choose another --out or empty it"
        )
    if ("heads" in old) != ("heads" in spec):
        said = "with" if "heads" in old else "without"
        raise UserError(f"--out {out}: holds an export {said} --heads; choose another --out or empty it")


def export(
    run_dir: Path,
    fmt: str,
    ema: bool = False,
    out: Path | None = None,
    num_check: int = 4,
    heads: bool = False,
) -> tuple[Path, float, dict[str, Any]]:
    """Write the student (with heads: and its adaptor heads) in `fmt` and preprocess.json into `out`; (model file,
    max abs diff vs torch, spec)."""
    from dali_kd.commands import export_heads
    from dali_kd.commands import export_source as source
    from dali_kd.io import write_json_atomic

    if fmt == "onnx":
        _import_onnx()  # before any work: a missing package is the first thing to say
    if num_check < 1:
        raise UserError(f"--check-batch: need at least 1 image (got {num_check})")
    if heads and ema:
        raise UserError(
            "--heads with --ema: the EMA averages the backbone only, and the heads were trained on the raw "
            "weights; export --heads without --ema"
        )
    cfg = source.read_run_config(run_dir)
    weights = source.read_student_weights(run_dir, ema)
    model, kwargs = source.build_student(cfg, weights)
    names = source.class_names(run_dir, cfg, kwargs["num_classes"])
    spec = source.preprocess_spec(cfg, model, weights, kwargs, names)
    # The check batch differs in size from the traced one: a batch size baked into the graph fails it.
    batch = check_batch(spec, max(num_check, TRACE_BATCH + 1))
    writer = WRITERS[fmt]
    if heads:
        state = source.read_student_state(run_dir, weights)
        stats = source.read_standardiser(run_dir, weights)
        model = export_heads.build_student_with_heads(cfg, model, state, weights.source, stats)
        spec.update(export_heads.heads_spec(cfg, model, batch))
        if fmt == "safetensors":
            writer = functools.partial(export_heads.write_safetensors_with_heads, spec)
    out = out or run_dir / ("export_ema" if ema else "export")
    _check_same_weights(out, spec)
    path = out / f"student{SUFFIX[fmt]}"
    diff = writer(model, path, batch)
    write_json_atomic(out / "preprocess.json", spec)
    return path, diff, spec


def usage_line(fmt: str, path: Path, spec: dict[str, Any]) -> str:
    """How to load what was written, in one line of Python."""
    if fmt == "safetensors" and "heads" in spec:
        return f"m = dali_kd.export.load_with_heads({str(path.parent)!r}); m(images)"
    if fmt == "safetensors":
        args = ", ".join(f"{k}={v!r}" for k, v in spec["timm_kwargs"].items())
        return (
            f"m = timm.create_model({spec['model']!r}, {args}); "
            f"m.load_state_dict(safetensors.torch.load_file({str(path)!r})); m.eval()"
        )
    if fmt == "torchscript":
        return f"m = torch.jit.load({str(path)!r}); m(images)"
    return f"s = onnxruntime.InferenceSession({str(path)!r}); s.run(None, {{'images': images}})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, diff, spec = export(
            args.run_dir, args.format, args.ema, args.out, args.check_batch, heads=args.heads
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    against = "onnxruntime vs torch" if args.format == "onnx" else f"{args.format} vs torch"
    classes = f", {len(spec['class_names'])} named classes" if spec["class_names"] else ""
    print(f"wrote {path} ({spec['weights']} weights from {spec['source']}{classes})")
    if args.heads and args.format == "safetensors":
        print(f"wrote {path.parent / 'heads.safetensors'}")
    print(f"wrote {path.parent / 'preprocess.json'}")
    if args.heads:
        print(f"outputs, in order: {', '.join(spec['outputs'])}")
    print(f"max abs diff ({against}, batch of {max(args.check_batch, TRACE_BATCH + 1)}): {diff:.3g}")
    if not diff <= args.tolerance:  # also catches NaN
        print(f"error: max abs diff {diff:.3g} is above --tolerance {args.tolerance:g}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"load it: {usage_line(args.format, path, spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
