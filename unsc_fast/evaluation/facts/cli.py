"""``unsc-fast compare --dataset facts``: the language-model benchmark from the compare command."""
from __future__ import annotations

import sys
import time

from unsc_fast.evaluation.facts.methods import METHODS, method_settings


def parse_facts_settings(assignments) -> dict[str, dict]:
    """``--set npo.beta=0.2`` -> ``{"npo": {"beta": 0.2}}`` (literals parsed, unknown names refused)."""
    import ast

    settings: dict[str, dict] = {}
    for assignment in assignments or ():
        target, separator, text = assignment.partition("=")
        name, dot, key = target.partition(".")
        if not separator or not dot or not key:
            raise ValueError(f"--set expects METHOD.SETTING=VALUE, got {assignment!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        settings.setdefault(name.strip(), {})[key.strip()] = value
        method_settings(name.strip(), settings[name.strip()])
    return settings


def main(args) -> int:
    from unsc_fast.evaluation.facts.report import format_table, write_outputs
    from unsc_fast.evaluation.facts.runner import FactsConfig, quick_config, run_facts

    if args.list_methods:
        for method in METHODS.values():
            print(f"{method.name:14s} {method.title}; learning rates tried: {', '.join(map(str, method.lr_grid))}")
        return 0
    try:
        methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else tuple(METHODS)
        settings = parse_facts_settings(args.set)
        chosen = dict(seeds=tuple(args.seeds), methods=methods, output=args.output,
                      workers=args.workers if args.workers is not None else (1 if args.quick else 2))
        if args.quick:
            quick = quick_config()
            merged = {name: {**quick.settings.get(name, {}), **settings.get(name, {})} for name in METHODS}
            config = quick_config(**chosen, settings=merged)
        else:
            config = FactsConfig(**chosen, settings=settings)
    except (KeyError, ValueError) as error:
        print(f"unsc-fast compare: error: {error}", file=sys.stderr)
        return 2
    say = None if args.quiet else (lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    results = run_facts(config, say)
    print("\n" + format_table(results))
    paths = write_outputs(results, config.output)
    print("\nwritten: " + ", ".join(str(path) for path in paths.values()))
    return 0
