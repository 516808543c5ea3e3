"""UNSC (Chen et al. 2024, "Machine Unlearning via Null Space Calibration") and its two
ablations, all through the library's ``unlearn``:

* ``unsc``: calibrated pseudo-labels + null-space-confined fine-tuning on the forget data;
* ``unsc_random_labels``: random labels, still projected (is calibration needed?);
* ``unsc_no_projection``: calibrated labels, unconstrained fine-tuning (is projection needed?);
* ``unsc_official``: the official code's pipeline (``unlearn(preset="official")``: the basis
  grown class by class with rising thresholds, plain SGD, batch 512, 25 epochs, lr 0.04).

The projected variants do full-class requests only: for random samples of classes that stay,
the remaining samples span the same layer inputs, the projection removes almost all of the
forget gradient and the model would not change (measured: docs/fidelity.md). ``unlearn``
itself refuses such a request (``NoRoomError``) rather than return the model untouched.
"""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod
from unsc_fast.unlearn import PRESETS, unlearn

DEFAULTS = {k: v for k, v in PRESETS["default"].items() if k in ("threshold", "epochs", "lr", "momentum", "batch_size")}
OFFICIAL = {k: v for k, v in PRESETS["official"].items() if k in ("epochs", "lr", "momentum", "batch_size")}
SAMPLE_WISE = ("the remaining samples of the forgotten samples' classes span the same layer inputs, so the "
               "null-space projection removes almost all of the forget gradient and the model would not change; "
               "use unsc_no_projection or a sample-wise method")


def _runner(calibrate: bool, project: bool, preset: str = "default"):
    def run(model, scenario, settings, seed, progress):
        forget_classes = scenario.forget_classes if scenario.kind == "full_class" else None
        result = unlearn(model, scenario.forget, scenario.remain, forget_classes=forget_classes,
                         num_classes=scenario.num_classes, calibrate=calibrate, project=project, seed=seed, preset=preset,
                         progress=progress, **settings)
        return {"forget_labels": result.labels}
    return run


UNSC = UnlearningMethod("unsc", "UNSC", _runner(True, True), DEFAULTS, scenarios=("full_class",),
                        unsupported_reason=SAMPLE_WISE,
                        summary="calibrated labels, updates confined to the remaining data's null space")
UNSC_OFFICIAL = UnlearningMethod("unsc_official", "UNSC (official pipeline)", _runner(True, True, "official"), OFFICIAL,
                                 scenarios=("full_class",), unsupported_reason=SAMPLE_WISE,
                                 summary="the official code's choices: class-by-class basis, plain SGD, batch 512")
UNSC_RANDOM_LABELS = UnlearningMethod("unsc_random_labels", "UNSC: random labels + projection", _runner(False, True),
                                      DEFAULTS, scenarios=("full_class",), unsupported_reason=SAMPLE_WISE,
                                      summary="ablation: random labels instead of calibration")
UNSC_NO_PROJECTION = UnlearningMethod("unsc_no_projection", "UNSC: calibration, no projection", _runner(True, False),
                                      DEFAULTS, summary="ablation: calibrated labels, unconstrained updates")
