"""Wrapper overhead: one ResNet-18 training step with AdamW vs NullSpaceOptimizer(AdamW).

Both steps run forward, backward and the optimizer step on the same batch in the same
process; the table prints the median step times and the overhead in percent of the plain
step (DESIGN.md target: <= 5% on an H100). The projector is built from the model's own
inputs at ``--threshold``; the ranks it keeps decide the projection cost.

    python benchmarks/bench_optimizer.py [--quick] [--batch N] [--device cuda]
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector
from unsc_fast.evaluation.models import ResNet18

try:
    from benchmarks.harness import environment, parse_args, time_ms
except ImportError:  # run as a script from benchmarks/
    from harness import environment, parse_args, time_ms


def training_step(model, optimizer, x, y):
    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    batch = 8 if args.quick else 128
    torch.manual_seed(0)
    model = ResNet18().to(args.device)
    x = torch.randn(batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    projector = NullSpaceProjector(model, threshold=0.97)
    model.eval()
    with torch.no_grad(), projector.observe():
        model(x)
    projector.build()
    model.train()

    wrapped_model = copy.deepcopy(model)
    wrapped_projector = NullSpaceProjector(wrapped_model).load_state_dict(projector.state_dict())
    plain = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), x, y)
    wrapped = training_step(
        wrapped_model,
        NullSpaceOptimizer(torch.optim.AdamW(wrapped_model.parameters(), lr=1e-3), wrapped_projector),
        x,
        y,
    )
    plain_ms = time_ms(plain, args.device, args.warmup, args.repeat)
    wrapped_ms = time_ms(wrapped, args.device, args.warmup, args.repeat)
    env = environment(args.device)
    kept = sum(projector.ranks().values())
    total = sum(layer.dim for layer in projector.layers.values())
    print(f"# optimizer wrapper overhead, ResNet-18, batch {batch} of 32x32; {env['device']}, "
          f"torch {env['torch']}, {env['date']}; kept {kept}/{total} basis columns")
    print("| step | ms |\n|---|---|")
    print(f"| AdamW | {plain_ms:.1f} |\n| NullSpaceOptimizer(AdamW) | {wrapped_ms:.1f} |")
    print(f"| overhead | {100 * (wrapped_ms - plain_ms) / plain_ms:.1f}% |")


if __name__ == "__main__":
    main()
