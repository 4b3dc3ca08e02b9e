"""Student speed: the RCCNet student vs the ResNet-18 teacher, CPU inference crops/s on 32x32 crops.

Both models run through the workflow's own inference step (``prepare_for_inference`` + ``infer_logits``, what
``predict_logits`` does for every stored chunk) on the same crops, at the same batch and thread count; warm-up passes
are not timed. A second row per thread count shows what that step gains over a plain NCHW forward at the reading
chunk (1024), and a ``torch.profiler`` breakdown of the student's forward goes into the notes.
"""

from __future__ import annotations

import copy
import math
import os
from collections import defaultdict

from harness import N_CORES, Context, Row, Stopwatch, met

NAME = "student_speed"
ORDER = 45

THREADS = (1, 2)
TARGET = 5.0
READ_CHUNK = 1024  # predict_logits' default batch_size: the forward batch before CPU_FORWARD_BATCH


def _best_crops_per_s(passes: dict, repeats: int) -> dict[str, float]:  # type: ignore[type-arg]
    """Best crops/s of each ``name -> (forward, crops)`` over ``repeats`` interleaved rounds after one untimed
    warm-up pass each: a shared machine's noise only ever slows a pass down, and interleaving spreads it evenly."""
    import torch

    best = dict.fromkeys(passes, math.inf)
    with torch.inference_mode():
        for forward, crops in passes.values():
            forward(crops)
        for _ in range(repeats):
            for name, (forward, crops) in passes.items():
                with Stopwatch() as watch:
                    forward(crops)
                best[name] = min(best[name], watch.seconds)
    return {name: len(passes[name][1]) / seconds for name, seconds in best.items()}


def _profile_breakdown(model, crops) -> str:  # type: ignore[no-untyped-def]
    """The student's forward time by operator kind (self CPU time, %), largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cellkd.training.classifier.evaluate import infer_logits

    kinds = {"conv": "convolution", "addmm": "first/hidden FC", "linear": "first/hidden FC", "batch_norm": "BatchNorm",
             "max_pool": "max-pool", "relu": "ReLU", "sub": "input normalisation", "div": "input normalisation",
             "to": "input normalisation", "copy": "layout copies", "cat": "layout copies"}  # fmt: skip
    with torch.inference_mode():
        infer_logits(model, crops)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            infer_logits(model, crops)
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        kind = next((label for key, label in kinds.items() if key in event.key), "other")
        shares[kind] += event.self_cpu_time_total
    total = sum(shares.values()) or 1.0
    return ", ".join(f"{kind} {100 * t / total:.0f}%" for kind, t in sorted(shares.items(), key=lambda kv: -kv[1]))


def run(ctx: Context) -> list[Row]:
    import torch

    from cellkd.models import classifier_input
    from cellkd.models.classifiers import RCCNet, create_resnet18
    from cellkd.training.classifier.evaluate import CPU_FORWARD_BATCH, infer_logits, prepare_for_inference

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student, teacher = RCCNet(), create_resnet18()
        crops = torch.randint(0, 256, (512 if ctx.quick else 2048, 32, 32, 3), dtype=torch.uint8)
    n_teacher = 128 if ctx.quick else 256  # ResNet-18 runs 30-90 crops/s per core: fewer crops, same batches
    repeats = 1 if ctx.quick else 5
    fc1 = next(m for m in student.modules() if isinstance(m, torch.nn.Linear))  # 64*6*6 -> 512
    n_params = sum(p.numel() for p in student.parameters())
    fc1_share = sum(p.numel() for p in fc1.parameters()) / n_params
    flops = {"conv": 2 * (32 * 32 * 32 * 27 + 30 * 30 * 32 * 288 + 15 * 15 * 64 * 288 + 13 * 13 * 64 * 576),
             "fc": 2 * (2304 * 512 + 512 * 512 + 512 * 4)}  # fmt: skip

    def plain(model):  # type: ignore[no-untyped-def]
        # Before: a contiguous NCHW model, one forward per reading chunk.
        return lambda c: torch.cat([model(classifier_input(part)) for part in c.split(READ_CHUNK)])

    rows: list[Row] = []
    previous = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            student_nchw = copy.deepcopy(student).eval()
            prepare_for_inference(student), prepare_for_inference(teacher)
            speed = _best_crops_per_s(
                {
                    "student": (lambda c: infer_logits(student, c), crops),
                    "teacher": (lambda c: infer_logits(teacher, c), crops[:n_teacher]),
                    "student_plain": (plain(student_nchw), crops),
                },
                repeats,
            )
            student_s, teacher_s, student_plain = speed["student"], speed["teacher"], speed["student_plain"]
            ratio = student_s / teacher_s
            label = f"{threads} thread{'s' if threads > 1 else ''}"
            notes = (
                f"same crops (uint8 -> classifier_input), both through predict_logits' forward step (channels_last, "
                f"batches of {CPU_FORWARD_BATCH}), {len(crops)} student / {n_teacher} teacher crops, best of {repeats} "
                f"after a warm-up pass; load average {os.getloadavg()[0]:.1f} on {N_CORES} cores (on busy cores "
                f"2-thread figures swing: OpenMP barriers wait for descheduled threads)"
            )
            if threads == THREADS[0]:
                notes += (
                    f". Student: {n_params:,} parameters, the first FC holds {100 * fc1_share:.0f}% of them but "
                    f"{100 * flops['fc'] / (flops['conv'] + flops['fc']):.0f}% of its "
                    f"{(flops['conv'] + flops['fc']) / 1e6:.0f} MFLOPs per crop (ResNet-18 at 32x32: ~1,110); "
                    f"profiled forward, self CPU time: {_profile_breakdown(student, crops[:512])}"
                )
            rows.append(Row(f"student_speed: RCCNet vs ResNet-18, CPU crops/s, 32x32, {label}",
                            f"{student_s:,.0f}", f"{teacher_s:,.0f}", f"{ratio:.1f}x", f">= {TARGET:.0f}x",
                            met(ratio >= TARGET), notes))  # fmt: skip
            rows.append(Row(f"student_speed: RCCNet, predict_logits' forward vs plain NCHW batch {READ_CHUNK}, "
                            f"crops/s, {label}", f"{student_s:,.0f}", f"{student_plain:,.0f}",
                            f"{student_s / student_plain:.1f}x", "-", met(None),
                            f"channels_last + batches of {CPU_FORWARD_BATCH} (cellkd) vs a contiguous NCHW model fed "
                            f"{READ_CHUNK} crops per forward (before); logits equal up to float rounding"))  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return rows
