"""Training: segmentation (Phase I); classifier training, distillation and fine-tuning live beside it."""

from cellkd.training.segmentation import (
    SegmentationTrainParams,
    evaluate_model,
    evaluate_segmentation,
    load_segmentation_model,
    save_segmentation_model,
    train_segmentation,
)

__all__ = [
    "SegmentationTrainParams",
    "evaluate_model",
    "evaluate_segmentation",
    "load_segmentation_model",
    "save_segmentation_model",
    "train_segmentation",
]
