"""Nucleus classifiers: registry, shapes, input kinds, gradients, RCCNet's parameter count, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellkd.models import (
    CLASSIFIER_ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_SHAPES,
    classifier_input,
    count_parameters,
    create_model,
)
from cellkd.models.classifiers import RCCNET_PARAMETERS

EXPECTED_KIND = {
    "resnet18": "level0",
    "resnet16": "level0",
    "vgg4": "level0",
    "resnet16ms": "multiscale",
    "vgg4ms": "multiscale",
    "xception": "multiscale",
    "rccnet": "level0",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=CLASSIFIER_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def batch(kind: str, size: int = 3) -> torch.Tensor:
    """``size`` inputs of the shape ``kind`` expects, standard normal from seed 0."""
    return torch.randn(size, *INPUT_SHAPES[kind], generator=torch.Generator().manual_seed(0))


def test_every_classifier_is_registered_with_its_input_kind(arch: str) -> None:
    model = create_model(arch, num_classes=4, dropout=0.3)
    assert model.input_kind == EXPECTED_KIND[arch]


def test_classifier_forward_backward_gives_one_logit_per_class(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, dropout=0.3)
    x = batch(model.input_kind)
    logits = model(x)
    assert logits.shape == (3, 4) and logits.dtype == torch.float32
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_classifier_num_classes_sets_the_output_width(arch: str) -> None:
    model = create_model(arch, num_classes=7, dropout=0.0).eval()
    with torch.inference_mode():
        assert model(batch(model.input_kind, 2)).shape == (2, 7)


def test_classifier_dropout_only_acts_in_training_mode(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, dropout=0.5)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    x = batch(model.input_kind)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))  # a fresh dropout mask per forward
        for m in dropouts:
            m.p = 0.0
        # ... and dropout is the only source of that randomness (BatchNorm uses the same batch statistics)
        assert torch.equal(model(x), model(x))
        model.eval()
        without_dropout = model(x)
        for m in dropouts:
            m.p = 0.5
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), without_dropout)  # in eval mode dropout changes nothing


def test_rccnet_has_the_papers_parameter_count() -> None:
    count = count_parameters(create_model("rccnet", num_classes=4))
    assert count == RCCNET_PARAMETERS == 1_512_868
    assert 1_200_000 <= count <= 1_800_000


def test_resnets_use_a_3x3_stride1_stem_without_max_pool() -> None:
    for arch in ("resnet18", "resnet16"):
        model = create_model(arch)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
    blocks18 = [len(getattr(create_model("resnet18"), f"layer{i}")) for i in range(1, 5)]
    blocks16 = [len(getattr(create_model("resnet16"), f"layer{i}")) for i in range(1, 5)]
    assert blocks18 == [2, 2, 2, 2] and blocks16 == [2, 2, 2, 1]


def test_multiscale_variants_keep_the_architecture_and_change_only_the_input() -> None:
    # resnet16ms is ResNet-16 on the 6-channel 16x16 input: the same blocks, a 6-channel stem.
    resnet, multiscale = create_model("resnet16"), create_model("resnet16ms")
    assert [len(getattr(multiscale, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 1]
    assert (resnet.conv1.in_channels, multiscale.conv1.in_channels) == (3, 6)
    assert count_parameters(multiscale) - count_parameters(resnet) == 3 * 64 * 3 * 3  # 3 more stem channels
    # vgg4ms: the same 2 convs and 2 linear layers; after the max-pool the flatten sees 64 x 8 x 8.
    vgg, vgg_multiscale = create_model("vgg4"), create_model("vgg4ms")
    widths = [(m.in_channels, m.out_channels) for m in vgg_multiscale if isinstance(m, nn.Conv2d)]
    assert widths == [(6, 64), (64, 64)]
    linear = [m.in_features for m in vgg_multiscale if isinstance(m, nn.Linear)]
    assert linear == [64 * 8 * 8, 128] and [m.in_features for m in vgg if isinstance(m, nn.Linear)][0] == 64 * 16 * 16
    with pytest.raises(RuntimeError):
        multiscale(batch("level0"))  # a 32x32 RGB crop is not its input


def test_classifiers_are_small_enough_for_crops() -> None:
    counts = {arch: count_parameters(create_model(arch)) for arch in CLASSIFIER_ARCHS}
    assert counts["resnet16"] < counts["resnet18"] < 12_000_000
    assert counts["xception"] < 1_000_000 and counts["vgg4"] < 2_500_000


def test_classifier_input_normalizes_each_rgb_group() -> None:
    crops = torch.zeros(2, 16, 16, 6, dtype=torch.uint8)
    crops[..., 3:] = 255
    x = classifier_input(crops)
    assert x.shape == (2, 6, 16, 16) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :3, 0, 0], -mean / std)
    assert torch.allclose(x[0, 3:, 0, 0], (1 - mean) / std)
    assert classifier_input(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 3, 32, 32)


def test_classifier_input_rejects_channels_not_a_multiple_of_three() -> None:
    with pytest.raises(ValueError, match=r"uint8 \(B, S, S, 3k\)"):
        classifier_input(torch.zeros(1, 16, 16, 4, dtype=torch.uint8))


def test_create_model_unknown_name_lists_the_classifiers() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*'rccnet'.*'vgg4'.*'xception'"):
        create_model("resnet50")


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"dropout": 1.0}, "dropout=1.0"), ({"num_classes": 1}, "num_classes=1")]
)
def test_classifier_rejects_bad_arguments(arch: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model(arch, **kwargs)
