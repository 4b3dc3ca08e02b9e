"""Phases II-IV: train nucleus classifiers (teachers), distil them into students, fine-tune on expert labels.

Modules, along the data flow:

``data``          rows of the concatenated nuclei stores, their crops, augmentation, ``cap_per_class``
``distillation``  the distillation loss, class weights, the teacher-logit cache
``train``         ``ClassifierTrainParams`` and the training loop (resume state, best / final checkpoints)
``evaluate``      logits of every row (``predict_logits``) and scores on a labelled split

Artifacts: reads nuclei stores ``results/nuclei/{stain}/{slide}.h5`` (one row per nucleus; layout,
writer and the only reader in ``cellkd.store.nuclei``). Several stores are concatenated in the
order given; a "row" is an index into that concatenation. Writes, per run, ``model.pt`` /
``best.pt`` (format in ``cellkd.models.checkpoint``, read by ``load_classifier``), ``last.pt``
(resume state) and ``history.csv``; the teacher-logit cache (HDF5, layout in
:func:`cache_teacher_logits`) is read by :func:`load_teacher_logits` for student training.

Training rows: the train split (or ``train_indices``) with label >= 0 in ``label_set``. With
``teacher_logits`` (a file from :func:`cache_teacher_logits`), the target of a row is the teacher's
argmax and the soft targets are its logits, so every train-split row is used: the teacher labels the
nuclei no annotation covers too. Validation rows: the val split (or ``val_indices``) with label >= 0
in ``label_set``, always scored against ``label_set`` (a student distilled from an SSA teacher is
validated on SSA labels). The model with the best validation macro F1 becomes ``model.pt``.

Memory: the crops of the selected rows are loaded once as uint8 tensors on the training device
(100k level-0 crops = 100k x 32 x 32 x 3 B = 300 MB worst case) and augmented per batch on the
device with a random element of the 8 flips/rotations, drawn from ``(seed, epoch)``. No
DataLoader is needed, so ``num_workers`` has no effect (it is kept so that the config mirrors the
segmentation trainer's). A teacher is never run during student training: its logits are cached.

Resume: as in ``cellkd.training.segmentation`` (see ``cellkd.training.common``): ``last.pt`` after
every epoch, ``best.pt`` on improvement, ``model.pt`` only at the very end.
"""

from cellkd.models.checkpoint import load_classifier, read_classifier_checkpoint
from cellkd.training.classifier.data import NucleusRows, augment_dihedral, cap_per_class, read_nucleus_rows
from cellkd.training.classifier.distillation import cache_teacher_logits, distillation_loss, load_teacher_logits
from cellkd.training.classifier.evaluate import evaluate_classifier, predict_logits
from cellkd.training.classifier.train import HISTORY_COLUMNS, ClassifierTrainParams, train_classifier

__all__ = [
    "HISTORY_COLUMNS",
    "ClassifierTrainParams",
    "NucleusRows",
    "augment_dihedral",
    "cache_teacher_logits",
    "cap_per_class",
    "distillation_loss",
    "evaluate_classifier",
    "load_classifier",
    "load_teacher_logits",
    "predict_logits",
    "read_classifier_checkpoint",
    "read_nucleus_rows",
    "train_classifier",
]
