//! The device storage layout of a KIVI cache, shared by the kernels and the runtime.
//!
//! Codes are stored in the order the decode kernel's tensor-core fragments want them, so that a lane loads its
//! operands with a few 16-byte loads and turns two codes into an fp16 pair with one LOP3 and one HFMA2 (the
//! "magic number" conversion: `0x6400 | code` is the fp16 number `1024 + code`). The decode kernel computes
//! scores with `mma.sync.m16n8k16` (fp16 in, fp32 accumulate): `S[head][token] = Q[head][d] x K^T[d][token]`
//! with the keys as operand B, and `O^T[d][head] = V^T[d][token] x P[token][head]` with the values as operand A.
//! In both, lane `4g + q` of a warp (g = 0..8, q = 0..4) holds fp16 pairs along the reduction dimension, and a
//! 32-bit code word splits into two 16-bit halves that become the two fp16 numbers of one pair.

use kivi_dsl::Layout;

/// Sizes and strides of the block-major device layout of a KIVI cache, derived from a [`Layout`].
///
/// A *sequence* is one (batch, KV head) pair. Its quantized tokens live in *blocks* of `residual_length` (R)
/// tokens, so one key flush fills exactly one block and a block table can later index blocks anywhere. Block
/// `i` of sequence `s` is block `s * blocks_per_seq + i` of each pool (an identity block table).
///
/// **Key codes** (b bits, per-channel groups along tokens): a block is cut into *key chunks* of
/// [`StorageLayout::key_chunk_tokens`] = 64 / b tokens; a chunk is `[lane 32][head_dim / 16]` u32 words. Word
/// `c` of lane `4g + q` holds, for channels `16c + 2q + 8s + e` (s, e in 0..2) and tokens `8j + g` of the chunk
/// (j in 0..8/b), the code of (token `8j + g`, channel `16c + 2q + 8s + e`) in bits
/// `[16e + b(2j + s), +b)`: the low half holds even channels, the high half odd ones. See
/// [`StorageLayout::key_code_position`].
///
/// **3-bit codes** fill *packs* of three u32 words that hold 16 codes per half (e): slots 0..15 of a half, slot
/// `k < 15` in word `k / 5` at bits `[16e + 3(k % 5), +3)`, slot 15 spread over bit `16e + 15` of the three
/// words (its bit i in word i). Nothing is wasted where whole packs are used. Keys: a chunk has 64 tokens (j in
/// 0..8, slot `2j + s`) and is `[lane 32][head_dim / 16][3]` words. Values: code `n` of a token pair (below)
/// sits in pack `n / 16`, slot `n % 16`; a last pack of fewer than 16 codes uses only the words its slots need.
///
/// **Key mins and scales** (the keys' scale dtype: fp16 by default, bf16 or fp32; one each per channel and group
/// of `key_group_size` tokens), one buffer: per group of a block, `[q 4][head_dim / 16][min s=0, scale s=0, min
/// s=1, scale s=1][e 2]`: the four pairs a lane needs per 16-channel step are one aligned 16-byte quad (32
/// bytes for fp32), and the mins of both channel sets sit where an mma's A operand wants them
/// ([`StorageLayout::key_param_index`]).
///
/// **Value codes** (per-token groups along head_dim): a block is cut into *value tiles* of 16 tokens; a tile is
/// `[lane 32][value_words_per_lane]` u32. Lane `4g + q` holds the token pairs `(2q + 8p, 2q + 8p + 1)` (p in
/// 0..2; the even token in the low half of a word, the odd one in the high half) at the channels
/// `16i + 8u + g`; pair p's `head_dim / 8` codes (index `n = 2i + u`) fill `value_words_per_pair` words,
/// `16 / b` codes per half-word, so every 16-bit half-word belongs to one token (padding where `head_dim / 8`
/// is not a multiple of `16 / b`). See [`StorageLayout::value_code_position`].
///
/// **Value scales and mins** (the values' scale dtype, one per token and group of `value_group_size` channels):
/// per value tile,
/// `[q 4][p 2][head_dim / value_group_size][e 2]` ([`StorageLayout::value_param_index`]).
///
/// Keys and values may have different head_dims: "head_dim" above means the keys' for key storage and the
/// values' for value storage.
///
/// **Residual rings** (the activation dtype, fp16 or bf16, row-major): keys `[R][head_dim]` per sequence, token at position p in row `p % R`;
/// values `[R + 1][head_dim]`, token p in row `p % (R + 1)` (the reference holds R + 1 full-precision values
/// between an append and the flush of the oldest one).
///
/// **Sink tokens** (S = `sink_tokens`, the activation dtype, never quantized): the first S tokens of a sequence sit in S more rows
/// after each ring, so a sequence's key rows are `[R + S][head_dim]` and its value rows `[R + 1 + S][head_dim]`,
/// sink i in row `R + i` (keys) and `R + 1 + i` (values). Positions p above count the tokens after the sinks:
/// Algorithm 1 runs on them as if the sinks were not there (the reference's semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageLayout {
    /// Channels per key head (and per query head).
    pub key_head_dim: u32,
    /// Channels per value head (and per output row).
    pub value_head_dim: u32,
    /// R: tokens per block and per key flush.
    pub residual_length: u32,
    /// Key bits.
    pub key_bits: u32,
    /// Key group size in tokens.
    pub key_group_size: u32,
    /// Value bits.
    pub value_bits: u32,
    /// Value group size in head-dim entries.
    pub value_group_size: u32,
    /// Rows of the value residual ring (R + 1).
    pub value_ring: u32,
    /// S: sink tokens per sequence (rows after each ring, of the activation dtype).
    pub sink_tokens: u32,
    /// Bytes of one key scale or min: 2 (fp16, bf16) or 4 (fp32).
    pub key_param_bytes: u32,
    /// Bytes of one value scale or min: 2 (fp16, bf16) or 4 (fp32).
    pub value_param_bytes: u32,
    /// Bytes of one activation (query, key, value, residual row entry, output): 2 (fp16 and bf16).
    pub act_bytes: u32,
}

