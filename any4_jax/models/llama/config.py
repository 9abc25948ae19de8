"""Llama-family model configuration: one frozen dataclass, presets as values.

Covers Llama 2/3/3.x, SmolLM2, Mistral (sliding-window attention) and Mixtral (a sparse
mixture of experts in place of the MLP): the architectures whose Hugging Face `config.json` has
`model_type` "llama", "mistral" or "mixtral".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
# Mixture-of-experts architectures whose routing or experts differ from Mixtral's (shared
# experts, grouped top-k, biased routers, ...): named in the error rather than half-loaded.
UNSUPPORTED_MOE = {
    "qwen2_moe": "Qwen-MoE (shared expert, gated)", "qwen3_moe": "Qwen3-MoE",
    "deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3", "dbrx": "DBRX",
    "olmoe": "OLMoE", "jamba": "Jamba", "granitemoe": "Granite-MoE", "phimoe": "Phi-MoE",
    "minimax": "MiniMax", "jetmoe": "JetMoE", "arctic": "Snowflake Arctic",
    "llama4": "Llama 4 (MoE)", "gpt_oss": "gpt-oss", "glm4_moe": "GLM-4-MoE",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 ("llama3") frequency scaling of the rotary embedding."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"rope scaling {self.factor=} must be positive")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor=} and {self.low_freq_factor=}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder.

    `head_dim` defaults to hidden_size // num_heads. `sliding_window` (Mistral) limits each
    query to the last `sliding_window` keys including itself; None means full causal attention.
    `num_experts` > 0 (Mixtral) replaces every block's MLP by a sparse mixture of that many
    SwiGLU experts of width `intermediate_size`, each token routed to `experts_per_token` of
    them (`models/llama/moe.py`).
    """

    name: str = "custom"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    num_experts: int = 0
    experts_per_token: int = 2

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LlamaConfig.{f}={v!r} must be a positive integer")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads="
                    f"{self.num_heads}; pass head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"{self.head_dim=} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                f"{self.num_kv_heads} (grouped-query attention)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.sliding_window=} must be positive or None")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"LlamaConfig.num_experts={self.num_experts!r} must be 0 (a dense "
                             "MLP) or a positive number of experts")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"LlamaConfig.experts_per_token={self.experts_per_token!r} must "
                             f"be between 1 and num_experts={self.num_experts}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """Parameter count by formula (the eval_shape test checks it against the module)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * f if not self.is_moe else self.num_experts * (3 * d * f + d)
        block = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * block + d + head

    # --- Hugging Face config.json -------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, name: str = "custom") -> LlamaConfig:
        """From a Hugging Face `config.json` dict (Llama or Mistral)."""
        mt = hf.get("model_type")
        if mt in UNSUPPORTED_MOE:
            raise ValueError(
                f"unsupported mixture-of-experts architecture {UNSUPPORTED_MOE[mt]} "
                f"(model_type={mt!r}); any4-jax runs Mixtral-style MoE (model_type 'mixtral': "
                "top-k softmax routing over SwiGLU experts, no shared expert)")
        if mt not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures") or mt
            raise ValueError(
                f"unsupported architecture {arch!r} (model_type={mt!r}); any4-jax runs "
                f"model_type in {SUPPORTED_MODEL_TYPES} (Llama 2/3, SmolLM2, Mistral, Mixtral)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"config.json sets {key}=true; biases in Llama projections "
                                 "are not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}; only 'silu' is supported")
        # transformers 5 nests rope settings in rope_parameters; 4.x uses rope_theta +
        # rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or rope
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        rs = None
        if rtype == "llama3":
            rs = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(
                    scaling["original_max_position_embeddings"]))
        elif rtype not in (None, "default"):
            raise ValueError(f"rope scaling type {rtype!r} is not supported (default, llama3)")
        moe = {}
        if mt == "mixtral":
            if "num_local_experts" not in hf:
                raise ValueError("config.json (mixtral) lacks the required key "
                                 "'num_local_experts'")
            moe = {"num_experts": int(hf["num_local_experts"]),
                   "experts_per_token": int(hf.get("num_experts_per_tok", 2))}
        try:
            return cls(
                name=name,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"),
                rope_theta=float(theta),
                rope_scaling=rs,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=(hf.get("sliding_window") if mt in ("mistral", "mixtral")
                                else None),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                **moe,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the required key {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that `from_hf` reads back and transformers understands."""
        mt = "mixtral" if self.is_moe else "mistral" if self.sliding_window else "llama"
        out: dict[str, Any] = {
            "model_type": mt,
            "architectures": [{"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM",
                               "llama": "LlamaForCausalLM"}[mt]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3",
                                   **dataclasses.asdict(self.rope_scaling)}
        if self.sliding_window:
            out["sliding_window"] = self.sliding_window
        if self.is_moe:
            out.update(num_local_experts=self.num_experts,
                       num_experts_per_tok=self.experts_per_token,
                       sliding_window=self.sliding_window)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


_LLAMA3_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)

SMOLLM2_135M = LlamaConfig(
    name="SmolLM2-135M", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
LLAMA32_1B = LlamaConfig(
    name="Llama-3.2-1B", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
    num_layers=16, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
    rope_scaling=_LLAMA3_SCALING, tie_word_embeddings=True, max_position_embeddings=131072,
    bos_token_id=128000, eos_token_id=128001)
LLAMA3_8B = LlamaConfig(
    name="Llama-3-8B", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
LLAMA3_70B = LlamaConfig(
    name="Llama-3-70B", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
    num_layers=80, num_heads=64, num_kv_heads=8, rope_theta=500000.0,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
# shapes for capacity plans (scripts/capacity_plan.py); Llama 3.1's rope scaling
LLAMA31_405B = LlamaConfig(
    name="Llama-3.1-405B", vocab_size=128256, hidden_size=16384, intermediate_size=53248,
    num_layers=126, num_heads=128, num_kv_heads=8, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)
LLAMA2_7B = LlamaConfig(
    name="Llama-2-7B", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_layers=32, num_heads=32, num_kv_heads=32, max_position_embeddings=4096)
MISTRAL_7B = LlamaConfig(
    name="Mistral-7B", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, sliding_window=4096,
    max_position_embeddings=32768)
MIXTRAL_8X7B = LlamaConfig(
    name="Mixtral-8x7B", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1e6, max_position_embeddings=32768,
    num_experts=8, experts_per_token=2)
# A small model for tests: GQA, untied, every code path, milliseconds to run.
TINY = LlamaConfig(
    name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=512)

PRESETS: dict[str, LlamaConfig] = {
    c.name: c for c in (SMOLLM2_135M, LLAMA32_1B, LLAMA3_8B, LLAMA3_70B, LLAMA31_405B,
                        LLAMA2_7B, MISTRAL_7B, MIXTRAL_8X7B, TINY)
}
# Published parameter counts (Hugging Face model cards / safetensors metadata).
PUBLISHED_PARAMS = {
    "SmolLM2-135M": 134_515_008,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3-70B": 70_553_706_496,
    "Llama-2-7B": 6_738_415_616,
    "Mistral-7B": 7_241_732_096,
    "Mixtral-8x7B": 46_702_792_704,
}


def rope_inv_freq(config: LlamaConfig):
    """Per-pair inverse frequencies (numpy float32, [head_dim // 2]), Llama-3 scaled if set."""
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32)
                                       / hd))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(is_mid, mid, out).astype(np.float32)
