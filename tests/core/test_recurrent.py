"""nn.RNN / nn.LSTM / nn.GRU: every weight of every layer and direction (``proj_size`` too).

Reference: a step-by-step recurrence written out here (PyTorch's documented cell equations,
one sequence and one step at a time), which records the row each weight multiplies at every
step. The adapter's statistics must equal the sum of those rows' outer products, for stacked,
bidirectional, projected, batch-first or not, unbatched, given-``hx`` and packed inputs. End to
end: after AdamW steps through NullSpaceOptimizer, every hidden state of every layer on the
remaining sequences is unchanged.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from unsc_fast import NullSpaceOptimizer, NullSpaceProjector


def cell(m, layer, direction, x, h, c):
    """One step of layer ``layer``, direction suffix ``direction``: (h', c', rows by weight kind)."""
    w = lambda kind: getattr(m, f"{kind}_l{layer}{direction}")  # noqa: E731
    b = (lambda kind: getattr(m, f"{kind}_l{layer}{direction}")) if m.bias else (lambda kind: 0)
    rows = {"ih": x, "hh": h}
    if isinstance(m, nn.GRU):
        gi, gh = w("weight_ih") @ x + b("bias_ih"), w("weight_hh") @ h + b("bias_hh")
        (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3), gh.chunk(3)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * hn)
        return (1 - z) * n + z * h, None, rows
    if isinstance(m, nn.LSTM):
        gates = w("weight_ih") @ x + b("bias_ih") + w("weight_hh") @ h + b("bias_hh")
        i, f, g, o = gates.chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        inner = torch.sigmoid(o) * torch.tanh(c)
        if m.proj_size:
            rows["hr"] = inner
            return w("weight_hr") @ inner, c, rows
        return inner, c, rows
    act = torch.tanh if m.nonlinearity == "tanh" else torch.relu
    return act(w("weight_ih") @ x + b("bias_ih") + w("weight_hh") @ h + b("bias_hh")), None, rows


def reference(m, sequences, h0=None, c0=None):
    """``(rows, states)``: per parameter name the rows it multiplied; per (layer, direction)
    the hidden state after every step of every sequence. ``sequences``: list of (T_b, F)."""
    D = 2 if m.bidirectional else 1
    width = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    rows, states = {}, {}
    inputs = [s.detach() for s in sequences]
    with torch.no_grad():
        for layer in range(m.num_layers):
            outputs = [[None] * D for _ in inputs]
            for d, suffix in enumerate(["", "_reverse"][:D]):
                for b, seq in enumerate(inputs):
                    h = h0[layer * D + d, b] if h0 is not None else seq.new_zeros(width)
                    c = c0[layer * D + d, b] if c0 is not None else seq.new_zeros(m.hidden_size)
                    order = range(len(seq) - 1, -1, -1) if suffix else range(len(seq))
                    out = [None] * len(seq)
                    for t in order:
                        h, c, used = cell(m, layer, suffix, seq[t], h, c)
                        out[t] = h
                        for kind, row in used.items():
                            rows.setdefault(f"weight_{kind}_l{layer}{suffix}", []).append(row)
                    outputs[b][d] = torch.stack(out)
                    states[(layer, suffix, b)] = outputs[b][d]
            inputs = [torch.cat(parts, dim=-1) for parts in outputs]
    return {k: torch.stack(v) for k, v in rows.items()}, states


def expected_covariance(projector, rows, param_name):
    return rows[param_name].T @ rows[param_name]


def check_statistics(m, observe_input, sequences, h0=None, c0=None):
    m = m.double().eval()
    projector = NullSpaceProjector(m, dtype=torch.float64)
    with torch.no_grad(), projector.observe():
        m(*observe_input)
    rows, _ = reference(m, sequences, h0, c0)
    slots_seen = {}
    for use_list in projector.protection.uses.values():
        for use in use_list:
            name = use.name
            slot = projector.protection.slot(use.slot).name
            expected = expected_covariance(projector, rows, name)
            if slot in slots_seen:  # both directions' input weights share the layer's input rows
                torch.testing.assert_close(expected, slots_seen[slot], rtol=1e-10, atol=1e-12)
            slots_seen[slot] = expected
            torch.testing.assert_close(projector.store.matrix("all", slot), expected, rtol=1e-10, atol=1e-12, msg=name)
            assert projector.count("all", slot) == rows[name].shape[0], name
    assert projector.coverage().share("protected") == 1.0
    return projector


MODULES = {
    "rnn-relu": lambda: nn.RNN(5, 4, num_layers=2, nonlinearity="relu", bidirectional=True),
    "gru": lambda: nn.GRU(5, 4, num_layers=3, bidirectional=True),
    "lstm": lambda: nn.LSTM(5, 4, num_layers=2),
    "lstm-proj": lambda: nn.LSTM(5, 6, num_layers=2, proj_size=3, bidirectional=True),
    "lstm-nobias": lambda: nn.LSTM(5, 4, num_layers=2, bias=False, bidirectional=True),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", list(MODULES))
def test_statistics_of_every_weight(kind, batch_first):
    torch.manual_seed(0)
    m = MODULES[kind]()
    m.batch_first = batch_first
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # (B, T, F)
    given = x if batch_first else x.transpose(0, 1)
    check_statistics(m, (given,), list(x))


@pytest.mark.parametrize("kind", ["gru", "lstm-proj"])
def test_given_initial_state_and_unbatched_input(kind):
    torch.manual_seed(0)
    m = MODULES[kind]().double()
    D, L = 2, m.num_layers
    width = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    h0 = torch.randn(L * D, 2, width, dtype=torch.float64)
    c0 = torch.randn(L * D, 2, m.hidden_size, dtype=torch.float64)
    hx = (h0, c0) if isinstance(m, nn.LSTM) else h0
    check_statistics(m, (x.transpose(0, 1), hx), list(x), h0, c0 if isinstance(m, nn.LSTM) else None)
    one = (h0[:, 0], c0[:, 0]) if isinstance(m, nn.LSTM) else h0[:, 0]
    check_statistics(m, (x[0], one), [x[0]], h0[:, :1], c0[:, :1] if isinstance(m, nn.LSTM) else None)


@pytest.mark.parametrize("kind", ["gru", "lstm-proj", "rnn-relu"])
def test_packed_sequences_count_only_real_steps(kind):
    torch.manual_seed(0)
    m = MODULES[kind]().double()
    m.batch_first = True
    lengths = torch.tensor([2, 5, 3])
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    check_statistics(m, (packed,), [x[b, :n] for b, n in enumerate(lengths.tolist())])


def test_labels_select_sequences():
    """Per-label statistics: each label gets its own sequences' rows, packed or not."""
    torch.manual_seed(0)
    m = MODULES["lstm-proj"]().double().eval()
    m.batch_first = True
    lengths, labels = torch.tensor([2, 5, 3, 4]), torch.tensor([1, 0, 1, 0])
    x = torch.randn(4, 5, 5, dtype=torch.float64)
    projector = NullSpaceProjector(m, dtype=torch.float64)
    with torch.no_grad(), projector.observe(labels=labels):
        m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    for label in (0, 1):
        chosen = (labels == label).nonzero().flatten().tolist()
        rows, _ = reference(m, [x[b, :lengths[b]] for b in chosen])
        for name in ("weight_hh_l1_reverse", "weight_hr_l0", "weight_ih_l1"):
            slot = projector.protection.uses[getattr(m, name)][0].slot
            torch.testing.assert_close(projector.store.matrix(label, slot), rows[name].T @ rows[name],
                                       rtol=1e-10, atol=1e-12)


