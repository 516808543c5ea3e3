"""The comparison runner end to end on tiny configurations, its settings parser and the
ImageFolder loader it reads user data with."""
import json
import re

import numpy as np
import pytest
import torch

from unsc_fast.evaluation import cli
from unsc_fast.evaluation.compare import CompareConfig, build_model, load_checkpoint, parse_settings, run_comparison
from unsc_fast.evaluation.image_folder import load_image_folder
from unsc_fast.evaluation.methods import METHODS
from unsc_fast.evaluation.divergence import DIVERGENCE_TITLES
from unsc_fast.evaluation.metrics import GAP_KEYS, METRIC_TITLES
from unsc_fast.evaluation.representation import REPRESENTATION_GAP_KEYS, REPRESENTATION_TITLES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = {"original": "original", "retrain": "**retrain (gold standard)** (reference)", "unsc": "UNSC",
        "finetune": "fine-tune"}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as ``unsc-fast compare`` uses on the digits: these tiny convolutions are
    fastest single-threaded, and two threads on a busy 2-core machine can be many times slower.
    The rest of the session gets its own thread count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """``unsc-fast compare`` with UNSC and fine-tune (+ retrain) over 2 seeds, a few epochs each (~13 s)."""
    threads = torch.get_num_threads()
    output = tmp_path_factory.mktemp("compare") / "out"
    code = cli.main(["compare", "--methods", "unsc,finetune", "--seeds", "0", "1", "--train-epochs", "4",
                     "--set", "unsc.epochs=2", "--set", "finetune.epochs=1", "--output", str(output), "--quiet"])
    torch.set_num_threads(threads)  # the CLI set one thread for the whole process
    assert code == 0
    return output, json.loads((output / "comparison.json").read_text())


