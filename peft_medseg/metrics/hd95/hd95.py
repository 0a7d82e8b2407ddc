"""95th-percentile Hausdorff distance for semantic segmentation: per class, mean foreground, and per center."""

import datasets
import evaluate
import numpy as np

from peft_medseg.metrics.functional import aggregate_by_center, hd95, mean_foreground

_DESCRIPTION = """
HD95: max of the two directed 95th-percentile surface distances between prediction and reference (face-connected
surface voxels, as in MONAI), per class and per image, then averaged over images ignoring NaNs.
Units are pixels, or mm when `spacing` is given (one [row, column] spacing for all images, or one per image).
Both masks empty gives 0.0; exactly one empty gives NaN (skipped by the means; `num_undefined` counts them).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: label maps (2D integer arrays), one per image.
    references: reference label maps of the same shapes.
    num_labels (int): number of classes, background included.
    spacing (list of float, or list of lists, optional): pixel spacing in mm.
    ignore_index (int, optional): reference value to exclude.
    centers (list of str, optional): the center of each image, for `per_center_hd95`.
Returns:
    per_class_hd95 (list indexed by class id), mean_hd95 (float, foreground classes), num_undefined (int,
    foreground class/image pairs where exactly one mask was empty), and with `centers`: per_center_hd95.
Examples:
    >>> import numpy as np
    >>> from peft_medseg.metrics import load_metric
    >>> hd95 = load_metric("hd95")
    >>> ref = np.zeros((8, 8), dtype=int); ref[2:6, 2:6] = 1
    >>> hd95.compute(predictions=[ref], references=[ref], num_labels=2)["mean_hd95"]
    0.0
"""

_CITATION = """
@article{huttenlocher1993,
  title={Comparing images using the Hausdorff distance},
  author={Huttenlocher, Daniel P. and Klanderman, Gregory A. and Rucklidge, William J.},
  journal={IEEE TPAMI}, volume={15}, number={9}, pages={850--863}, year={1993}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HD95(evaluate.Metric):
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

    def _compute(self, predictions, references, num_labels, spacing=None, ignore_index=None, centers=None):
        if spacing is None or np.ndim(spacing) <= 1:
            spacings = [spacing] * len(predictions)
        else:
            spacings = list(spacing)
        values = np.array(
            [
                hd95(np.asarray(p), np.asarray(r), num_labels, spacing=s, ignore_index=ignore_index)
                for p, r, s in zip(predictions, references, spacings)
            ]
        )
        per_class = aggregate_by_center(list(values), ["all"] * len(values))["all"]
        result = {
            "per_class_hd95": per_class.tolist(),
            "mean_hd95": mean_foreground(per_class),
            "num_undefined": int(np.isnan(values[:, 1:]).sum()),
        }
        if centers is not None:
            by_center = aggregate_by_center(list(values), centers)
            result["per_center_hd95"] = {center: mean_foreground(v) for center, v in by_center.items()}
        return result
