"""Read ``.npy`` files that may hold pickled objects, without running code from them.

MultiID-2M stores a sample's boxes and embeddings as a pickled dict inside an ``.npy`` (an object
array of shape ()). ``np.load(allow_pickle=True)`` would unpickle it with the full ``pickle``
module: a crafted file's ``__reduce__`` runs any function it names. :func:`load_npy` reads plain
arrays as ``np.load(allow_pickle=False)`` does and unpickles object arrays with
:class:`RestrictedUnpickler`, which resolves only the globals numpy needs to rebuild arrays and
scalars (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``) and a few plain containers; every
other global (``os.system``, ``builtins.exec``, any class) raises :class:`UnsafePickleError`
before anything is called. Dicts, lists, tuples, strings, bytes and numbers need no global.

Example:
    >>> import io, numpy as np
    >>> buf = io.BytesIO(); np.save(buf, {"bboxes": np.zeros((1, 4))}, allow_pickle=True)
    >>> load_npy(buf.getvalue())["bboxes"].shape
    (1, 4)
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "load_npy"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list (nothing of it was executed)."""


def _latin1_encode(text, encoding="latin1"):
    # Protocol 2 pickles store bytes as _codecs.encode(str, "latin1"); no other codec is admitted.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files written by numpy 1 or 2
        allowed[module, "_reconstruct"] = multiarray._reconstruct
        allowed[module, "scalar"] = multiarray.scalar
    allowed["numpy", "ndarray"] = np.ndarray
    allowed["numpy", "dtype"] = np.dtype
    return allowed


_ALLOWED = {
    **_numpy_globals(),
    ("builtins", "complex"): complex,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that admits only numpy array/scalar reconstruction and plain containers.

    Every other global raises :class:`UnsafePickleError` naming it; persistent ids are refused too.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise UnsafePickleError(f"refused to load the global {module}.{name}: only numpy arrays and plain "
                                    "containers are read from data files") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id: only numpy arrays and plain containers are read from data files")


def _read_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    return np.lib.format._read_array_header(fp, version)  # (3, 0): utf8 field names; no public reader


def load_npy(source: bytes | str | os.PathLike, *, name: str | None = None):
    """An ``.npy`` file's content: a plain array, or for a pickled object array of shape () the
    object inside it (a dict in MultiID-2M), decoded by :class:`RestrictedUnpickler`.

    source: the file's bytes or its path. name: how errors name the file (default: the path).
    Raises :class:`UnsafePickleError` (naming the file and the refused global) for a pickle that
    needs anything else, ``ValueError`` for a file that is not ``.npy``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<npy bytes>"
    else:
        data, label = Path(source).read_bytes(), name or str(source)
    fp = io.BytesIO(data)
    try:
        shape, fortran, dtype = _read_header(fp)
    except Exception as exc:  # noqa: BLE001 -- any header problem: not an npy file
        raise ValueError(f"{label} is not an .npy file ({type(exc).__name__}: {exc})") from None
    if not dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    try:
        arr = RestrictedUnpickler(fp).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- truncated or malformed pickle
        raise ValueError(f"{label}: the pickled object array does not load ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{label}: the pickle holds a {type(arr).__name__}, not the array its header declares")
    return arr.item() if arr.ndim == 0 else arr
