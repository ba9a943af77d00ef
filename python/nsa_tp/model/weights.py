"""Weights of one DeepSeek-V3.2 attention layer (MLA + lightning indexer), whole and unsharded.

Two sources:

- :func:`random_weights` — deterministic from a seed, at the config's dims (real head dims, any hidden size),
  scaled so activations stay O(1) through the layer (every projection ~ N(0, 1/fan_in)).
- :func:`load_layer_weights` — one layer of a HuggingFace checkpoint (a ``.safetensors`` file, or a folder
  with ``model.safetensors.index.json``), by the names DeepSeek-V3.2 uses::

      model.layers.{i}.self_attn.q_a_proj.weight            [q_lora_rank, hidden]
      model.layers.{i}.self_attn.q_a_layernorm.weight       [q_lora_rank]
      model.layers.{i}.self_attn.q_b_proj.weight            [H * (128 + 64), q_lora_rank]   per head: nope, rope
      model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight  [512 + 64, hidden]              latent, rope key
      model.layers.{i}.self_attn.kv_a_layernorm.weight      [512]
      model.layers.{i}.self_attn.kv_b_proj.weight           [H * (128 + 128), 512]          per head: k_nope, v
      model.layers.{i}.self_attn.o_proj.weight              [hidden, H * 128]
      model.layers.{i}.self_attn.indexer.wq_b.weight        [64 * 128, q_lora_rank]
      model.layers.{i}.self_attn.indexer.wk.weight          [128, hidden]
      model.layers.{i}.self_attn.indexer.k_norm.weight      [128]                           a LayerNorm: weight
      model.layers.{i}.self_attn.indexer.k_norm.bias        [128]                           and bias
      model.layers.{i}.self_attn.indexer.weights_proj.weight [64, hidden]

  The released checkpoint stores most projections in fp8 (``float8_e4m3fn``) with a ``weight_scale_inv``
  per 128x128 block; those are dequantized on load (value = fp8 * scale_inv of its block).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from nsa_tp.config import ConfigError, NSAConfig

__all__ = [
    "LayerWeights",
    "WeightsError",
    "random_weights",
    "load_layer_weights",
    "save_layer_weights",
    "hf_names",
    "expected_shapes",
    "require_safetensors",
    "checkpoint_files",
    "check_checkpoint",
]

# Block size of the checkpoint's fp8 weight quantization (DeepSeek-V3 "weight_block_size": [128, 128]).
_FP8_BLOCK = 128


class WeightsError(ConfigError):
    """A checkpoint that lacks a tensor or holds one of the wrong shape (the message names it).

    A :class:`~nsa_tp.config.ConfigError` (so a ``ValueError``): the CLI reports it as a bad ``--model-path``.
    """


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """All weights of one attention layer, unsharded, in torch ``Linear`` layout ``[out, in]``."""

    q_a_proj: torch.Tensor
    q_a_layernorm: torch.Tensor
    q_b_proj: torch.Tensor
    kv_a_proj_with_mqa: torch.Tensor
    kv_a_layernorm: torch.Tensor
    kv_b_proj: torch.Tensor
    o_proj: torch.Tensor
    idx_wq_b: torch.Tensor
    idx_wk: torch.Tensor
    idx_k_norm_weight: torch.Tensor
    idx_k_norm_bias: torch.Tensor
    idx_weights_proj: torch.Tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in dataclasses.fields(self):
            yield f.name, getattr(self, f.name)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerWeights:
        """Every tensor moved/cast (norm weights and biases included)."""
        return LayerWeights(**{k: v.to(device=device, dtype=dtype) for k, v in self.items()})

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self.items())


def hf_names(layer: int) -> dict[str, str]:
    """Field of :class:`LayerWeights` -> HuggingFace tensor name for ``layer``."""
    p = f"model.layers.{layer}.self_attn."
    return {
        "q_a_proj": p + "q_a_proj.weight",
        "q_a_layernorm": p + "q_a_layernorm.weight",
        "q_b_proj": p + "q_b_proj.weight",
        "kv_a_proj_with_mqa": p + "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm": p + "kv_a_layernorm.weight",
        "kv_b_proj": p + "kv_b_proj.weight",
        "o_proj": p + "o_proj.weight",
        "idx_wq_b": p + "indexer.wq_b.weight",
        "idx_wk": p + "indexer.wk.weight",
        "idx_k_norm_weight": p + "indexer.k_norm.weight",
        "idx_k_norm_bias": p + "indexer.k_norm.bias",
        "idx_weights_proj": p + "indexer.weights_proj.weight",
    }


def expected_shapes(cfg: NSAConfig) -> dict[str, tuple[int, ...]]:
    """Field -> shape for ``cfg`` (the table in the module docstring)."""
    H = cfg.num_attention_heads
    return {
        "q_a_proj": (cfg.q_lora_rank, cfg.hidden_size),
        "q_a_layernorm": (cfg.q_lora_rank,),
        "q_b_proj": (H * cfg.qk_head_dim, cfg.q_lora_rank),
        "kv_a_proj_with_mqa": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.hidden_size),
        "kv_a_layernorm": (cfg.kv_lora_rank,),
        "kv_b_proj": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "o_proj": (cfg.hidden_size, H * cfg.v_head_dim),
        "idx_wq_b": (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
        "idx_wk": (cfg.index_head_dim, cfg.hidden_size),
        "idx_k_norm_weight": (cfg.index_head_dim,),
        "idx_k_norm_bias": (cfg.index_head_dim,),
        "idx_weights_proj": (cfg.index_n_heads, cfg.hidden_size),
    }


def random_weights(cfg: NSAConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> LayerWeights:
    """Deterministic random weights (CPU generator: the same bits on every rank and machine).

    Projections are ``N(0, 1/fan_in)`` so each output is O(1) for O(1) inputs; norm weights are
    ``1 + N(0, 0.1)`` (away from 0 so no channel dies) and the k_norm bias ``N(0, 0.1)``. Returned on CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 2:
            t = torch.randn(shape, generator=gen) * shape[1] ** -0.5
        elif name == "idx_k_norm_bias":
            t = torch.randn(shape, generator=gen) * 0.1
        else:
            t = 1.0 + torch.randn(shape, generator=gen) * 0.1
        tensors[name] = t.to(dtype)
    return LayerWeights(**tensors)


