//! kivi-dsl: the layout language of kivi.
//!
//! One grammar, parsed with `syn`, serves the `kivi_layout!` proc-macro (crate `kivi-dsl-macros`) and text
//! specs read at run time (`.kivi` files, command-line strings). See the README's "Spec format".
//!
//! ```
//! let layout = kivi_dsl::parse_spec("kivi-2, llama-3-8b, residual_length: 64").unwrap();
//! assert_eq!(layout.keys.bits, 2);
//! assert_eq!(layout.num_kv_heads, 8);
//! assert_eq!(layout.residual_length, 64);
//! layout.check_supported().unwrap();
//! assert_eq!(layout.to_spec().parse::<kivi_dsl::Layout>().unwrap(), layout);
//! ```

#![warn(missing_docs)]

mod error;
mod layout;
mod parse;
mod presets;
mod print;
mod validate;

#[cfg(test)]
mod tests;

pub use error::{LayoutError, SpecError};
pub use layout::*;
pub use parse::{
    parse_spec, parse_spec_supported, parse_tokens, parse_tokens_supported, TENSOR_FIELDS,
    TOP_LEVEL_FIELDS,
};
pub use presets::{
    model_preset, preset_layout, preset_names, quant_preset, ModelPreset, QuantPreset,
    MODEL_PRESETS, QUANT_PRESETS,
};
pub use validate::{
    dividing_group_sizes, key_chunk_tokens, HEAD_DIM_RANGE, MAX_RESIDUAL_LENGTH, MAX_SINK_TOKENS,
    SUPPORTED_BITS,
};
