"""Megatron's dataset index cache, checked before megatron reads it.

megatron-core caches the shuffle, sample and blend indices it builds as ``.npy`` files under
``path_to_cache`` (sci-scale's ``DATA_CACHE/index``) and reads them back with
``numpy.load(allow_pickle=True)``. The indices are integer arrays; an ``.npy`` file of object
dtype is a pickle, and loading it runs whatever it names. A cache directory can be shared
between users or copied from elsewhere, so every ``.npy`` in it is opened here first, header
only, with pickles refused: an object array (or a header numpy cannot read) is an error naming
the file, before megatron touches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from sci_scale.data.corpus import CorpusError


class IndexCacheError(CorpusError):
    """A file in megatron's index cache is not a plain numeric array."""


def check_index_cache(directory: str | Path | None) -> None:
    """Refuse an index cache holding anything but numeric arrays (see the module)."""
    if directory is None or not Path(directory).is_dir():
        return
    for path in sorted(Path(directory).glob("*.npy")):
        try:
            # Memory-mapped with pickles refused: numpy reads the header and stops at an
            # object dtype; a numeric array is only mapped, not read.
            numpy.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if "object" not in str(exc).lower():
                raise _unreadable(path, exc) from None
            raise IndexCacheError(
                f"{path}: an index cache file holding a pickle (object data), which megatron "
                "would unpickle; its indices are integer arrays, so it did not write this file: "
                "delete it (megatron rebuilds the index)"
            ) from None
        except (OSError, EOFError) as exc:
            raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> IndexCacheError:
    return IndexCacheError(
        f"{path}: not a readable index cache file ({exc}); delete it and megatron rebuilds it"
    )
