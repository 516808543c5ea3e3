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

Sub-class requests (a fine label inside a coarse class that stays) are allowed, with a
higher energy threshold by default (``SUB_CLASS``). Measured on digits (5 coarse classes,
digit 3 forgotten from "3/8", seeds 0 and 1, 30-epoch originals): the forgotten digit's layer
inputs have room outside the remaining data's subspace (selectivity 3.6-3.9 in the first
Linear layer, past ``unlearn``'s 1.5), and UNSC moves the 3s' accuracy from 100 % to 0-2 %
where the retrained model keeps 7-9 % (it puts most 3s in "2/5", as the calibration does: the
sample-wise rule, the most likely coarse class other than the sample's own; the own coarse
class cannot be a target, the original predicts it for every 3 and nothing would change).
At the full-class default threshold 0.97 the sibling digit pays: the 8s fall from 96-98 % to
73 % and 42 %, as what tells a 3 from an 8 lies in the low-energy directions the basis leaves
free; at 0.99 they stay at 98 % and 94 % with the 3s still at 1.8 %. The room check still
guards each run: with no room the run is reported as not run (``UnsupportedScenario``).
"""
from __future__ import annotations

from unsc_fast.evaluation.methods.base import UnlearningMethod, UnsupportedScenario
from unsc_fast import NullSpaceProjector
from unsc_fast.room import NoRoomError
from unsc_fast.unlearn import PRESETS, unlearn
from unsc_fast.unlearning.stopping import StopRule

DEFAULTS = {**{k: v for k, v in PRESETS["default"].items()
                if k in ("threshold", "epochs", "lr", "momentum", "batch_size", "features", "criterion", "adaptive",
                         "distill")},
            "stop": "rule", "tolerance": StopRule.tolerance,  # "rule": the stop rule (epochs is its budget); "epochs": exactly that many (ablations)
            "erasure_checks": StopRule.max_erasure_checks,  # the stop rule's cap on erasure checks once forgotten (None: none)
            "confidence": StopRule.confidence,  # a forget sample is still known while its label keeps this probability (None: argmax only)
            "stop_when_stalled": StopRule.stop_when_stalled,  # stop when forgetting stalls at the ladder's floor
            "strict_erasure": StopRule.strict_erasure,  # end the erasure at the first guard sample it costs
            # the stop rule's guard: "validation" takes the split's validation part where it has one
            # (data the original never trained on), "train" a slice of the remaining training data
            "guard": "validation",
            # the forget samples' targets: None = the method's own (the preset's calibration, soft by
            # default; random for unsc_random_labels), or an unlearn() rule such as "calibrate"
            "labels": None}
GUARDS = ("validation", "train")
# the settings that make the stop rule (a tolerance builds it): setting -> StopRule field
RULE_SETTINGS = {"tolerance": "tolerance", "erasure_checks": "max_erasure_checks", "confidence": "confidence",
                 "stop_when_stalled": "stop_when_stalled", "strict_erasure": "strict_erasure"}
STOPS = {"rule": "preset", "epochs": None}
OFFICIAL = {k: v for k, v in PRESETS["official"].items() if k in ("epochs", "lr", "momentum", "batch_size")}
SAMPLE_WISE = ("the remaining samples of the forgotten samples' classes span the same layer inputs, so the "
               "null-space projection removes almost all of the forget gradient and the model would not change; "
               "use unsc_no_projection or a sample-wise method")


PROJECTED = ("full_class", "sub_class")  # and sequential: a series of full-class requests
SUB_CLASS = {"sub_class": {"threshold": 0.99}}  # protect the sibling fine label (module docstring; the default start now)


def _runner(calibrate: bool, project: bool, preset: str = "default"):
    def run(model, scenario, settings, seed, progress):
        settings = dict(settings)
        if "stop" in settings:
            if settings["stop"] not in STOPS:
                raise ValueError(f"unsc: stop must be one of {sorted(STOPS)}, got {settings['stop']!r}")
            settings["stop"] = STOPS[settings["stop"]]
        rule = {field: settings.pop(name) for name, field in RULE_SETTINGS.items() if name in settings}
        guard = settings.pop("guard", "train")
        if guard not in GUARDS:
            raise ValueError(f"unsc: guard must be one of {GUARDS}, got {guard!r}")
        if guard == "validation" and scenario.guard is not None:
            settings["guard"] = scenario.guard
        if rule.get("tolerance") is not None and settings.get("stop", "preset") == "preset":
            settings["stop"] = StopRule(max_epochs=settings.get("epochs", 50), **rule)
        forget_classes = scenario.forget_classes if scenario.kind == "full_class" else None
        remain, projector = scenario.remain, None
        if project and scenario.carry is not None:  # a later request of a sequence: no pass over the data
            projector = NullSpaceProjector(model).load_state_dict(scenario.carry)
            remain = None
        try:
            result = unlearn(model, scenario.forget, remain, forget_classes=forget_classes, projector=projector,
                             num_classes=scenario.num_classes, calibrate=calibrate, project=project, seed=seed,
                             preset=preset, progress=progress, **settings)
        except NoRoomError as error:  # sub-class: the forgotten digit looks like its coarse class's other digit
            raise UnsupportedScenario(f"no room for this {scenario.kind.replace('_', '-')} request: {error}") from error
        info = {"forget_labels": result.labels}
        if scenario.step is not None and project:
            info["reused_statistics"] = projector is not None
            # the remaining data's per-label covariances serve the next request of a sequence: it
            # excludes its class from them (``build(exclude=...)``) instead of observing the data again
            info["carry"] = result.projector.state_dict()
        return info
    return run


UNSC = UnlearningMethod("unsc", "UNSC", _runner(True, True), DEFAULTS, scenarios=PROJECTED,
                        unsupported_reason=SAMPLE_WISE, scenario_defaults=SUB_CLASS,
                        summary="calibrated labels, updates confined to the remaining data's null space")
UNSC_OFFICIAL = UnlearningMethod("unsc_official", "UNSC (official pipeline)", _runner(True, True, "official"), OFFICIAL,
                                 scenarios=PROJECTED, unsupported_reason=SAMPLE_WISE,
                                 summary="the official code's choices: class-by-class basis, plain SGD, batch 512")
UNSC_RANDOM_LABELS = UnlearningMethod("unsc_random_labels", "UNSC: random labels + projection", _runner(False, True),
                                      DEFAULTS, scenarios=PROJECTED, unsupported_reason=SAMPLE_WISE,
                                      scenario_defaults=SUB_CLASS,
                                      summary="ablation: random labels instead of calibration")
UNSC_NO_PROJECTION = UnlearningMethod("unsc_no_projection", "UNSC: calibration, no projection", _runner(True, False),
                                      DEFAULTS, summary="ablation: calibrated labels, unconstrained updates")