@pytest.mark.slow  # shares one ~13 s end-to-end run on the digits
def test_compare_writes_every_output(digits_run, capsys):
    output, _ = digits_run
    for name in ("classwise.png", "tradeoff.png", "representation.png"):
        data = (output / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    assert (output / "comparison.md").read_text().startswith("## Unlearning comparison: full-class forgetting of class 3")
    state = torch.load(output / "original.pt", weights_only=True)
    assert set(state) == set(build_model("digits_cnn", _digits_shape()).state_dict())


def _digits_shape():
    from unsc_fast.evaluation.data import load_digits_split

    return load_digits_split()


@pytest.mark.slow  # shares one ~13 s end-to-end run on the digits
def test_compare_json_has_every_method_seed_and_metric(digits_run):
    _, results = digits_run
    assert list(results["runs"]) == ["retrain", "unsc", "finetune", "original"]
    assert results["config"]["seeds"] == [0, 1]
    assert results["config"]["settings"] == {"unsc": {"epochs": 2}, "finetune": {"epochs": 1}}
    assert results["scenario"]["forget_classes"] == [3]
    assert results["dataset"]["num_classes"] == 10 and results["dataset"]["image_shape"] == [1, 8, 8]
    assert results["environment"]["torch"] == torch.__version__
    for name, runs in results["runs"].items():
        assert [run["seed"] for run in runs] == [0, 1], name
        for run in runs:
            assert set(METRIC_TITLES) <= set(run["metrics"]), name
            assert all(isinstance(run["metrics"][key], float) for key in METRIC_TITLES), name
            assert len(run["metrics"]["per_class_test"]) == 10
            assert set(run["gap"]) == set(GAP_KEYS) | {"avg_gap"} | set(REPRESENTATION_GAP_KEYS) | {"representation_gap"}
            assert run["seconds"] > 0
        summary = results["summary"][name]
        # U-LiRA is off by default; finite_outputs' mean is the share of seeds whose outputs stayed finite
        assert set(summary["metrics"]) == (set(METRIC_TITLES) | set(DIVERGENCE_TITLES) | set(REPRESENTATION_TITLES)
                                           | {"finite_outputs"})
        assert summary["metrics"]["finite_outputs"]["mean"] == 1.0, name
        for key in METRIC_TITLES:
            values = [run["metrics"][key] for run in runs]
            assert summary["metrics"][key]["mean"] == pytest.approx(np.mean(values))
            assert summary["metrics"][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
    # the settings each run used, defaults filled in; retraining follows --train-epochs
    assert results["runs"]["unsc"][0]["settings"] == {**METHODS["unsc"].defaults, "epochs": 2}
    assert results["runs"]["retrain"][0]["settings"]["epochs"] == 4
    # retrain is the reference: no gap to itself; every other gap is measured against the same seed's retrain
    for run in results["runs"]["retrain"]:
        assert run["gap"]["avg_gap"] == 0.0
    for name in ("unsc", "finetune", "original"):
        for run, reference in zip(results["runs"][name], results["runs"]["retrain"]):
            assert run["gap"]["mia_svc"] == pytest.approx(abs(run["metrics"]["mia_svc"] - reference["metrics"]["mia_svc"]))
    # on the digits each seed trains its own original (the spread covers training too); the
    # seed-0 (base seed) one is the saved one; it knows class 3, the retrained one does not
    assert results["original"]["per_seed"] is True
    first, second = (run["metrics"] for run in results["runs"]["original"])
    assert first["per_class_test"] != second["per_class_test"]
    assert first["acc_remain_train"] == results["original"]["metrics"]["acc_remain_train"]
    assert results["original"]["metrics"]["acc_forget_test"] > 80
    assert results["summary"]["retrain"]["metrics"]["acc_forget_test"]["mean"] == 0.0
    assert len(results["runs"]["unsc"][0]["info"]["forget_labels"]) == results["scenario"]["forget_train"]
    # every model's outputs are compared with the same seed's retrained model: retrain itself is at distance 0
    assert results["distance_titles"] == DIVERGENCE_TITLES and results["membership"] is None
    for run in results["runs"]["retrain"]:
        assert run["metrics"]["tow"] == 1.0 and run["metrics"]["kl_forget"] == 0.0
    for run in results["runs"]["original"]:  # the original still knows class 3: far on the forget set
        assert run["metrics"]["tow"] < 0.2 and run["metrics"]["js_forget"] > 10 * run["metrics"]["js_remain"]


@pytest.mark.slow  # shares one ~13 s end-to-end run on the digits
def test_compare_markdown_has_mean_and_std_for_every_method(digits_run):
    output, _ = digits_run
    text = (output / "comparison.md").read_text()
    header = "| method | " + " | ".join(METRIC_TITLES.values()) + " | ToW | avg gap | time s |"
    assert header in text
    assert "Mean ± std over 2 seed(s) (0, 1)" in text
    table = text.split("\n\n")[2].splitlines()
    for name, label in ROWS.items():
        row = next(line for line in table if line.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        assert len(cells) == len(METRIC_TITLES) + 3, name
        assert re.fullmatch(r"[01]\.\d{3} ± \d\.\d{3}", cells[len(METRIC_TITLES)]), row  # ToW
        assert all(re.fullmatch(r"\d+\.\d ± \d+\.\d", cell) for cell in cells[:len(METRIC_TITLES)]), row
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cells[-1]), row
        if name == "retrain":
            assert cells[-2] == "0 (reference)"
        else:  # the average gap has two decimals
            assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", cells[-2]), row
    assert "### Gap to the retrained model" in text and "### Per-class test accuracy (%)" in text
    assert "### Distance to the retrained model" in text and "| JS forget |" in text
    assert "### Representation level: linear probe and relearning attack" in text
    assert "| method | probe Acc_f test | probe Acc_r test | relearn Acc_f test |" in text


@pytest.mark.slow  # shares one ~13 s end-to-end run on the digits
def test_a_saved_original_is_reused_with_checkpoint(digits_run, tmp_path):
    output, results = digits_run
    config = CompareConfig(methods=("unsc",), seeds=(0,), checkpoint=str(output / "original.pt"),
                           settings={"retrain": {"epochs": 1}, "unsc": {"epochs": 1}})
    again = run_comparison(config)
    assert again["original"]["source"] == str(output / "original.pt")
    for key in METRIC_TITLES:  # the very same model as the run that saved it
        assert again["original"]["metrics"][key] == pytest.approx(results["original"]["metrics"][key])
    assert again["runs"]["retrain"][0]["settings"]["epochs"] == 1

    whole = tmp_path / "whole.pt"  # a pickled module needs the opt-in (tests/evaluation/test_checkpoint.py)
    torch.save(load_checkpoint(str(output / "original.pt"), "digits_cnn", _digits_shape()), whole)
    assert isinstance(load_checkpoint(str(whole), "digits_cnn", _digits_shape(), trust_pickle=True), torch.nn.Module)


# --------------------------------------------------------------------------- settings


def test_one_original_is_shared_by_every_seed_when_asked():
    config = CompareConfig(methods=("finetune",), seeds=(0, 1), train_epochs=2, original_per_seed=False,
                           settings={"finetune": {"epochs": 1}, "retrain": {"epochs": 1}})
    results = run_comparison(config)
    first, second = (run["metrics"] for run in results["runs"]["original"])
    assert first["per_class_test"] == second["per_class_test"] and results["original"]["per_seed"] is False
    assert CompareConfig().original_per_seed is True and CompareConfig(dataset="cifar10").original_per_seed is False
    with pytest.raises(ValueError, match="checkpoint"):
        CompareConfig(checkpoint="x.pt", original_per_seed=True)


def test_parse_settings_reads_python_literals_and_method_aliases():
    settings = parse_settings(["natmu.epochs=3", "natmu.init_linear=True", "unsc.lr = 0.02",
                               "gradient-ascent.lr=1e-3", "salun.saliency_fraction=0.3"])
    assert settings == {"natmu": {"epochs": 3, "init_linear": True}, "unsc": {"lr": 0.02},
                        "gradient_ascent": {"lr": 1e-3}, "salun": {"saliency_fraction": 0.3}}
    assert isinstance(settings["natmu"]["epochs"], int)
    assert parse_settings([]) == {} and parse_settings(None) == {}


@pytest.mark.parametrize("assignment, error, message", [
    ("natmu.epochs", ValueError, "METHOD.SETTING=VALUE"),
    ("epochs=3", ValueError, "METHOD.SETTING=VALUE"),
    ("natmu.=3", ValueError, "METHOD.SETTING=VALUE"),
    ("forgetful.epochs=3", KeyError, "unknown method 'forgetful'"),
    ("natmu.epoch=3", KeyError, "natmu has no setting epoch"),
])
def test_parse_settings_errors(assignment, error, message):
    with pytest.raises(error, match=message):
        parse_settings([assignment])


def test_bad_settings_fail_before_any_training():
    config = CompareConfig(methods=("unsc",), seeds=(0,), settings={"unsc": {"bogus": 1}}, train_epochs=1000)
    with pytest.raises(KeyError, match="unsc has no setting bogus"):
        run_comparison(config)
    with pytest.raises(KeyError, match="unknown method"):
        run_comparison(CompareConfig(methods=("unsc", "forgetful"), train_epochs=1000))
    with pytest.raises(SystemExit):  # argparse: not one of the scenarios
        cli.main(["compare", "--scenario", "half-class"])


def test_cli_compare_rejects_a_bad_set_before_training(tmp_path):
    with pytest.raises(KeyError, match="natmu has no setting epoch"):
        cli.main(["compare", "--set", "natmu.epoch=3", "--train-epochs", "1000", "--output", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_list_methods(capsys):
    assert cli.main(["compare", "--list-methods"]) == 0
    printed = capsys.readouterr().out
    for name, method in METHODS.items():
        assert re.search(rf"^{name} +{re.escape(method.summary)}", printed, re.M), name
    assert "boundary" in printed and "[full-class]" in printed


def test_unknown_model_is_a_key_error():
    with pytest.raises(KeyError, match="unknown model 'vgg'"):
        build_model("vgg", _digits_shape())


# --------------------------------------------------------------------------- ImageFolder data


def write_pngs(root, classes=("cat", "dog", "emu"), per_class=6, size=10, mode="RGB", seed=0):
    """Tiny images whose class is obvious: a bright band in a class-specific row, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for sample in range(per_class):
            image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            image[3 * index:3 * index + 2, :, index % 3] = 250
            picture = Image.fromarray(image)
            (picture.convert("L") if mode == "L" else picture).save(root / name / f"{sample:03d}.png")
    return root


def test_image_folder_loader_reads_resizes_and_standardises(tmp_path):
    root = write_pngs(tmp_path / "colour")
    split = load_image_folder(root, seed=0)
    assert split.class_names == ("cat", "dog", "emu") and split.num_classes == 3 and split.name == "colour"
    assert split.image_shape == (3, 10, 10)
    assert len(split.y_train) + len(split.y_test) == 18
    assert torch.bincount(split.y_test, minlength=3).tolist() == [2, 2, 2]  # stratified: 30% of 6 per class
    assert torch.allclose(split.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(split.x_train.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)

    resized = load_image_folder(root, image_size=8, seed=0)
    assert resized.image_shape == (3, 8, 8)

    grey = load_image_folder(write_pngs(tmp_path / "grey", mode="L"), seed=0)
    assert grey.image_shape == (1, 10, 10)


def test_image_folder_loader_with_train_and_test_folders_and_npy(tmp_path):
    write_pngs(tmp_path / "split" / "train", classes=("a", "b"), per_class=4, mode="L")
    write_pngs(tmp_path / "split" / "test", classes=("a", "b"), per_class=2, mode="L", seed=1)
    split = load_image_folder(tmp_path / "split")
    assert (len(split.y_train), len(split.y_test)) == (8, 4)
    assert split.y_test.tolist() == [0, 0, 1, 1] and split.class_names == ("a", "b")

    for label, value in (("zero", 0.0), ("one", 1.0)):
        (tmp_path / "arrays" / label).mkdir(parents=True)
        for sample in range(3):
            np.save(tmp_path / "arrays" / label / f"{sample}.npy", np.full((5, 6), value + 0.1 * sample))
    arrays = load_image_folder(tmp_path / "arrays", test_fraction=0.34, seed=0)
    assert arrays.image_shape == (1, 5, 6) and arrays.class_names == ("one", "zero")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "empty")


def test_compare_on_an_image_folder_random_sample_forgetting(tmp_path):
    root = write_pngs(tmp_path / "pictures", per_class=10, size=8)
    output = tmp_path / "out"
    code = cli.main(["compare", "--data", str(root), "--scenario", "random-sample", "--forget-fraction", "0.2",
                     "--methods", "unsc,unsc_no_projection,boundary", "--seeds", "0", "--train-epochs", "3",
                     "--set", "unsc_no_projection.epochs=1",
                     "--output", str(output), "--quiet"])
    assert code == 0
    results = json.loads((output / "comparison.json").read_text())
    assert results["dataset"]["class_names"] == ["cat", "dog", "emu"]
    assert results["dataset"]["image_shape"] == [3, 8, 8]
    assert results["scenario"]["kind"] == "random_sample" and results["scenario"]["forget_train"] == 4
    # boundary unlearning is class-level only: reported as not run, with the reason, never run as something else
    assert list(results["runs"]) == ["retrain", "unsc_no_projection", "original"]
    assert "boundary cannot do random-sample forgetting" in results["skipped"]["boundary"]
    # projected UNSC would be a no-op on random samples: skipped with the reason, never run silently
    assert "span the same layer inputs" in results["skipped"]["unsc"]
    # no forget test set in random-sample forgetting: undefined, written as null / n/a, never as 0
    assert results["runs"]["unsc_no_projection"][0]["metrics"]["acc_forget_test"] is None
    assert results["summary"]["unsc_no_projection"]["metrics"]["acc_forget_test"]["mean"] is None
    assert results["runs"]["unsc_no_projection"][0]["gap"]["avg_gap"] is not None
    text = (output / "comparison.md").read_text()
    assert "| n/a |" in text and "### Not run" in text and "- boundary cannot do random-sample forgetting" in text
    assert "| method | cat | dog | emu |" in text
    for name in ("classwise.png", "tradeoff.png"):
        assert (output / name).read_bytes().startswith(PNG_SIGNATURE)
