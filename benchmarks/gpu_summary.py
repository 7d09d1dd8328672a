"""A GPU visit's table of targets: reads what `benchmarks/gpu_check.sh` left under its output folder and writes one
JSON and one markdown table, each part's key figure against its target, measured or not (parts not measured say
why), and the figures that decide what to change (the ablation's fastest overrides, the profile, the fixed cost of a
step, DALI's CPU cost by stage) beside them.

    python benchmarks/gpu_summary.py OUT          # writes OUT/gpu_check.json and OUT/gpu_check.md, prints the table
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from gpu_paths import PATHS  # noqa: E402

# The targets on one H200 (benchmarks/RESULTS.md, "GPU figures").
AUGMENT_MIN_IMG_S = 12_000
AUGMENT_MIN_VS_TORCHVISION = 4.0  # on ImageNet-like 500x375 JPEGs
TORCHVISION_WORKERS = 16
REFERENCE_MAX_VS_FLOOR = 1.0  # the step at its floor measured in the same run
REFERENCE_MAX_STEP_MS = 40.0  # ViT-B/16 -> ViT-S/16, 224 px, bf16, batch 256: >= 6,400 img/s
REFERENCE_MAX_STALL_PCT = 2.0
CACHED_MAX_VS_STUDENT_ONLY = 1.05
STUDENT_ONLY_MAX_VS_FLOOR = 1.10
MULTI_CROP_MAX_COST = 1.5
MIX_MAX_SHARE_PCT = 2.0  # mixing should be noise on the GPU: at most 2% of the reference step


# ---- summary ------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_status(out: Path, part: str) -> dict[str, Any]:
    """What gpu_check.sh noted about a part (exit code, seconds, its limit), or that it never started."""
    return read_json(out / "parts" / f"{part}.json") or {"part": part, "rc": None, "note": "not started"}


def why_missing(out: Path, part: str) -> str:
    status = part_status(out, part)
    if status.get("note"):
        return f"not measured: {status['note']}"
    if status.get("rc") in (124, 137):
        return f"not measured: cut off at its {status.get('timeout_s')} s limit"
    return f"not measured: exit {status.get('rc')} (see {part}.log)"


def verdict(value: float | None, limit: float, at_most: bool, device: str | None) -> str:
    if value is None:
        return "not measured"
    if device is None or not str(device).startswith("cuda"):
        return "n/a (not on a GPU)"
    return "yes" if (value <= limit if at_most else value >= limit) else "no"


def pytest_counts(text: str) -> dict[str, int]:
    """{'passed': 12, 'skipped': 1, ...} from pytest's last summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def augment_figures(report: dict) -> dict[str, Any]:
    """DALI on the GPU, dali_kd's loader and the raw pipeline, per decode mode, vs torchvision with 16 workers, from
    augment_throughput.py's JSON. Without GPU rows (the dry run) the CPU rows stand in, so the arithmetic runs."""
    rows = report.get("results", [])
    torchvision = {r["workers"]: r["img_per_s"] for r in rows if r["backend"] == "torchvision"}
    baseline_workers = (
        TORCHVISION_WORKERS if TORCHVISION_WORKERS in torchvision else max(torchvision, default=None)
    )
    device = "cuda" if any(r["backend"] in ("dali_gpu", "dali_raw_gpu") for r in rows) else "cpu"
    loader, raw = ("dali_gpu", "dali_raw_gpu") if device == "cuda" else ("dali_cpu", "dali_raw")

    def rates(backend: str) -> dict[str, float]:
        by_decode: dict[str, float] = {}
        for r in rows:
            if r["backend"] == backend:
                decode = r.get("decode") or "window"
                by_decode[decode] = max(by_decode.get(decode, 0.0), r["img_per_s"])
        return by_decode

    loader_rates, raw_rates = rates(loader), rates(raw)
    # What training gets is the loader; the raw pipeline only where the loader has no row.
    measured = loader_rates or raw_rates
    best = max(measured.values(), default=None)
    baseline = torchvision.get(baseline_workers)
    return {
        "device": device,
        "loader": loader,
        "loader_img_per_s": loader_rates,
        "raw_pipeline_img_per_s": raw_rates,
        "best_img_per_s": best,
        "torchvision_workers": baseline_workers,
        "torchvision_img_per_s": baseline,
        "dali_vs_torchvision": best / baseline if best and baseline else None,
        "window_vs_full": measured["window"] / measured["full"]
        if measured.get("window") and measured.get("full")
        else None,
    }


