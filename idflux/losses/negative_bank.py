"""Device-side negative bank for the contrastive loss: an identity gallery plus an optional FIFO.

The bank holds rows ``(K, D)`` of face embeddings with one int64 identity id per row, on the device
the loss runs on, and draws per-face negatives as an index tensor ``neg_index (N, m)`` that
:func:`idflux.kernels.cosine_infonce` gathers inside the kernel, so no ``(N, m, D)`` tensor is built
(the released data loader builds one per batch: 4033 x 512 per face).

Rows are two blocks in one storage tensor: the gallery (fixed, ``num_gallery`` rows, built from a
MultiID-2M reference gallery or from arrays) followed by an optional FIFO ring of
``queue_capacity`` rows holding the last embeddings pushed (MoCo-style queue). A bank with no
gallery rows is a pure queue (:meth:`NegativeBank.fifo`). ``embeddings`` / ``ids`` are views of the
filled rows (gallery, then the filled queue slots in slot order).

It is an ``nn.Module`` whose tensors are non-persistent buffers: ``.to(device)`` of a module that
holds it (the loss) moves it, and the gallery (hundreds of MB) stays out of model checkpoints;
persist it with :meth:`NegativeBank.save` / :meth:`NegativeBank.load` (safetensors).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

FORMAT = "idflux.negative_bank/1"
_INT = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _sorted_blocks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by identity: (perm, unique ids, count per id, start of each id's block in perm)."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    uid, count = torch.unique_consecutive(sorted_ids, return_counts=True)
    return perm, uid, count, torch.cumsum(count, 0) - count


def _own_block(own: torch.Tensor, uid: torch.Tensor, count: torch.Tensor, start: torch.Tensor):
    """For each id in ``own``: (rows it owns, start of its block), 0 and 0 where it owns none."""
    if uid.numel() == 0:
        zero = torch.zeros_like(own)
        return zero, zero
    at = torch.searchsorted(uid, own).clamp_max(uid.numel() - 1)
    hit = uid[at] == own
    return torch.where(hit, count[at], 0), torch.where(hit, start[at], 0)


def _names_table(names, ids: torch.Tensor) -> dict[int, str]:
    """``names`` (sequence: names[id], or mapping id -> name) as a dict covering every id in ``ids``."""
    if names is None:
        return {}
    if isinstance(names, Mapping):
        table = {int(k): str(v) for k, v in names.items()}
    elif isinstance(names, Sequence) and not isinstance(names, (str, bytes)):
        table = {i: str(v) for i, v in enumerate(names)}
    else:
        raise ValueError(f"NegativeBank: names must be a sequence (names[id]) or a mapping id -> name, got {type(names).__name__}")
    dup = sorted(v for v, n in Counter(table.values()).items() if n > 1)
    if dup:
        raise ValueError(f"NegativeBank: names must be unique (one name per identity id), repeated: {dup[:5]}")
    missing = sorted(set(ids.unique().tolist()) - set(table))
    if missing:
        raise ValueError(f"NegativeBank: names has no entry for ids {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "give a name to every identity id in the bank, or pass names=None")
    return table


class NegativeBank(nn.Module):
    """Identity gallery (and optional FIFO queue) of negative embeddings, sampled on the device.

    Build with :meth:`from_arrays`, :meth:`from_gallery`, :meth:`fifo` or :meth:`load`.

    Attributes:
        embeddings: (K, D) filled rows (gallery then queue), the dtype given at construction.
        ids: (K,) int64 identity id of each filled row.
        names: dict id -> name (the gallery's identity table; empty when built without names).
        num_gallery: number of fixed gallery rows; queue_capacity: FIFO slots after them (0: none).

    Example:
        >>> bank = NegativeBank.from_arrays(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
        >>> bank.sample(torch.tensor([0, 2]), 5, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 5])
    """

    def __init__(self, embeddings: torch.Tensor, ids: torch.Tensor, names: dict[int, str] | None = None,
                 *, queue_capacity: int = 0):
        """Low-level: ``embeddings`` (K, D) float and ``ids`` (K,) int64 on one device, already valid.

        Prefer the ``from_*`` constructors, which check their input.
        """
        super().__init__()
        K, D = embeddings.shape
        self.num_gallery = K
        self.queue_capacity = int(queue_capacity)
        self.names = dict(names or {})
        self._name_to_id = {v: k for k, v in self.names.items()}
        self._queue_next = 0  # slot the next push writes
        self._queue_filled = 0
        rows = embeddings.new_zeros(K + self.queue_capacity, D)
        rows[:K] = embeddings
        row_ids = torch.full((K + self.queue_capacity,), -1, dtype=torch.int64, device=embeddings.device)
        row_ids[:K] = ids
        perm, uid, count, start = _sorted_blocks(ids.to(torch.int64))
        # The tail of _perm is rewritten by every sample() with the queue's own sort (it changes per push).
        perm = torch.cat([perm, perm.new_zeros(self.queue_capacity)])
        for name, t in (("_rows", rows), ("_row_ids", row_ids), ("_perm", perm),
                        ("_gallery_uid", uid), ("_gallery_count", count), ("_gallery_start", start)):
            self.register_buffer(name, t, persistent=False)

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_arrays(cls, embeddings, ids, names=None, *, device=None, dtype=None, queue_capacity: int = 0) -> "NegativeBank":
        """Bank from in-memory arrays.

        embeddings: (K, D) float tensor or numpy array, finite, K >= 1. ids: (K,) integer identity
        per row. names: None, a sequence (names[id] is the name of identity id) or a mapping id ->
        name covering every id. device / dtype: where and how to store (default: as given).
        queue_capacity: FIFO slots after the gallery (default 0).
        The input is copied and detached.
        """
        embeddings = torch.as_tensor(embeddings)
        ids = torch.as_tensor(ids)
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise ValueError(f"NegativeBank.from_arrays: embeddings must be (K, D) with K, D >= 1, got shape {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise ValueError(f"NegativeBank.from_arrays: embeddings must be floating point, got {embeddings.dtype}; cast with .float()")
        if ids.dtype not in _INT or ids.shape != embeddings.shape[:1]:
            raise ValueError(f"NegativeBank.from_arrays: ids must be an integer tensor of shape ({embeddings.shape[0]},), "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        if not bool(torch.isfinite(embeddings).all()):
            bad = int((~torch.isfinite(embeddings)).any(1).nonzero()[0])
            raise ValueError(f"NegativeBank.from_arrays: embeddings row {bad} has NaN or inf values; drop or fix that row")
        _check_capacity(queue_capacity)
        ids = ids.to(torch.int64)
        table = _names_table(names, ids)
        device = embeddings.device if device is None else torch.device(device)
        dtype = embeddings.dtype if dtype is None else dtype
        return cls(embeddings.detach().to(device, dtype).clone(), ids.to(device), table, queue_capacity=queue_capacity)

    @classmethod
    def from_gallery(cls, folder, *, max_per_identity: int | None = 200, seed: int = 0, device=None,
                     dtype: torch.dtype = torch.float32, queue_capacity: int = 0) -> "NegativeBank":
        """Bank from a MultiID-2M reference gallery folder: ``folder/<name>/<id>.npy``.

        Each identity is a subfolder; its ``*.npy`` files (one per reference image, one face each)
        hold either a plain array of shape (D,) or (1, D), or a pickled dict with ``"embeddings"``
        (or ``"embedding"``) of shape (D,) or (n, D), of which row 0 is used (the shard format of
        spec section 3; the released gallery code reads row 0 too). Other files (jpg, json, the
        ``<name>.npy`` cluster centres beside the subfolders) are ignored, as are subfolders with
        no npy. Identity ids are 0..I-1 in sorted name order; ``names[id]`` is the folder name.

        max_per_identity: keep at most this many embeddings per identity, a random subset drawn
        with ``seed`` (default 200, the released cap; None keeps all). device / dtype: storage
        (default CPU, float32). Dict files are read by :func:`idflux.safe_npy.load_npy`, which admits
        numpy arrays and plain containers only: a file pickling anything else is refused, naming it.
        Building from millions of files is slow: do it once and :meth:`save` the result.
        """
        import numpy as np  # lazy: the GPU test machine has torch and triton only

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"NegativeBank.from_gallery: gallery folder {str(folder)!r} does not exist or is not a directory")
        if max_per_identity is not None and (isinstance(max_per_identity, bool) or not isinstance(max_per_identity, int) or max_per_identity < 1):
            raise ValueError(f"NegativeBank.from_gallery: max_per_identity must be an int >= 1 or None, got {max_per_identity!r}")
        _check_capacity(queue_capacity)
        rng = np.random.default_rng(seed)
        names, rows, row_ids = [], [], []
        for person in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(f for f in person.iterdir() if f.suffix == ".npy" and f.is_file())
            if not files:
                continue
            if max_per_identity is not None and len(files) > max_per_identity:
                files = [files[i] for i in sorted(rng.choice(len(files), max_per_identity, replace=False))]
            for f in files:
                emb = _read_embedding(f, np)
                if rows and emb.shape != rows[0].shape:
                    raise ValueError(f"NegativeBank.from_gallery: {f} holds a {emb.shape[0]}-d embedding but earlier files are "
                                     f"{rows[0].shape[0]}-d; every gallery embedding must come from the same model")
                rows.append(emb)
                row_ids.append(len(names))
            names.append(person.name)
        if not rows:
            raise ValueError(f"NegativeBank.from_gallery: no <name>/*.npy embeddings under {str(folder)!r}; "
                             "expected the MultiID-2M layout ref/<name>/<id>.npy")
        embeddings = torch.from_numpy(np.stack(rows))
        ids = torch.tensor(row_ids, dtype=torch.int64)
        device = torch.device("cpu") if device is None else torch.device(device)
        return cls(embeddings.to(device, dtype), ids.to(device), dict(enumerate(names)), queue_capacity=queue_capacity)

    @classmethod
    def fifo(cls, capacity: int, dim: int, *, device=None, dtype: torch.dtype = torch.float32) -> "NegativeBank":
        """An empty FIFO queue of ``capacity`` (D = ``dim``) rows and no gallery: fill it with :meth:`push`."""
        _check_capacity(capacity, minimum=1)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"NegativeBank.fifo: dim must be an int >= 1, got {dim!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        return cls(torch.zeros(0, dim, device=device, dtype=dtype), torch.zeros(0, dtype=torch.int64, device=device),
                   queue_capacity=capacity)

    # ----------------------------------------------------------------------------- views

    @property
    def embeddings(self) -> torch.Tensor:
        """(K, D) view of the filled rows: gallery, then the filled queue slots in slot order."""
        return self._rows[: self.num_gallery + self._queue_filled]

    @property
    def ids(self) -> torch.Tensor:
        """(K,) int64 view of the filled rows' identity ids."""
        return self._row_ids[: self.num_gallery + self._queue_filled]

    @property
    def dim(self) -> int:
        return self._rows.shape[1]

    @property
    def device(self) -> torch.device:
        return self._rows.device

    @property
    def queue_next(self) -> int:
        """Queue slot the next push writes (the oldest entry's slot once the queue is full)."""
        return self._queue_next

    def __len__(self) -> int:
        return self.num_gallery + self._queue_filled

    def id_of(self, name: str) -> int:
        """Identity id of a gallery name (KeyError naming it when absent)."""
        try:
            return self._name_to_id[name]
        except KeyError:
            raise KeyError(f"NegativeBank: no identity named {name!r} in the bank's names table ({len(self.names)} names)") from None

    def extra_repr(self) -> str:
        return (f"gallery={self.num_gallery}, queue={self._queue_filled}/{self.queue_capacity}, dim={self.dim}, "
                f"identities={len(self.names)}, dtype={self._rows.dtype}")

    # ----------------------------------------------------------------------------- queue

    @torch.no_grad()
    def push(self, emb: torch.Tensor, ids: torch.Tensor) -> None:
        """Append (B, D) embeddings with their (B,) integer ids to the FIFO, overwriting the oldest.

        Detached and cast to the bank's device and dtype. With B > queue_capacity only the last
        queue_capacity rows are kept. Slot order: entry i of all pushes lands in slot i % capacity.
        """
        C = self.queue_capacity
        if C == 0:
            raise ValueError("NegativeBank.push: this bank has no queue; build it with queue_capacity > 0 or NegativeBank.fifo")
        if emb.ndim != 2 or emb.shape[1] != self.dim or not emb.is_floating_point():
            raise ValueError(f"NegativeBank.push: emb must be a float (B, {self.dim}) tensor, got {emb.dtype} {tuple(emb.shape)}")
        if ids.dtype not in _INT or ids.shape != emb.shape[:1]:
            raise ValueError(f"NegativeBank.push: ids must be an integer tensor of shape ({emb.shape[0]},), got {ids.dtype} {tuple(ids.shape)}")
        B = emb.shape[0]
        keep = min(B, C)
        slots = (self._queue_next + (B - keep) + torch.arange(keep, device=self.device)) % C + self.num_gallery
        self._rows.index_copy_(0, slots, emb[B - keep:].detach().to(self.device, self._rows.dtype))
        self._row_ids.index_copy_(0, slots, ids[B - keep:].to(self.device, torch.int64))
        self._queue_next = (self._queue_next + B) % C
        self._queue_filled = min(C, self._queue_filled + B)

    def queue_state(self) -> dict:
        """The FIFO's contents and position (for training checkpoints; the gallery is saved apart)."""
        K = self.num_gallery
        return {"rows": self._rows[K:].detach().cpu().clone(), "ids": self._row_ids[K:].cpu().clone(),
                "next": self._queue_next, "filled": self._queue_filled}

    @torch.no_grad()
    def load_queue_state(self, state: dict) -> None:
        """Restore what :meth:`queue_state` returned (same capacity and dim)."""
        K = self.num_gallery
        if state["rows"].shape != self._rows[K:].shape:
            raise ValueError(f"NegativeBank.load_queue_state: queue of shape {tuple(state['rows'].shape)} does not fit "
                             f"this bank's {tuple(self._rows[K:].shape)}")
        self._rows[K:] = state["rows"].to(self.device, self._rows.dtype)
        self._row_ids[K:] = state["ids"].to(self.device)
        self._queue_next, self._queue_filled = int(state["next"]), int(state["filled"])

    # ----------------------------------------------------------------------------- sampling

    def sample(self, ids: torch.Tensor, m: int, *, generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
        """Draw ``m`` negatives per face, never of the face's own identity: neg_index (N, m) int64.

        ids: (N,) integer identity of each face (any device; an id absent from the bank makes every
        row a candidate). m >= 0. generator: a ``torch.Generator`` on the bank's device (default:
        that device's global RNG); the same generator state gives the same draws.

        Draws are independent and uniform over the filled rows whose id differs from the face's
        (with replacement, so m may exceed the candidates): row ``r`` of the face's complement,
        r ~ U{0..K - own - 1}, is mapped past the face's own block in the id-sorted order, which is
        exact and needs no Python loop over faces and no rejection. Note: uniform over rows, not
        identities (the released loader picks an identity first, then one of its embeddings).
        Raises ValueError when a face's identity owns every filled row (one host sync per call).
        With ``check=False`` there is no sync: such a face's draws are rows of its own identity,
        which :func:`~idflux.kernels.cosine_infonce` excludes when given ``neg_ids`` (``ContrastiveLoss``
        does), so its only negatives are the in-batch ones.
        """
        if ids.ndim != 1 or ids.dtype not in _INT:
            raise ValueError(f"NegativeBank.sample: ids must be a 1-D integer tensor (one identity per face), got {ids.dtype} {tuple(ids.shape)}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"NegativeBank.sample: m must be an int >= 0 (negatives per face), got {m!r}")
        if generator is not None and not _same_device(generator.device, self.device):
            raise ValueError(f"NegativeBank.sample: generator is on {generator.device} but the bank is on {self.device}; "
                             f"use torch.Generator(device={str(self.device)!r})")
        own = ids.to(self.device, torch.int64)
        G, Q = self.num_gallery, self._queue_filled
        own_g, start_g = _own_block(own, self._gallery_uid, self._gallery_count, self._gallery_start)
        if Q:
            perm_q, uid_q, count_q, start_q = _sorted_blocks(self._row_ids[G:G + Q])
            self._perm[G:G + Q] = perm_q + G
            own_q, start_q = _own_block(own, uid_q, count_q, start_q)
        else:
            own_q = start_q = torch.zeros_like(own)
        free_g, free_q = G - own_g, Q - own_q
        free = free_g + free_q
        if check and own.numel() and m and bool((free == 0).any()):
            bad = own[free == 0][0].item()
            raise ValueError(f"NegativeBank.sample: identity {bad}{self._name_suffix(bad)} owns every one of the bank's {G + Q} "
                             "rows, so it has no negative to draw; add other identities to the bank")
        u = torch.rand((own.numel(), m), generator=generator, device=self.device, dtype=torch.float64)
        r = torch.minimum((u * free[:, None]).long(), (free - 1).clamp_min(0)[:, None])
        # r < free_g: the gallery's complement; else the queue's. Skip the own block in id order.
        rq = r - free_g[:, None]
        at_g = r + torch.where(r >= start_g[:, None], own_g[:, None], 0)
        at_q = G + rq + torch.where(rq >= start_q[:, None], own_q[:, None], 0)
        pick = torch.where(rq < 0, at_g, at_q)
        if not check:  # a face with no negative (never raised above): point at one of its own rows
            if G + Q == 0:  # an empty bank: index 0 is out of range, which cosine_infonce excludes
                return torch.zeros((own.numel(), m), dtype=torch.int64, device=self.device)
            own_row = torch.where(own_g > 0, start_g, G + start_q)
            pick = torch.where((free == 0)[:, None], own_row[:, None], pick)
        return self._perm[pick]

    def _name_suffix(self, i: int) -> str:
        return f" ({self.names[i]!r})" if i in self.names else ""

    # ----------------------------------------------------------------------------- persistence

    def save(self, path) -> None:
        """Write the filled rows, ids, names and queue state to ``path`` (safetensors), atomically.

        The file is written beside ``path`` and moved over it with ``os.replace``, so a crash never
        leaves a half-written bank. Names go in the metadata as JSON.
        """
        from safetensors.torch import save_file  # lazy: not needed to sample

        path = Path(path)
        meta = {
            "format": FORMAT,
            "names": json.dumps(sorted(self.names.items())),
            "num_gallery": str(self.num_gallery),
            "queue_capacity": str(self.queue_capacity),
            "queue_next": str(self._queue_next),
        }
        tensors = {"embeddings": self.embeddings.detach().contiguous().cpu(), "ids": self.ids.contiguous().cpu()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, *, device=None, dtype: torch.dtype | None = None) -> "NegativeBank":
        """Read a bank written by :meth:`save` (default: CPU, stored dtype)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"NegativeBank.load: no file {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"NegativeBank.load: {str(path)!r} is not a readable safetensors file ({e})") from e
        if meta.get("format") != FORMAT or set(tensors) != {"embeddings", "ids"}:
            raise ValueError(f"NegativeBank.load: {str(path)!r} is not a NegativeBank file (format {meta.get('format')!r}, "
                             f"tensors {sorted(tensors)}); write it with NegativeBank.save")
        emb, ids = tensors["embeddings"], tensors["ids"]
        G, C = int(meta["num_gallery"]), int(meta["queue_capacity"])
        names = {int(k): v for k, v in json.loads(meta["names"])}
        device = torch.device("cpu") if device is None else torch.device(device)
        emb = emb.to(device, dtype or emb.dtype)
        ids = ids.to(device)
        bank = cls(emb[:G], ids[:G], names, queue_capacity=C)
        filled = emb.shape[0] - G
        if filled:
            slots = torch.arange(filled, device=device) + G
            bank._rows.index_copy_(0, slots, emb[G:])
            bank._row_ids.index_copy_(0, slots, ids[G:])
            bank._queue_filled = filled
            bank._queue_next = int(meta["queue_next"])
        return bank


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where "cuda" (a generator's device) means the current CUDA device."""
    def full(d):
        return torch.device(d.type, torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
    return full(a) == full(b)


def _check_capacity(capacity, minimum: int = 0) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < minimum:
        raise ValueError(f"NegativeBank: queue_capacity must be an int >= {minimum}, got {capacity!r}")


def _read_embedding(f: Path, np):
    """One reference embedding (D,) float32 from ``f``: a (D,)/(1, D) array or a pickled dict."""
    from idflux.safe_npy import UnsafePickleError, load_npy

    try:
        arr = load_npy(f)  # pickled dicts through a restricted unpickler: nothing in the file runs
    except UnsafePickleError as e:
        raise ValueError(f"NegativeBank.from_gallery: refused {f}: {e}") from None
    except Exception as e:
        raise ValueError(f"NegativeBank.from_gallery: cannot read {f} as .npy ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray):
        obj = arr
        key = next((k for k in ("embeddings", "embedding") if isinstance(obj, Mapping) and k in obj), None)
        if key is None:
            found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"NegativeBank.from_gallery: {f} is a pickled object without an 'embeddings' entry (found {found})")
        arr = np.asarray(obj[key])
        if arr.ndim == 2 and arr.shape[0] >= 1:
            arr = arr[0]  # (n, D) per detected face; a gallery image holds one face
    elif arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.shape[0] < 1 or arr.dtype.kind not in "fiu":
        raise ValueError(f"NegativeBank.from_gallery: {f} must hold one embedding of shape (D,) or (1, D), "
                         f"got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"NegativeBank.from_gallery: {f} has NaN or inf values")
    return arr