/// Bytes of one number of a scale dtype.
fn param_bytes(d: kivi_dsl::ScaleDtype) -> u32 {
    match d {
        kivi_dsl::ScaleDtype::F16 | kivi_dsl::ScaleDtype::Bf16 => 2,
        kivi_dsl::ScaleDtype::F32 => 4,
    }
}

/// Where one code lives: the u32 word (counted from the start of its block) and the bit of its lowest bit; or,
/// for slot 15 of a 3-bit pack, its bit i at bit `bit` of word `word + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodePosition {
    /// Word index within the block (of the code's lowest bit).
    pub word: usize,
    /// Bit offset of the code's least significant bit in that word.
    pub bit: u32,
    /// The code's bits lie in consecutive words, one each, all at `bit` (slot 15 of a 3-bit pack).
    pub spread: bool,
}

impl CodePosition {
    fn at(word: u32, bit: u32) -> Self {
        CodePosition {
            word: word as usize,
            bit,
            spread: false,
        }
    }

    /// The (word, bit) of each of the code's `bits` bits, lowest first.
    pub fn bit_positions(&self, bits: u32) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..bits).map(move |i| {
            if self.spread {
                (self.word + i as usize, self.bit)
            } else {
                (self.word, self.bit + i)
            }
        })
    }

    /// The `bits`-bit code at this position of `words` (a block's words; `words` must reach it).
    pub fn read(&self, words: &[u32], bits: u32) -> u32 {
        self.bit_positions(bits)
            .enumerate()
            .fold(0, |code, (i, (w, b))| code | (((words[w] >> b) & 1) << i))
    }
}

/// The (word within the pack, bit within its half) of slot `k` (0..16) of a 3-bit pack, and whether the slot is
/// the spread one.
fn pack3_slot(k: u32) -> (u32, u32, bool) {
    if k < 15 {
        (k / 5, 3 * (k % 5), false)
    } else {
        (0, 15, true)
    }
}

impl StorageLayout {
    /// The storage layout of a layout that passed `check_supported` (bits 1, 2, 3, 4 or 8, groups of at least 16
    /// dividing R and head_dim, R a multiple of [`StorageLayout::key_chunk_tokens`] and of 16; other layouts
    /// give meaningless numbers).
    pub fn new(layout: &Layout) -> Self {
        let r = layout.residual_length;
        StorageLayout {
            key_head_dim: layout.keys.head_dim,
            value_head_dim: layout.values.head_dim,
            residual_length: r,
            key_bits: layout.keys.bits,
            key_group_size: layout.keys.group_elems(r),
            value_bits: layout.values.bits,
            value_group_size: layout.values.group_elems(r),
            value_ring: r + 1,
            sink_tokens: layout.sink_tokens,
            key_param_bytes: param_bytes(layout.keys.scale_dtype),
            value_param_bytes: param_bytes(layout.values.scale_dtype),
            act_bytes: 2,
        }
    }

