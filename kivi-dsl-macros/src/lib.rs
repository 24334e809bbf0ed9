//! `kivi_layout!`: a kivi layout spec checked at compile time.
//!
//! The macro takes the same grammar as `kivi_dsl::parse_spec` (presets, `field: value` items, later items
//! override earlier ones), runs `Layout::validate` and `Layout::check_supported` while compiling, and expands
//! to a `::kivi_dsl::Layout` struct literal (usable in `const` items). Mistakes are compile errors at the
//! offending tokens.
//!
//! ```
//! use kivi_dsl_macros::kivi_layout;
//!
//! const LAYOUT: kivi_dsl::Layout = kivi_layout!(kivi-2, llama-3-8b, residual_length: 64);
//! assert_eq!(LAYOUT.keys.bits, 2);
//! assert_eq!(LAYOUT.num_heads, 32);
//! assert_eq!(LAYOUT.num_kv_heads, 8);
//! assert_eq!(LAYOUT.residual_length, 64);
//! assert_eq!(LAYOUT, kivi_dsl::parse_spec("kivi-2, llama-3-8b, residual_length: 64").unwrap());
//! ```
//!
//! An unknown preset does not compile:
//! ```compile_fail
//! let l = kivi_dsl_macros::kivi_layout!(kivi-2, llama-9);
//! ```
//! Nor does an impossible layout (a group size of 48 is not a power of two):
//! ```compile_fail
//! let l = kivi_dsl_macros::kivi_layout!(kivi-2, llama-3-8b, keys: { group_size: 48 });
//! ```
//! Nor a valid one the code generator does not emit yet (5-bit codes):
//! ```compile_fail
//! let l = kivi_dsl_macros::kivi_layout!(kivi-2, llama-3-8b, keys: { bits: 5 });
//! ```
//! Nor a spec with a mandatory field missing (no quantization preset, no bits):
//! ```compile_fail
//! let l = kivi_dsl_macros::kivi_layout!(llama-3-8b);
//! ```
//! Nor a syntax error (missing `:`):
//! ```compile_fail
//! let l = kivi_dsl_macros::kivi_layout!(kivi-2, llama-3-8b, residual_length 64);
//! ```

#![warn(missing_docs)]

use kivi_dsl::{Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry, TensorQuant};
use proc_macro2::TokenStream;
use quote::quote;

/// Parses a kivi layout spec at compile time and expands to a `::kivi_dsl::Layout` struct literal.
///
/// Input: the spec grammar of `kivi_dsl::parse_spec`, e.g. `kivi_layout!(kivi-2, llama-3-8b, residual_length:
/// 64)`. The layout must pass `Layout::validate` and `Layout::check_supported`.
///
/// # Errors
/// A compile error spanning the offending tokens: a syntax error, an unknown field or preset, a missing
/// mandatory field, an impossible layout or one the code generator does not emit yet (pointed at where the
/// field was last set).
#[proc_macro]
pub fn kivi_layout(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    match kivi_dsl::parse_tokens_supported(input.into()) {
        Ok(layout) => expand(&layout).into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(l: &Layout) -> TokenStream {
    let keys = expand_tensor(&l.keys);
    let values = expand_tensor(&l.values);
    let (residual_length, sink_tokens, num_heads, num_kv_heads) = (
        l.residual_length,
        l.sink_tokens,
        l.num_heads,
        l.num_kv_heads,
    );
    let dtype = match l.dtype {
        Dtype::F16 => quote!(F16),
        Dtype::Bf16 => quote!(Bf16),
    };
    quote! {
        ::kivi_dsl::Layout {
            keys: #keys,
            values: #values,
            residual_length: #residual_length,
            sink_tokens: #sink_tokens,
            num_heads: #num_heads,
            num_kv_heads: #num_kv_heads,
            dtype: ::kivi_dsl::Dtype::#dtype,
        }
    }
}

fn expand_tensor(t: &TensorQuant) -> TokenStream {
    let (bits, head_dim) = (t.bits, t.head_dim);
    let axis = match t.axis {
        QuantAxis::PerChannel => quote!(PerChannel),
        QuantAxis::PerToken => quote!(PerToken),
    };
    let group_size = match t.group_size {
        GroupSize::Elements(n) => quote!(::kivi_dsl::GroupSize::Elements(#n)),
        GroupSize::PerBlock => quote!(::kivi_dsl::GroupSize::PerBlock),
    };
    let symmetry = match t.symmetry {
        Symmetry::Asymmetric => quote!(Asymmetric),
        Symmetry::Symmetric => quote!(Symmetric),
    };
    let scale_dtype = match t.scale_dtype {
        ScaleDtype::F16 => quote!(F16),
        ScaleDtype::Bf16 => quote!(Bf16),
        ScaleDtype::F32 => quote!(F32),
    };
    let rounding = match t.rounding {
        Rounding::Half => quote!(Half),
        Rounding::F32 => quote!(F32),
    };
    quote! {
        ::kivi_dsl::TensorQuant {
            bits: #bits,
            axis: ::kivi_dsl::QuantAxis::#axis,
            group_size: #group_size,
            head_dim: #head_dim,
            symmetry: ::kivi_dsl::Symmetry::#symmetry,
            scale_dtype: ::kivi_dsl::ScaleDtype::#scale_dtype,
            rounding: ::kivi_dsl::Rounding::#rounding,
        }
    }
}
