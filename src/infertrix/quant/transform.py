"""The shared base of the quant family's transforms (W4A8, W4A16, W8A8).

A subclass only says how one linear layer becomes its quantized module (``quantize_linear``, given
the float weight after any smoothing and, when calibrating, the input Hessian; it returns a
:class:`~.linear_base.QuantizedLinear`) and which kernel runs it. Everything else lives here once: choosing layers (``filter_fn``, ``quantize_lm_head``),
calibration (SmoothQuant smoothing folded into norms, GPTQ's sequential layer pass, on a few real
text samples with a progress bar), swapping modules reversibly, and the ``describe`` report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core import calibration
from ..core.model import decoder_layers
from ..core.parallel import TensorParallel, tensor_parallel
from ..core.transform import Applied, ConfigError, Stage, Transform, UnsupportedModelError
from ..linear.swap import FilterFn, ModuleSwapper, output_projection_name, select_linears
from . import checkpoint
from .calibration import InputStats, sequential_quantize
from .linear_base import QuantizedLinear, check_linear
from .rotation import check_rotatable, rotate_residual
from .smoothing import apply_smoothing, smoothing_groups
from .tensor_parallel import gathered_linear, shard_problem, shard_quantized


@dataclass
class QuantTransform(Transform):
    """Base of weight(-and-activation) quantization transforms; see the subclasses' fields.

    Shared fields:
      filter_fn: ``filter_fn(module, qualified_name) -> bool`` picks the linear layers (default: all
        linear layers of the decoder layers).
      quantize_lm_head: also quantize the output projection (tied to the embedding on SmolLM2:
        the embedding keeps its float weight; the quantized head is a separate copy).
      smooth_alpha: SmoothQuant migration strength in [0, 1]; None = no smoothing. Needs data.
      gptq: GPTQ error compensation instead of round-to-nearest. Needs data.
      tokenizer, calibration_text, calibration_ids, calibration_windows, window_tokens: the
        calibration fields of every family (see ``infertrix.core.calibration``); default 16
        windows x 256 tokens from the end of the shipped Pride and Prejudice.
      damp: GPTQ's dampening, a fraction of the Hessian's mean diagonal.
      rotate: rotate the residual stream by a random orthogonal matrix first (QuaRot/SpinQuant R1,
        see ``infertrix.quant.rotation``): exact in float, spreads outlier channels before
        quantizing; needs no data. Unties a tied ``lm_head`` (one more float copy of it unless
        ``quantize_lm_head``). ``rotation_seed`` picks the matrix. ``"auto"``: rotate only with
        ``gptq=True`` (measured on SmolLM2: rotation helps GPTQ and hurts round-to-nearest) and
        where the architecture allows it (Llama-style pre-norm decoders); otherwise quantize
        unrotated, and ``describe()`` says which and why (Gemma's norms, MoE blocks).
      progress: show a tqdm progress bar while calibrating.
      keep_original: keep the float layers so ``restore`` can undo the transform (default). False
        frees them (the memory saving is then real) and makes the transform irreversible.
    """

    stage: ClassVar[Stage] = Stage.WEIGHTS
    conflict_group: ClassVar[str | None] = "weight quantization"
    kernel_op: ClassVar[str] = ""  # infertrix op the quantized modules call, for the report

    filter_fn: FilterFn | None = field(default=None, repr=False)
    quantize_lm_head: bool = False
    smooth_alpha: float | None = None
    gptq: bool = False
    tokenizer: Any = field(default=None, repr=False)
    calibration_text: Any = field(default=None, repr=False)
    calibration_ids: Any = field(default=None, repr=False)
    calibration_windows: int = 16
    window_tokens: int = 256
    damp: float = 0.01
    rotate: bool | str = False
    rotation_seed: int = 0
    progress: bool = True
    keep_original: bool = True

    def validate(self) -> None:
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha must be in [0, 1] (SmoothQuant uses 0.5), got {self.smooth_alpha}")
        if self.calibration_windows < 1 or self.window_tokens < 8:
            raise ConfigError(f"need calibration_windows >= 1 and window_tokens >= 8, "
                              f"got {self.calibration_windows} and {self.window_tokens}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1) (GPTQ uses 0.01), got {self.damp}")
        if self.rotate not in (True, False, "auto"):
            raise ConfigError(f"rotate must be true, false or 'auto', got {self.rotate!r}")

    @property
    def calibrated(self) -> bool:
        return self.gptq or self.smooth_alpha is not None

    def check_model(self, model: nn.Module) -> None:
        decoder_layers(model)
        if self.rotate is True:
            check_rotatable(model)
        if self.calibrated and self.calibration_ids is None:
            calibration.require_tokenizer(model, self, self._no_data(), f" ({self._calibration_name()})")
        for name, mod in select_linears(model, self.filter_fn, self.quantize_lm_head).items():
            try:
                check_linear(mod)
            except ConfigError as exc:
                raise UnsupportedModelError(f"{type(self).__name__} cannot quantize {name}: {exc}") from None

    # --- what a subclass provides
    def quantize_linear(self, linear: nn.Linear, weight: Tensor, hessian: Tensor | None) -> QuantizedLinear:
        raise NotImplementedError

    def quantize_with_stats(self, linear: nn.Linear, weight: Tensor, stats: InputStats | None) -> QuantizedLinear:
        """``quantize_linear`` given the calibration statistics of the layer's inputs (a scheme that
        reads more of them than the Hessian, such as FlattenQuant's per-channel maxima, overrides it)."""
        return self.quantize_linear(linear, weight, None if stats is None else stats.hessian)

    def extra_report(self) -> dict[str, Any]:
        return {}

    def tensor_parallel_problem(self, model: nn.Module, tp: TensorParallel) -> str | None:
        """Round-to-nearest on shards: each rank quantizes whole layers and keeps its slice
        (:mod:`.tensor_parallel`); calibration and rotation are not made to work there."""
        if self.calibrated:
            return (f"calibration ({self._calibration_name()}) reads whole layer inputs, which row-parallel "
                    f"layers see only a slice of; quantize without data: recipe '{self.name}({self._no_data_args()})'")
        if self.rotate is True:
            return "rotation rewrites the sharded embedding and every layer; use rotate=false"
        group = getattr(self, "group_size", -1)
        for name, lin in select_linears(model, self.filter_fn, self.quantize_lm_head).items():
            problem = shard_problem(name, tp.style(name), lin.in_features, group, tp)
            if problem:
                return problem
        return None

    def _quantize_target(self, name: str, lin: nn.Linear, tp: TensorParallel | None) -> QuantizedLinear:
        """``lin`` quantized (round-to-nearest); on a sharded model, this rank's part of the whole layer."""
        if tp is None:
            return self.quantize_linear(lin, lin.weight.detach().float(), None)
        full = gathered_linear(lin)
        return shard_quantized(self.quantize_linear(full, full.weight.float(), None), name, tp)

    # --- shared
    def _no_data_args(self) -> str:
        return ", ".join(([] if not self.gptq else ["gptq=false"])
                         + ([] if self.smooth_alpha is None else ["smooth_alpha=none"]))

    def _no_data(self) -> str:
        """The recipe that quantizes without data, for the error when no tokenizer is found."""
        return f", or quantize without data: recipe '{self.name}({self._no_data_args()})'"

    def _calibration_name(self) -> str:
        return "+".join(([] if not self.gptq else ["GPTQ"])
                        + ([] if self.smooth_alpha is None else [f"SmoothQuant smooth_alpha={self.smooth_alpha}"]))

    def apply(self, model: nn.Module) -> Applied:
        swapper = ModuleSwapper(model)
        smoothed: list[str] = []
        rotation = self._rotation_plan(model)
        try:
            if rotation == "rotate":
                rotate_residual(model, swapper, self.rotation_seed)  # before choosing layers: unties lm_head
                rotation = f"residual stream rotated (seed {self.rotation_seed})"
            targets = select_linears(model, self.filter_fn, self.quantize_lm_head)
            head = output_projection_name(model)
            before = sum(_module_bytes(m) for m in targets.values())
            if not self.calibrated:
                tp = tensor_parallel(model)
                for name, lin in targets.items():
                    swapper.swap(name, self._quantize_target(name, lin, tp))
            else:
                smoothed = self._quantize_calibrated(model, swapper, targets, head)
            config = getattr(model, "config", None)
            if head in swapper.originals and getattr(config, "tie_word_embeddings", False):
                # the quantized head is its own copy now: saved and loaded as such, not re-tied
                swapper.save_attr(config, "tie_word_embeddings")
                config.tie_word_embeddings = False
            checkpoint.record(model, self.recipe(), {n: model.get_submodule(n) for n in swapper.originals})
        except BaseException:
            swapper.undo()
            raise
        # the swapped modules themselves, not their paths: a later transform (a skip plan) may
        # move them out of the model's module tree while this one is applied
        quantized = {n: model.get_submodule(n) for n in targets if n in swapper.originals}

        def undo() -> None:
            swapper.undo()
            checkpoint.erase(model)

        def report() -> dict[str, Any]:
            return self._report(quantized, head, before, smoothed, rotation)

        if not self.keep_original:
            swapper.forget()
            return Applied(self, undo=None, irreversible_reason="keep_original=False freed the float layers",
                           report=report)
        # the float layers kept for restore() stay in memory: describe counts them
        return Applied(self, undo=undo, report=report, held=swapper.held)

    def _rotation_plan(self, model: nn.Module) -> str:
        """``"rotate"``, or why the residual stream stays as it is (shown by ``describe``)."""
        if self.rotate is True:
            return "rotate"
        if self.rotate == "auto" and not self.gptq:
            return "off (rotate='auto' rotates only with gptq=True: round-to-nearest loses more with it)"
        if self.rotate == "auto":
            try:
                check_rotatable(model)
            except UnsupportedModelError as exc:
                return f"skipped (rotate='auto'): {exc}"
            return "rotate"
        return "off"

    def _quantize_calibrated(self, model: nn.Module, swapper: ModuleSwapper, targets: dict[str, nn.Linear],
                             head: str | None) -> list[str]:
        """Quantize ``targets`` layer by layer on calibration data (smoothing first when asked);
        return the names of the smoothed layers."""
        smoothed: list[str] = []
        # the END of the shipped text: the perplexity benchmarks read its beginning
        batches = calibration.windows_for(model, self, None, self._no_data(), f" ({self._calibration_name()})")

        def on_layer(index, linears: dict[str, nn.Module], stats: dict[str, InputStats]) -> None:
            weights = {n: m.weight.detach().float().clone() for n, m in linears.items()}
            if self.smooth_alpha is not None and index != "lm_head":
                layer = decoder_layers(model)[index]
                prefix = next(iter(linears)).rsplit(".", 2)[0] + "."
                scales = apply_smoothing(
                    smoothing_groups(layer, prefix), weights, stats, self.smooth_alpha, swapper.save_param
                )
                for n, s in scales.items():
                    st = stats[n]
                    if st.hessian is not None:
                        st.hessian /= s.double()[:, None] * s.double()[None, :]
                    st.absmax /= s
                smoothed.extend(scales)
            for n, lin in linears.items():
                swapper.swap(n, self.quantize_with_stats(lin, weights[n], stats.get(n)))

        sequential_quantize(
            model, targets, batches, on_layer, hessian=self.gptq,
            lm_head_name=head if head in targets else None, progress=self.progress,
        )
        return smoothed

    def _report(self, quantized: dict[str, QuantizedLinear], head: str | None, before: int, smoothed: list[str],
                rotation: str) -> dict[str, Any]:
        from .. import ops

        out = {
            "layers": len(quantized),
            "lm_head": "quantized (separate copy; the tied embedding stays float)" if head in quantized else "float",
            "bytes_before": before,
            "bytes_after": sum(mod.storage_bytes() for mod in quantized.values()),
            "kernel": f"{self.kernel_op}: {ops.status()[self.kernel_op]['cpu']}" if self.kernel_op else "torch",
            "calibration": ("gptq" if self.gptq else "rtn")
            + (f"+smooth(alpha={self.smooth_alpha}, {len(smoothed)} layers)" if self.smooth_alpha is not None else "")
            + ("+rotated" if rotation.startswith("residual") else ""),
            "rotation": rotation,
        }
        out.update(self.extra_report())
        return out


def _module_bytes(mod: nn.Module) -> int:
    local = [getattr(t, "_local_tensor", t) for t in list(mod.parameters()) + list(mod.buffers())]  # shards
    return sum(t.numel() * t.element_size() for t in local)
