//! The two validation levels: [`Layout::validate`] (is the layout possible at all) and
//! [`Layout::check_supported`] (does the code generator emit it yet).

use crate::error::LayoutError;
use crate::layout::{GroupSize, Layout, QuantAxis, Symmetry, TensorQuant};

/// Largest accepted `residual_length`, tokens.
pub const MAX_RESIDUAL_LENGTH: u32 = 4096;
/// Largest accepted `sink_tokens`.
pub const MAX_SINK_TOKENS: u32 = 65536;
/// Accepted head_dim range (and head_dim must be a multiple of 16).
pub const HEAD_DIM_RANGE: std::ops::RangeInclusive<u32> = 16..=256;
/// Bit widths the code generator emits: 1, 2, 4 and 8 (a code never straddles a 16-bit half-word), and 3
/// (16 codes in three half-words: five in each, the sixteenth spread over their top bits; see kivi-codegen's
/// StorageLayout).
pub const SUPPORTED_BITS: [u32; 5] = [1, 2, 3, 4, 8];

/// Tokens of one key chunk of the device layout for `bits`-bit keys: 64 / bits for 1, 2, 4, 8; 64 for 3 (a
/// chunk holds 16 codes per half-word pack of each lane). kivi-codegen's StorageLayout uses the same.
pub fn key_chunk_tokens(bits: u32) -> u32 {
    if bits == 3 {
        64
    } else {
        64 / bits.max(1)
    }
}

/// The power-of-two group sizes dividing `n`, ascending (empty for 0).
pub fn dividing_group_sizes(n: u32) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    (0..=n.trailing_zeros()).map(|s| 1u32 << s).collect()
}

/// The per-token group sizes that would work for `head_dim`: the powers of two dividing `head_dim` that the
/// generator emits (at least 16), or all powers of two dividing it if none is that large.
fn working_group_sizes(head_dim: u32) -> Vec<u32> {
    let all = dividing_group_sizes(head_dim);
    let min = 16;
    let large: Vec<u32> = all.iter().copied().filter(|&g| g >= min).collect();
    if large.is_empty() {
        all
    } else {
        large
    }
}

fn tensor_names(t: &str) -> [&'static str; 4] {
    // bits, head_dim, group_size, tensor name
    if t == "keys" {
        ["keys.bits", "keys.head_dim", "keys.group_size", "keys"]
    } else {
        [
            "values.bits",
            "values.head_dim",
            "values.group_size",
            "values",
        ]
    }
}

impl Layout {
    /// Checks that the layout is possible: bits in 1..=8 (2..=8 when symmetric); at least one head and KV head, `num_heads` a multiple
    /// of `num_kv_heads`; each head_dim a multiple of 16 in 16..=256; each group size a power of two (not 0)
    /// that divides `residual_length` (per-channel groups) or that tensor's head_dim (per-token groups);
    /// `residual_length` in 1..=4096; `sink_tokens` at most 65536.
    ///
    /// # Errors
    /// The first rule broken, as a [`LayoutError`] naming the field and value.
    pub fn validate(&self) -> Result<(), LayoutError> {
        for (name, t) in [("keys", &self.keys), ("values", &self.values)] {
            let [bits, _, _, _] = tensor_names(name);
            if !(1..=8).contains(&t.bits) {
                return Err(LayoutError::BitsOutOfRange {
                    field: bits,
                    value: t.bits,
                });
            }
            if t.bits == 1 && t.symmetry == Symmetry::Symmetric {
                return Err(LayoutError::SymmetricOneBit { field: bits });
            }
        }
        if self.num_heads == 0 {
            return Err(LayoutError::ZeroHeads { field: "num_heads" });
        }
        if self.num_kv_heads == 0 {
            return Err(LayoutError::ZeroHeads {
                field: "num_kv_heads",
            });
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(LayoutError::HeadsNotMultiple {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
            });
        }
        for (name, t) in [("keys", &self.keys), ("values", &self.values)] {
            let [_, head_dim, _, _] = tensor_names(name);
            if t.head_dim % 16 != 0 || !HEAD_DIM_RANGE.contains(&t.head_dim) {
                return Err(LayoutError::BadHeadDim {
                    field: head_dim,
                    value: t.head_dim,
                });
            }
        }
        if self.residual_length == 0 || self.residual_length > MAX_RESIDUAL_LENGTH {
            return Err(LayoutError::ResidualOutOfRange {
                value: self.residual_length,
            });
        }
        for (name, t) in [("keys", &self.keys), ("values", &self.values)] {
            self.validate_group(name, t)?;
        }
        if self.sink_tokens > MAX_SINK_TOKENS {
            return Err(LayoutError::SinkTokensOutOfRange {
                value: self.sink_tokens,
            });
        }
        Ok(())
    }

