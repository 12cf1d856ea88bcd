"""``ExpertStore``: every expert's weights in safetensors files, the slow tier of expert offloading.

Layout: one safetensors file per MoE layer (``layer_003.safetensors``) holding, for expert ``j``,
``e0007.gate_up`` ``[2I, H]`` and ``e0007.down`` ``[H, I]``, plus ``manifest.json``. The files
are ordinary safetensors (``safetensors.safe_open`` reads them); we write them with our own
small writer so experts are streamed one at a time (no second copy of a layer in memory) and we
read them by byte offset:

- ``read_into`` copies one expert into caller-provided tensors with ``os.preadv`` (it releases
  the GIL, so a prefetch thread overlaps it with compute). The data of every expert starts on a
  4096-byte boundary (the header is padded with spaces, as the safetensors format allows), so
  when the destination is page-aligned too (the cache's slots are, see :func:`aligned_empty`)
  the read goes through an ``O_DIRECT`` descriptor: the disk writes straight into the slot, with
  no page-cache copy and no kernel memcpy (measured on this machine's disk: 705 MB/s and 0.09 s
  of CPU per 500 MB, against 131 MB/s and 1.7 s CPU for cold buffered reads). Otherwise it reads
  through the page cache and drops those pages afterwards (``posix_fadvise(DONTNEED)``). Either
  way every read really goes to the disk and the page cache never holds a hidden second copy.
- ``view`` returns zero-copy tensors over a read-only memory map of the file (the Fiddler path:
  compute where the expert is stored); ``release`` drops those pages again.
- ``tier="host"`` keeps all experts in host memory instead (pinned when the cache lives on a
  GPU); then a fetch is a memory copy, which is the host -> device tier of GPU offloading.

Stores are created from a loaded model (``from_model``) or from a checkpoint folder
(``from_checkpoint``), both one expert at a time, and reopened with ``open``. With ``bits=8`` or
``bits=4`` each expert is written quantized, as one ``e0007.lowbit`` byte blob
(:class:`~infertrix.moe.lowbit.LowBitFormat`, EdgeMoE): a read moves a quarter of a float32
expert's bytes or less, into one page-aligned byte slot whose typed views the int8/int4 kernels use.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..core.transform import ConfigError, UnsupportedModelError
from .expert_files import (
    ALIGN,
    HAS_FADVISE,
    MANIFEST,
    FileEntry,
    LayerFile,
    dtype_from_name,
    dtype_size,
    layer_file,
    writable_bytes,
    write_layer_file,
    write_manifest,
)
from .lowbit import LowBitFormat, PartsWriter

if TYPE_CHECKING:
    from .calibrate import RoutedInputs


class ExpertStore:
    """All experts of a model in safetensors files; see the module docstring.

    ``tier``: ``"disk"`` reads experts from the files on each fetch (memory-mapped for in-place
    compute); ``"host"`` loads them all into host memory once (pinned if ``pin_memory``).
    """

    def __init__(self, path: str | os.PathLike, tier: str = "disk", pin_memory: bool = False):
        if tier not in ("disk", "host"):
            raise ConfigError(f"ExpertStore tier must be 'disk' or 'host', got {tier!r}")
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise ConfigError(
                f"{self.path} is not an expert store (no {MANIFEST}); create one with "
                "ExpertStore.from_model(model, path) or ExpertStore.from_checkpoint(folder, path)"
            )
        self.manifest = json.loads(manifest.read_text())
        self.tier = tier
        self.layers: list[int] = [int(i) for i in self.manifest["layers"]]
        self._files = {i: LayerFile(self.path / layer_file(i)) for i in self.layers}
        f0 = self._files[self.layers[0]]
        self.num_experts = len(f0.entries)
        spec = self.manifest.get("lowbit")
        #: int8/int4 experts (None: float experts in the model's dtype); per layer, ``format_of``
        self.format = LowBitFormat.from_spec(spec) if spec else None
        #: layers whose low-bit experts have another width than ``format`` (EdgeMoE's bit widths by importance)
        self.layer_formats = {int(i): LowBitFormat.from_spec(v) for i, v in self.manifest.get("lowbit_layers", {}).items()}
        self._bytes = {i: self._files[i].entries[0].nbytes for i in self.layers}
        usual = [i for i in self.layers if i not in self.layer_formats] or self.layers
        self.expert_bytes = self._bytes[usual[0]]  # of ``format``'s experts; per layer, ``bytes_of``
        if self.format is None:
            self.gate_up_shape, self.down_shape, self.dtype = f0.gate_up_shape, f0.down_shape, f0.dtype
            self.bits = 8 * dtype_size(self.dtype)
        else:  # the float experts' shapes and dtype (what the model and restore see)
            self.gate_up_shape, self.down_shape = self.format.gate_up_shape, self.format.down_shape
            self.dtype = dtype_from_name(self.manifest["dtype"])
            self.bits = self.format.bits
        #: how low-bit experts were rounded: "nearest", or "gptq" (from each expert's routed tokens)
        self.rounding: str = self.manifest.get("rounding", "nearest")
        self._host: dict[int, tuple[torch.Tensor, ...]] = {}
        if tier == "host":
            for i in self.layers:
                host = tuple(torch.empty((self.num_experts, *shape), dtype=dtype, pin_memory=pin_memory)
                             for shape, dtype in self.slot_shapes(i))
                for j in range(self.num_experts):
                    self._read(i, j, *(t[j] for t in host))
                self._host[i] = host

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls, model: torch.nn.Module, path: str | os.PathLike, bits: int | None = None, group_size: int = 32,
        calibration: RoutedInputs | None = None, damp: float = 0.01, layer_bits: dict[int, int] | None = None,
        encoded: Any = None, notes: dict[str, Any] | None = None, progress: bool = True, **kwargs: Any,
    ) -> ExpertStore:
        """Write the experts of a loaded transformers 5 MoE model (one expert at a time); ``bits``
        8 or 4 writes them quantized (``group_size``: int4 groups), None as they are. With
        ``calibration`` (``moe.calibrate.routed_inputs``) low-bit experts are quantized by GPTQ
        from their own routed tokens (``damp``: GPTQ's dampening); experts no token reached are
        rounded to nearest, and the manifest counts them. ``layer_bits``: another width for some
        layers (by decoder layer index); ``encoded(layer, j)``: an expert's blob when the caller
        already quantized it at its layer's width (else None); ``notes``: more manifest entries."""
        from .discovery import find_moe_layers

        if (calibration is not None or layer_bits) and bits is None:
            raise ConfigError("expert calibration (GPTQ) and per-layer widths need low-bit experts: pass bits=8 or 4")
        layers = find_moe_layers(model)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        writer = PartsWriter(bits, group_size, damp if calibration is not None else None, layer_bits)
        slow = calibration is not None and progress  # GPTQ: seconds a layer
        for layer in tqdm(layers, desc="writing experts", unit="layer", disable=not slow, leave=False):
            gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
            hessians = None if calibration is None else (lambda j, layer=layer: calibration.hessians(layer, j))
            done = None if encoded is None else (lambda j, i=layer.index: encoded(i, j))
            write_layer_file(path / layer_file(layer.index),
                             writer.parts(lambda j, gu=gu, dn=dn: (gu[j], dn[j]), hessians, layer.index, done),
                             layer.num_experts)
        uncalibrated = 0
        if calibration is not None:
            uncalibrated = calibration.uncalibrated
            notes = {**(notes or {}), "min_tokens": calibration.min_tokens}
        write_manifest(path, [layer.index for layer in layers], source="model", **writer.manifest(uncalibrated),
                       **(notes or {}))
        return cls(path, **kwargs)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike, path: str | os.PathLike, bits: int | None = None, group_size: int = 32,
        **kwargs: Any,
    ) -> ExpertStore:
        """Write the experts of a safetensors checkpoint folder without loading the model.

        Reads tensor slices one expert at a time, so memory stays at about one expert. Handles
        transformers 5's fused keys (``...experts.gate_up_proj``) and the per-expert layouts
        checkpoints are saved in (Mixtral ``experts.{j}.w1/w3/w2``; Qwen-MoE/OLMoE
        ``experts.{j}.gate_proj/up_proj/down_proj``). ``bits``/``group_size`` as in ``from_model``.
        """
        from safetensors import safe_open

        checkpoint = Path(checkpoint)
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{checkpoint} holds no *.safetensors files; pass a transformers checkpoint folder")
        fused = re.compile(r".*layers\.(\d+)\..*experts\.(gate_up_proj|down_proj)$")
        split = re.compile(r".*layers\.(\d+)\..*experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)(?:\.weight)?$")
        where: dict[int, dict[Any, tuple[Path, str]]] = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                for key in h.keys():
                    if m := fused.match(key):
                        where.setdefault(int(m.group(1)), {})[m.group(2)] = (f, key)
                    elif m := split.match(key):
                        part = {"w1": "gate", "w3": "up", "w2": "down"}.get(m.group(3), m.group(3).removesuffix("_proj"))
                        where.setdefault(int(m.group(1)), {})[(int(m.group(2)), part)] = (f, key)
        if not where:
            raise UnsupportedModelError(f"{checkpoint} has no MoE expert weights (no `layers.N...experts...` keys)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        writer = PartsWriter(bits, group_size)
        for index, parts in sorted(where.items()):
            if "gate_up_proj" in parts:
                (fgu, kgu), (fdn, kdn) = parts["gate_up_proj"], parts["down_proj"]
                with safe_open(str(fgu), "pt") as hgu, safe_open(str(fdn), "pt") as hdn:
                    sgu, sdn = hgu.get_slice(kgu), hdn.get_slice(kdn)
                    n = sgu.get_shape()[0]
                    write_layer_file(path / layer_file(index),
                                     writer.parts(lambda j, a=sgu, b=sdn: (a[j : j + 1][0], b[j : j + 1][0])), n)
            else:
                n = 1 + max(j for (j, _p) in parts)

                def expert(j: int, parts=parts) -> tuple[torch.Tensor, torch.Tensor]:
                    def get(p: str) -> torch.Tensor:
                        f, k = parts[(j, p)]
                        with safe_open(str(f), "pt") as h:
                            return h.get_tensor(k)

                    return torch.cat([get("gate"), get("up")], dim=0), get("down")

                write_layer_file(path / layer_file(index), writer.parts(expert), n)
        write_manifest(path, sorted(where), source=str(checkpoint), **writer.manifest())
        return cls(path, **kwargs)

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs: Any) -> ExpertStore:
        return cls(path, **kwargs)

    # -- access -----------------------------------------------------------------------------
    def format_of(self, layer: int) -> LowBitFormat | None:
        """The low-bit format of ``layer``'s experts (None: float experts)."""
        return self.layer_formats.get(layer, self.format)

    def bytes_of(self, layer: int) -> int:
        """Bytes of one of ``layer``'s experts as stored (and as a cache slot holds it)."""
        return self._bytes[layer]

    def slot_shapes(self, layer: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of the tensors one expert of ``layer`` is read into: float ``gate_up``,
        ``down``; low-bit: one byte blob."""
        if self.format is not None:
            return [((self.bytes_of(layer),), torch.uint8)]
        return [(self.gate_up_shape, self.dtype), (self.down_shape, self.dtype)]

    def _read(self, layer: int, expert: int, *dest: torch.Tensor) -> int:
        lf = self._files[layer]
        e = lf.entries[expert]
        bufs = [writable_bytes(t) for t in dest]
        want = e.nbytes
        if lf.direct_fd >= 0 and all(t.data_ptr() % ALIGN == 0 for t in dest):
            try:  # one syscall, disk -> slot, the page cache bypassed
                n = os.preadv(lf.direct_fd, bufs, e.offset)
            except OSError:  # the device refused this alignment: read through the page cache from now on
                os.close(lf.direct_fd)
                lf.direct_fd = -1
            else:
                if n != want:
                    raise OSError(f"short read of expert {expert} of layer {layer} from {lf.path}")
                return n
        n = os.preadv(lf.fd, bufs, e.offset)
        if n != want:
            raise OSError(f"short read of expert {expert} of layer {layer} from {lf.path}")
        self._drop(lf, e)
        return n

    def read_into(self, layer: int, expert: int, *dest: torch.Tensor) -> int:
        """Copy one expert into ``dest`` (contiguous, any device; shaped as :meth:`slot_shapes`:
        ``gate_up, down`` or one byte blob); returns bytes read from disk (0 for the host tier,
        whose copies are memory copies)."""
        if self.tier == "host":
            for t, h in zip(dest, self._host[layer], strict=True):
                t.copy_(h[expert], non_blocking=True)
            return 0
        if dest[0].device.type == "cpu":
            return self._read(layer, expert, *dest)
        staging = [torch.empty_like(t, device="cpu") for t in dest]
        n = self._read(layer, expert, *staging)
        for t, s in zip(dest, staging, strict=True):
            t.copy_(s)
        return n

    def view(self, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
        """Zero-copy tensors of one expert where it is stored (mmap or host memory), shaped as
        :meth:`slot_shapes`."""
        if self.tier == "host":
            return tuple(h[expert] for h in self._host[layer])
        lf = self._files[layer]
        e = lf.entries[expert]
        out, offset = [], e.offset
        with warnings.catch_warnings():  # read-only map: the tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            for shape, dtype in self.slot_shapes(layer):
                count = math.prod(shape)
                out.append(torch.frombuffer(lf.mm, dtype=dtype, count=count, offset=offset).view(shape))
                offset += count * dtype_size(dtype)
        return tuple(out)

    def release(self, layer: int, expert: int) -> None:
        """Drop an in-place expert's pages (mapping and page cache) after use."""
        if self.tier == "host":
            return
        lf = self._files[layer]
        e = lf.entries[expert]
        if lf._mmap is not None:
            start = e.offset - e.offset % mmap.PAGESIZE
            end = e.offset + e.nbytes
            try:
                lf._mmap.madvise(mmap.MADV_DONTNEED, start, min(end, len(lf._mmap)) - start)
            except (AttributeError, OSError, ValueError):
                pass
        self._drop(lf, e)

    @staticmethod
    def _drop(lf: LayerFile, e: FileEntry) -> None:
        if HAS_FADVISE:
            os.posix_fadvise(lf.fd, e.offset, e.nbytes, os.POSIX_FADV_DONTNEED)

    def drop_page_cache(self) -> None:
        """Drop every store file's pages from the page cache (for honest cold reads)."""
        if HAS_FADVISE:
            for lf in self._files.values():
                os.posix_fadvise(lf.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def load_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts of one layer as fused ``[E, 2I, H]`` and ``[E, H, I]`` tensors (for restore;
        low-bit experts dequantized: the float originals are not kept)."""
        gu = torch.empty((self.num_experts, *self.gate_up_shape), dtype=self.dtype)
        dn = torch.empty((self.num_experts, *self.down_shape), dtype=self.dtype)
        fmt = self.format_of(layer)
        blob = torch.empty(self.bytes_of(layer), dtype=torch.uint8) if fmt is not None else None
        for j in range(self.num_experts):
            if blob is None:
                self.read_into(layer, j, gu[j], dn[j])
            else:
                self.read_into(layer, j, blob)
                g, d = fmt.decode(fmt.views(blob))
                gu[j], dn[j] = g, d
        return gu, dn

    @property
    def rounding_note(self) -> str:
        """``rounding`` for describe(): GPTQ says how many experts no calibration token reached."""
        if self.rounding != "gptq":
            return self.rounding
        left, least = self.manifest.get("uncalibrated_experts", 0), self.manifest.get("min_tokens", 1)
        few = "no calibration token reached" if least <= 1 else f"fewer than {least} calibration tokens reached"
        return f"gptq (damp {self.manifest.get('damp')}; {left} experts {few}: nearest)"

    @property
    def total_bytes(self) -> int:
        return sum(self._bytes.values()) * self.num_experts

    def close(self) -> None:
        for lf in self._files.values():
            lf.close()
        self._host.clear()

    def __repr__(self) -> str:
        return (
            f"ExpertStore({str(self.path)!r}, tier={self.tier!r}, layers={len(self.layers)}, "
            f"experts={self.num_experts}, {self.bits} bits, {self.total_bytes / 2**20:.1f} MiB)"
        )