    /// Full-precision key rows per sequence: the ring's R, then the S sink tokens.
    pub fn key_res_rows(&self) -> u32 {
        self.residual_length + self.sink_tokens
    }

    /// Full-precision value rows per sequence: the ring's R + 1, then the S sink tokens.
    pub fn value_res_rows(&self) -> u32 {
        self.value_ring + self.sink_tokens
    }

    /// Key codes per 16-bit half-word (16 / key bits; 5 for 3 bits, whose packs hold 16 per three halves).
    pub fn key_codes_per_half(&self) -> u32 {
        16 / self.key_bits
    }

    /// Tokens of one key chunk: 8 rows of an mma n-tile times the `8 / bits` tokens a lane keeps per word (per
    /// pack of three words for 3 bits: 64 tokens).
    pub fn key_chunk_tokens(&self) -> u32 {
        kivi_dsl::key_chunk_tokens(self.key_bits)
    }

    /// 16-channel k-steps of the score mma (key head_dim / 16), despite the name: a lane keeps this many times
    /// [`StorageLayout::key_words_per_step`] code words per chunk (three times as many words for 3 bits).
    pub fn key_words_per_lane(&self) -> u32 {
        self.key_head_dim / 16
    }

    /// Code words of one lane per 16-channel step and chunk: 1, or 3 (one pack) for 3-bit keys.
    pub fn key_words_per_step(&self) -> u32 {
        if self.key_bits == 3 {
            3
        } else {
            1
        }
    }

    /// Key groups per block (R / key_group_size).
    pub fn key_groups_per_block(&self) -> u32 {
        self.residual_length / self.key_group_size
    }

    /// Value codes per 16-bit half-word (16 / value bits; 5 for 3 bits, whose packs hold 16 per three halves).
    pub fn value_codes_per_half(&self) -> u32 {
        16 / self.value_bits
    }

    /// u32 words per lane per value tile for one token pair: ceil((head_dim / 8) / codes per half-word); for 3
    /// bits, three per whole pack of 16 codes and ceil(rest / 5) for the rest.
    pub fn value_words_per_pair(&self) -> u32 {
        let n = self.value_head_dim / 8;
        if self.value_bits == 3 {
            3 * (n / 16) + (n % 16).div_ceil(5)
        } else {
            n.div_ceil(self.value_codes_per_half())
        }
    }

    /// u32 words per lane per value tile (two token pairs).
    pub fn value_words_per_lane(&self) -> u32 {
        2 * self.value_words_per_pair()
    }

    /// Value groups per token (value head_dim / value_group_size).
    pub fn value_groups_per_token(&self) -> u32 {
        self.value_head_dim / self.value_group_size
    }

    /// u32 words of key codes per block.
    pub fn key_block_words(&self) -> u32 {
        self.residual_length / self.key_chunk_tokens()
            * 32
            * self.key_words_per_lane()
            * self.key_words_per_step()
    }

    /// Numbers (of the keys' scale dtype) of the key parameter buffer per block: a min and a scale per channel
    /// and group.
    pub fn key_block_params(&self) -> u32 {
        2 * self.key_head_dim * self.key_groups_per_block()
    }

    /// u32 words of value codes per block.
    pub fn value_block_words(&self) -> u32 {
        self.residual_length / 16 * 32 * self.value_words_per_lane()
    }

    /// Value scales (and, separately, mins) per block, numbers of the values' scale dtype.
    pub fn value_block_params(&self) -> u32 {
        self.residual_length * self.value_groups_per_token()
    }

    /// Blocks a sequence needs for `capacity` tokens (every quantized token lies in a block; the sink tokens do
    /// not).
    pub fn blocks_for(&self, capacity: u32) -> u32 {
        capacity
            .saturating_sub(self.sink_tokens)
            .div_ceil(self.residual_length)
            .max(1)
    }

    /// Tokens of a sequence of `len` that Algorithm 1 sees (those after the sink tokens).
    pub fn after_sinks(&self, len: u32) -> u32 {
        len.saturating_sub(self.sink_tokens)
    }

