"""Model dimensions of DeepSeek-V3.2's attention (MLA + lightning indexer).

``NSAConfig()`` holds the real DeepSeek-V3.2 values; ``NSAConfig.from_hf_config`` reads them from a
HuggingFace ``config.json`` of a ``DeepseekV32ForCausalLM`` and names the field that is missing or wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["NSAConfig", "ConfigError", "NSA_ARCHITECTURES"]

# Architectures whose attention is DeepSeek Sparse Attention (SGLang calls the backend "nsa"/"dsa").
NSA_ARCHITECTURES = ("DeepseekV32ForCausalLM", "DeepseekV32ForCausalLMNextN")


class ConfigError(ValueError):
    """A config.json that is not an NSA model, or lacks / mistypes a field (the message names it)."""


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """DeepSeek-V3.2 attention dims (defaults are the released model's)."""

    hidden_size: int = 7168
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    page_size: int = 64
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    # YaRN rope scaling (DeepSeek-V3 family); factor 1.0 means plain RoPE.
    rope_scaling_factor: float = 40.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0

    # Derived dims used by kernels and caches.
    @property
    def qk_head_dim(self) -> int:
        """Per-head q/k dim before absorption: 128 nope + 64 rope = 192."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def d_qk(self) -> int:
        """Absorbed q/k dim seen by the sparse MLA kernel: 512 latent + 64 rope = 576."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def d_v(self) -> int:
        """Latent output dim of the sparse MLA kernel (512)."""
        return self.kv_lora_rank

    @property
    def yarn_mscale(self) -> float:
        """DeepSeek's attention-scale correction for YaRN: ``(0.1 * mscale_all_dim * ln(factor) + 1)``."""
        if self.rope_scaling_factor <= 1.0:
            return 1.0
        return 0.1 * self.rope_mscale_all_dim * math.log(self.rope_scaling_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 * mscale^2`` as DeepSeek-V3 applies it under YaRN."""
        return self.qk_head_dim**-0.5 * self.yarn_mscale**2

    def replace(self, **changes: Any) -> NSAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, path_or_dict: str | Path | Mapping[str, Any]) -> NSAConfig:
        """Read a HuggingFace ``config.json`` (a path to the file or its folder, or the parsed dict)."""
        hf, where = _read_hf_config(path_or_dict)
        _check_architectures(hf, where)

        def field(name: str, kind: type = int) -> Any:
            return _hf_field(hf, where, name, kind)

        kwargs: dict[str, Any] = {
            name: field(name)
            for name in (
                "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk",
            )
        }
        if "rms_norm_eps" in hf:
            kwargs["rms_norm_eps"] = float(field("rms_norm_eps", float))
        if "max_position_embeddings" in hf:
            kwargs["max_position_embeddings"] = field("max_position_embeddings")
        if "rope_theta" in hf:
            kwargs["rope_theta"] = float(field("rope_theta", float))
        kwargs.update(_rope_scaling(hf.get("rope_scaling"), where))
        return cls(**kwargs)


def _read_hf_config(path_or_dict: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The parsed config and where it came from (for messages); a ``ConfigError`` names what is wrong."""
    if isinstance(path_or_dict, Mapping):
        hf, where = dict(path_or_dict), "config"
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model-path: no config.json at {path}")
        try:
            hf = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"--model-path {path}: not UTF-8 text (byte {e.start}); expected a HuggingFace "
                              "config.json (a .safetensors file goes with its folder: pass the folder)") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-path {path}: not valid JSON ({e}); expected a HuggingFace config.json") \
                from e
        except OSError as e:
            raise ConfigError(f"--model-path {path}: cannot read it ({e.strerror})") from e
        where = str(path)
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{where}: expected a JSON object (a HuggingFace config.json), got "
                          f"{type(hf).__name__ if hf is not None else 'null'}")
    return hf, where


def _check_architectures(hf: Mapping[str, Any], where: str) -> None:
    archs = hf.get("architectures")
    if not archs:
        raise ConfigError(f"{where}: field 'architectures' is missing; expected one of {NSA_ARCHITECTURES}")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: field 'architectures' must be a list of names, got {archs!r}")
    if not any(a in NSA_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{where}: field 'architectures' is {archs}, not an NSA (DeepSeek Sparse Attention) model; "
            f"expected one of {NSA_ARCHITECTURES}"
        )


def _hf_field(hf: Mapping[str, Any], where: str, name: str, kind: type = int) -> Any:
    """``hf[name]``, checked: a positive int (``kind=int``) or a number (``kind=float``)."""
    if name not in hf or hf[name] is None:
        raise ConfigError(f"{where}: field '{name}' is missing (needed for NSA attention)")
    value = hf[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: field '{name}' must be a number, got {value!r}")
    return value


# rope_scaling key -> NSAConfig field
_ROPE_KEYS = (
    ("factor", "rope_scaling_factor"),
    ("original_max_position_embeddings", "rope_original_max_position_embeddings"),
    ("beta_fast", "rope_beta_fast"),
    ("beta_slow", "rope_beta_slow"),
    ("mscale", "rope_mscale"),
    ("mscale_all_dim", "rope_mscale_all_dim"),
)


def _rope_scaling(scaling: Any, where: str) -> dict[str, Any]:
    """The YaRN fields of ``rope_scaling`` (``{"rope_scaling_factor": 1.0}`` when there is none)."""
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError(f"{where}: field 'rope_scaling' must be an object like "
                          f'{{"type": "yarn", "factor": 40, ...}} or null, got {scaling!r}')
    if not scaling:
        return {"rope_scaling_factor": 1.0}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"{where}: field 'rope_scaling.type' is {kind!r}; DeepSeek-V3.2 uses 'yarn'")
    out: dict[str, Any] = {}
    for key, attr in _ROPE_KEYS:
        if key in scaling:
            value = scaling[key]
            if key == "original_max_position_embeddings":
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
                want, cast = "a positive integer", int
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                want, cast = "a number", float
            if not ok:
                raise ConfigError(f"{where}: field 'rope_scaling.{key}' must be {want}, got {value!r}")
            out[attr] = cast(value)
    return out
