//! Shared test helpers: hand-built layouts and random fp16 data.

#![allow(dead_code)]

use half::f16;
use kivi_dsl::{Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry, TensorQuant};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The paper's layout: keys per-channel (group `g` tokens), values per-token (group `g` entries), asymmetric,
/// fp16 scales, half rounding, fp16 activations.
pub fn layout(k_bits: u32, v_bits: u32, g: u32, r: u32, d: u32, h: u32, hkv: u32) -> Layout {
    let tq = |bits, axis| TensorQuant {
        bits,
        axis,
        group_size: GroupSize::Elements(g),
        head_dim: d,
        symmetry: Symmetry::Asymmetric,
        scale_dtype: ScaleDtype::F16,
        rounding: Rounding::Half,
    };
    Layout {
        keys: tq(k_bits, QuantAxis::PerChannel),
        values: tq(v_bits, QuantAxis::PerToken),
        residual_length: r,
        sink_tokens: 0,
        num_heads: h,
        num_kv_heads: hkv,
        dtype: Dtype::F16,
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` fp16 values uniform in `[-a, a]`.
pub fn rand_f16(r: &mut StdRng, n: usize, a: f32) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(r.gen_range(-a..=a))).collect()
}

pub fn h(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
