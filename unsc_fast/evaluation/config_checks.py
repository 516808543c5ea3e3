"""Checks of a comparison's configuration that run before any training: every problem the run
would otherwise hit after hours (a missing input, an unwritable output, an empty seed list)."""
from __future__ import annotations

import os
from pathlib import Path

# ``config`` below is a ``compare.CompareConfig``, not imported here: compare imports this module.


class ConfigError(ValueError):
    """An argument that would make the run fail (or mean nothing) later, found before any training."""


def check_config(config: CompareConfig) -> None:
    """Raise ``ConfigError`` listing every problem the run would otherwise hit after the
    training: a missing input file, an output that cannot be written, an empty seed list.

    Only cheap checks on the file system and the values; settings are checked by
    ``method_settings`` and the classes by ``make_scenario``, both also before training.
    """
    problems = _value_problems(config) + _input_problems(config) + _output_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))


def _value_problems(config: CompareConfig) -> list[str]:
    """Values the API accepts but that would make an empty or meaningless run."""
    problems = []
    if not config.seeds:
        problems.append("no seeds: give at least one (--seeds 0 1 2)")
    if config.scenario == "full_class" and not config.forget_classes:
        problems.append("full-class forgetting needs at least one class (--forget-classes)")
    if config.scenario in ("random_sample", "memorised") and not 0 < config.forget_fraction < 1:
        problems.append(f"--forget-fraction must be in (0, 1), got {config.forget_fraction}")
    if config.scenario == "sub_class" and len(config.forget_classes) != 1:
        problems.append(f"sub-class forgetting forgets one fine label (--forget-classes D), got {list(config.forget_classes)}")
    if config.scenario == "sequential" and not config.then_forget:
        problems.append("sequential forgetting needs at least one further request (--then-forget C)")
    if config.scenario == "memorised" and (config.memorisation_shadows < 2 or config.memorisation_shadows % 2):
        problems.append(f"--memorisation-shadows must be an even number of at least 2, got {config.memorisation_shadows}")
    if config.scenario == "memorised" and config.memorisation_epochs is not None and config.memorisation_epochs < 1:
        problems.append(f"--memorisation-epochs must be at least 1, got {config.memorisation_epochs}")
    if config.checkpoint is None and config.train_epochs < 1:
        problems.append(f"--train-epochs must be at least 1 to train the original, got {config.train_epochs}")
    if config.image_size is not None and config.image_size < 1:
        problems.append(f"--image-size must be positive, got {config.image_size}")
    return problems


def _input_problems(config: CompareConfig) -> list[str]:
    """Input paths that do not exist: found now, not after the original's training."""
    problems = []
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        problems.append(f"checkpoint {config.checkpoint} is not a file")
    root = config.data_root if config.data_root is not None else config.data
    if root is not None and not Path(root).is_dir():
        problems.append(f"data directory {root} does not exist or is not a directory")
    return problems


def _output_problems(config: CompareConfig) -> list[str]:
    """The output directory (and the saved original's folder) must be creatable and writable."""
    folders = [config.output] + ([str(Path(config.save_original).parent)] if config.save_original else [])
    problems = []
    for folder in dict.fromkeys(folders):
        problem = _unwritable_folder(Path(folder))
        if problem:
            problems.append(problem)
    return problems


def _unwritable_folder(folder: Path) -> str | None:
    """Why ``folder`` could not be created or written into, or None if it can."""
    if folder.exists() and not folder.is_dir():
        return f"output {folder} exists and is not a directory"
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        return f"output {folder} cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output {folder} cannot be written: no write permission on {existing}"
    return None
