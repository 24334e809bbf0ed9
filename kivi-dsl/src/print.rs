//! The canonical text of a layout: [`Layout::to_spec`] and `Display`.

use std::fmt;

use crate::layout::{GroupSize, Layout, TensorQuant};

impl GroupSize {
    /// The spelling in the spec language: the number of elements, or `per_block`.
    pub fn to_spec(self) -> String {
        match self {
            GroupSize::Elements(n) => n.to_string(),
            GroupSize::PerBlock => "per_block".to_string(),
        }
    }
}

impl TensorQuant {
    /// The canonical `{ ... }` block of this tensor, every field spelled out.
    pub fn to_spec(&self) -> String {
        format!(
            "{{ bits: {}, axis: {}, group_size: {}, head_dim: {}, quant: {}, scale_dtype: {}, rounding: {} }}",
            self.bits,
            self.axis.as_str(),
            self.group_size.to_spec(),
            self.head_dim,
            self.symmetry.as_str(),
            self.scale_dtype.as_str(),
            self.rounding.as_str(),
        )
    }
}

impl Layout {
    /// The canonical spec of this layout: one line, no presets, every field spelled out, in the order
    /// `keys, values, residual_length, sink_tokens, num_heads, num_kv_heads, dtype`. For a valid layout,
    /// `parse_spec(&l.to_spec()) == Ok(l)`.
    pub fn to_spec(&self) -> String {
        format!(
            "keys: {}, values: {}, residual_length: {}, sink_tokens: {}, num_heads: {}, num_kv_heads: {}, \
             dtype: {}",
            self.keys.to_spec(),
            self.values.to_spec(),
            self.residual_length,
            self.sink_tokens,
            self.num_heads,
            self.num_kv_heads,
            self.dtype.as_str(),
        )
    }
}

impl fmt::Display for Layout {
    /// Writes [`Layout::to_spec`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_spec())
    }
}