def test_dropout_between_layers_needs_eval_mode():
    m = nn.GRU(5, 4, num_layers=2, dropout=0.5).train()
    projector = NullSpaceProjector(m)
    with pytest.raises(ValueError, match=r"dropout=0\.5 between layers must be observed in eval mode"):
        with projector.observe():
            m(torch.randn(3, 2, 5))


class Classifier(nn.Module):
    def __init__(self, recurrent: nn.RNNBase, width: int) -> None:
        super().__init__()
        self.recurrent, self.head = recurrent, nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.recurrent(x)[0])


@pytest.mark.parametrize("kind", list(MODULES))
def test_hidden_states_on_remaining_sequences_do_not_move(kind):
    """AdamW through NullSpaceOptimizer on other sequences: every hidden state of every layer
    and direction on the remaining sequence stays put, while plain AdamW moves them."""
    torch.manual_seed(0)
    recurrent = MODULES[kind]()
    width = (recurrent.proj_size or recurrent.hidden_size) if isinstance(recurrent, nn.LSTM) else recurrent.hidden_size
    model = Classifier(recurrent, width * (2 if recurrent.bidirectional else 1)).double().eval()
    g = torch.Generator().manual_seed(1)
    remaining = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)  # 2 steps: a null space everywhere
    other = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    projector = NullSpaceProjector(model, threshold=1.0, dtype=torch.float64)
    assert projector.coverage().share("protected") == 1.0
    with torch.no_grad(), projector.observe():
        model(remaining)
    projector.build()
    _, before = reference(model.recurrent, [remaining[:, 0]])
    plain = copy.deepcopy(model)
    start = {p: p.detach().clone() for p in model.parameters()}
    optimizer = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), projector)
    reference_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for _ in range(3):
        for m, opt in ((model, optimizer), (plain, reference_optimizer)):
            opt.zero_grad()
            m(other).square().mean().backward()
            opt.step()
    moved = 0
    for param, uses in projector.protection.uses.items():
        change = param.detach() - start[param]
        moved += float(change.norm()) > 1e-8
        assert projector.residual(param, change) < 1e-9, uses[0].name
    assert moved == len(projector.protection.uses), "every weight should move somewhere"
    _, ours = reference(model.recurrent, [remaining[:, 0]])
    _, theirs = reference(plain.recurrent, [remaining[:, 0]])
    for key, state in before.items():
        mine, plain_change = float((ours[key] - state).norm()), float((theirs[key] - state).norm())
        assert mine < 1e-9 * plain_change, f"{key}: hidden states moved {mine:.2e} (plain AdamW {plain_change:.2e})"
