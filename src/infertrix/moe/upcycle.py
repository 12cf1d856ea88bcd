"""Turn a dense Llama-style model (SmolLM2) into a Mixtral MoE with real weights, for benchmarks.

Two ways, both with a router derived from the weights (no training):

- ``mode="split"`` (MoEfication, Zhang et al. 2022, arXiv:2110.01786): the MLP's intermediate
  neurons are clustered into ``num_experts`` equal groups by balanced spherical k-means on their
  ``gate_proj`` rows, so neurons that fire on similar inputs share an expert. Expert ``e`` holds
  its group's rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``; the experts
  together are exactly the dense MLP. Router row ``e`` is the mean ``gate_proj`` row of the group,
  so its logit is the group's mean pre-activation: the router picks the groups most excited by
  the token. Mixtral renormalises the top-k weights to sum to one, so each expert's ``down_proj``
  is scaled by ``top_k`` (two equally weighted experts then add up to their dense sum). The model
  is lossy with respect to the dense one (top-2 of 8 keeps a quarter of the neurons), but its
  routing is real: it follows the text.
- ``mode="copy"`` (sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055): every expert
  is a full copy of the MLP, with the same router; since the routing weights sum to one the model
  computes exactly the dense model, at ``num_experts`` times the MLP memory.

    python -m infertrix.moe.upcycle --out ~/.cache/infertrix/moe/smollm2-8x --experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..core.calibration import run_windows, token_windows
from ..core.transform import ConfigError, UnsupportedModelError


def balanced_kmeans(rows: torch.Tensor, k: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster ``rows`` [N, D] into ``k`` groups of exactly N/k by cosine similarity; returns
    the group of each row [N]. Assignment is greedy by similarity with a per-group capacity."""
    n = rows.shape[0]
    if n % k:
        raise ConfigError(f"cannot split {n} neurons into {k} equal experts; pick num_experts dividing {n}")
    cap = n // k
    x = torch.nn.functional.normalize(rows.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        order = torch.argsort((x @ centroids.T).reshape(-1), descending=True).tolist()
        owner, fill, left = [-1] * n, [0] * k, n
        for flat in order:
            i, c = divmod(flat, k)
            if owner[i] < 0 and fill[c] < cap:
                owner[i] = c
                fill[c] += 1
                left -= 1
                if not left:
                    break
        assign = torch.tensor(owner)
        centroids = torch.nn.functional.normalize(
            torch.zeros(k, x.shape[1]).index_add_(0, assign, x), dim=-1
        )
    return assign


def fit_router(inputs: torch.Tensor, importance: torch.Tensor, scale: float = 0.05) -> torch.Tensor:
    """A linear router [E, H] whose logits predict each expert's importance (least squares, ridge),
    scaled so logits spread by about ``scale``: top-k picks by predicted importance and Mixtral's
    renormalised weights stay near 1/k each (two experts then add up to their dense sum)."""
    x = inputs.double()
    ridge = 1e-3 * x.pow(2).mean() * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(x.T @ x + ridge * x.shape[0], x.T @ importance.double())  # [H, E]
    logits = inputs.double() @ w
    return (w.T * (scale / logits.std().clamp_min(1e-12))).to(inputs.dtype)


def mlp_inputs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's MLP inputs [N, H] on token ``windows`` [n, L] (the dense model)."""
    layers = model.model.layers
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: got[i].append(a[0].reshape(-1, a[0].shape[-1])))
        for i, layer in enumerate(layers)
    ]
    try:
        run_windows(model, windows, progress=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def mixtral_config(cfg, num_experts: int, top_k: int, intermediate_size: int):
    """The ``MixtralConfig`` of a dense Llama-style ``cfg`` with ``num_experts`` experts per layer."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None),
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=getattr(cfg, "rope_parameters", None),
        tie_word_embeddings=cfg.tie_word_embeddings,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        router_aux_loss_coef=0.0,
    )


def layer_experts(
    mlp: nn.Module, num_experts: int, top_k: int, mode: str, seed: int, inputs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate_up_proj, down_proj, router weight)`` of one layer's experts, from its dense ``mlp``."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [I,H],[I,H],[H,I]
    groups = balanced_kmeans(wg, num_experts, seed=seed)
    idx = [torch.nonzero(groups == e).flatten() for e in range(num_experts)]
    if mode == "split":
        gate_up = torch.stack([torch.cat([wg[j], wu[j]], 0) for j in idx])
        down = torch.stack([wd[:, j] * top_k for j in idx])
    else:
        gate_up = torch.cat([wg, wu], 0).expand(num_experts, -1, -1).clone()
        down = wd.expand(num_experts, -1, -1).clone()
    if inputs is None:
        return gate_up, down, torch.stack([wg[j].mean(0) for j in idx])
    # each neuron group's share of the MLP output on real text
    act = torch.nn.functional.silu(inputs @ wg.T) * (inputs @ wu.T)  # [N, I]
    importance = torch.stack([(act[:, j] @ wd[:, j].T).norm(dim=-1) for j in idx], dim=1)
    return gate_up, down, fit_router(inputs, importance)


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    mode: str = "split",
    seed: int = 0,
    calibration_ids: torch.Tensor | None = None,
    window_tokens: int = 512,
) -> nn.Module:
    """A ``MixtralForCausalLM`` built from a dense Llama-style causal LM (see the module docstring).

    With ``calibration_ids`` (token windows [n, L], or 1-D ids cut into windows of
    ``window_tokens``: :func:`infertrix.core.calibration.token_windows`) the router is fitted by
    least squares to predict each expert's output norm on those tokens (:func:`fit_router`);
    without, router row ``e`` is the mean ``gate_proj`` row of expert ``e``'s neurons.
    """
    from transformers import MixtralForCausalLM

    if mode not in ("split", "copy"):
        raise ConfigError(f"mode must be 'split' or 'copy', got {mode!r}")
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral"):
        raise UnsupportedModelError(f"upcycle expects a Llama/Mistral-style dense model, got {cfg.model_type!r}")
    inter = cfg.intermediate_size // num_experts if mode == "split" else cfg.intermediate_size
    mcfg = mixtral_config(cfg, num_experts, top_k, inter)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(mcfg)
    moe = moe.to_empty(device="cpu").to(dtype)
    dense_sd = model.state_dict()
    sd = {name: dense_sd[name] for name in moe.state_dict() if ".mlp." not in name and name in dense_sd}
    inputs = None
    if calibration_ids is not None:
        inputs = mlp_inputs(model, token_windows(ids=calibration_ids, window_tokens=window_tokens))
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            gate_up, down, router = layer_experts(
                layer.mlp, num_experts, top_k, mode, seed + i, None if inputs is None else inputs[i]
            )
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = down
            sd[f"model.layers.{i}.mlp.gate.weight"] = router
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and mcfg.tie_word_embeddings)]
    if missing or unexpected:
        raise UnsupportedModelError(f"upcycle could not map weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    # rotary frequencies are non-persistent buffers: rebuild them rather than keep to_empty's garbage
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=mcfg)
    moe.tie_weights()
    moe.generation_config = model.generation_config
    return moe.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the upcycled checkpoint")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--mode", choices=("split", "copy"), default="split")
    ap.add_argument("--calibration-windows", type=int, default=4,
                    help="windows of 512 tokens from the start of the shipped text; 0: router from weights only")
    args = ap.parse_args(argv)
    from .. import models

    dense, tok = models.load("smollm2")
    n = args.calibration_windows  # from the start of the text: benchmarks/moe.py decodes the prose after it
    ids = token_windows(tok, windows=n, window_tokens=512, start=0.0) if n > 0 else None
    moe = upcycle(dense, args.experts, args.top_k, args.mode, calibration_ids=ids)
    out = Path(args.out).expanduser()
    moe.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
