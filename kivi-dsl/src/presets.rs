//! Named presets: model shapes (heads, head_dim) and KIVI quantization settings (bits, axes, groups, R).
//!
//! A spec may name one of each (in either order, e.g. `kivi-2, llama-3-8b`); each preset sets only its own
//! fields, and items later in the spec override earlier ones.

use crate::layout::{
    Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry, TensorQuant,
};

/// The attention shape of a model: what a model preset sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelPreset {
    /// The preset's name in a spec, e.g. `llama-3-8b`.
    pub name: &'static str,
    /// Query heads per layer.
    pub num_heads: u32,
    /// Key/value heads per layer.
    pub num_kv_heads: u32,
    /// Channels per head (sets both `keys.head_dim` and `values.head_dim`).
    pub head_dim: u32,
}

/// KIVI quantization settings: what a quantization preset sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantPreset {
    /// The preset's name in a spec, e.g. `kivi-2`.
    pub name: &'static str,
    /// Bits per key code.
    pub key_bits: u32,
    /// Axis of a key group (KIVI: per-channel).
    pub key_axis: QuantAxis,
    /// Key group size (tokens per group for per-channel).
    pub key_group_size: GroupSize,
    /// Bits per value code.
    pub value_bits: u32,
    /// Axis of a value group (KIVI: per-token).
    pub value_axis: QuantAxis,
    /// Value group size (head-dim entries per group for per-token).
    pub value_group_size: GroupSize,
    /// R, the full-precision residual window in tokens.
    pub residual_length: u32,
}

/// The model presets, in the order error messages list them.
pub const MODEL_PRESETS: &[ModelPreset] = &[
    ModelPreset {
        name: "llama-2-7b",
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
    },
    ModelPreset {
        name: "llama-3-8b",
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
    },
    ModelPreset {
        name: "mistral-7b",
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
    },
    ModelPreset {
        name: "smollm2-135m",
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    },
];

const fn kivi(name: &'static str, bits: u32) -> QuantPreset {
    QuantPreset {
        name,
        key_bits: bits,
        key_axis: QuantAxis::PerChannel,
        key_group_size: GroupSize::Elements(32),
        value_bits: bits,
        value_axis: QuantAxis::PerToken,
        value_group_size: GroupSize::Elements(32),
        residual_length: 128,
    }
}

/// The quantization presets (KIVI-2 and KIVI-4 as in the paper: G = 32, R = 128), in the order error messages
/// list them.
pub const QUANT_PRESETS: &[QuantPreset] = &[kivi("kivi-2", 2), kivi("kivi-4", 4)];

/// Looks up a model preset by name (ASCII case-insensitive); `None` if there is none of that name.
pub fn model_preset(name: &str) -> Option<&'static ModelPreset> {
    MODEL_PRESETS
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// Looks up a quantization preset by name (ASCII case-insensitive); `None` if there is none of that name.
pub fn quant_preset(name: &str) -> Option<&'static QuantPreset> {
    QUANT_PRESETS
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// All preset names, model presets first, comma separated: the list error messages show.
pub fn preset_names() -> String {
    MODEL_PRESETS
        .iter()
        .map(|p| p.name)
        .chain(QUANT_PRESETS.iter().map(|p| p.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The layout a model preset and a quantization preset give together, with the defaults for everything else
/// (asymmetric, fp16 scales, `half` rounding, fp16 activations, no sink tokens). `None` if either name is
/// unknown. Equal to `parse_spec("<quant>, <model>")`.
pub fn preset_layout(model: &str, quant: &str) -> Option<Layout> {
    Some(Layout::from_presets(
        model_preset(model)?,
        quant_preset(quant)?,
    ))
}

impl Layout {
    /// The layout of a model preset combined with a quantization preset, defaults for everything else (see
    /// [`preset_layout`]). Not validated: every built-in combination is valid.
    pub fn from_presets(model: &ModelPreset, quant: &QuantPreset) -> Layout {
        let tensor = |bits, axis, group_size| TensorQuant {
            bits,
            axis,
            group_size,
            head_dim: model.head_dim,
            symmetry: Symmetry::Asymmetric,
            scale_dtype: ScaleDtype::F16,
            rounding: Rounding::Half,
        };
        Layout {
            keys: tensor(quant.key_bits, quant.key_axis, quant.key_group_size),
            values: tensor(quant.value_bits, quant.value_axis, quant.value_group_size),
            residual_length: quant.residual_length,
            sink_tokens: 0,
            num_heads: model.num_heads,
            num_kv_heads: model.num_kv_heads,
            dtype: Dtype::F16,
        }
    }
}