    /// Quantized keys of a sequence of `len` tokens: the whole blocks of R among its tokens after the sinks.
    pub fn quantized_keys(&self, len: u32) -> u32 {
        let n = self.after_sinks(len);
        n - n % self.residual_length
    }

    /// Quantized values of a sequence of `len` tokens: all but the newest R of its tokens after the sinks.
    pub fn quantized_values(&self, len: u32) -> u32 {
        self.after_sinks(len).saturating_sub(self.residual_length)
    }

    /// The key code of token `t` (0..R, within its block) and channel `d`.
    pub fn key_code_position(&self, t: u32, d: u32) -> CodePosition {
        let kc = self.key_chunk_tokens();
        let (chunk, tc) = (t / kc, t % kc);
        let (j, g) = (tc / 8, tc % 8);
        let (c, r) = (d / 16, d % 16);
        let (s, q, e) = (r / 8, (r % 8) / 2, r % 2);
        let lane = 4 * g + q;
        let kws = self.key_words_per_step();
        let word = ((chunk * 32 + lane) * self.key_words_per_lane() + c) * kws;
        let slot = 2 * j + s;
        if self.key_bits == 3 {
            let (w, bit, spread) = pack3_slot(slot);
            return CodePosition {
                spread,
                ..CodePosition::at(word + w, 16 * e + bit)
            };
        }
        CodePosition::at(word, 16 * e + self.key_bits * slot)
    }

    /// The indices (within its block's key parameters) of the (scale, min) of token `t` (0..R), channel `d`.
    pub fn key_param_index(&self, t: u32, d: u32) -> (usize, usize) {
        let gi = t / self.key_group_size;
        let (c, r) = (d / 16, d % 16);
        let (s, q, e) = (r / 8, (r % 8) / 2, r % 2);
        let quad = ((gi * 4 + q) * self.key_words_per_lane() + c) * 4 + 2 * s;
        (((quad + 1) * 2 + e) as usize, (quad * 2 + e) as usize)
    }

    /// The value code of token `t` (0..R, within its block) and channel `d`.
    pub fn value_code_position(&self, t: u32, d: u32) -> CodePosition {
        let (kt, tt) = (t / 16, t % 16);
        let (p, q, e) = (tt / 8, (tt % 8) / 2, tt % 2);
        let (i, r) = (d / 16, d % 16);
        let (g, u) = (r % 8, r / 8);
        let lane = 4 * g + q;
        let n = 2 * i + u;
        let pair = (kt * 32 + lane) * self.value_words_per_lane() + p * self.value_words_per_pair();
        if self.value_bits == 3 {
            let (w, bit, spread) = pack3_slot(n % 16);
            return CodePosition {
                spread,
                ..CodePosition::at(pair + 3 * (n / 16) + w, 16 * e + bit)
            };
        }
        let cph = self.value_codes_per_half();
        CodePosition::at(pair + n / cph, 16 * e + self.value_bits * (n % cph))
    }

    /// The index (within its block) of the value scale and min of token `t` (0..R) and channel `d`.
    pub fn value_param_index(&self, t: u32, d: u32) -> usize {
        let (kt, tt) = (t / 16, t % 16);
        let (p, q, e) = (tt / 8, (tt % 8) / 2, tt % 2);
        let gv = d / self.value_group_size;
        ((((kt * 4 + q) * 2 + p) * self.value_groups_per_token() + gv) * 2 + e) as usize
    }

    /// Device bytes of one sequence (one batch entry x one KV head) with `capacity` tokens: codes, scales and
    /// mins of keys and values, plus both residual rings. Split-K scratch is per cache, not per sequence: see the
    /// runtime.
    pub fn bytes_per_sequence(&self, capacity: u32) -> u64 {
        let blocks = u64::from(self.blocks_for(capacity));
        blocks * self.bytes_per_block() + self.ring_bytes()
    }

    /// Device bytes of one sequence (one batch entry x one KV head) with room for `capacity` tokens, part by
    /// part ([`MemoryBreakdown`]); the parts sum to [`StorageLayout::bytes_per_sequence`].
    pub fn memory(&self, capacity: u32) -> MemoryBreakdown {
        let blocks = u64::from(self.blocks_for(capacity));
        MemoryBreakdown {
            capacity,
            key_codes: blocks * 4 * u64::from(self.key_block_words()),
            key_scales_mins: blocks * u64::from(self.key_param_bytes * self.key_block_params()),
            value_codes: blocks * 4 * u64::from(self.value_block_words()),
            value_scales_mins: blocks
                * 2
                * u64::from(self.value_param_bytes * self.value_block_params()),
            residual: self.ring_bytes(),
        }
    }

