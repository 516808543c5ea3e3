"""UNSC (Chen et al. 2024, "Machine Unlearning via Null Space Calibration") and its two
ablations, all through the library's ``unlearn``:

* ``unsc``: calibrated pseudo-labels + null-space-confined fine-tuning on the forget data;
* ``unsc_random_labels``: random labels, still projected (is calibration needed?);
* ``unsc_no_projection``: calibrated labels, unconstrained fine-tuning (is projection needed?).
"""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.unlearn import unlearn

DEFAULTS = dict(threshold=0.99, epochs=5, lr=0.01, momentum=0.9, batch_size=32)


def _runner(calibrate: bool, project: bool):
    def run(model, scenario, settings, seed, progress):
        forget_classes = scenario.forget_classes if scenario.kind == "full_class" else None
        result = unlearn(model, scenario.forget, scenario.remain, forget_classes=forget_classes,
                         num_classes=scenario.num_classes, calibrate=calibrate, project=project, seed=seed,
                         progress=progress, **settings)
        return {"forget_labels": result.labels}
    return run


UNSC = UnlearningMethod("unsc", "UNSC", _runner(True, True), DEFAULTS,
                        summary="calibrated labels, updates confined to the remaining data's null space")
UNSC_RANDOM_LABELS = UnlearningMethod("unsc_random_labels", "UNSC: random labels + projection", _runner(False, True),
                                      DEFAULTS, summary="ablation: random labels instead of calibration")
UNSC_NO_PROJECTION = UnlearningMethod("unsc_no_projection", "UNSC: calibration, no projection", _runner(True, False),
                                      DEFAULTS, summary="ablation: calibrated labels, unconstrained updates")
