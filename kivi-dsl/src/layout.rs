//! The validated-layout data model: what a kivi spec describes.
//!
//! A [`Layout`] is plain data. Build one from text with [`crate::parse_spec`], at compile time with
//! `kivi_dsl_macros::kivi_layout!`, or by hand; in every case call [`Layout::validate`] (the parsers do) before
//! giving it to code generation.

use serde::{Deserialize, Serialize};

/// Which axis a quantization group runs along (KIVI, Liu et al., ICML 2024, section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuantAxis {
    /// A group is `group_size` consecutive tokens of one channel (the paper's choice for keys).
    PerChannel,
    /// A group is `group_size` consecutive head-dim entries of one token (the paper's choice for values).
    PerToken,
}

/// Asymmetric (scale and zero point/min per group, the paper's choice) or symmetric (scale only) quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Symmetry {
    /// `x ~= code * scale + min`, codes in `[0, 2^bits - 1]`.
    Asymmetric,
    /// `x ~= (code - 2^(bits-1)) * scale`, no min stored.
    Symmetric,
}

/// Storage type of a group's scale (and min).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScaleDtype {
    /// IEEE binary16 (the reference's choice).
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE binary32.
    F32,
}

/// How the quantization arithmetic rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rounding {
    /// The reference's: every step (`max - min`, `/ (2^bits - 1)`, `x - min`, `/ scale`) is rounded to fp16,
    /// the code rounds half to even. Bit-exact with the paper's code.
    Half,
    /// Every step in fp32, the code rounds half to even.
    F32,
}

/// The activation dtype of queries, keys, values, the full-precision residual and the attention output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

/// The size of a quantization group along its axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GroupSize {
    /// `n` elements per group along the axis (tokens for per-channel, head-dim entries for per-token).
    Elements(u32),
    /// One group per whole flush block (per-channel: `residual_length` tokens of a channel) or per whole token
    /// (per-token: all `head_dim` entries).
    PerBlock,
}

/// Quantization of one tensor (keys or values) of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorQuant {
    /// Bits per code, 1..=8.
    pub bits: u32,
    /// Axis of a group.
    pub axis: QuantAxis,
    /// Group size along `axis`.
    pub group_size: GroupSize,
    /// Channels per head of this tensor.
    pub head_dim: u32,
    /// Asymmetric or symmetric.
    pub symmetry: Symmetry,
    /// Storage type of scale and min.
    pub scale_dtype: ScaleDtype,
    /// Rounding of the quantization arithmetic.
    pub rounding: Rounding,
}

/// A whole KIVI cache layout: how keys and values are quantized, the full-precision residual window, the
/// attention head shape and the activation dtype.
///
/// The math is Algorithm 1 of KIVI (Liu et al., ICML 2024) as the paper's reference code implements it: keys
/// flush `residual_length` tokens at a time once that many full-precision keys exist, values flush their oldest
/// token once `residual_length + 1` full-precision values exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// Key quantization (paper: per-channel).
    pub keys: TensorQuant,
    /// Value quantization (paper: per-token).
    pub values: TensorQuant,
    /// R: tokens kept in full precision; keys quantize in blocks of R tokens (paper: 128).
    pub residual_length: u32,
    /// The first N tokens of a sequence kept in full precision (0: none, as in the paper).
    pub sink_tokens: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads (`num_heads / num_kv_heads` query heads share one; 1 is MQA).
    pub num_kv_heads: u32,
    /// Activation dtype.
    pub dtype: Dtype,
}

impl QuantAxis {
    /// The spelling in the spec language: `per_channel` or `per_token`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantAxis::PerChannel => "per_channel",
            QuantAxis::PerToken => "per_token",
        }
    }
}

impl Symmetry {
    /// The spelling in the spec language: `asymmetric` or `symmetric`.
    pub fn as_str(self) -> &'static str {
        match self {
            Symmetry::Asymmetric => "asymmetric",
            Symmetry::Symmetric => "symmetric",
        }
    }
}

impl ScaleDtype {
    /// The spelling in the spec language: `fp16`, `bf16` or `fp32`.
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleDtype::F16 => "fp16",
            ScaleDtype::Bf16 => "bf16",
            ScaleDtype::F32 => "fp32",
        }
    }
}

impl Rounding {
    /// The spelling in the spec language: `half` or `fp32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rounding::Half => "half",
            Rounding::F32 => "fp32",
        }
    }
}

impl Dtype {
    /// The spelling in the spec language: `fp16` or `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl TensorQuant {
    /// Codes stored in one 32-bit word (`32 / bits`, for bits dividing 32).
    pub fn codes_per_word(&self) -> u32 {
        32 / self.bits
    }

    /// The group size in elements along the axis, resolving [`GroupSize::PerBlock`] against the layout's
    /// residual length (per-channel) or this tensor's head_dim (per-token).
    pub fn group_elems(&self, residual_length: u32) -> u32 {
        match (self.group_size, self.axis) {
            (GroupSize::Elements(n), _) => n,
            (GroupSize::PerBlock, QuantAxis::PerChannel) => residual_length,
            (GroupSize::PerBlock, QuantAxis::PerToken) => self.head_dim,
        }
    }
}

impl Layout {
    /// Query heads per KV head (`num_heads / num_kv_heads`); 1 for MHA.
    pub fn gqa_ratio(&self) -> u32 {
        self.num_heads / self.num_kv_heads.max(1)
    }
}