def multi_crop_figures(report: dict) -> dict[str, Any]:
    rows = report.get("multi_crop", [])
    backend = "dali_gpu" if any(r["backend"] == "dali_gpu" for r in rows) else "dali_cpu"
    costs = {
        r["backend"]: r["cost_vs_global_only"]
        for r in rows
        if "local" in r["crops"] and r.get("cost_vs_global_only") is not None
    }
    return {
        "device": "cuda" if backend == "dali_gpu" else "cpu",
        "backend": backend,
        "crops": next((r["crops"] for r in rows if "local" in r["crops"]), None),
        "cost_vs_global_only": costs.get(backend),
        "cost_by_backend": costs,
    }


def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def summarize(out: Path) -> dict[str, Any]:
    """Every part's key figures and each target of the issue, measured or not, from the files under `out`."""
    rows: list[dict[str, str]] = []
    parts: dict[str, Any] = {}

    def row(part: str, figure: str, target: str, met: str) -> None:
        rows.append({"part": part, "measured": figure, "target": target, "met": met})

    # gpu tests
    text = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else None
    status = part_status(out, "gpu_tests")
    if text is None or status.get("rc") is None:
        row("gpu tests", why_missing(out, "gpu_tests"), "all pass", "not measured")
    else:
        counts = pytest_counts(text)
        parts["gpu_tests"] = {"rc": status["rc"], **counts}
        passed = status["rc"] == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")
        if not counts.get("passed") and counts.get("skipped"):
            met = "n/a (skipped: no GPU)"
        else:
            met = "yes" if passed else "no"
        row(
            "gpu tests",
            ", ".join(f"{n} {w}" for w, n in counts.items()) or f"exit {status['rc']}",
            "all pass",
            met,
        )

    # training paths
    report = read_json(out / "paths" / "paths.json")
    if report is None:
        row(
            "training paths (compiled student)",
            why_missing(out, "paths"),
            "every path trains",
            "not measured",
        )
    else:
        records = report["paths"]
        parts["paths"] = records
        ok = [r for r in records if r["ok"]]
        failed = [f"{r['path']}: {r['error']}" for r in records if not r["ok"]]
        missing = [p.name for p in PATHS if p.name not in {r["path"] for r in records}]
        ms = [r["ms_per_step"] for r in records if r.get("ms_per_step") is not None]
        figure = f"{len(ok)}/{len(PATHS)} ok on {report['device']}"
        if ms:
            figure += f", {min(ms):.1f}–{max(ms):.1f} ms/step"
        if failed:
            figure += "; " + "; ".join(failed)
        if missing:
            figure += "; not run: " + ", ".join(missing)
        met = "yes" if len(ok) == len(PATHS) else "no"
        row("training paths (compiled student)", figure, "every path trains, batches on the device", met)

    # the reference step
    report = read_json(out / "reference_step.json")
    ref = next((r for r in (report or {}).get("results", []) if "step_ms" in r), None)
    floor_ratio = (report or {}).get("ratios", {}).get("dali_step_vs_floor")
    floor_target = f"≤ {REFERENCE_MAX_VS_FLOOR:.1f}× the floor measured in the same run"
    if ref is None:
        reason = why_missing(out, "reference_step")
        row("reference step / same-run floor", reason, floor_target, "not measured")
        row("reference step ms/step", reason, f"≤ {REFERENCE_MAX_STEP_MS:.0f} ms", "not measured")
        row("reference step data stall", reason, f"< {REFERENCE_MAX_STALL_PCT:.0f}%", "not measured")
    else:
        parts["reference_step"] = ref
        device = ref.get("device")
        if floor_ratio is None:
            row(
                "reference step / same-run floor",
                "not measured: no floor in the report",
                floor_target,
                "not measured",
            )
        else:
            floor = report["floor"]
            row(
                "reference step / same-run floor",
                f"{floor_ratio:.2f}× ({ref['step_ms']:.1f} vs {floor['step_ms']:.1f} ms; {split_text(ref)})",
                floor_target,
                verdict(floor_ratio, REFERENCE_MAX_VS_FLOOR, True, device),
            )
        row(
            "reference step ms/step",
            f"{ref['step_ms']:.1f} ms ({fmt(ref.get('img_per_s'), '.0f', ' img/s')}, "
            f"GPU JPEG decoder {fmt(ref.get('gpu_jpeg_util_pct'), '.0f', '%')}, {device})",
            f"≤ {REFERENCE_MAX_STEP_MS:.0f} ms (≥ 6,400 img/s)",
            verdict(ref["step_ms"], REFERENCE_MAX_STEP_MS, True, device),
        )
        stall = ref.get("data_stall_pct")
        row(
            "reference step data stall",
            fmt(stall, ".2f", "%"),
            f"< {REFERENCE_MAX_STALL_PCT:.0f}%",
            verdict(stall, REFERENCE_MAX_STALL_PCT, True, device),
        )

    two_teachers_row(out, row, parts)

    # cached step vs student-only step
    report = read_json(out / "cache_step.json")
    ratio = (report or {}).get("ratios", {}).get("cached_vs_student_only_step")
    if ratio is None:
        reason = why_missing(out, "cache_step") if report is None else "not measured: a backend failed"
        row("cached step / student-only step", reason, f"≤ {CACHED_MAX_VS_STUDENT_ONLY}×", "not measured")
    else:
        by_mode = {r["backend"]: r for r in report["results"]}
        parts["cache_step"] = {"ratio": ratio, "results": report["results"]}
        device = by_mode["dali+cache"].get("device")
        row(
            "cached step / student-only step",
            f"{ratio:.3f}× ({by_mode['dali+cache']['step_ms']:.1f} vs "
            f"{by_mode['dali+student-only']['step_ms']:.1f} ms, {device})",
            f"≤ {CACHED_MAX_VS_STUDENT_ONLY}×",
            verdict(ratio, CACHED_MAX_VS_STUDENT_ONLY, True, device),
        )
    student_floor = (report or {}).get("ratios", {}).get("dali+student-only_step_vs_floor")
    target = f"≤ {STUDENT_ONLY_MAX_VS_FLOOR}× its floor (the synthetic student step)"
    if student_floor is None:
        reason = why_missing(out, "cache_step") if report is None else "not measured: no floor in the report"
        row("student-only step / its floor", reason, target, "not measured")
    else:
        only = next(r for r in report["results"] if r["backend"] == "dali+student-only")
        row(
            "student-only step / its floor",
            f"{student_floor:.2f}× ({only['step_ms']:.1f} vs {report['floor']['student_ms']:.1f} ms; {split_text(only)})",
            target,
            verdict(student_floor, STUDENT_ONLY_MAX_VS_FLOOR, True, only.get("device")),
        )

    # function matching's mixing step, as a share of the reference step (same batch and view size)
    report = read_json(out / "mix_cost.json")
    target = f"≤ {MIX_MAX_SHARE_PCT:.0f}% of the reference step"
    if report is None:
        row("mixing per batch / reference step", why_missing(out, "mix_cost"), target, "not measured")
    else:
        worst = max(report["ms"].values())
        parts["mix_cost"] = report
        figure = ", ".join(f"{kind} {ms:.2f}" for kind, ms in report["ms"].items())
        figure += f" ms per batch of {report['batch_size']} × {report['size']}² ({report['device']})"
        if ref is None:
            row(
                "mixing per batch / reference step",
                f"{figure}; no reference step to compare",
                target,
                "not measured",
            )
        else:
            share = 100 * worst / ref["step_ms"]
            row(
                "mixing per batch / reference step",
                f"{share:.2f}% ({figure}; step {ref['step_ms']:.1f} ms)",
                target,
                verdict(share, MIX_MAX_SHARE_PCT, True, report["device"]),
            )

    # augmentation
    report = read_json(out / "augment.json")
    if report is None:
        reason = why_missing(out, "augment")
        row("DALI GPU augmentation, 224 px", reason, f"≥ {AUGMENT_MIN_IMG_S:,} img/s", "not measured")
        row(
            "DALI GPU / torchvision 16 workers",
            reason,
            f"≥ {AUGMENT_MIN_VS_TORCHVISION:.0f}×",
            "not measured",
        )
    else:
        aug = augment_figures(report)
        parts["augment"] = aug
        size = report.get("settings", {}).get("image_size")

        def listed(rates: dict[str, float]) -> str:
            return ", ".join(f"{mode} decode {rate:,.0f}" for mode, rate in rates.items()) or "—"

        stand_in = "" if aug["device"] == "cuda" else " (DALI CPU stands in: no GPU)"
        window_full = f"; window/full {aug['window_vs_full']:.2f}×" if aug["window_vs_full"] else ""
        row(
            f"DALI GPU augmentation, {size} px",
            f"loader {listed(aug['loader_img_per_s'])} img/s (raw pipeline {listed(aug['raw_pipeline_img_per_s'])})"
            f"{window_full}{stand_in}",
            f"≥ {AUGMENT_MIN_IMG_S:,} img/s at 224 px",
            verdict(aug["best_img_per_s"], AUGMENT_MIN_IMG_S, False, aug["device"])
            if size == 224 or aug["device"] != "cuda"
            else f"n/a ({size} px)",
        )
        row(
            f"DALI GPU / torchvision {aug['torchvision_workers']} workers",
            f"{fmt(aug['dali_vs_torchvision'], '.2f', '×')} (torchvision "
            f"{fmt(aug['torchvision_img_per_s'], ',.0f', ' img/s')}){stand_in}",
            f"≥ {AUGMENT_MIN_VS_TORCHVISION:.0f}× torchvision with {TORCHVISION_WORKERS} workers (500×375 JPEGs)",
            verdict(aug["dali_vs_torchvision"], AUGMENT_MIN_VS_TORCHVISION, False, aug["device"])
            if aug["torchvision_workers"] == TORCHVISION_WORKERS or aug["device"] != "cuda"
            else f"n/a ({aug['torchvision_workers']} workers)",
        )

    # multi-crop
    report = read_json(out / "multi_crop.json")
    mc = multi_crop_figures(report) if report else None
    if mc is None or mc["cost_vs_global_only"] is None:
        reason = why_missing(out, "multi_crop") if report is None else "not measured: no multi-crop rows"
        row("multi-crop cost per image vs 2 global", reason, f"≤ {MULTI_CROP_MAX_COST}×", "not measured")
    else:
        parts["multi_crop"] = mc
        others = ", ".join(f"{b} {c:.2f}×" for b, c in mc["cost_by_backend"].items() if b != mc["backend"])
        row(
            f"multi-crop cost per image vs 2 global ({mc['backend']})",
            f"{mc['cost_vs_global_only']:.2f}× ({mc['crops']}; {others})",
            f"≤ {MULTI_CROP_MAX_COST}× (2 + 8 crops)",
            verdict(mc["cost_vs_global_only"], MULTI_CROP_MAX_COST, True, mc["device"]),
        )

    decision_rows(out, row, parts)
    versions = (out / "versions.txt").read_text().strip() if (out / "versions.txt").exists() else None
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "part_status": {p: part_status(out, p) for p in PARTS},
        "targets": rows,
        "parts": parts,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "gpu_check.md").write_text(summary_markdown(summary) + "\n")
    return summary


