"""GPU: U-Net training samples/s (fp32 vs AMP + channels_last) and ``predict_fragment`` tiles/s; skipped without
CUDA."""

from __future__ import annotations

import numpy as np
from harness import Context, Row, Stopwatch

NAME = "gpu"
ORDER = 70


def run(ctx: Context) -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        return [Row("gpu: U-Net training / inference", "skipped: no CUDA", "-", "-", "-", "n/a")]
    from cellkd.inference import predict_fragment
    from cellkd.models import create_segmentation_model

    dev = torch.device("cuda")
    batch, steps = 8, 5 if ctx.quick else 30

    def train_rate(amp: bool) -> float:
        with torch.random.fork_rng(devices=[dev]):
            torch.manual_seed(0)
            model = create_segmentation_model("unet", encoder="resnet34").to(dev)
        fmt = torch.channels_last if amp else torch.contiguous_format
        model = model.to(memory_format=fmt).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 512, 512, device=dev).to(memory_format=fmt)
        y = (torch.rand(batch, 1, 512, 512, device=dev) > 0.5).float()
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        for _ in range(3):  # warm-up steps (cudnn autotuning)
            step()
        torch.cuda.synchronize()
        with Stopwatch() as watch:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        return steps * batch / watch.seconds

    fp32, amp = train_rate(False), train_rate(True)
    model = create_segmentation_model("unet", encoder="resnet34").to(dev).eval()
    image = np.random.default_rng(0).integers(0, 256, size=(4096, 4096, 3), dtype=np.uint8)
    predict_fragment(model, image[:1024, :1024], batch_size=16)
    with Stopwatch() as watch:
        predict_fragment(model, image, batch_size=16)
        torch.cuda.synchronize()
    tiles = len(range(0, 4096, 448)) ** 2
    return [
        Row(
            "gpu: U-Net resnet34 training, samples/s (AMP + channels_last vs fp32)",
            f"{amp:.1f}",
            f"{fp32:.1f}",
            f"{amp / fp32:.1f}x",
            "-",
            "n/a",
            f"{torch.cuda.get_device_name()}, batch {batch}, 512x512",
        ),
        Row(
            "gpu: predict_fragment, tiles/s",
            f"{tiles / watch.seconds:.1f}",
            "-",
            "-",
            "-",
            "n/a",
            "4096x4096 in-memory image, batch 16, fp32",
        ),
    ]