    fn validate_group(&self, name: &str, t: &TensorQuant) -> Result<(), LayoutError> {
        let [_, _, group_field, tensor] = tensor_names(name);
        let GroupSize::Elements(g) = t.group_size else {
            return Ok(());
        };
        if g == 0 || !g.is_power_of_two() {
            return Err(LayoutError::BadGroupSize {
                field: group_field,
                value: g,
            });
        }
        match t.axis {
            QuantAxis::PerChannel if !self.residual_length.is_multiple_of(g) => {
                Err(LayoutError::ResidualNotMultipleOfGroup {
                    tensor: if tensor == "keys" { "key" } else { "value" },
                    residual_length: self.residual_length,
                    group_size: g,
                })
            }
            QuantAxis::PerToken if !t.head_dim.is_multiple_of(g) => {
                Err(LayoutError::HeadDimNotMultipleOfGroup {
                    tensor,
                    head_dim: t.head_dim,
                    group_size: g,
                    working: working_group_sizes(t.head_dim),
                })
            }
            _ => Ok(()),
        }
    }

    /// Checks that the code generator emits this layout: [`Layout::validate`] first, then bits 1, 2, 3, 4 or 8;
    /// keys per-channel and values per-token; numeric group sizes of at least 16 (a 16-row tile of the decode
    /// kernel's tensor-core fragments shares a group), or `per_block` where the block (residual_length for keys,
    /// head_dim for values) is a power of two; `residual_length` a multiple of `max(key chunk, 16)` (whole key
    /// chunks and value tiles per flush block; [`key_chunk_tokens`]: 64 / key bits, 64 for 3 bits). Symmetric
    /// or asymmetric quantization, either rounding, fp16 or bf16 activations, fp16, bf16 or fp32 scales, any
    /// number of sink tokens and different key and value head_dims are generated. One rule is left to the generator, which knows the
    /// storage: the decode iteration of one warp must fit 48 KiB of shared memory (kivi-codegen's
    /// `LayoutKernels::new` refuses it as [`LayoutError::NotYetSupported`] too; e.g. head_dim 256 with 3-bit keys
    /// and 8-bit values).
    ///
    /// # Errors
    /// A [`LayoutError`] from `validate`, or [`LayoutError::NotYetSupported`] for the first unsupported choice.
    pub fn check_supported(&self) -> Result<(), LayoutError> {
        self.validate()?;
        let unsupported = |what: String| Err(LayoutError::NotYetSupported { what });
        let tensors = [("keys", &self.keys), ("values", &self.values)];
        for (name, t) in tensors {
            if !SUPPORTED_BITS.contains(&t.bits) {
                return unsupported(format!(
                    "{name}.bits {} (the generator emits 1, 2, 3, 4 or 8 bits)",
                    t.bits
                ));
            }
        }
        if self.keys.axis != QuantAxis::PerChannel {
            return unsupported(format!(
                "keys.axis {} (keys are quantized per_channel only)",
                self.keys.axis.as_str()
            ));
        }
        if self.values.axis != QuantAxis::PerToken {
            return unsupported(format!(
                "values.axis {} (values are quantized per_token only)",
                self.values.axis.as_str()
            ));
        }
        for (name, t) in tensors {
            match t.group_size {
                // One scale and min per flush block of a key channel (R tokens) or per value token (head_dim
                // channels): the kernels of the numeric group of that size.
                GroupSize::PerBlock => {
                    let g = t.group_elems(self.residual_length);
                    if !g.is_power_of_two() {
                        let of = match t.axis {
                            QuantAxis::PerChannel => "residual_length",
                            QuantAxis::PerToken => "head_dim",
                        };
                        return unsupported(format!(
                            "{name}.group_size per_block with {of} {g} (the kernels group a power of two of \
                             elements: use a {of} that is one, or a number of elements)"
                        ));
                    }
                }
                GroupSize::Elements(g) if g < 16 => {
                    return unsupported(format!(
                        "{name}.group_size {g} (the decode kernel needs groups of at least 16 elements: one \
                         16-row tile of its tensor-core fragments shares a group)"
                    ));
                }
                GroupSize::Elements(_) => {}
            }
        }
        let unit = key_chunk_tokens(self.keys.bits).max(16);
        if !self.residual_length.is_multiple_of(unit) {
            return unsupported(format!(
                "residual_length {} with {}-bit keys (a flush block must hold whole key chunks and value tiles: \
                 use a multiple of {unit})",
                self.residual_length, self.keys.bits
            ));
        }
        Ok(())
    }
}
