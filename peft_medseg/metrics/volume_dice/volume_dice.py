"""Volume-level (3D) Dice for 2D slices cut from volumes, regrouped by case and slice index."""

import datasets
import evaluate
import numpy as np

from peft_medseg.metrics.functional import mean_foreground, volume_dice

_DESCRIPTION = """
3D Dice per case: slices are regrouped by `case_ids`, ordered by `slice_indices`, stacked into volumes and scored
as one volume each (not as the mean of per-slice Dice). Conventions as the `dice` module: a class absent from both
volumes scores 1.0, present in only one 0.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: label maps (2D integer arrays), one per slice.
    references: reference label maps of the same shapes.
    case_ids (list of str): the volume each slice came from.
    slice_indices (list of int): the position of each slice in its volume.
    num_labels (int): number of classes, background included.
    ignore_index (int, optional): reference value to exclude.
Returns:
    per_case_dice ({case_id: list indexed by class id}), per_class_dice (mean over cases), mean_dice (float).
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VolumeDice(evaluate.Metric):
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

    def _compute(self, predictions, references, case_ids, slice_indices, num_labels, ignore_index=None):
        per_case = volume_dice(
            [np.asarray(p) for p in predictions],
            [np.asarray(r) for r in references],
            case_ids,
            slice_indices,
            num_labels,
            ignore_index,
        )
        per_class = np.nanmean(np.asarray(list(per_case.values())), axis=0)
        return {
            "per_case_dice": {case_id: values.tolist() for case_id, values in per_case.items()},
            "per_class_dice": per_class.tolist(),
            "mean_dice": mean_foreground(per_class),
        }
