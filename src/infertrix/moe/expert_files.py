"""The expert store's files: one safetensors file per MoE layer, written one expert at a time with
our own small writer, the data of every expert on an ``ALIGN``-byte boundary (the header padded with
spaces, as the format allows) so reads can bypass the page cache; see :mod:`.store`."""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.transform import ConfigError, UnsupportedModelError

MANIFEST = "manifest.json"
FORMAT = "infertrix-expert-store/1"

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
}
_DTYPES_BACK = {v: k for k, v in _DTYPES.items()}
HAS_FADVISE = hasattr(os, "posix_fadvise")
_O_DIRECT = getattr(os, "O_DIRECT", 0)
ALIGN = 4096  # expert data offsets in the file, and the cache slots in memory, are multiples of this


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def expert_key(expert: int, part: str) -> str:
    return f"e{expert:04d}.{part}"


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def write_layer_file(path: Path, experts: Any, num_experts: int) -> None:
    """Write one layer's experts; ``experts(j) -> {part: tensor}`` (float experts: ``gate_up``
    ``[2I, H]`` and ``down`` ``[H, I]``; low-bit ones: one ``lowbit`` byte blob) is called once per
    expert, in order, so only one expert is materialised at a time."""
    first = experts(0)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": FORMAT}}
    off = 0
    for j in range(num_experts):  # the parts of each expert in order: one contiguous range per expert
        for part, t in first.items():
            dtype = _DTYPES.get(t.dtype)
            if dtype is None:
                raise ConfigError(f"ExpertStore cannot store dtype {t.dtype}; use one of {sorted(map(str, _DTYPES))}")
            nbytes = t.numel() * t.element_size()
            header[expert_key(j, part)] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # data starts page-aligned (for O_DIRECT reads)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for j in range(num_experts):
            parts = first if j == 0 else experts(j)
            if [(k, tuple(t.shape)) for k, t in parts.items()] != [(k, tuple(t.shape)) for k, t in first.items()]:
                raise UnsupportedModelError("experts of one layer must share one shape")
            for part, t in parts.items():
                f.write(_as_bytes(t.detach().to("cpu", first[part].dtype)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class FileEntry:
    offset: int  # absolute file offset of the expert's first byte
    gu_bytes: int  # float experts: gate_up's bytes; low-bit experts: the whole blob's
    dn_bytes: int  # float experts: down's bytes; low-bit experts: 0

    @property
    def nbytes(self) -> int:
        return self.gu_bytes + self.dn_bytes


class LayerFile:
    """One layer file: offsets from its header, a file descriptor and a lazy read-only mmap."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        self.entries: dict[int, FileEntry] = {}
        shapes: dict[str, tuple[list[int], str]] = {}
        for key, meta in header.items():
            m = re.fullmatch(r"e(\d+)\.(gate_up|down|lowbit)", key)
            if m is None:
                continue
            j, part = int(m.group(1)), m.group(2)
            start, end = meta["data_offsets"]
            e = self.entries.setdefault(j, FileEntry(0, 0, 0))
            if part in ("gate_up", "lowbit"):
                e.offset, e.gu_bytes = base + start, end - start
            else:
                e.dn_bytes = end - start
                dn_start = base + start
            shapes[part] = (meta["shape"], meta["dtype"])
            if part == "down" and e.gu_bytes and dn_start != e.offset + e.gu_bytes:
                raise ConfigError(f"{path}: expert {j}'s tensors are not adjacent; rebuild the store")
        # low-bit stores: the float shapes and dtype are in the manifest
        self.gate_up_shape = tuple(shapes["gate_up"][0]) if "gate_up" in shapes else None
        self.down_shape = tuple(shapes["down"][0]) if "down" in shapes else None
        self.dtype = _DTYPES_BACK[shapes["gate_up"][1]] if "gate_up" in shapes else torch.uint8
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd = -1  # O_DIRECT descriptor, when every expert's bytes are page-aligned
        aligned = all(e.offset % ALIGN == 0 and e.gu_bytes % ALIGN == 0 and e.dn_bytes % ALIGN == 0
                      for e in self.entries.values())
        if aligned and _O_DIRECT:
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | _O_DIRECT)
            except OSError:  # a file system without O_DIRECT (e.g. older tmpfs)
                self.direct_fd = -1
        self._mmap: mmap.mmap | None = None

    @property
    def mm(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return self._mmap

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a zero-copy view is still alive; the GC closes it later
                pass
            self._mmap = None
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose data starts on an ``ALIGN``-byte boundary (``O_DIRECT``
    reads need page-aligned destinations; torch's allocator aligns to 64 bytes)."""
    nbytes = math.prod(shape) * dtype_size(dtype)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = -raw.data_ptr() % ALIGN
    return raw[start : start + nbytes].view(dtype).view(shape)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def writable_bytes(t: torch.Tensor) -> np.ndarray:
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("read_into needs contiguous CPU tensors")
    return t.view(-1).view(torch.uint8).numpy()


def read_safetensors(path: str | os.PathLike, keep) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file whose name ``keep(name)`` accepts, read with ``preadv``
    into fresh tensors, the file's pages dropped after each: unlike a memory map, it never holds
    a second copy of the weights (mapped pages count in resident memory until unmapped)."""
    extra = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "BOOL": torch.bool}
    out: dict[str, torch.Tensor] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, n, 8))
        header.pop("__metadata__", None)
        for name, meta in header.items():
            if not keep(name):
                continue
            start, end = meta["data_offsets"]
            dtype = _DTYPES_BACK.get(meta["dtype"]) or extra[meta["dtype"]]
            t = torch.empty(meta["shape"], dtype=dtype)
            if end > start and os.preadv(fd, [writable_bytes(t)], 8 + n + start) != end - start:
                raise OSError(f"short read of {name} from {path}")
            if HAS_FADVISE:
                os.posix_fadvise(fd, 8 + n + start, end - start, os.POSIX_FADV_DONTNEED)
            out[name] = t
    finally:
        os.close(fd)
    return out


def write_manifest(path: Path, layers: list[int], source: str, **extra: Any) -> None:
    """``extra``: for low-bit stores, ``lowbit`` (the format's spec) and ``dtype`` (the float experts')."""
    manifest = {"format": FORMAT, "layers": layers, "source": source, **extra}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES_BACK[name]
