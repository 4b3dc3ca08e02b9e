"""Model factory: one registry mapping a name from workflow_config.yaml to a constructor.

Segmentation networks ("unet", "unetplusplus") and nucleus classifiers ("resnet18", "resnet16",
"vgg4", "xception", "rccnet", see :mod:`cellkd.models.classifiers`) are registered here; further
modules add theirs with :func:`register_model` (e.g. ``register_model("resnet18", create_resnet18)``)
and must be imported below so that the registration runs on ``import cellkd.models``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from cellkd.models.classifiers import (
    CLASSIFIER_ARCHS,
    CLASSIFIER_CONSTRUCTORS,
    INPUT_SHAPES,
    InputKind,
    classifier_input,
)
from cellkd.models.segmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEGMENTATION_ARCHS,
    count_parameters,
    create_segmentation_model,
    preprocess,
)

ModelConstructor = Callable[..., nn.Module]

MODEL_REGISTRY: dict[str, ModelConstructor] = {}
"""name -> constructor taking keyword arguments; fill it through :func:`register_model`."""


def register_model(name: str, constructor: ModelConstructor) -> None:
    """Make ``create_model(name, **kwargs)`` call ``constructor(**kwargs)``; a name can be registered once."""
    if name in MODEL_REGISTRY:
        raise ValueError(f"model name {name!r} is already registered (to {MODEL_REGISTRY[name]!r})")
    MODEL_REGISTRY[name] = constructor


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``; the error lists every valid name."""
    try:
        constructor = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_REGISTRY)}") from None
    return constructor(**kwargs)


for _arch in SEGMENTATION_ARCHS:
    register_model(_arch, partial(create_segmentation_model, _arch))
for _arch, _constructor in CLASSIFIER_CONSTRUCTORS.items():
    register_model(_arch, _constructor)

__all__ = [
    "CLASSIFIER_ARCHS",
    "INPUT_SHAPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_REGISTRY",
    "SEGMENTATION_ARCHS",
    "InputKind",
    "classifier_input",
    "count_parameters",
    "create_model",
    "create_segmentation_model",
    "preprocess",
    "register_model",
]
