"""U-Net / U-Net++ with ConvTranspose upsampling: shapes, gradients, no interpolation, dropout, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cellkd.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_REGISTRY,
    SEGMENTATION_ARCHS,
    count_parameters,
    create_model,
    create_segmentation_model,
    preprocess,
    register_model,
)
from cellkd.models.checkpoint import segmentation_from_checkpoint

ENCODER = "resnet18"
SMALL = {"encoder": ENCODER, "decoder_channels": (32, 16, 16, 8, 8)}
"""A light configuration: tests check wiring, not capacity."""
SMP_CLASSES = {"unet": smp.Unet, "unetplusplus": smp.UnetPlusPlus}


@pytest.fixture(scope="module", params=SEGMENTATION_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def built(arch: str) -> nn.Module:
    """The SMALL model of ``arch``, built once per module; tests take a copy through ``model``."""
    return create_segmentation_model(arch, **SMALL)


@pytest.fixture
def model(built: nn.Module) -> nn.Module:
    """A fresh copy of ``built`` that a test may train, mutate or run backward on."""
    return copy.deepcopy(built)


@pytest.fixture(scope="module")
def reference(arch: str) -> nn.Module:
    """smp's stock model with the SMALL configuration (nearest-neighbour upsampling), in eval mode."""
    smp_class = SMP_CLASSES[arch]
    return smp_class(encoder_name=ENCODER, encoder_weights=None, decoder_channels=SMALL["decoder_channels"]).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Two 64x64 RGB inputs (divisible by 32) drawn from a fixed-seed standard normal."""
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _upsample_ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of aten upsampling/interpolation ops that ran during one forward pass."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return sorted({e.key for e in prof.key_averages() if "upsample" in e.key or "interp" in e.key})


def test_forward_backward_gives_logit_shape_and_finite_gradients(model: nn.Module, images: torch.Tensor) -> None:
    model.train()
    logits = model(images)
    assert logits.shape == (2, 1, 64, 64)
    assert logits.dtype == torch.float32
    logits.mean().backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)).weight.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    deconvs = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert deconvs
    for deconv in deconvs:
        grad = deconv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_every_decoder_block_upsamples_with_one_conv_transpose(arch: str, model: nn.Module) -> None:
    blocks = list(model.decoder.blocks.children())
    # U-Net: one block per stage (5); U-Net++: every nested node x_d_l upsamples (4+3+2+1+1 = 11).
    assert len(blocks) == {"unet": 5, "unetplusplus": 11}[arch]
    for block in blocks:
        deconvs = [m for m in block.modules() if isinstance(m, nn.ConvTranspose2d)]
        assert len(deconvs) == 1
        assert deconvs[0].kernel_size == (2, 2) and deconvs[0].stride == (2, 2)
        assert deconvs[0].in_channels == deconvs[0].out_channels


def test_forward_runs_no_interpolation_op(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        # The detector must see smp's own nearest-neighbour upsampling, or its silence proves nothing.
        assert _upsample_ops(reference, images)
        assert _upsample_ops(model, images) == []


def test_forward_never_calls_functional_interpolate(
    model: nn.Module, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model.eval()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("F.interpolate called")

    monkeypatch.setattr(torch.nn.functional, "interpolate", forbidden)
    with torch.no_grad():
        assert model(images).shape == (2, 1, 64, 64)


def test_initial_model_equals_smp_nearest_upsampling_with_same_weights(
    model: nn.Module, reference: nn.Module, images: torch.Tensor
) -> None:
    """At init the deconvolutions copy nearest upsampling, so with shared weights the outputs match smp's."""
    model.eval()
    state = {
        key.replace("segmentation_head.1.", "segmentation_head.0."): value
        for key, value in model.state_dict().items()
        if ".upsample." not in key
    }
    reference = copy.deepcopy(reference)
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-5)


def test_dropout_is_active_in_train_and_off_in_eval(model: nn.Module, images: torch.Tensor) -> None:
    assert any(isinstance(m, nn.Dropout2d) and m.p == 0.3 for m in model.segmentation_head)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        first = model(images)
        second = model(images)
        assert not torch.equal(first, second)
        model.eval()
        assert torch.equal(model(images), model(images))


