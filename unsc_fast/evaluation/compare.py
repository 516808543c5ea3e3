"""The comparison runner behind ``unsc-fast compare``: one original model, one deletion
request, every chosen unlearning method over several seeds, every metric for each.

The model retrained without the forget data is always run (it is the reference each
metric's gap is measured against, per seed). Results are a plain JSON-ready dict; the
``report`` module turns them into the markdown table, the plots and the JSON file.
"""
from __future__ import annotations

import ast
import platform
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from unsc_fast.evaluation.data import DatasetSplit, validation_part
from unsc_fast.evaluation.datasets import get_dataset, load_dataset
from unsc_fast.evaluation.methods import METHODS, UnsupportedScenario, get_method
from unsc_fast.evaluation.memorisation import scorer
from unsc_fast.evaluation.metrics import METRIC_TITLES, gap_to_reference, unlearning_metrics
from unsc_fast.evaluation.models import MODELS, create_model  # noqa: F401 (MODELS: kept for callers)
from unsc_fast.evaluation.representation import REPRESENTATION_TITLES, representation_gap, representation_metrics
from unsc_fast.evaluation.scenario import make_scenario
from unsc_fast.evaluation.summary import summarise
from unsc_fast.evaluation.recipes import train
from unsc_fast.training import Progress

from unsc_fast.evaluation.checkpoints import UntrustedCheckpointError, load_checkpoint  # noqa: E402
from unsc_fast.evaluation.config_checks import ConfigError, check_config  # noqa: E402

REFERENCE = "retrain"
EMBEDDED = ("digits", "mnist1d")  # generated or bundled: an original per seed costs seconds


@dataclass
class CompareConfig:
    """Everything a comparison run depends on (saved with its results)."""

    scenario: str = "full_class"
    forget_classes: tuple[int, ...] = (3,)  # sub_class: the fine label; sequential: the first request
    forget_fraction: float | None = None    # None: 0.1 (random_sample), 0.05 (memorised)
    then_forget: tuple[int, ...] = (5,)     # sequential: one further request per class, in order
    memorisation_shadows: int = 8           # memorised: shadow models of the memorisation estimate
    memorisation_epochs: int | None = None  # their epochs (None: twice train_epochs, as they see half the data)
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "digits"          # a name of datasets.DATASETS
    data_root: str | None = None     # the folder its files are read from (the paper's datasets, folder)
    data: str | None = None          # kept for old configs: an image folder, i.e. dataset="folder"
    image_size: int | None = None
    checkpoint: str | None = None    # the original model; None = train one
    model: str | None = None         # architecture to train or load into; None = the dataset's default
    trust_checkpoint: bool = False   # unpickle arbitrary objects from the checkpoint (runs its code)
    train_epochs: int = 30
    base_seed: int = 0               # data split, original model, random forget set
    settings: dict[str, dict] = field(default_factory=dict)  # method -> {setting: value}
    output: str = "compare_results"
    save_original: str | None = None  # where a freshly trained original's state_dict is saved
    # each seed trains its own original with that seed (None: yes on the embedded datasets, which
    # train in seconds, and never with a checkpoint); the official notebooks report mean +- std
    # over three originals, so a spread over the methods' seeds alone understates the variance
    original_per_seed: bool | None = None
    # share of every class held out of the training data (no model trains on it); unsc's stop rule
    # then guards with it instead of a slice of the remaining training data (docs/fidelity.md)
    validation_split: float = 0.0

    def __post_init__(self) -> None:
        """``data`` alone means the image folder (the old ``--data DIR``); ``model=None`` becomes
        the dataset's default, so the saved config names the model that really ran."""
        if self.data is not None:
            if self.dataset not in ("digits", "folder") or self.data_root not in (None, self.data):
                raise ValueError("data= is the image-folder path: use dataset/data_root for other datasets")
            self.dataset, self.data_root = "folder", self.data
        if self.model is None:
            self.model = get_dataset(self.dataset).default_model
        if self.original_per_seed is None:
            self.original_per_seed = self.checkpoint is None and self.dataset in EMBEDDED
        if self.forget_fraction is None:
            self.forget_fraction = 0.05 if self.scenario.replace("-", "_") == "memorised" else 0.1
        if self.original_per_seed and self.checkpoint is not None:
            raise ValueError("original_per_seed trains an original per seed: it cannot be used with a checkpoint")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split: a share of the training data in [0, 1), got {self.validation_split}")
        if self.validation_split and self.checkpoint is not None:
            raise ValueError("validation_split holds data out of the original's training, which a checkpoint "
                             "has already done (or not): it needs an original trained here")