# In the order gpu_check.sh runs them: the most important first.
PARTS = (
    "reference_step", "two_teachers_step", "ablation", "profile", "cache_step", "multi_crop", "tiny_step", "augment",
    "dali_op_costs", "mix_cost", "gpu_tests", "paths",
)  # fmt: skip


def two_teachers_row(out: Path, row, parts: dict[str, Any]) -> None:
    """The two-teacher step (ViT-B/16 and ResNet-50 -> ViT-S/16) beside its floor measured in the same run, each
    teacher's forward in the floor named."""
    report = read_json(out / "two_teachers_step.json")
    step = next((r for r in (report or {}).get("results", []) if "step_ms" in r), None)
    ratio = (report or {}).get("ratios", {}).get("dali_step_vs_floor")
    part, target = "two-teacher step / same-run floor", f"≤ {REFERENCE_MAX_VS_FLOOR:.1f}× its floor"
    if step is None or ratio is None:
        reason = (
            why_missing(out, "two_teachers_step") if step is None else "not measured: no floor in the report"
        )
        row(part, reason, target, "not measured")
        return
    parts["two_teachers_step"] = step
    floor = report["floor"]
    each = ", ".join(
        f"{k.removeprefix('teacher_ms_')} {v:.1f}" for k, v in floor.items() if k.startswith("teacher_ms_")
    )
    figure = (
        f"{ratio:.2f}× ({step['step_ms']:.1f} vs {floor['step_ms']:.1f} ms, {fmt(step.get('img_per_s'), '.0f', ' img/s')}; "
        f"{split_text(step)}; floor's teachers: {each or '—'} ms)"
    )
    row(part, figure, target, verdict(ratio, REFERENCE_MAX_VS_FLOOR, True, step.get("device")))


