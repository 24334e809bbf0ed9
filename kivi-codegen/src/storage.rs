//! The device storage layout of a KIVI cache, shared by the kernels and the runtime.

use kivi_dsl::Layout;

/// Sizes and strides of the block-major device layout of a KIVI cache, derived from a [`Layout`].
///
/// A *sequence* is one (batch, KV head) pair. Its quantized tokens live in *blocks* of `residual_length` (R)
/// tokens, so one key flush fills exactly one block and a block table can later index blocks anywhere:
/// - key codes: per block `[head_dim][R / key_codes_per_word]` u32 (per-channel: a channel's codes run along
///   tokens, `32 / bits` per word, code j in bits `[bits*j, bits*j + bits)`, as the reference packs them);
///   key scale and min: per block `[head_dim][R / key_group_size]` fp16.
/// - value codes: per block `[R][head_dim / value_codes_per_word]` u32 (per-token: a token's codes run along
///   head_dim); value scale and min: per block `[R][head_dim / value_group_size]` fp16.
/// - key residual ring: per sequence `[R][head_dim]` fp16, token at position p in row `p % R`.
/// - value residual ring: per sequence `[R + 1][head_dim]` fp16, token p in row `p % (R + 1)` (the reference
///   holds R + 1 full-precision values between an append and the flush of the oldest one).
///
/// Block `i` of sequence `s` is block `s * blocks_per_seq + i` of each pool (an identity block table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageLayout {
    /// Channels per head.
    pub head_dim: u32,
    /// R: tokens per block and per key flush.
    pub residual_length: u32,
    /// Key codes per u32 word.
    pub key_codes_per_word: u32,
    /// Key group size in tokens.
    pub key_group_size: u32,
    /// Key groups per channel per block (R / key_group_size).
    pub key_groups_per_channel: u32,
    /// Key code words per channel per block (R / key_codes_per_word).
    pub key_words_per_channel: u32,
    /// Value codes per u32 word.
    pub value_codes_per_word: u32,
    /// Value group size in head-dim entries.
    pub value_group_size: u32,
    /// Value groups per token (head_dim / value_group_size).
    pub value_groups_per_token: u32,
    /// Value code words per token (head_dim / value_codes_per_word).
    pub value_words_per_token: u32,
    /// Rows of the value residual ring (R + 1).
    pub value_ring: u32,
}

impl StorageLayout {
    /// The storage layout of a layout that passed `check_supported` (bits dividing 32, groups dividing R and
    /// head_dim; other layouts give meaningless numbers).
    pub fn new(layout: &Layout) -> Self {
        let r = layout.residual_length;
        let key_group_size = layout.keys.group_elems(r);
        let value_group_size = layout.values.group_elems(r);
        let head_dim = layout.keys.head_dim;
        StorageLayout {
            head_dim,
            residual_length: r,
            key_codes_per_word: layout.keys.codes_per_word(),
            key_group_size,
            key_groups_per_channel: r / key_group_size,
            key_words_per_channel: r / layout.keys.codes_per_word(),
            value_codes_per_word: layout.values.codes_per_word(),
            value_group_size,
            value_groups_per_token: head_dim / value_group_size,
            value_words_per_token: head_dim / layout.values.codes_per_word(),
            value_ring: r + 1,
        }
    }

    /// u32 words of key codes per block.
    pub fn key_block_words(&self) -> u32 {
        self.head_dim * self.key_words_per_channel
    }

    /// Key scales (and, separately, mins) per block.
    pub fn key_block_params(&self) -> u32 {
        self.head_dim * self.key_groups_per_channel
    }

    /// u32 words of value codes per block.
    pub fn value_block_words(&self) -> u32 {
        self.residual_length * self.value_words_per_token
    }

    /// Value scales (and, separately, mins) per block.
    pub fn value_block_params(&self) -> u32 {
        self.residual_length * self.value_groups_per_token
    }

    /// Blocks a sequence needs for `capacity` tokens (every quantized token lies in a block).
    pub fn blocks_for(&self, capacity: u32) -> u32 {
        capacity.div_ceil(self.residual_length)
    }

    /// Device bytes of one sequence (one batch entry x one KV head) with `capacity` tokens: codes, scales and
    /// mins of keys and values, plus both residual rings (fp16 is 2 bytes).
    pub fn bytes_per_sequence(&self, capacity: u32) -> u64 {
        let blocks = u64::from(self.blocks_for(capacity));
        let per_block = 4 * u64::from(self.key_block_words() + self.value_block_words())
            + 2 * 2 * u64::from(self.key_block_params() + self.value_block_params());
        let rings =
            2 * u64::from(self.head_dim) * u64::from(self.residual_length + self.value_ring);
        blocks * per_block + rings
    }
}