def _dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    """``[out, in]`` fp8 with ``[ceil(out/128), ceil(in/128)]`` block scales -> float32."""
    rows, cols = w.shape
    want = (-(-rows // _FP8_BLOCK), -(-cols // _FP8_BLOCK))
    if tuple(scale_inv.shape) != want:
        raise WeightsError(f"{name}_scale_inv: expected shape {want} for a {tuple(w.shape)} fp8 weight, "
                           f"got {tuple(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(_FP8_BLOCK, 0)[:rows].repeat_interleave(_FP8_BLOCK, 1)[:, :cols]
    return w.float() * scale


def require_safetensors() -> None:
    """Raise :class:`WeightsError` with the fix when the ``safetensors`` package (an optional dependency,
    needed only for real weights) is not installed."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise WeightsError("--model-path: reading checkpoint weights needs the safetensors package; "
                           "install it (pip install safetensors) or drop --model-path for random weights") from None


def checkpoint_files(path: str | Path) -> list[Path]:
    """The ``.safetensors`` files of a checkpoint (a file, or a folder with or without an index), checked up
    front so a wrong ``--model-path`` fails with one line before any rank starts."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"--model-path {path}: weights are read from a checkpoint folder (config.json + "
                               "*.safetensors) or one .safetensors file, not this file; pass the folder")
        return [path]
    if not path.is_dir():
        raise WeightsError(f"--model-path {path}: no such file or folder")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"--model-path {path}: no *.safetensors weights in this folder; pass a checkpoint "
                           "folder, or drop --model-path for random weights (`nsa-tp plan --model-path` reads "
                           "only config.json)")
    return files


def check_checkpoint(path: str | Path, layer: int | None = None) -> None:
    """Everything about ``--model-path`` that can be checked without reading tensors: the package, the files,
    that each file's header parses (a truncated or foreign file fails here with one line, not in a rank) and,
    given ``layer``, that the layer's attention tensors are there."""
    require_safetensors()
    from safetensors import SafetensorError, safe_open

    present: set[str] = set()
    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as h:
                present.update(h.keys())
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"--model-path {f}: not a readable safetensors checkpoint ({e})") from e
    if layer is not None:
        missing = [n for n in hf_names(layer).values() if n not in present]
        if missing:
            raise WeightsError(f"--layer {layer}: tensor '{missing[0]}' is missing from {path} (layer {layer} has "
                               "no NSA attention weights there?); pick another --layer")


def _open_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read ``names`` (and any ``*_scale_inv`` next to them) from one file or an indexed folder."""
    require_safetensors()
    checkpoint_files(path)
    from safetensors import SafetensorError

    try:
        return _read_tensors(path, names)
    except SafetensorError as e:  # a truncated or non-safetensors file behind a .safetensors name
        raise WeightsError(f"--model-path {path}: not a readable safetensors checkpoint ({e})") from e


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise WeightsError(f"{path}: no model.safetensors.index.json and no *.safetensors file")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n in weight_map:
                by_file.setdefault(weight_map[n], []).append(n)
        found: dict[str, torch.Tensor] = {}
        for fname, keys in by_file.items():
            with safe_open(str(path / fname), framework="pt") as h:
                found.update({k: h.get_tensor(k) for k in keys})
        return found
    if not path.is_file():
        raise WeightsError(f"--model-path: {path} is neither a .safetensors file nor a checkpoint folder")
    with safe_open(str(path), framework="pt") as h:
        present = set(h.keys())
        return {n: h.get_tensor(n) for n in names if n in present}


def load_layer_weights(
    path: str | Path, layer: int, cfg: NSAConfig, dtype: torch.dtype = torch.bfloat16
) -> LayerWeights:
    """One attention layer's weights from a HuggingFace checkpoint (file or folder), on CPU, in ``dtype``.

    Raises :class:`WeightsError` naming the first missing tensor or the first shape that does not match
    ``cfg`` (expected vs got). fp8 tensors with a ``weight_scale_inv`` are dequantized per 128x128 block.
    """
    names = hf_names(layer)
    wanted = list(names.values()) + [n + "_scale_inv" for n in names.values() if n.endswith(".weight")]
    raw = _open_tensors(Path(path), wanted)
    shapes = expected_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for field, hf in names.items():
        if hf not in raw:
            raise WeightsError(f"{path}: tensor '{hf}' is missing (layer {layer} has no NSA attention weights?)")
        t = raw[hf]
        if t.dtype == torch.float8_e4m3fn:
            scale = raw.get(hf + "_scale_inv")
            if scale is None:
                raise WeightsError(f"{path}: '{hf}' is fp8 but '{hf}_scale_inv' is missing")
            t = _dequant_fp8_block(t, scale, hf)
        if tuple(t.shape) != shapes[field]:
            raise WeightsError(f"{path}: '{hf}' expected shape {shapes[field]} for this config, got {tuple(t.shape)}")
        out[field] = t.to(dtype)
    return LayerWeights(**out)


def save_layer_weights(weights: LayerWeights, path: str | Path, layer: int) -> None:
    """Write ``weights`` as one ``.safetensors`` file under the HuggingFace names (tests, fixtures)."""
    from safetensors.torch import save_file

    names = hf_names(layer)
    save_file({names[k]: v.contiguous() for k, v in weights.items()}, str(path))
