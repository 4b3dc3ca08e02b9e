"""Training: segmentation (Phase I); nucleus classifiers, distillation and fine-tuning (Phases II-IV)."""

from cellkd.models.checkpoint import load_classifier, load_segmentation_model, save_segmentation_model
from cellkd.training.classifier import (
    ClassifierTrainParams,
    cache_teacher_logits,
    distillation_loss,
    evaluate_classifier,
    load_teacher_logits,
    predict_logits,
    train_classifier,
)
from cellkd.training.segmentation import (
    SegmentationTrainParams,
    evaluate_model,
    evaluate_segmentation,
    train_segmentation,
)

__all__ = [
    "ClassifierTrainParams",
    "SegmentationTrainParams",
    "cache_teacher_logits",
    "distillation_loss",
    "evaluate_classifier",
    "evaluate_model",
    "evaluate_segmentation",
    "load_classifier",
    "load_segmentation_model",
    "load_teacher_logits",
    "predict_logits",
    "save_segmentation_model",
    "train_classifier",
    "train_segmentation",
]
