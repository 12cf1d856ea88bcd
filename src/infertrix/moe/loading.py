"""Load an MoE checkpoint with its experts offloaded, never holding all experts in memory.

``from_pretrained`` would materialise every expert before ``ExpertOffload`` could free them, so
peak memory would be the full model. ``load_offloaded`` instead builds the model on the meta
device, writes (or reuses) the expert store straight from the checkpoint's safetensors files
one expert at a time (:meth:`ExpertStore.from_checkpoint`), loads only the dense weights, and
applies :class:`ExpertOffload`. Peak memory is the dense weights plus the expert budget.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..core.api import optimize
from ..core.transform import ConfigError, UnsupportedModelError
from .expert_files import MANIFEST, read_safetensors
from .offload import ExpertOffload
from .store import ExpertStore

_EXPERT_KEY = re.compile(r".*\.experts\.(\d+\.)?[\w.]+$")
# checkpoint names -> transformers 5 module names (the only rename among the supported models)
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


def load_offloaded(
    checkpoint: str | Path,
    offload: ExpertOffload | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A causal LM from a safetensors checkpoint folder with ``offload`` applied.

    ``offload.store_dir`` is where the expert store is written (or reused); it is required, since
    the store is the experts' only copy in this process.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    offload = offload or ExpertOffload()
    if offload.store_dir is None:
        raise ConfigError("load_offloaded needs ExpertOffload(store_dir=...): the store is where the experts live")
    checkpoint = Path(checkpoint)
    store_dir = Path(offload.store_dir)
    if not (store_dir / MANIFEST).exists() and (offload.expert_gptq or offload.int8_layers):
        raise ConfigError("expert_gptq and int8_layers calibrate by running the model with its float experts, which "
                          "load_offloaded never holds; write the store once from a loaded model (from_pretrained, "
                          "then ExpertOffload with this store_dir) and load_offloaded reuses it, or use "
                          "expert_gptq=False, int8_layers=0")
    if not (store_dir / MANIFEST).exists():
        ExpertStore.from_checkpoint(checkpoint, store_dir, offload.expert_bits, offload.expert_group_size).close()

    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    wanted = dict(model.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}

    def rename(key: str) -> str:
        for old, new in _RENAMES:
            key = key.replace(old, new)
        return key

    def keep(key: str) -> bool:
        is_expert = _EXPERT_KEY.match(key) is not None and ".shared_expert" not in key
        return not is_expert and rename(key) in wanted

    for f in sorted(checkpoint.glob("*.safetensors")):
        for key, t in read_safetensors(f, keep).items():
            state[rename(key)] = t.to(dtype)
    # as transformers does: tie only when the checkpoint holds no output embedding of its own (a
    # checkpoint saved with tie_word_embeddings=True but a separate lm_head keeps it untied)
    head = model.get_output_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    own_head = head_key in state
    model.load_state_dict(state, strict=False, assign=True)
    del state
    # non-persistent buffers (rotary frequencies) are not in checkpoints: rebuild them on the CPU
    for name, module in list(model.named_modules()):
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=module.config))
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and not own_head:
        model.tie_weights()
    left = [n for n, t in model.state_dict().items() if t.device.type == "meta" and ".experts." not in n]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise UnsupportedModelError(
            f"{checkpoint} lacks weights for {left[:5]}{'...' if len(left) > 5 else ''}; load_offloaded "
            "supports Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints"
        )
    model.eval()
    return optimize(model, offload)
