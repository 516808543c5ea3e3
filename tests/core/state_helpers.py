"""A comparison the core tests share (one copy instead of one per file)."""
import torch


def assert_bitwise_equal(a, b, where="state"):
    """Nested dicts/lists/tuples of tensors and plain values, equal bit for bit (tensors: same
    dtype, shape and values); ``where`` names the first place that differs."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, where
