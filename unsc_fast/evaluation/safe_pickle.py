"""Read the pickles of the CIFAR "python version" without trusting them.

A pickle is a program: ``pickle.load`` calls whatever global the file names, so a doctored
``data_batch_1`` could run any code. The CIFAR batches only hold dicts, lists, bytes, numbers
and numpy arrays, so ``load_numpy_pickle`` uses an unpickler that resolves nothing but the few
globals numpy's own pickles name to rebuild arrays and dtypes; any other global (``os.system``,
``builtins.eval``, a class of some module, ...) is refused before it is called, with an error
naming the file and the global.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

_PROBE = np.empty(0, dtype=np.uint8)
_RECONSTRUCT = _PROBE.__reduce__()[0]      # numpy's array rebuild function (protocols 0-4)
_FROMBUFFER = _PROBE.__reduce_ex__(5)[0]   # its protocol-5 counterpart


def _latin1_encode(text, encoding="latin1"):
    """What ``_codecs.encode`` does in a protocol-2 pickle written by Python 3: turn the text
    that stands for a bytes object back into bytes. Only that codec is honoured."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode is only accepted with 'latin1' on text, got {encoding!r}")
    return text.encode("latin1")


# The exact (module, name) pairs numpy 1.x and 2.x pickles use, and what each resolves to.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside ``ALLOWED_GLOBALS``; nothing of it was called."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, numbers and numpy arrays; refuses every other global."""

    def __init__(self, file, source: str, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(
                f"{self.source}: refused to load the global {module}.{name}; only numpy arrays and plain "
                "containers are accepted in a dataset pickle (is this really a CIFAR python-version file?)"
            ) from None


def load_numpy_pickle(path) -> object:
    """Unpickle ``path`` with ``NumpyOnlyUnpickler``; Python 2 strings come back as bytes, as in
    the CIFAR files (their keys are ``b"data"``, ``b"labels"``, ...)."""
    path = Path(path)
    with path.open("rb") as handle:
        try:
            return NumpyOnlyUnpickler(handle, str(path), encoding="bytes").load()
        except RefusedGlobal:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            raise ValueError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from error
