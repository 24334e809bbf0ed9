//! `kivi_layout!` expands to the layout `parse_spec` gives for the same spec.

use kivi_dsl::{parse_spec, Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry};
use kivi_dsl_macros::kivi_layout;

const LLAMA3_KIVI2: Layout = kivi_layout!(kivi-2, llama-3-8b, residual_length: 64);

#[test]
fn fields_of_a_preset_combination_with_override() {
    let l = LLAMA3_KIVI2;
    assert_eq!(l.keys.bits, 2);
    assert_eq!(l.keys.axis, QuantAxis::PerChannel);
    assert_eq!(l.keys.group_size, GroupSize::Elements(32));
    assert_eq!(l.keys.head_dim, 128);
    assert_eq!(l.keys.symmetry, Symmetry::Asymmetric);
    assert_eq!(l.keys.scale_dtype, ScaleDtype::F16);
    assert_eq!(l.keys.rounding, Rounding::Half);
    assert_eq!(l.values.bits, 2);
    assert_eq!(l.values.axis, QuantAxis::PerToken);
    assert_eq!(l.values.group_size, GroupSize::Elements(32));
    assert_eq!(l.values.head_dim, 128);
    assert_eq!(l.residual_length, 64);
    assert_eq!(l.sink_tokens, 0);
    assert_eq!(l.num_heads, 32);
    assert_eq!(l.num_kv_heads, 8);
    assert_eq!(l.dtype, Dtype::F16);
    assert_eq!(
        l,
        parse_spec("kivi-2, llama-3-8b, residual_length: 64").unwrap()
    );
}

#[test]
fn every_preset_combination_matches_the_text_parser() {
    // rustfmt spaces out `kivi-2` to `kivi - 2` inside `kivi_layout!(...)`; both spellings parse.
    let pairs = [
        (kivi_layout!(kivi - 2, llama - 2 - 7b), "kivi-2, llama-2-7b"),
        (kivi_layout!(llama - 3 - 8b, kivi - 4), "llama-3-8b, kivi-4"),
        (kivi_layout!(mistral - 7b, kivi - 2,), "mistral-7b, kivi-2,"),
        (
            kivi_layout!(kivi - 4, smollm2 - 135m),
            "kivi-4, smollm2-135m",
        ),
    ];
    for (macro_layout, text) in pairs {
        assert_eq!(macro_layout, parse_spec(text).unwrap(), "{text}");
    }
}

#[test]
fn explicit_spec_without_presets() {
    let l = kivi_layout!(
        keys: { bits: 4, axis: per_channel, group_size: 64 },   // comments are fine
        values: { bits: 8, group_size: 16, head_dim: 64 },
        head_dim: 64,
        residual_length: 256,
        num_heads: 12, num_kv_heads: 4,
        dtype: fp16, scale_dtype: fp16, rounding: half, quant: asymmetric,
    );
    assert_eq!(l.keys.bits, 4);
    assert_eq!(l.keys.group_size, GroupSize::Elements(64));
    assert_eq!(l.values.bits, 8);
    assert_eq!(l.values.group_size, GroupSize::Elements(16));
    assert_eq!((l.keys.head_dim, l.values.head_dim), (64, 64));
    assert_eq!(l.residual_length, 256);
    assert_eq!((l.num_heads, l.num_kv_heads), (12, 4));
    l.check_supported().unwrap();
}
