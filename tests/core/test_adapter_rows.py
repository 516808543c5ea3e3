"""``LayerAdapter.input_rows``: the rows a sketch consumes are exactly those whose covariance the
dense path accumulates (``sum rows^T rows == accumulate_``), for every adapter with dense or
grouped slots, with and without a sample selection."""
import pytest
import torch
from torch import nn

from unsc_fast.adapters import adapter_for

CASES = {
    "linear_3d": (lambda: nn.Linear(6, 3), lambda g: (torch.randn(4, 5, 6, generator=g),)),
    "conv1d_reflect": (lambda: nn.Conv1d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
                       lambda g: (torch.randn(4, 3, 11, generator=g),)),
    "conv2d_strided": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda g: (torch.randn(4, 3, 9, 7, generator=g),)),
    "conv2d_same_grouped": (lambda: nn.Conv2d(4, 6, (2, 3), padding="same", groups=2),
                            lambda g: (torch.randn(4, 4, 6, 5, generator=g),)),
    "conv2d_circular_depthwise": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="circular"),
                                  lambda g: (torch.randn(4, 3, 5, 5, generator=g),)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), lambda g: (torch.randn(4, 2, 3, 4, 3, generator=g),)),
    "mha_packed": (lambda: nn.MultiheadAttention(8, 2, batch_first=True).eval(),
                   lambda g: (lambda q: (q, q, q))(torch.randn(4, 5, 8, generator=g))),
    "mha_separate": (lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=5).eval(),
                     lambda g: (torch.randn(5, 4, 8, generator=g), torch.randn(3, 4, 6, generator=g),
                                torch.randn(3, 4, 5, generator=g))),
    "gru": (lambda: nn.GRU(6, 4), lambda g: (torch.randn(5, 4, 6, generator=g),)),
    "lstm_batch_first": (lambda: nn.LSTM(6, 4, batch_first=True, bidirectional=True),
                         lambda g: (torch.randn(4, 5, 6, generator=g),)),
}


@pytest.mark.parametrize("index", [None, torch.tensor([0, 2, 3])])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_give_the_dense_covariance(case, index):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    module = make().double()
    args = tuple(a.double() for a in inputs(torch.Generator().manual_seed(1)))
    adapter = adapter_for("layer", module)
    output = module(*args)
    dense = {s.name: s.zeros(torch.float64, "cpu") for s in adapter.slots()}
    counts = adapter.accumulate_(dense, args, {}, output, index)
    sketched = {s.name: s.zeros(torch.float64, "cpu") for s in adapter.slots()}
    rows_seen = {s.name: 0 for s in adapter.slots()}
    for name, group, rows in adapter.input_rows(args, {}, output, index):
        target = sketched[name] if group is None else sketched[name][group]
        target += rows.T @ rows
        if group in (None, 0):
            rows_seen[name] += rows.shape[0]
    for name, expected in dense.items():
        scale = expected.abs().max()
        assert (sketched[name] - expected).abs().max() <= 1e-12 * scale, name
        assert rows_seen[name] == counts[name], name


def test_conv_rows_come_in_chunks(monkeypatch):
    from unsc_fast.adapters import conv

    monkeypatch.setattr(conv, "PATCH_CHUNK", 500)  # a few samples' patches at a time
    module = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    chunks = list(adapter_for("c", module).input_rows((x,), {}, module(x), None))
    assert len(chunks) == 6 and all(rows.numel() <= 27 * 25 for _, _, rows in chunks)
    total = sum(rows.T @ rows for _, _, rows in chunks)
    dense = torch.zeros(27, 27, dtype=torch.float64)
    adapter_for("c", module).accumulate_({"c": dense}, (x,), {}, None, None)
    assert torch.allclose(total, dense, rtol=0, atol=1e-12 * dense.abs().max())


def test_embedding_has_no_rows_to_sketch():
    with pytest.raises(NotImplementedError, match="cannot feed a sketch"):
        next(adapter_for("e", nn.Embedding(5, 3)).input_rows((torch.tensor([1, 2]),), {}, None, None))
