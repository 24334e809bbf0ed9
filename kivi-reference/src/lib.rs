//! kivi-reference: the CPU oracle of every kivi test.
//!
//! A plain, readable re-implementation of KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization
//! for KV Cache", ICML 2024), Algorithm 1, with the exact half-precision rounding of the paper's reference code:
//!
//! - [`dtype`]: the activation types (fp16, bf16) and rounding to a layout's formats.
//! - [`quant`]: quantize one group, pack/unpack codes, per-channel keys and per-token values, dequantize.
//! - [`cache`]: [`RefCache`], the streaming KV cache (prefill, decode steps with attention, flushes) and
//!   [`attention_exact`], unquantized attention.
//! - [`eval`]: the quantization error of any layout (and of an FP8 cache) on captured q/k/v, against exact
//!   attention.
//! - [`files`]: loaders for the reference data files (`tests/data/*.safetensors`) and [`check_stream`] /
//!   [`check_pack`], which replay a file's case through this crate and report how well it matches.
//!
//! Every function returns [`RefError`] on bad input (wrong lengths, unsupported layouts, malformed files); none
//! panics on user data.

#![warn(missing_docs)]

pub mod cache;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod files;
pub mod quant;

pub use cache::{attention_exact, attention_f32, CacheExport, RefCache};
pub use dtype::{Activation, Format};
pub use error::RefError;
pub use files::{
    check_pack, check_stream, data_dir, FileKind, PackCase, PackReport, PackValues, ReferenceFile,
    StreamCase, StreamReport, TensorDiff,
};
pub use quant::{
    check_bits, codes_per_pack, codes_per_word, dequantize, dequantize_keys_per_channel,
    dequantize_values_per_token, pack_codes, pack_codes_padded, packed_words, quantize_group,
    quantize_group_into, quantize_group_with, quantize_keys_per_channel,
    quantize_keys_per_channel_with, quantize_values_per_token, quantize_values_per_token_with,
    unpack_codes, value_words_per_token, GroupQuant, QuantGroup, QuantizedKeys, QuantizedValues,
    Rounding, Symmetry,
};