def split_text(result: dict) -> str:
    """A result's step in parts (train_throughput's split), ms and × floor."""
    split = result.get("split") or {}
    parts, vs = split.get("parts_ms", {}), split.get("vs_floor") or {}
    named = []
    for name in ("data", "teacher", "student", "optimizer", "rest"):
        ms = parts.get(f"{name}_ms")
        if ms is not None:
            times = vs.get(name)
            named.append(f"{name} {ms:.1f}" + (f" ({times:.2f}×)" if times is not None else ""))
    return ", ".join(named) + " ms" if named else "no split"


def decision_rows(out: Path, row, parts: dict[str, Any]) -> None:
    """The figures that decide what to change next: the ablation's fastest overrides, the profile, the fixed cost
    of a step, DALI's CPU cost by stage. No target of their own: "met" says "info"."""
    report = read_json(out / "ablation.json")
    if report is None:
        row(
            "ablation: fastest overrides",
            why_missing(out, "ablation"),
            "decides the defaults",
            "not measured",
        )
    else:
        parts["ablation"] = report
        fastest = " ".join(report["fastest_overrides"]) or "the defaults"
        timed = sum(1 for c in report["candidates"] if c["ms"])
        base = report["candidates"][0]
        figure = f"{fastest} (defaults {statistics.median(base['ms']):.1f} ms; {timed} settings timed, noise {report['noise_pct']:.1f}%)"
        row("ablation: fastest overrides", figure, "decides the defaults", "info")
    report = read_json(out / "profile.json")
    if report is None:
        row(
            "profile: GPU busy, host syncs per step",
            why_missing(out, "profile"),
            "0 host syncs",
            "not measured",
        )
    else:
        parts["profile"] = report
        idle = report.get("idle") or {}
        top = (report.get("top_kernels") or report.get("top_ops") or [{}])[0].get("name", "—")
        figure = (
            f"GPU busy {fmt(report['gpu_busy_pct'], '.1f', '%')}, idle {fmt(idle.get('ms_per_step'), '.2f', ' ms')}"
            f"/step, {report['host_syncs_per_step']:.2f} host syncs/step, top: {top[:60]} ({report['device']})"
        )
        met = verdict(report["host_syncs_per_step"], 0, True, report["device"])
        row("profile: GPU busy, host syncs per step", figure, "0 host syncs in a steady step", met)
    report = read_json(out / "tiny_step.json")
    tiny = next((r for r in (report or {}).get("results", []) if "step_ms" in r), None)
    if tiny is None:
        row(
            "tiny step: fixed cost per step", why_missing(out, "tiny_step"), "explains itself", "not measured"
        )
    else:
        floor = report.get("floor") or {}
        figure = f"{tiny['step_ms']:.2f} ms/step over {tiny['measured_steps']} steps"
        if floor:
            figure += f", floor {floor['step_ms']:.2f} ms: {tiny['step_ms'] - floor['step_ms']:.2f} ms fixed"
        row(
            "tiny step: fixed cost per step",
            f"{figure}; {split_text(tiny)} ({tiny['device']})",
            "explains itself",
            "info",
        )
    report = read_json(out / "dali_op_costs.json")
    if report is None:
        row(
            "DALI CPU mode: CPU ms per image by stage",
            why_missing(out, "dali_op_costs"),
            "explains itself",
            "not measured",
        )
    else:
        parts["dali_op_costs"] = report
        stages = ", ".join(
            f"{r['stage'].removeprefix('+ ')} {r['cpu_ms_per_image']:.2f}" for r in report["stages"]
        )
        full = report["cuts"][-1]["cpu_ms_per_image"]
        row(
            "DALI CPU mode: CPU ms per image by stage",
            f"{full:.2f} ms/image, {report['threads']} threads ({stages}); most: {report['top_stage']['fix']}",
            "explains itself",
            "info",
        )


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| part | measured | target | met? |", "|---|---|---|---|"]
    for r in summary["targets"]:
        lines.append(f"| {r['part']} | {r['measured'].replace('|', '/')} | {r['target']} | {r['met']} |")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="gpu_check.sh's output folder")
    args = parser.parse_args(argv)
    print(summary_markdown(summarize(args.out)))


if __name__ == "__main__":
    main()
