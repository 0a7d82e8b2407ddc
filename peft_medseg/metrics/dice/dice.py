"""Dice and IoU for semantic segmentation: per class, mean foreground, and per center."""

import datasets
import evaluate
import numpy as np

from peft_medseg.metrics.functional import segmentation_report

_DESCRIPTION = """
Dice coefficient and IoU (Jaccard) of label maps, computed per image and averaged over images.
Per-class values are indexed by class id (0 is background). `mean_dice` / `mean_iou` average the foreground classes.
A class absent from both prediction and reference scores 1.0; present in only one, 0.0.
Pixels equal to `ignore_index` in the reference are excluded. Pass `centers` (one per image) for per-center Dice.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: label maps (2D integer arrays), one per image.
    references: reference label maps of the same shapes.
    num_labels (int): number of classes, background included.
    ignore_index (int, optional): reference value to exclude (for example 255).
    centers (list of str, optional): the center of each image, for `per_center_dice`.
Returns:
    per_class_dice, per_class_iou (lists indexed by class id), mean_dice, mean_iou (floats),
    and with `centers`: per_center_dice ({center: mean foreground Dice}), per_center_per_class_dice.
Examples:
    >>> import numpy as np
    >>> from peft_medseg.metrics import load_metric
    >>> dice = load_metric("dice")
    >>> ref = np.array([[0, 1], [1, 1]])
    >>> dice.compute(predictions=[ref], references=[ref], num_labels=2)["mean_dice"]
    1.0
"""

_CITATION = """
@article{dice1945,
  title={Measures of the amount of ecologic association between species},
  author={Dice, Lee R.},
  journal={Ecology}, volume={26}, number={3}, pages={297--302}, year={1945}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Dice(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=None, centers=None):
        predictions = [np.asarray(p) for p in predictions]
        references = [np.asarray(r) for r in references]
        return segmentation_report(predictions, references, num_labels, centers=centers, ignore_index=ignore_index)