    /// Bytes of one quantized block: codes, scales and mins of keys and values.
    pub fn bytes_per_block(&self) -> u64 {
        4 * u64::from(self.key_block_words() + self.value_block_words())
            + u64::from(self.key_param_bytes * self.key_block_params())
            + 2 * u64::from(self.value_param_bytes * self.value_block_params())
    }

    /// Bytes a decode step must read for one sequence (one KV head) holding `len` tokens of which
    /// `quantized_keys` and `quantized_values` are quantized: key codes, scales and mins of the quantized keys,
    /// value codes (with their padding, as stored), scales and mins of the quantized values, and every
    /// full-precision key and value (the residual, including the new token, and the sink tokens). The query heads
    /// (2 bytes x key head_dim each) come on top. This is the byte count `kivi bench` divides by the time. (With
    /// more than 16 query heads per KV head the kernel reads the cache once per tile of 16 heads; this counts it
    /// once.) Scales and mins count their dtype's bytes, full-precision tokens the activations'.
    pub fn decode_read_bytes(&self, len: u64, quantized_keys: u64, quantized_values: u64) -> u64 {
        let (dk, dv) = (u64::from(self.key_head_dim), u64::from(self.value_head_dim));
        let key_codes = quantized_keys * dk * u64::from(self.key_bits) / 8;
        let key_params = quantized_keys / u64::from(self.key_group_size)
            * dk
            * 2
            * u64::from(self.key_param_bytes);
        let value_codes = quantized_values * 32 * u64::from(self.value_words_per_lane()) * 4 / 16;
        let value_params = quantized_values
            * u64::from(self.value_groups_per_token())
            * 2
            * u64::from(self.value_param_bytes);
        let residual = ((len - quantized_keys) * dk + (len - quantized_values) * dv)
            * u64::from(self.act_bytes);
        key_codes + key_params + value_codes + value_params + residual
    }

    /// Bytes of the two residual rings of one sequence, with their sink rows.
    pub fn ring_bytes(&self) -> u64 {
        u64::from(self.act_bytes)
            * (u64::from(self.key_head_dim) * u64::from(self.key_res_rows())
                + u64::from(self.value_head_dim) * u64::from(self.value_res_rows()))
    }
}

/// Device bytes of one sequence (one batch entry x one KV head) of a KIVI cache with room for `capacity` tokens,
/// as [`StorageLayout`] stores it: quantized blocks of R tokens for the whole capacity (so a cache never moves),
/// plus the full-precision residual rings. Split-K scratch is per cache, not per sequence (the runtime's
/// `KiviCache` adds `batch x num_heads x splits x (value head_dim + 2) x 4` bytes, splits <= 64 with the automatic
/// split). Multiply by batch x num_kv_heads for a layer, and by the layers for a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBreakdown {
    /// Tokens the sequence has room for.
    pub capacity: u32,
    /// Packed key codes (u32 words), bytes.
    pub key_codes: u64,
    /// Key scales and mins (the keys' scale dtype), bytes.
    pub key_scales_mins: u64,
    /// Packed value codes (u32 words, with the padding of their fragment layout), bytes.
    pub value_codes: u64,
    /// Value scales and mins (the values' scale dtype), bytes.
    pub value_scales_mins: u64,
    /// The full-precision residual rings of keys (R tokens) and values (R + 1 tokens), and the sink tokens of both,
    /// bytes.
    pub residual: u64,
}

impl MemoryBreakdown {
    /// All parts, bytes.
    pub fn total(&self) -> u64 {
        self.key_codes
            + self.key_scales_mins
            + self.value_codes
            + self.value_scales_mins
            + self.residual
    }

    /// Bytes an fp16 cache of the same capacity takes per sequence: keys and values, `2 x (key head_dim + value
    /// head_dim) x capacity`.
    pub fn fp16_bytes(capacity: u32, key_head_dim: u32, value_head_dim: u32) -> u64 {
        2 * (u64::from(key_head_dim) + u64::from(value_head_dim)) * u64::from(capacity)
    }
}
