"""observe() records only the thread that entered it (RELIABILITY 64, issue 10.3).

Module hooks are global: without a thread check, a forward run by another thread while the
block is open is recorded under the observing thread's labels, and its root hooks discard or
commit the observing thread's half-finished forward.
"""
import threading

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector

TIMEOUT = 30.0


class Gate(nn.Module):
    """Identity; when armed, the observing thread's forward stops here until the other thread
    has run its forwards, so they happen in the middle of the observed forward."""

    def __init__(self) -> None:
        super().__init__()
        self.observer: int | None = None
        self.reached = threading.Event()
        self.release = threading.Event()

    def forward(self, x):
        if threading.get_ident() == self.observer:
            self.reached.set()
            assert self.release.wait(TIMEOUT), "the other thread never finished"
        return x


def gated_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Gate(), nn.Tanh(), nn.Linear(6, 3))


def test_other_threads_forwards_are_not_recorded():
    model = gated_model()
    gate = model[1]
    torch.manual_seed(1)
    x_mine, y_mine = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 2])
    x_other = [torch.randn(5, 4) * 10 + 3 for _ in range(3)]  # same batch size: labels would "fit"
    outputs, errors = [], []
    between = threading.Event()  # the observed forward is done, the block still open
    other_done = threading.Event()

    def other_thread():
        try:
            assert gate.reached.wait(TIMEOUT)
            outputs.append(model(x_other[0]))  # inside the observer's forward
            gate.release.set()
            assert between.wait(TIMEOUT)
            outputs.extend(model(x) for x in x_other[1:])  # between the observer's forwards
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            gate.release.set()
        finally:
            other_done.set()

    projector = NullSpaceProjector(model)
    worker = threading.Thread(target=other_thread)
    gate.observer = threading.get_ident()
    worker.start()
    try:
        with projector.observe(labels=y_mine):
            model(x_mine)
            gate.observer = None
            between.set()
            assert other_done.wait(TIMEOUT)
    finally:
        gate.release.set()
        between.set()
        worker.join(TIMEOUT)
    assert not errors, errors
    assert len(outputs) == 3  # the other thread's forwards ran, and gave its own outputs
    torch.testing.assert_close(outputs[0], model(x_other[0]))

    alone = NullSpaceProjector(model)
    with alone.observe(labels=y_mine):
        model(x_mine)
    assert projector.groups == alone.groups == [0, 1, 2]
    for name in ("0", "3"):
        for key in alone.groups:
            assert torch.equal(projector.covariance(name, [key]), alone.covariance(name, [key]))
            assert projector.count(key, name) == alone.count(key, name)


def test_a_block_whose_forwards_all_ran_elsewhere_says_so():
    model = nn.Linear(3, 2)
    projector = NullSpaceProjector(model)
    with pytest.warns(UserWarning, match="ran in other threads"):
        with projector.observe():
            worker = threading.Thread(target=lambda: model(torch.randn(4, 3)))
            worker.start()
            worker.join(TIMEOUT)
    assert projector.groups == []