def parse_settings(assignments) -> dict[str, dict]:
    """``["natmu.epochs=3", "unsc.lr=0.02"]`` -> ``{"natmu": {"epochs": 3}, "unsc": {"lr": 0.02}}``.

    Values are Python literals where they parse as one (numbers, True/False), else strings;
    an unknown method or setting is an error here, before any training starts.
    """
    settings: dict[str, dict] = {}
    for assignment in assignments or ():
        target, separator, text = assignment.partition("=")
        method_name, dot, key = target.partition(".")
        if not separator or not dot or not key:
            raise ValueError(f"--set expects METHOD.SETTING=VALUE, got {assignment!r}")
        method = get_method(method_name.strip())
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        settings.setdefault(method.name, {})[key.strip()] = value
        method.settings(settings[method.name])  # raises KeyError on an unknown setting
    return settings


def method_settings(config: CompareConfig, name: str) -> dict:
    """The user's settings for ``name``; retraining follows the original's epochs by default."""
    chosen = dict(config.settings.get(name, {}))
    if name == REFERENCE and "epochs" not in chosen and config.checkpoint is None:
        chosen["epochs"] = config.train_epochs
    return get_method(name).settings(chosen, config.scenario.replace("-", "_"))


def load_data(config: CompareConfig) -> DatasetSplit:
    """The dataset of ``config`` (see ``datasets.DATASETS``), split and standardised."""
    split = load_dataset(config.dataset, config.data_root, image_size=config.image_size, seed=config.base_seed)
    return validation_part(split, config.validation_split, config.base_seed) if config.validation_split else split


def build_model(name: str, split: DatasetSplit) -> nn.Module:
    """Model ``name`` for the split's sample shape (channels, image size or signal length) and classes."""
    return create_model(name, split.num_classes, split.image_shape)


def original_model(config: CompareConfig, split: DatasetSplit, progress: Progress | None, seed: int | None = None):
    """(model, seconds, source): the checkpoint if one is given, else a model trained on all data
    with ``seed`` (default ``base_seed``); only the ``base_seed`` one is saved."""
    start = time.perf_counter()
    if config.checkpoint:
        model = load_checkpoint(config.checkpoint, config.model, split, trust_pickle=config.trust_checkpoint)
        return model, time.perf_counter() - start, config.checkpoint
    seed = config.base_seed if seed is None else seed
    torch.manual_seed(seed)  # before building: the initial weights are part of the run
    model = build_model(config.model, split)
    train(model, split.x_train, split.y_train, epochs=config.train_epochs, seed=seed,
          progress=progress, label="original")
    seconds = time.perf_counter() - start
    if seed != config.base_seed:
        return model, seconds, f"{config.model} trained {config.train_epochs} epochs, seed {seed}"
    if config.save_original:
        Path(config.save_original).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), config.save_original)
    return model, seconds, f"{config.model} trained {config.train_epochs} epochs"


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def measure(model: nn.Module, scenario, seed: int) -> dict:
    """Every per-model figure: the output-level metrics, then the probe and the relearning attack."""
    return {**unlearning_metrics(model, scenario, seed=seed), **representation_metrics(model, scenario, seed=seed)}


def gaps(metrics: dict, reference: dict) -> dict:
    """The output-level gaps (``avg_gap``) and the representation-level ones (``representation_gap``)."""
    return {**gap_to_reference(metrics, reference), **representation_gap(metrics, reference)}


