"""Where a training run keeps its deterministic preprocessing: one switch, ``cache: ram | disk | none``.

    ram    MONAI's ``CacheDataset``: every case preprocessed once and held in this process (the fastest; memory
           grows with the dataset: about 10 MB per CT after resampling, 20 GB at 2,000 series)
    disk   :class:`DiskCacheDataset`: every case preprocessed once into ``cache_dir`` and read back, memory-mapped,
           at each draw; the process holds only the file list, so its memory stays flat at any dataset size
    none   MONAI's ``Dataset``: every draw loads and resamples its volume again

The disk cache is built for a shared filesystem read by several processes and nodes:

- an entry is a folder of ``.npy`` arrays and a ``meta.json`` that says how to rebuild the item; nothing is ever
  unpickled (``allow_pickle=False``), so reading a cache someone else wrote cannot run code;
- an entry is written into a hidden temporary folder and renamed into place (atomic on POSIX filesystems, NFS
  included), so a reader, another rank or a run resumed after a kill sees a whole entry or none; an entry whose
  files do not have the sizes ``meta.json`` records is computed again;
- the entry's name is a hash of the item (its paths, with each file's size and modification time) and of the
  deterministic transforms' settings (:func:`transform_fingerprint`): a changed spacing, window or ROI, or a
  re-written image, never reads stale data;
- ranks that compute the same entry at once each write their own temporary folder; the first rename wins.

MONAI's ``PersistentDataset`` is the base (the split at the first random transform is its own), but its entries
are pickles (``torch.load``) moved from the local temporary folder, which is neither pickle-free nor atomic across
filesystems.
"""

from __future__ import annotations

import enum
import hashlib
import json
import mmap
import os
import shutil
import socket
import threading
import time
import types
import uuid
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Randomizable, RandomizableTrait, Transform

from ..transforms.indices import PackedIndices

__all__ = ["CACHE_MODES", "cached_dataset", "DiskCacheDataset", "transform_fingerprint", "item_fingerprint"]

CACHE_MODES = ("ram", "disk", "none")
_NOT_SETTINGS = (np.random.RandomState, torch.Generator, type(threading.Lock()), type(threading.RLock()))
FORMAT = 2  # of an entry's meta.json; a change makes new entry names
MMAP_BYTES = 1 << 20  # arrays from 1 MiB up are memory-mapped: a crop reads its pages only (as fast as RAM from a
# 250 x 250 x 150 volume up; reading it whole first is 1.5 times slower there, 5 times at 400 x 400 x 250)
INLINE_BYTES = 1 << 12  # arrays up to 4 KiB (crop coordinates, class vectors) sit in meta.json: one file less to open
STALE_TMP_S = 6 * 3600  # temporary folders older than this are left-overs of killed runs


