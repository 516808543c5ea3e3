"""build() keeps the null-space complement of a dense basis from the eigendecomposition that
found it (eigh's other eigenvectors) instead of a QR of the basis; a sketched basis still gets
its complement by QR (``ops.complement_basis``). A saved state carries the complement, so a
resumed projector projects bitwise as before; a state without one gets a QR on load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unsc_fast import NullSpaceProjector, ops
from unsc_fast.projector.persistence import seal_state


def high_rank_projector(seed: int = 0) -> NullSpaceProjector:
    """One Linear whose basis keeps most of its inputs (k > d / 2: the complement is cheaper)."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 3)
    projector = NullSpaceProjector(model, threshold=0.99)
    with torch.no_grad(), projector.observe():
        model(torch.relu(torch.randn(400, 64)))
    return projector


def count_qr(monkeypatch) -> list:
    calls = []
    qr = ops.complement_basis

    def counting(U):
        calls.append(U.shape)
        return qr(U)

    monkeypatch.setattr(ops, "complement_basis", counting)
    return calls


def test_build_installs_the_eigh_complement_without_qr(monkeypatch):
    projector = high_rank_projector()
    calls = count_qr(monkeypatch)
    projector.build()
    assert calls == []
    U, Q = projector.basis(""), projector._complements[""]
    d, k = U.shape
    assert 2 * k > d and Q.shape == (d, d - k) and Q.is_contiguous()
    identity = torch.eye(d - k, dtype=torch.float64)
    assert float((Q.double().mT @ Q.double() - identity).abs().max()) <= 1e-5
    assert float(torch.linalg.matrix_norm(U.double().mT @ Q.double(), ord=2)) <= 1e-5
    G = torch.randn(3, d)
    torch.testing.assert_close(projector.project_tensor_("", G.clone()), G - G @ U @ U.T, atol=1e-5, rtol=0)


def test_a_sketched_basis_gets_its_complement_by_qr(monkeypatch):
    projector = high_rank_projector()
    calls = count_qr(monkeypatch)
    projector.build(method="randomized", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and "" in projector._complements


def test_a_saved_state_keeps_the_complement_bitwise(monkeypatch):
    """Resuming must project exactly as before: the state carries eigh's complement, which a QR
    of the basis would not reproduce bitwise. A state without one (saved before complements
    were kept) still loads, with a QR."""
    projector = high_rank_projector().build()
    calls = count_qr(monkeypatch)
    state = projector.state_dict()
    restored = high_rank_projector(seed=1).load_state_dict(state)
    assert calls == [] and torch.equal(restored._complements[""], projector._complements[""])
    del state["complements"], state["checksum"]  # as saved before complements (and checksums)
    with pytest.warns(UserWarning, match="carries no checksum"):
        older = high_rank_projector(seed=1).load_state_dict(state)
    assert len(calls) == 1
    Q, P = older._complements[""].double(), projector._complements[""].double()
    torch.testing.assert_close(Q @ Q.T, P @ P.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("what, edit, message", [
    ("not orthogonal to the basis", lambda U, Q: torch.cat([U[:, :1], Q[:, 1:]], 1), "not orthogonal to the basis"),
    ("not orthonormal", lambda U, Q: 2 * Q, "not orthonormal"),
    ("wrong width", lambda U, Q: Q[:, 1:], r"must be torch.float32 of shape"),
    ("wrong dtype", lambda U, Q: Q.double(), r"must be torch.float32 of shape"),
    ("NaN", lambda U, Q: Q * float("nan"), "NaN or Inf"),
])
def test_a_broken_saved_complement_is_refused(what, edit, message):
    projector = high_rank_projector().build()
    state = projector.state_dict()
    state["complements"] = {"": edit(projector.basis(""), projector._complements[""])}
    seal_state(state)  # edited on purpose: the complement's own checks are under test
    target = high_rank_projector(seed=1)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert not target.built