def run_comparison(config: CompareConfig, progress: Progress | None = None, membership=None) -> dict:
    """Run every method of ``config`` over its seeds; returns the raw results (JSON-ready).

    Every model (the original's row included) is also compared with the same seed's
    retrained model output by output (``divergence.distance_to_retrain``: KL, JS, ToW).
    ``membership`` (a ``membership.ShadowSettings``) turns on the per-example U-LiRA-style
    attack: its shadow models are trained once, then every model is scored on the forget set.
    """
    from unsc_fast.evaluation.divergence import DIVERGENCE_TITLES, distance_to_retrain
    from unsc_fast.evaluation.membership import MEMBERSHIP_TITLES, ULiRA

    say = progress or (lambda message: None)
    check_config(config)  # fail on a missing file or an unwritable output before any training
    names = [get_method(name).name for name in config.methods]
    names = [REFERENCE] + [name for name in names if name != REFERENCE]
    for name in names:  # fail on a bad setting before hours of training, not after
        method_settings(config, name)
    split = load_data(config)
    try:
        scenario = make_scenario(split, config.scenario, forget_classes=config.forget_classes,
                                 forget_fraction=config.forget_fraction, seed=config.base_seed, then_forget=config.then_forget,
                                 memorisation=scorer(config, split, lambda: build_model(config.model, split), progress))
    except ValueError as error:  # a class outside the data, a sub-class of a non-digit dataset: a usage error
        if config.scenario == "memorised":  # its shadow models train in there: not the user's input
            raise
        raise ConfigError(str(error)) from error
    split = scenario.split  # sub-class forgetting: the coarse labels the models are trained on
    say(f"{scenario.describe()}; methods: {', '.join(names)}; seeds: {', '.join(map(str, config.seeds))}")

    original, original_seconds, source = original_model(config, split, progress)
    original_metrics = measure(original, scenario, config.base_seed)
    say(f"original ({source}): " + _brief(original_metrics))
    base_original, base_metrics = (original, original_seconds, source), original_metrics
    attack = None
    if membership is not None:
        say(f"u-lira: training {membership.shadows} shadow models ({membership.epochs} epochs each)")
        attack = ULiRA.train_shadows(original, scenario, membership, progress)

    def against_reference(model, metrics, reference_model):
        """``metrics`` plus the distance to the retrained model and, if on, the U-LiRA figures."""
        extra = distance_to_retrain(model, reference_model, scenario)
        if attack is not None:
            extra.update(attack.evaluate(model, reference_model))
        return {**metrics, **extra}

    runs: dict[str, list[dict]] = {}
    skipped = {name: get_method(name).unsupported_message(scenario.kind)
               for name in names if not get_method(name).supports(scenario.kind)}
    for reason in skipped.values():
        say(f"not run: {reason}")
    active = [name for name in names if name not in skipped]
    for seed in config.seeds:
        references = reference_model = None
        if config.original_per_seed and seed != config.base_seed:
            original, original_seconds, source = original_model(config, split, progress, seed=seed)
            original_metrics = measure(original, scenario, seed)
            say(f"seed {seed}: original ({source}): " + _brief(original_metrics))
        elif config.original_per_seed:
            original, original_seconds, source = base_original
            original_metrics = base_metrics
        for name in active:
            say(f"seed {seed}: {name} ...")
            try:
                result = get_method(name)(original, scenario, method_settings(config, name), seed, progress)
            except UnsupportedScenario as error:  # found on the model: UNSC with no room for a sub-class
                skipped[name] = str(error)
                say(f"seed {seed}: {name} not run: {error}")
                continue
            metrics = measure(result.model, scenario, seed)
            if not metrics["finite_outputs"]:
                say(f"seed {seed}: {name} diverged (NaN/Inf outputs): its attacks are reported as n/a")
            if name == REFERENCE:
                references, reference_model = metrics, result.model
            metrics = against_reference(result.model, metrics, reference_model)
            runs.setdefault(name, []).append({
                "seed": seed,
                "seconds": result.seconds,
                "metrics": metrics,
                "gap": gaps(metrics, references),
                "settings": result.settings,
                "info": _jsonable(result.info),
            })
            say(f"seed {seed}: {name} done in {result.seconds:.1f} s: " + _brief(metrics))
        runs.setdefault("original", []).append({
            "seed": seed, "seconds": original_seconds,
            "metrics": against_reference(original, original_metrics, reference_model),
            "gap": gaps(original_metrics, references), "settings": {}, "info": {"source": source},
        })

    return {
        "config": _jsonable(asdict(config)),
        "scenario": {"kind": scenario.kind, "description": scenario.describe(),
                     "forget_classes": list(scenario.forget_classes),
                     "forget_train": int(scenario.forget_train_mask.sum()),
                     "forget_test": int(scenario.forget_test_mask.sum())},
        "dataset": {"name": split.name, "num_classes": split.num_classes, "train": len(split.y_train),
                    "test": len(split.y_test), "image_shape": list(split.image_shape),
                    "class_names": list(split.class_names or map(str, range(split.num_classes)))},
        "original": {"source": base_original[2], "seconds": base_original[1], "metrics": base_metrics,
                     "per_seed": bool(config.original_per_seed)},
        "runs": runs,
        "skipped": skipped,
        "summary": {name: summarise(method_runs) for name, method_runs in runs.items()},
        "titles": {name: ("original" if name == "original" else get_method(name).title) for name in runs},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 and AVX512 round differently
                        "python": sys.version.split()[0], "platform": platform.platform()},
        "metric_titles": METRIC_TITLES,
        "representation_titles": REPRESENTATION_TITLES,
        "distance_titles": DIVERGENCE_TITLES,
        "membership_titles": MEMBERSHIP_TITLES if attack is not None else {},
        "membership": _jsonable(asdict(membership)) if membership is not None else None,
    }