def test_shallower_encoder_uses_trailing_default_decoder_channels() -> None:
    model = create_segmentation_model("unet", encoder=ENCODER, encoder_depth=3)
    assert [b.conv2[0].out_channels for b in model.decoder.blocks.children()] == [64, 32, 16]
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 24, 24)).shape == (1, 1, 24, 24)


def test_input_not_divisible_by_output_stride_raises(model: nn.Module) -> None:
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="divisible by 32"):
        model(torch.zeros(1, 3, 48, 48))


def test_create_model_dispatches_to_segmentation_factory() -> None:
    model = create_model("unetplusplus", dropout=0.1, **SMALL)
    assert isinstance(model, smp.UnetPlusPlus)
    assert set(SEGMENTATION_ARCHS) <= set(MODEL_REGISTRY)


@pytest.mark.parametrize("factory", [create_model, create_segmentation_model])
def test_unknown_arch_error_lists_valid_names(factory) -> None:
    with pytest.raises(ValueError, match=r"unknown .*'segnet'.*'unet', 'unetplusplus'"):
        factory("segnet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "resnet9000"}, "unknown encoder 'resnet9000'"),
        ({"dropout": 1.0}, r"dropout=1.0 must lie in \[0, 1\)"),
        ({"encoder_depth": 6}, "encoder_depth=6 must be 3, 4 or 5"),
        ({"decoder_channels": (64, 32)}, "must hold 5 positive integers"),
        ({"decoder_channels": (256, 128, 64, 32, 0)}, "must hold 5 positive integers"),
    ],
)
def test_invalid_arguments_raise_with_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_segmentation_model("unet", **kwargs)


def test_register_model_rejects_a_taken_name_and_create_model_passes_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cellkd.models.MODEL_REGISTRY", dict(MODEL_REGISTRY))
    register_model("tiny", lambda width=1: nn.Linear(width, 1))
    assert create_model("tiny", width=7).in_features == 7
    with pytest.raises(ValueError, match="'unet' is already registered"):
        register_model("unet", nn.Identity)


def test_count_parameters_counts_all_or_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3 parameters
    model[0].weight.requires_grad_(False)  # 6 frozen
    assert count_parameters(model) == 11
    assert count_parameters(model, trainable_only=True) == 5


def test_preprocess_normalizes_uint8_hwc_to_float_bchw() -> None:
    """A 2x2 image: white (255) everywhere except pixel (0, 1), which is black."""
    image = np.full((2, 2, 3), 255, dtype=np.uint8)
    image[0, 1] = 0
    x = preprocess(image)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(x[0, :, 0, 1], -mean / std)
    assert preprocess(torch.from_numpy(np.stack([image, image]))).shape == (2, 3, 2, 2)


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (np.zeros((2, 2, 3), dtype=np.float32), TypeError, "expects uint8"),
        (np.zeros((2, 3, 2, 2), dtype=np.uint8), ValueError, r"got shape \(2, 3, 2, 2\)"),
    ],
)
def test_preprocess_rejects_non_uint8_or_channels_first(images: np.ndarray, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        preprocess(images)


def test_encoder_layers_a_shallow_model_never_runs_are_pruned_and_old_checkpoints_still_load() -> None:
    torch.manual_seed(0)
    model = create_segmentation_model("unet", encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(16, 8, 8))
    assert model.pruned_modules == [f"encoder.features.{i}" for i in range(14, 19)]
    assert not any(key.startswith("encoder.features.14.") for key in model.state_dict())
    # smp's own model keeps them: the state dict of a checkpoint written before pruning
    torch.manual_seed(0)
    stock = smp.Unet("mobilenet_v2", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=1)
    assert sum(p.numel() for p in stock.encoder.parameters()) > 3 * sum(p.numel() for p in model.encoder.parameters())
    old_state = {f"encoder.features.18.{k}": v for k, v in stock.encoder.features[18].state_dict().items()}
    old_state.update(model.state_dict())
    checkpoint = {"arch": "unet", "encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": (16, 8, 8)}
    rebuilt = segmentation_from_checkpoint({**checkpoint, "dropout": 0.3, "state_dict": old_state}, "cpu")
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
