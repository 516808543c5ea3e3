"""Command line: ``unsc-fast demo`` and ``unsc-fast compare`` (also ``python -m unsc_fast ...``)."""
from __future__ import annotations

import argparse
import sys

# Plain names, so that building the parser imports neither torch nor the harness.
DATASET_NAMES = ("digits", "mnist1d", "cifar10", "cifar100", "svhn", "mnist", "fashionmnist", "folder")
TASK_NAMES = ("facts",)  # benchmarks with their own runner (facts: language models, unsc_fast.evaluation.facts)
MODEL_NAMES = ("digits_cnn", "digits_mlp", "allcnn", "vgg11", "alexnet", "resnet18", "mnist1d_cnn", "mnist1d_mlp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unsc-fast", description="Machine unlearning by null-space calibration")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="forget one digit class on the bundled digits data")
    demo.add_argument("--forget-class", type=int, default=3, help="digit to forget (default 3)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threshold", type=float, default=None,
                      help="UNSC's starting energy per layer, in (0, 1] (default: unlearn()'s preset, 0.99)")
    demo.add_argument("--epochs", type=int, default=5,
                      help="epochs of the naive baseline (UNSC stops by its stop rule)")
    demo.add_argument("--lr", type=float, default=0.01, help="learning rate of the naive baseline")
    demo.add_argument("--train-epochs", type=int, default=30, help="epochs for the original and retrained models")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: the digits' tiny convolutions run fastest, and do not "
                           "stall on a busy machine, single-threaded)")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")

    add_compare_parser(commands)
    return parser


def add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="compare unlearning methods (UNSC, NatMU, baselines) on one model and data",
        description="Run unlearning methods over several seeds on one deletion request and write a markdown "
                    "table, a class-wise plot, an Acc_r-vs-Acc_f plot and a JSON of every figure.",
    )
    compare.add_argument("--scenario", choices=("full-class", "random-sample", "sub-class", "memorised", "sequential"),
                         default="full-class",
                         help="the deletion request (docs/compare.md): full-class (default), random-sample, sub-class "
                              "(digit pairs as coarse classes, forget one digit), memorised (the most memorised samples), "
                              "sequential (--forget-classes, then each --then-forget class)")
    compare.add_argument("--forget-classes", type=int, nargs="+", default=[3], metavar="C",
                         help="class indices to forget in full-class forgetting, the first request of sequential "
                              "forgetting, the fine digit in sub-class forgetting (default 3)")
    compare.add_argument("--forget-fraction", type=float, default=None,
                         help="fraction of the training set forgotten in random-sample (default 0.1) and memorised "
                              "(default 0.05) forgetting")
    compare.add_argument("--then-forget", type=int, nargs="+", default=[5], metavar="C",
                         help="sequential forgetting: the classes forgotten after --forget-classes, one request each, "
                              "in order (default 5)")
    compare.add_argument("--memorisation-shadows", type=int, default=8, metavar="N",
                         help="memorised forgetting: shadow models of the memorisation estimate, an even number (default 8)")
    compare.add_argument("--memorisation-epochs", type=int, default=None, metavar="E",
                         help="epochs of each memorisation shadow model (default: twice --train-epochs, as they see "
                              "half the data)")
    compare.add_argument("--methods", default=None,
                         help="comma-separated methods (default: all; see --list-methods); retrain always runs")
    compare.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S")
    compare.add_argument("--dataset", default=None, choices=DATASET_NAMES + TASK_NAMES,
                         help="digits (bundled, default) and mnist1d (generated locally) need no files; cifar10, "
                              "cifar100, svhn, mnist, fashionmnist read their standard distribution files and folder "
                              "an ImageFolder layout, all from --data-root (nothing is downloaded); facts: the "
                              "language-model benchmark (fictitious persons' facts and a tiny GPT-2, generated and "
                              "trained locally; uses --seeds, --methods, --set, --output, --workers, --quick)")
    compare.add_argument("--data-root", default=None, metavar="DIR",
                         help="folder holding the dataset's files, e.g. the unpacked cifar-10-batches-bin/ or its parent")
    compare.add_argument("--data", default=None, metavar="DIR",
                         help="image folder, one sub-folder per class (ImageFolder layout, optional train/ test/): "
                              "the same as --dataset folder --data-root DIR")
    compare.add_argument("--image-size", type=int, default=None,
                         help="resize images to this square size (folder, and the file datasets: e.g. 32 for "
                              "FashionMNIST as the official code does)")
    compare.add_argument("--checkpoint", default=None, metavar="PATH",
                         help="original model: a state_dict for --model (bare or under 'state_dict'), loaded with "
                              "torch.load(weights_only=True); default: train one")
    compare.add_argument("--trust-checkpoint", action="store_true",
                         help="also accept a checkpoint that holds Python objects (e.g. a whole pickled nn.Module): "
                              "it is unpickled in full, which runs any code the file names. Only for files you "
                              "made or whose source you trust")
    compare.add_argument("--model", default=None, choices=MODEL_NAMES,
                         help="architecture to train or to load a state_dict into; default: the dataset's (digits: "
                              "digits_cnn, mnist1d: mnist1d_cnn, cifar10: allcnn, cifar100: resnet18, svhn: vgg11, "
                              "mnist/fashionmnist: alexnet, folder: digits_cnn)")
    compare.add_argument("--one-original", action="store_true",
                         help="train one original model (--base-seed) for every seed; by default each seed trains its "
                              "own original on the embedded datasets (digits, mnist1d), so the spread covers training")
    compare.add_argument("--validation-split", type=float, default=0.0, metavar="FRACTION",
                         help="hold this share of every class out of the training data (no model trains on it) and "
                              "let unsc's stop rule guard the remaining classes with it, rather than with a slice of "
                              "the training data the original fit (default 0; needs an original trained here)")
    compare.add_argument("--train-epochs", type=int, default=30,
                         help="epochs for the original model and (unless retrain.epochs is set) the retrained one")
    compare.add_argument("--set", action="append", default=[], metavar="METHOD.SETTING=VALUE",
                         help="override a method's setting, e.g. --set natmu.epochs=3 (repeatable)")
    compare.add_argument("--output", default="compare_results", metavar="DIR",
                         help="where comparison.md/.json, classwise.png, tradeoff.png and original.pt go")
    compare.add_argument("--list-methods", action="store_true", help="list the methods and their default settings")
    compare.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads (default: 1 on the bundled digits, whose tiny convolutions run "
                              "fastest single-threaded; torch's default otherwise)")
    compare.add_argument("--quiet", action="store_true", help="no progress lines")
    compare.add_argument("--quick", action="store_true",
                         help="facts: a tiny configuration that runs in seconds (a smoke test, not the benchmark)")
    compare.add_argument("--workers", type=int, default=None, metavar="N",
                         help="facts: worker processes, one torch thread each (default 2)")
    compare.add_argument("--ulira-shadows", type=int, default=None, metavar="N",
                         help="per-example membership attack (U-LiRA style) with N shadow models, an even number; "
                              "0: off. Default: 8 for random-sample forgetting on the embedded datasets (digits, "
                              "mnist1d; about a minute), off otherwise")
    compare.add_argument("--ulira-epochs", type=int, default=None, metavar="E",
                         help="epochs of each shadow model (default: twice --train-epochs, as they see half the data)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from unsc_fast.evaluation.demo import main as demo_main

        return demo_main(args)
    if args.command == "compare":
        from unsc_fast.evaluation.compare import main as compare_main

        return compare_main(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