def _brief(metrics: dict) -> str:
    titles = {**METRIC_TITLES, **REPRESENTATION_TITLES}
    return ", ".join(f"{title} {metrics[key]:.1f}" for key, title in titles.items())


def timestamped_progress(message: str) -> None:
    """Progress lines on stderr with the wall-clock time, as the demo prints them."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dataset_choice(args) -> tuple[str, str | None]:
    """(dataset, data root) from ``--dataset``/``--data-root``; ``--data DIR`` (the older flag)
    means ``--dataset folder --data-root DIR``. No flag at all is the bundled digits."""
    data = getattr(args, "data", None)
    dataset, root = getattr(args, "dataset", None), getattr(args, "data_root", None)
    if data is not None:
        if dataset not in (None, "folder") or root not in (None, data):
            raise SystemExit("--data DIR is the image folder (= --dataset folder --data-root DIR); "
                             "use --dataset NAME --data-root DIR for the other datasets")
        return "folder", data
    dataset = dataset or "digits"
    if root is None and get_dataset(dataset).needs_root:
        raise SystemExit(f"--dataset {dataset} reads local files: give --data-root DIR (nothing is downloaded)")
    return dataset, root


def main(args) -> int:
    """``unsc-fast compare``: run, print the table, write table/plots/JSON under ``--output``."""
    from unsc_fast.evaluation.report import format_report, write_outputs

    if getattr(args, "dataset", None) == "facts":  # the language-model benchmark has its own runner
        from unsc_fast.evaluation.facts.cli import main as facts_main

        return facts_main(args)
    if args.list_methods:
        for method in METHODS.values():
            scenarios = ", ".join(s.replace("_", "-") for s in method.scenarios)  # sequential: any with full-class
            own = "".join(f"; {kind.replace('_', '-')}: {d}" for kind, d in method.scenario_defaults.items())
            print(f"{method.name:20s} {method.summary} [{scenarios}]\n{'':20s} defaults: {method.defaults}{own}")
        return 0
    dataset, data_root = dataset_choice(args)
    if args.threads is None and dataset in ("digits", "mnist1d"):  # tiny layers: fastest on one thread
        torch.set_num_threads(1)
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else tuple(METHODS)
    try:
        config = _config_from_arguments(args, dataset, data_root, methods)
    except ValueError as error:
        return _refuse(error)
    from unsc_fast.evaluation.membership import settings_from_arguments

    try:
        results = run_comparison(config, None if args.quiet else timestamped_progress, settings_from_arguments(args))
    except (ConfigError, UntrustedCheckpointError) as error:
        return _refuse(error)
    print("\n" + format_report(results))
    paths = write_outputs(results, config.output)
    print("\nwritten: " + ", ".join(str(path) for path in paths.values()))
    return 0


def _config_from_arguments(args, dataset: str, data_root, methods) -> CompareConfig:
    """``compare``'s command line as a ``CompareConfig`` (its checks raise ``ValueError``)."""
    return CompareConfig(
        scenario=args.scenario.replace("-", "_"),
        forget_classes=tuple(args.forget_classes),
        forget_fraction=args.forget_fraction,
        then_forget=tuple(args.then_forget), memorisation_shadows=args.memorisation_shadows,
        memorisation_epochs=args.memorisation_epochs,
        methods=methods,
        seeds=tuple(args.seeds),
        dataset=dataset,
        data_root=data_root,
        image_size=args.image_size,
        checkpoint=args.checkpoint,
        trust_checkpoint=args.trust_checkpoint,
        model=args.model,
        train_epochs=args.train_epochs,
        settings=parse_settings(args.set),
        output=args.output,
        save_original=None if args.checkpoint else str(Path(args.output) / "original.pt"),
        original_per_seed=False if getattr(args, "one_original", False) else None,
        validation_split=args.validation_split,
    )


def _refuse(error: Exception) -> int:
    """A usage error, printed the way argparse prints one (no traceback), and exit status 2."""
    print(f"unsc-fast compare: error: {error}", file=sys.stderr)
    return 2