def cached_dataset(
    data: Sequence,
    transform: Callable,
    cache: str = "ram",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int | None = 1,
    copy_cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """The bundles' ``train#dataset`` and ``validate#dataset``: the dataset ``cache`` names.

    Args:
        data: the datalist items.
        transform: deterministic preprocessing, then the random augmentation (split at the first random transform).
        cache: "ram" (CacheDataset), "disk" (DiskCacheDataset in ``cache_dir``) or "none" (Dataset).
        cache_dir: the disk cache's folder (shared by runs, ranks and nodes; entries are keyed by their settings).
        cache_rate: the share of items cached in RAM (``ram`` only).
        num_workers: threads that fill the cache.
        copy_cache: CacheDataset's deep copy of each cached item per draw (``ram`` only).
        progress: a progress bar while caching.

    Raises:
        ValueError: an unknown ``cache``, or ``disk`` without ``cache_dir``.
    """
    if cache == "ram":
        return CacheDataset(
            data, transform, cache_rate=cache_rate, num_workers=num_workers, copy_cache=copy_cache, progress=progress
        )
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache: disk needs a cache_dir (a folder every rank and node can reach).")
        return DiskCacheDataset(data, transform, cache_dir, num_workers=num_workers, progress=progress)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")


# ------------------------------------------------------------------------------------------ keys
def _canonical(obj: Any, seen: set[int]) -> Any:
    """A JSON-able, process-independent description of a transform's settings (no object addresses)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, (np.dtype, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, np.generic):
        return _canonical(obj.item(), seen)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if arr.size <= 64:
            return {"array": _canonical(arr.tolist(), seen), "dtype": str(arr.dtype)}
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(), "shape": arr.shape}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, seen) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(json.dumps(_canonical(v, seen), sort_keys=True) for v in obj)
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        code = getattr(obj, "__code__", None)  # a lambda is named "<lambda>": its code tells two apart
        body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16] if code else ""
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}{':' + body if body else ''}"
    if id(obj) in seen:
        return "<cycle>"
    seen.add(id(obj))
    state = getattr(obj, "__dict__", None)
    if state is None:
        return type(obj).__qualname__
    state = {k: v for k, v in state.items() if not isinstance(v, _NOT_SETTINGS)}
    return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": _canonical(state, seen)}


def _deterministic_part(transform: Callable) -> list:
    """The transforms a cache holds the output of: those before the first random one (PersistentDataset's rule)."""
    flat = transform.flatten().transforms if hasattr(transform, "flatten") else [transform]
    part = []
    for t in flat:
        if isinstance(t, (RandomizableTrait, Randomizable)) or not isinstance(t, Transform):
            break
        part.append(t)
    return part


def transform_fingerprint(transform: Callable) -> str:
    """A hash of the deterministic transforms' types and settings (spacing, window, ROI, dtypes, ...), the same in
    every process that builds them from the same config, and of the library versions that compute them."""
    import monai

    from .. import __version__

    described = [_canonical(t, set()) for t in _deterministic_part(transform)]
    text = json.dumps(
        {"format": FORMAT, "monai": monai.__version__, "ours": __version__, "transforms": described}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _file_identity(value: Any) -> Any:
    """(size, mtime_ns) of each existing file or folder a datalist value names: a re-written image is a new item."""
    if isinstance(value, str) and os.path.exists(value):
        st = os.stat(value)
        return [value, st.st_size, st.st_mtime_ns]
    if isinstance(value, (list, tuple)):
        return [_file_identity(v) for v in value]
    return value


def item_fingerprint(item: Any, transform_hash: str) -> str:
    """The entry name of a datalist item under the transforms of ``transform_hash``."""
    described = (
        _file_identity(item) if not isinstance(item, Mapping) else {str(k): _file_identity(v) for k, v in item.items()}
    )
    text = json.dumps({"item": _canonical(described, set()), "transforms": transform_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# ------------------------------------------------------------------------------------------ entries
class CacheFormatError(ValueError):
    """A preprocessed value the disk cache cannot store without pickling."""


def _encode(key: str, stem: str, value: Any, folder: Path, files: dict[str, int]) -> dict:
    """Write the item's ``value`` under ``key`` as .npy files named after ``stem`` in ``folder``; returns its
    description for meta.json."""

    def save(array: np.ndarray, suffix: str = "") -> dict:
        """The array as a .npy file (readable by anyone with numpy), and where its data starts (read without
        parsing the header again)."""
        array, file = np.ascontiguousarray(array), f"{stem}{suffix}.npy"
        np.save(folder / file, array, allow_pickle=False)
        files[file] = (folder / file).stat().st_size
        return {
            "file": file,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
            "offset": files[file] - array.nbytes,
        }

    def stored(array: np.ndarray) -> dict:
        if array.nbytes <= INLINE_BYTES and array.dtype.kind in "biuf":
            return {"inline": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
        return save(array)

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().as_subclass(torch.Tensor)
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as int16
            return {"kind": "tensor", "bfloat16": True, **save(tensor.view(torch.int16).numpy())}
        return {"kind": "tensor", **stored(tensor.numpy())}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise CacheFormatError(f"'{key}' is an array of Python objects")
        return {"kind": "array", **stored(value)}
    if isinstance(value, PackedIndices):
        return {
            "kind": "packed_indices",
            "bits": save(value.bits, ".bits"),
            "ends": save(value.ends, ".ends"),
            "size": value.size,
        }
    if isinstance(value, np.generic):
        value = value.item()
    try:
        json.dumps(value)
    except TypeError:
        raise CacheFormatError(f"'{key}' is a {type(value).__name__}") from None
    return {"kind": "json", "value": value}


def _numeric(dtype: str) -> np.dtype:
    """A dtype from meta.json, refused unless plain numbers (never objects: nothing there can unpickle)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError(f"not a numeric dtype: {dtype}")
    return dtype


def _load(folder: Path, spec: dict) -> np.ndarray:
    """An array of the entry: from 1 MiB up memory-mapped copy-on-write (writable, the file untouched), else read."""
    dtype, shape = _numeric(spec["dtype"]), [int(n) for n in spec["shape"]]
    count, offset = int(np.prod(shape)), int(spec["offset"])
    with open(folder / spec["file"], "rb") as f:
        if offset + count * dtype.itemsize != os.fstat(f.fileno()).st_size:
            raise ValueError(f"{spec['file']}: not the array meta.json describes")
        if count * dtype.itemsize < MMAP_BYTES:
            return np.fromfile(f, dtype, count, offset=offset).reshape(shape)
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(mapped, dtype, count, offset).reshape(shape)


def _decode(spec: dict, folder: Path) -> Any:
    def array(spec: dict) -> np.ndarray:
        if "inline" in spec:
            return np.asarray(spec["inline"], dtype=_numeric(spec["dtype"])).reshape(spec["shape"])
        return _load(folder, spec)

    kind = spec["kind"]
    if kind == "tensor":
        tensor = torch.from_numpy(array(spec))
        return tensor.view(torch.bfloat16) if spec.get("bfloat16") else tensor
    if kind == "array":
        return array(spec)
    if kind == "packed_indices":
        packed = PackedIndices.__new__(PackedIndices)
        packed.bits, packed.ends, packed.size = array(spec["bits"]), array(spec["ends"]), int(spec["size"])
        return packed
    if kind == "json":
        return spec["value"]
    raise ValueError(f"unknown cached value kind {kind!r}")


def write_entry(item: Any, folder: Path) -> bool:
    """Write a preprocessed item (a dict of tensors, arrays, crop-centre masks and JSON values, or one tensor) as the
    entry ``folder``: into a temporary folder beside it, then renamed into place. Another process that renamed its
    own first wins; this copy is dropped (returns False)."""
    tmp = folder.parent / f".tmp-{folder.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files: dict[str, int] = {}
        if isinstance(item, Mapping):
            values = {str(k): _encode(str(k), f"v{i}", v, tmp, files) for i, (k, v) in enumerate(item.items())}
            meta = {"format": FORMAT, "mapping": True, "values": values, "files": files}
        else:
            meta = {
                "format": FORMAT,
                "mapping": False,
                "values": {"": _encode("the item", "v0", item, tmp, files)},
                "files": files,
            }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, folder)
        except OSError:  # the entry exists: another rank or worker wrote it first
            if not (folder / "meta.json").is_file():
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete_meta(folder: Path) -> dict | None:
    """The entry's meta.json when the entry is whole (every file there, of the size it records), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or any((folder / f).stat().st_size != n for f, n in meta["files"].items()):
            return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return meta


def read_entry(folder: Path) -> Any | None:
    """The item of an entry, or None when it is absent or incomplete (a file missing or of another size)."""
    meta = _complete_meta(folder)
    if meta is None:
        return None
    try:
        values = {k: _decode(spec, folder) for k, spec in meta["values"].items()}
    except (OSError, ValueError, KeyError):
        return None
    return values if meta["mapping"] else values[""]


class DiskCacheDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` with entries that are never unpickled and are written atomically in place,
    filled at construction by ``num_workers`` threads (as ``CacheDataset`` fills its RAM cache); see the module
    docstring.

    Args:
        data: the datalist items.
        transform: the preprocessing (deterministic, then random; split at the first random transform).
        cache_dir: the cache folder; created if missing. Several datasets, runs, ranks and nodes may share it.
        num_workers: threads filling the cache (None or < 1: one).
        progress: a progress bar while filling.
        fill: fill the cache now (False: each item on its first draw).

    Example::

        dataset = DiskCacheDataset(datalist, Compose([LoadImaged("image"), ..., RandSpatialCropd(...)]),
                                   "/shared/cache", num_workers=8)
    """

    def __init__(
        self,
        data: Sequence,
        transform: Callable,
        cache_dir: str | os.PathLike,
        num_workers: int | None = 1,
        progress: bool = True,
        fill: bool = True,
    ) -> None:
        super().__init__(data, transform, cache_dir)
        self.transform_hash = transform_fingerprint(self.transform)
        self.num_workers = max(1, int(num_workers or 1))
        self.progress = progress
        if fill:
            self.fill()

    def entry(self, index: int) -> Path:
        """The entry folder of item ``index``: ``<cache_dir>/<2 hex>/<name>``."""
        name = item_fingerprint(self.data[index], self.transform_hash)
        return self.cache_dir / name[:2] / name

    def _cachecheck(self, item_transformed: Any) -> Any:
        name = item_fingerprint(item_transformed, self.transform_hash)
        folder = self.cache_dir / name[:2] / name
        cached = read_entry(folder)
        if cached is not None:
            return cached
        computed = self._pre_transform(deepcopy(item_transformed))
        if _complete_meta(folder) is not None:  # another process wrote it meanwhile
            return computed
        if folder.is_dir():  # a damaged entry: moved aside (a reader may hold its files), then replaced
            aside = folder.parent / f".tmp-damaged-{folder.name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                pass
        try:
            write_entry(computed, folder)
        except CacheFormatError as e:
            raise CacheFormatError(
                f"cache: disk stores tensors, arrays, crop-centre masks and JSON values; the preprocessed item of "
                f"{item_transformed!r} has {e}: use cache: ram for this pipeline."
            ) from None
        return computed

    def fill(self) -> None:
        """Compute every missing entry (``num_workers`` threads), after clearing temporary folders that killed runs
        left behind."""
        self._clear_stale()
        missing = [i for i in range(len(self.data)) if _complete_meta(self.entry(i)) is None]
        if not missing:
            return

        def compute(i: int) -> None:
            self._cachecheck(self.data[i])

        with ThreadPool(self.num_workers) as pool:
            jobs = pool.imap_unordered(compute, missing)
            if self.progress:
                try:
                    from tqdm import tqdm

                    jobs = tqdm(jobs, total=len(missing), desc="Caching dataset on disk")
                except ImportError:
                    pass
            for _ in jobs:
                pass

    def _clear_stale(self) -> None:
        now = time.time()
        for tmp in self.cache_dir.glob("*/.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass
