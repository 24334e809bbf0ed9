//! The launch contract of kivi's kernels on raw device pointers and the caller's stream: what an inference engine
//! that owns its memory and streams calls (the C ABI and the Python package sit on it too). Nothing here allocates
//! or synchronizes: every call checks its arguments on the host, then queues kernels on `stream` and returns.
//!
//! The state of a sequence is its length alone (KIVI Algorithm 1's invariants: after a prefill or a decode step
//! of a sequence of `len` tokens, its first `min(len, sink_tokens)` are sink tokens in full precision; of the `n` after
//! them, the first `n - n % R` keys and the first `max(n - R, 0)` values are quantized, and the rest sit in its
//! full-precision rings). Lengths are `i32` in device memory, one per batch
//! entry, so the batch may be ragged, a decode step needs no host synchronization, and it can be captured in a
//! CUDA graph (a fixed grid of [`LayoutModule::graph_grid_splits`] splits; blocks past a sequence's own splits
//! exit at once). Bad lengths or block-table entries found on the device set bits of an error flag
//! ([`DEVICE_ERROR_LENGTH`] and the others) and make the affected outputs NaN; nothing is read or written out of
//! range.
//!
//! Storage (all device memory, sizes in elements of the named dtype, from [`StorageLayout`] of the layout;
//! `seqs = batch * num_kv_heads`, `blocks` = `seqs * blocks_per_seq` contiguous or `pages * num_kv_heads` paged;
//! "act" is the layout's activation dtype, fp16 or bf16, and "kscale"/"vscale" its key and value scale dtypes,
//! fp16, bf16 or fp32): `k_codes` u32 `[blocks][key_block_words]`, `k_params` kscale `[blocks][key_block_params]`,
//! `v_codes` u32 `[blocks][value_block_words]`, `v_scale` and `v_mn` vscale `[blocks][value_block_params]`,
//! `k_res` act `[seqs][residual_length + sink_tokens][key head_dim]`, `v_res` act `[seqs][value_ring +
//! sink_tokens][value head_dim]`
//! (the ring's rows, then the sink tokens'); every block buffer 16-byte aligned. With sink tokens, a sequence of
//! `len` tokens keeps its first `min(len, sink_tokens)` in full precision and runs Algorithm 1 on the rest. Queries,
//! new keys and values, prefill inputs and outputs are act too. [`BufferBytes`] sizes every buffer in bytes. [`StorageLayout::memory`](kivi_codegen::StorageLayout::memory) gives the bytes per sequence.

use std::ffi::c_void;

use kivi_codegen::{DecodePlan, KernelKind, StorageLayout, MAX_SPLITS};

use crate::error::{Result, RuntimeError};
use crate::gpu::LayoutModule;

/// A device address (CUDA's `CUdeviceptr`: what `cuMemAlloc`, `cudaMalloc` or `torch.Tensor.data_ptr()` give);
/// 0 means none where an argument is optional. A plain integer, so that the contract does not depend on a
/// particular version of a CUDA binding.
pub type CUdeviceptr = u64;

/// A CUDA stream handle (CUDA's `CUstream` / `cudaStream_t`; null is the legacy default stream), of the context the
/// module was loaded into.
pub type CUstream = *mut c_void;

/// The largest capacity (tokens per sequence) a cache may have: positions are 32-bit in the kernels.
pub const MAX_CAPACITY: u32 = 1 << 28;

/// Error-flag bit: a sequence length below 0 or beyond what its storage holds (or, at prefill, beyond
/// `max_len`; at decode, no room for the new token, or a negative `q_lens` entry).
pub const DEVICE_ERROR_LENGTH: u32 = 1;
/// Error-flag bit: a block-table entry outside `[0, pages)`.
pub const DEVICE_ERROR_PAGE: u32 = 2;
/// Error-flag bit: a decode step needs more splits than the grid or the split-K scratch holds.
pub const DEVICE_ERROR_SPLITS: u32 = 4;

/// The error flag's bits in words (empty for 0).
pub fn describe_device_error(bits: u32) -> String {
    let mut parts = Vec::new();
    if bits & DEVICE_ERROR_LENGTH != 0 {
        parts.push(
            "a sequence length outside what its storage holds (or no room for the new token, or a negative q_len)",
        );
    }
    if bits & DEVICE_ERROR_PAGE != 0 {
        parts.push("a block table entry outside [0, pages)");
    }
    if bits & DEVICE_ERROR_SPLITS != 0 {
        parts.push(
            "a decode step that needs more splits than the grid or the split-K scratch holds",
        );
    }
    let unknown = bits & !(DEVICE_ERROR_LENGTH | DEVICE_ERROR_PAGE | DEVICE_ERROR_SPLITS);
    let mut s = parts.join("; ");
    if unknown != 0 {
        s.push_str(&format!("; unknown bits {unknown:#x}"));
    }
    s
}

/// The device buffers of one layer's cache (see the module documentation for their shapes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheBuffers {
    /// Key codes, u32.
    pub k_codes: CUdeviceptr,
    /// Key mins and scales, of the keys' scale dtype.
    pub k_params: CUdeviceptr,
    /// Full-precision key ring and sink tokens, activations `[seqs][residual_length + sink_tokens][key head_dim]`.
    pub k_res: CUdeviceptr,
    /// Value codes, u32.
    pub v_codes: CUdeviceptr,
    /// Value scales, of the values' scale dtype.
    pub v_scale: CUdeviceptr,
    /// Value mins, of the values' scale dtype.
    pub v_mn: CUdeviceptr,
    /// Full-precision value ring and sink tokens, activations `[seqs][value_ring + sink_tokens][value head_dim]`.
    pub v_res: CUdeviceptr,
}

/// Where the quantized blocks (`residual_length` tokens each) of a sequence live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAddressing {
    /// Sequence `seq = b * num_kv_heads + h` owns blocks `[seq * blocks_per_seq, (seq + 1) * blocks_per_seq)`.
    Contiguous {
        /// Blocks per sequence (its capacity is `blocks_per_seq * residual_length + sink_tokens` tokens).
        blocks_per_seq: u32,
    },
    /// Paged (vLLM-style): a page holds one block of every KV head, `residual_length` tokens (a multiple of the
    /// key group size); block `i` of batch entry `b`, KV head `h` is storage block
    /// `block_table[b * entries_per_seq + i] * num_kv_heads + h`. The kernels check every entry they use against
    /// `[0, pages)` and flag [`DEVICE_ERROR_PAGE`] instead of reading out of range.
    Paged {
        /// i32 `[batch][entries_per_seq]` in device memory, 4-byte aligned.
        block_table: CUdeviceptr,
        /// Entries per batch entry (its capacity is `entries_per_seq * residual_length + sink_tokens` tokens).
        entries_per_seq: u32,
        /// Pages allocated: the block buffers hold `pages * num_kv_heads` blocks.
        pages: u32,
    },
}

impl BlockAddressing {
    /// The addressing a flat argument list names (the C ABI's and the Python package's form): `block_table` 0 for
    /// contiguous storage with `per_seq` blocks per sequence, else paged with `per_seq` table entries per batch entry
    /// and `pages` pages.
    pub fn from_table(block_table: CUdeviceptr, per_seq: u32, pages: u32) -> Self {
        if block_table == 0 {
            BlockAddressing::Contiguous {
                blocks_per_seq: per_seq,
            }
        } else {
            BlockAddressing::Paged {
                block_table,
                entries_per_seq: per_seq,
                pages,
            }
        }
    }

    /// Tokens one sequence can hold: those of its blocks, plus the layout's sink tokens.
    pub fn max_tokens(&self, storage: &StorageLayout) -> u64 {
        let per_seq = match *self {
            BlockAddressing::Contiguous { blocks_per_seq } => blocks_per_seq,
            BlockAddressing::Paged {
                entries_per_seq, ..
            } => entries_per_seq,
        };
        u64::from(per_seq) * u64::from(storage.residual_length) + u64::from(storage.sink_tokens)
    }

    /// (table pointer or 0, blocks or entries per sequence, pages) as the kernels take them.
    fn kernel_args(&self) -> (CUdeviceptr, i32, i32) {
        match *self {
            BlockAddressing::Contiguous { blocks_per_seq } => (0, blocks_per_seq as i32, 0),
            BlockAddressing::Paged {
                block_table,
                entries_per_seq,
                pages,
            } => (block_table, entries_per_seq as i32, pages as i32),
        }
    }

    fn check(&self, storage: &StorageLayout) -> Result<()> {
        let (table, per_seq, pages) = match *self {
            BlockAddressing::Contiguous { blocks_per_seq } => (None, blocks_per_seq, 1),
            BlockAddressing::Paged {
                block_table,
                entries_per_seq,
                pages,
            } => (Some(block_table), entries_per_seq, pages),
        };
        if let Some(t) = table {
            check_ptr("block_table", t, 4)?;
        }
        if per_seq == 0 || self.max_tokens(storage) > u64::from(MAX_CAPACITY) {
            return Err(RuntimeError::Limit {
                what: "blocks per sequence",
                value: per_seq.into(),
                limit: format!(
                    "it must be in 1..={} (a capacity of at most {MAX_CAPACITY} tokens)",
                    MAX_CAPACITY.saturating_sub(storage.sink_tokens) / storage.residual_length
                ),
            });
        }
        if pages == 0 || pages > i32::MAX as u32 {
            return Err(RuntimeError::Limit {
                what: "pages",
                value: pages.into(),
                limit: format!("it must be in 1..={}", i32::MAX),
            });
        }
        Ok(())
    }
}

/// Tokens (activations: fp16 or bf16) of `head_dim` contiguous channels in device memory: token `t` of batch entry `b`, KV head `h` is
/// at `ptr + (b * stride_batch + h * stride_head + t * stride_token) * 2` bytes. Strides are in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenRows {
    /// The first element, 4-byte aligned.
    pub ptr: CUdeviceptr,
    /// Elements between batch entries (even).
    pub stride_batch: i64,
    /// Elements between KV heads (even).
    pub stride_head: i64,
    /// Elements between tokens (even, at least head_dim).
    pub stride_token: i64,
}

impl TokenRows {
    /// `[batch][num_kv_heads][tokens][head_dim]`, row-major (the layout of [`crate::KiviCache::prefill`]).
    pub fn heads_major(ptr: CUdeviceptr, num_kv_heads: u32, tokens: u32, head_dim: u32) -> Self {
        let per_head = i64::from(tokens) * i64::from(head_dim);
        TokenRows {
            ptr,
            stride_batch: i64::from(num_kv_heads) * per_head,
            stride_head: per_head,
            stride_token: i64::from(head_dim),
        }
    }

    /// `[batch][tokens][num_kv_heads][head_dim]`, row-major (the layout of most engines' projections).
    pub fn tokens_major(ptr: CUdeviceptr, num_kv_heads: u32, tokens: u32, head_dim: u32) -> Self {
        let row = i64::from(num_kv_heads) * i64::from(head_dim);
        TokenRows {
            ptr,
            stride_batch: i64::from(tokens) * row,
            stride_head: i64::from(head_dim),
            stride_token: row,
        }
    }

    fn check(&self, what: &'static str, head_dim: u32) -> Result<()> {
        check_ptr(what, self.ptr, 4)?;
        for (name, s) in [
            ("stride_batch", self.stride_batch),
            ("stride_head", self.stride_head),
            ("stride_token", self.stride_token),
        ] {
            if s < 0 || s % 2 != 0 {
                return Err(RuntimeError::Limit {
                    what,
                    value: s.unsigned_abs(),
                    limit: format!("its {name} must be even and non-negative (elements; rows are read in pairs)"),
                });
            }
        }
        if self.stride_token < i64::from(head_dim) {
            return Err(RuntimeError::Limit {
                what,
                value: self.stride_token as u64,
                limit: format!("its stride_token must be at least head_dim {head_dim}"),
            });
        }
        Ok(())
    }
}

/// Bytes of each buffer of one layer's cache for `batch` entries stored as `blocks` (the memory-size calculator
/// of the raw API; [`StorageLayout::memory`](kivi_codegen::StorageLayout::memory) breaks down one sequence), and
/// of the decode scratch for `splits` splits per row ([`LayoutModule::graph_grid_splits`] of the capacity serves
/// every length).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferBytes {
    /// `k_codes` (u32).
    pub k_codes: u64,
    /// `k_params` (the keys' scale dtype).
    pub k_params: u64,
    /// `k_res` (activations).
    pub k_res: u64,
    /// `v_codes` (u32).
    pub v_codes: u64,
    /// `v_scale` (the values' scale dtype).
    pub v_scale: u64,
    /// `v_mn` (the values' scale dtype).
    pub v_mn: u64,
    /// `v_res` (activations).
    pub v_res: u64,
    /// Split-K scratch `part_acc` (f32).
    pub part_acc: u64,
    /// Split-K scratch `part_ml` (f32).
    pub part_ml: u64,
    /// Completion counters (u32, zeroed once).
    pub counters: u64,
}

impl BufferBytes {
    /// The sizes for `layout`, `batch` entries, blocks stored as `blocks` and `splits` splits of scratch per row.
    pub fn new(
        layout: &kivi_dsl::Layout,
        batch: u32,
        blocks: &BlockAddressing,
        splits: u32,
    ) -> Self {
        let st = StorageLayout::new(layout);
        let hkv = u64::from(layout.num_kv_heads);
        let seqs = u64::from(batch) * hkv;
        let n = match *blocks {
            BlockAddressing::Contiguous { blocks_per_seq } => seqs * u64::from(blocks_per_seq),
            BlockAddressing::Paged { pages, .. } => u64::from(pages) * hkv,
        };
        let (dk, dv) = (u64::from(st.key_head_dim), u64::from(st.value_head_dim));
        let (acc, ml, counters) = DecodeScratch::elements(layout, batch, splits);
        BufferBytes {
            k_codes: n * u64::from(st.key_block_words()) * 4,
            k_params: n * u64::from(st.key_block_params() * st.key_param_bytes),
            k_res: seqs * u64::from(st.key_res_rows()) * dk * u64::from(st.act_bytes),
            v_codes: n * u64::from(st.value_block_words()) * 4,
            v_scale: n * u64::from(st.value_block_params() * st.value_param_bytes),
            v_mn: n * u64::from(st.value_block_params() * st.value_param_bytes),
            v_res: seqs * u64::from(st.value_res_rows()) * dv * u64::from(st.act_bytes),
            part_acc: acc as u64 * 4,
            part_ml: ml as u64 * 4,
            counters: counters as u64 * 4,
        }
    }

    /// All of them.
    pub fn total(&self) -> u64 {
        self.k_codes
            + self.k_params
            + self.k_res
            + self.v_codes
            + self.v_scale
            + self.v_mn
            + self.v_res
            + self.part_acc
            + self.part_ml
            + self.counters
    }
}

/// Arguments of a prefill (KIVI Algorithm 1) into empty sequences.
#[derive(Clone, Copy, Debug)]
pub struct PrefillArgs {
    /// Batch entries (sequences = batch x num_kv_heads).
    pub batch: u32,
    /// Keys (activations).
    pub keys: TokenRows,
    /// Values (activations).
    pub values: TokenRows,
    /// i32 `[batch]` in device memory: tokens of each batch entry (0 leaves it empty).
    pub seq_lens: CUdeviceptr,
    /// An upper bound of every `seq_lens` entry (sizes the grids; a larger or negative length is flagged and that
    /// sequence left as it was).
    pub max_len: u32,
    /// The cache.
    pub cache: CacheBuffers,
    /// Where its blocks live.
    pub blocks: BlockAddressing,
    /// u32 in device memory that the kernels OR error bits into, or 0 for none.
    pub error_flag: CUdeviceptr,
}

/// The split-K scratch of decode steps: `part_acc` f32 `[batch * num_heads][splits][value head_dim]`, `part_ml` f32
/// `[batch * num_heads][splits][2]`, `counters` u32 `[batch * num_kv_heads]`, zeroed once before the first step
/// (each step leaves them zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeScratch {
    /// f32 partial outputs.
    pub part_acc: CUdeviceptr,
    /// f32 partial (max, sum) pairs.
    pub part_ml: CUdeviceptr,
    /// u32 completion counters.
    pub counters: CUdeviceptr,
    /// Splits per row the scratch holds.
    pub splits: u32,
}

impl DecodeScratch {
    /// Elements of (`part_acc`, `part_ml`, `counters`) for `batch` entries and `splits` splits per row.
    pub fn elements(layout: &kivi_dsl::Layout, batch: u32, splits: u32) -> (usize, usize, usize) {
        let rows = batch as usize * layout.num_heads as usize;
        let d = StorageLayout::new(layout).value_head_dim as usize;
        (
            rows * splits as usize * d,
            rows * splits as usize * 2,
            batch as usize * layout.num_kv_heads as usize,
        )
    }
}

/// Arguments of one decode step (KIVI Algorithm 1) over a batch of sequences of any lengths: appends each
/// sequence's new key and value, attends its query heads over its tokens (the new one included) and runs the
/// flushes that follow, in one launch.
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs {
    /// Batch entries.
    pub batch: u32,
    /// Activations `[batch][num_heads][key head_dim]`, 4-byte aligned.
    pub q: CUdeviceptr,
    /// Activations `[batch][num_kv_heads][key head_dim]`: the new keys.
    pub k_new: CUdeviceptr,
    /// Activations `[batch][num_kv_heads][value head_dim]`: the new values.
    pub v_new: CUdeviceptr,
    /// Activations `[batch][num_heads][value head_dim]`: the attention output.
    pub out: CUdeviceptr,
    /// f32 `[batch][num_heads]`, or 0: the natural-log log-sum-exp of each row's scaled scores, to merge partial
    /// attention results (out = sum_i exp(lse_i - lse) out_i over parts with lse = log sum_i exp(lse_i)).
    pub lse: CUdeviceptr,
    /// i32 `[batch]`: tokens of each sequence before this step (not changed by it).
    pub seq_lens: CUdeviceptr,
    /// i32 `[batch]`, or 0: receives `seq_lens + 1` (unchanged lengths for sequences flagged with an error);
    /// a buffer that does not overlap `seq_lens`. For CUDA graphs either pass 0 and advance the lengths yourself,
    /// or capture two graphs that swap the buffers and replay them alternately (`KiviCache::capture_decode`).
    pub seq_lens_next: CUdeviceptr,
    /// i32 `[batch]`, or 0 (every sequence takes one new token): q_len > 1 (draft-token verification, chunked
    /// prefill), causal. Sequence `b` takes `q_lens[b]` new tokens, one launch per token: launch `j` (with
    /// `q_index = j`) serves token `j` of every sequence with `q_lens[b] > j`, reading the lengths the launch
    /// before wrote (swap `seq_lens` and `seq_lens_next`), and leaves the others alone: no append, no output
    /// row written, `seq_lens_next[b] = seq_lens[b]`. Token `j` thus attends to every earlier token and itself,
    /// exactly as `q_lens[b]` single steps would (flushes included). A negative entry sets
    /// [`DEVICE_ERROR_LENGTH`]. `q`, `k_new`, `v_new`, `out` and `lse` of launch `j` are token `j`'s rows.
    pub q_lens: CUdeviceptr,
    /// Which of the `q_lens` tokens this launch serves (ignored without `q_lens`).
    pub q_index: u32,
    /// The cache.
    pub cache: CacheBuffers,
    /// Where its blocks live.
    pub blocks: BlockAddressing,
    /// Split-K scratch.
    pub scratch: DecodeScratch,
    /// The grid's splits: at least every sequence's splits ([`LayoutModule::decode_splits`] of the longest), or
    /// [`LayoutModule::graph_grid_splits`] for a step that must serve any length (CUDA graphs).
    pub grid_splits: u32,
    /// Sliding window: attend the newest `window` tokens after the sink tokens only, and the sink tokens (0: all).
    pub window: u32,
    /// Softmax scale of the scores (None: 1 / sqrt(key head_dim)).
    pub softmax_scale: Option<f32>,
    /// u32 error flag, or 0.
    pub error_flag: CUdeviceptr,
}

fn check_ptr(what: &'static str, ptr: CUdeviceptr, align: u64) -> Result<()> {
    if ptr == 0 {
        return Err(RuntimeError::Pointer {
            what,
            ptr,
            problem: "is null".into(),
        });
    }
    if !ptr.is_multiple_of(align) {
        return Err(RuntimeError::Pointer {
            what,
            ptr,
            problem: format!("is not {align}-byte aligned"),
        });
    }
    Ok(())
}

fn check_optional_ptr(what: &'static str, ptr: CUdeviceptr, align: u64) -> Result<()> {
    if ptr == 0 {
        Ok(())
    } else {
        check_ptr(what, ptr, align)
    }
}

impl CacheBuffers {
    fn check(&self) -> Result<()> {
        for (what, p) in [
            ("k_codes", self.k_codes),
            ("k_params", self.k_params),
            ("k_res", self.k_res),
            ("v_codes", self.v_codes),
            ("v_scale", self.v_scale),
            ("v_mn", self.v_mn),
            ("v_res", self.v_res),
        ] {
            check_ptr(what, p, 16)?;
        }
        Ok(())
    }
}

/// Kernel parameters: pointers to each argument's value, in the kernel's order.
struct Params(Vec<*mut c_void>);

impl Params {
    fn new() -> Self {
        Params(Vec::with_capacity(32))
    }
    /// Pushes a pointer to `v`, which must outlive the launch.
    fn push<T>(&mut self, v: &T) -> &mut Self {
        self.0.push(v as *const T as *mut c_void);
        self
    }

    /// Pushes the four parameters of token rows (address, then the batch, head and token strides), which must
    /// outlive the launch: the leading parameters of every prefill kernel.
    fn rows(&mut self, r: &TokenRows) -> &mut Self {
        self.push(&r.ptr)
            .push(&r.stride_batch)
            .push(&r.stride_head)
            .push(&r.stride_token)
    }
}

/// Storage block indices are 32-bit in the kernels: batch x num_kv_heads x blocks_per_seq (contiguous) or
/// pages x num_kv_heads (paged) must stay below 2^31.
pub(crate) fn check_block_count(
    layout: &kivi_dsl::Layout,
    batch: u32,
    blocks: &BlockAddressing,
) -> Result<()> {
    let hkv = u64::from(layout.num_kv_heads);
    let count = match *blocks {
        BlockAddressing::Contiguous { blocks_per_seq } => {
            u64::from(batch) * hkv * u64::from(blocks_per_seq)
        }
        // The table's entries (batch x entries) are indexed in 32 bits too.
        BlockAddressing::Paged {
            pages,
            entries_per_seq,
            ..
        } => (u64::from(pages) * hkv).max(u64::from(batch) * u64::from(entries_per_seq)),
    };
    if count > i32::MAX as u64 {
        return Err(RuntimeError::Limit {
            what: "storage blocks (sequences x blocks per sequence; paged: pages x num_kv_heads and the table's entries)",
            value: count,
            limit: format!("it must be at most {} (32-bit block indices)", i32::MAX),
        });
    }
    Ok(())
}

/// The decode kernel reads blocks one way: a paged cache needs the paged kernel and the other way round.
pub(crate) fn check_paged_kernel(module: &LayoutModule, blocks: &BlockAddressing) -> Result<()> {
    let kernel = module.kernels().spec(KernelKind::DecodePartial).tile.paged;
    let wanted = matches!(blocks, BlockAddressing::Paged { .. });
    if kernel == wanted {
        return Ok(());
    }
    Err(RuntimeError::State(if wanted {
        "a paged cache needs the paged decode kernel: load the layout with `KernelTiles::paged()` tiles".into()
    } else {
        "a contiguous cache needs the contiguous decode kernel: this module was loaded with paged tiles".into()
    }))
}

fn check_batch(layout: &kivi_dsl::Layout, batch: u32, head_tiles: u32) -> Result<u32> {
    let seqs = u64::from(batch) * u64::from(layout.num_kv_heads);
    if batch == 0 || seqs * u64::from(head_tiles) > 65535 {
        return Err(RuntimeError::Limit {
            what: "batch",
            value: batch.into(),
            limit: format!(
                "it must be at least 1 and batch x num_kv_heads ({}) x head tiles ({head_tiles}) at most 65535 (the \
                 grid's y limit)",
                layout.num_kv_heads
            ),
        });
    }
    Ok(seqs as u32)
}

impl LayoutModule {
    fn launch(
        &self,
        kind: KernelKind,
        stream: CUstream,
        grid: (u32, u32),
        params: &mut Params,
    ) -> Result<()> {
        let threads = self.kernels().spec(kind).tile.threads;
        self.ctx().bind_to_thread()?;
        // SAFETY: the caller of the public launch functions vouches for the pointers (their contract); the
        // parameter list matches the kernel's signature in templates/ (one push per parameter, in order).
        unsafe {
            cudarc::driver::result::launch_kernel(
                self.function(kind).cu_function(),
                (grid.0, grid.1, 1),
                (threads, 1, 1),
                0,
                stream as cudarc::driver::sys::CUstream,
                &mut params.0,
            )
        }?;
        Ok(())
    }

    /// A [`DecodeArgs::grid_splits`] that serves every sequence of at most `max_len` tokens (the new one
    /// included) with a sliding `window` (0: none), whatever the mix of lengths ([`DecodePlan::grid_splits`]).
    pub fn decode_splits(&self, max_len: u32, window: u32) -> u32 {
        let fixed = self
            .kernels()
            .spec(KernelKind::DecodePartial)
            .tile
            .split_tokens;
        DecodePlan::new(&self.kernels().layout).grid_splits(fixed, max_len, window)
    }

    /// The splits that serve every length up to `capacity` tokens (sink tokens included): the grid (and scratch)
    /// of a decode step that is captured once in a CUDA graph and replayed at any length.
    pub fn graph_grid_splits(&self, capacity: u32) -> u32 {
        let fixed = self
            .kernels()
            .spec(KernelKind::DecodePartial)
            .tile
            .split_tokens;
        DecodePlan::new(&self.kernels().layout).max_splits(fixed, capacity)
    }

    /// Queues a prefill (KIVI Algorithm 1) on `stream`: per batch entry, its first `min(len, sink_tokens)` tokens
    /// go to its sink rows; of the `n` after them, the first `n - n % R` keys are quantized per-channel and the
    /// first `max(n - R, 0)` values per-token into its blocks, and the rest go to its full-precision rings. The sequences must be empty (a prefill overwrites what their
    /// blocks and rings held). Four kernels; no allocation, no synchronization.
    ///
    /// # Errors
    /// [`RuntimeError::Pointer`] for a null or misaligned pointer; [`RuntimeError::Limit`] for batch 0 or too
    /// large, bad strides, `max_len` beyond the storage; driver errors. Lengths are checked on the device
    /// ([`DEVICE_ERROR_LENGTH`], [`DEVICE_ERROR_PAGE`] in `error_flag`).
    ///
    /// # Safety
    /// Every pointer must be device memory of this module's context, valid for the shapes in the module
    /// documentation and [`PrefillArgs`] for the whole time the kernels run, and not in use by other work.
    pub unsafe fn launch_prefill(&self, stream: CUstream, a: &PrefillArgs) -> Result<()> {
        let layout = &self.kernels().layout;
        let st = StorageLayout::new(layout);
        let seqs = check_batch(layout, a.batch, 1)?;
        a.cache.check()?;
        a.blocks.check(&st)?;
        check_block_count(layout, a.batch, &a.blocks)?;
        a.keys.check("prefill keys", st.key_head_dim)?;
        a.values.check("prefill values", st.value_head_dim)?;
        check_ptr("seq_lens", a.seq_lens, 4)?;
        check_optional_ptr("error_flag", a.error_flag, 4)?;
        if u64::from(a.max_len) > a.blocks.max_tokens(&st) {
            return Err(RuntimeError::Limit {
                what: "prefill max_len",
                value: a.max_len.into(),
                limit: format!(
                    "the storage holds {} tokens per sequence",
                    a.blocks.max_tokens(&st)
                ),
            });
        }
        if a.max_len == 0 {
            return Ok(());
        }
        let r = st.residual_length;
        let (table, per_seq, pages) = a.blocks.kernel_args();
        let (max_len, kv_heads) = (a.max_len as i32, layout.num_kv_heads as i32);
        // The leading parameters of both quantize kernels: token rows, lengths, shape and block addressing.
        let quantize_params = |rows: &TokenRows| {
            let mut p = Params::new();
            p.rows(rows)
                .push(&a.seq_lens)
                .push(&max_len)
                .push(&kv_heads)
                .push(&table)
                .push(&per_seq)
                .push(&pages);
            p
        };
        let key_blocks = a.max_len / r;
        if key_blocks > 0 {
            let mut p = quantize_params(&a.keys);
            p.push(&a.cache.k_codes)
                .push(&a.cache.k_params)
                .push(&a.error_flag);
            self.launch(KernelKind::QuantizeKeys, stream, (key_blocks, seqs), &mut p)?;
        }
        let values = a.max_len.saturating_sub(r);
        if values > 0 {
            let per_block = kivi_codegen::value_tokens_per_block(
                self.kernels().spec(KernelKind::QuantizeValues).tile.threads,
            );
            let mut p = quantize_params(&a.values);
            p.push(&a.cache.v_codes)
                .push(&a.cache.v_scale)
                .push(&a.cache.v_mn)
                .push(&a.error_flag);
            self.launch(
                KernelKind::QuantizeValues,
                stream,
                (values.div_ceil(per_block), seqs),
                &mut p,
            )?;
        }
        let threads = self.kernels().spec(KernelKind::StoreResidual).tile.threads;
        for (rows, ring, ring_size, is_values, d) in [
            (
                &a.keys,
                a.cache.k_res,
                st.residual_length as i32,
                0i32,
                st.key_head_dim,
            ),
            (
                &a.values,
                a.cache.v_res,
                st.value_ring as i32,
                1i32,
                st.value_head_dim,
            ),
        ] {
            let mut p = Params::new();
            p.rows(rows)
                .push(&a.seq_lens)
                .push(&kv_heads)
                .push(&max_len)
                .push(&is_values)
                .push(&ring)
                .push(&ring_size)
                .push(&a.error_flag);
            // One thread per 8-channel run of a row (head_dim is a multiple of 16).
            let grid = ((ring_size as u32 + st.sink_tokens) * (d / 8)).div_ceil(threads);
            self.launch(KernelKind::StoreResidual, stream, (grid, seqs), &mut p)?;
        }
        Ok(())
    }

    /// Queues one decode step (KIVI Algorithm 1, the decode kernel: append, attention with split-K, merge and
    /// flushes in one launch) on `stream`. No allocation, no synchronization; with `seq_lens_next` 0 and a fixed
    /// `grid_splits` it can be captured in a CUDA graph and replayed after the lengths change.
    ///
    /// # Errors
    /// [`RuntimeError::Pointer`] for a null or misaligned pointer; [`RuntimeError::Limit`] for batch 0 or too
    /// large, `grid_splits` outside `1..=min(scratch.splits, 1024)`, `q_index` above `i32::MAX`, a softmax scale
    /// that is not finite and positive; [`RuntimeError::State`] if `seq_lens_next` overlaps `seq_lens` or
    /// `q_lens`; driver errors. Lengths, `q_lens` and table entries are checked on the device (`error_flag`).
    ///
    /// # Safety
    /// As [`LayoutModule::launch_prefill`]; the scratch must hold `scratch.splits` splits per row
    /// ([`DecodeScratch::elements`]) and its counters start zeroed.
    pub unsafe fn launch_decode(&self, stream: CUstream, a: &DecodeArgs) -> Result<()> {
        let layout = &self.kernels().layout;
        let st = StorageLayout::new(layout);
        let plan = DecodePlan::new(layout);
        let seqs = check_batch(layout, a.batch, plan.head_tiles)?;
        a.cache.check()?;
        a.blocks.check(&st)?;
        check_paged_kernel(self, &a.blocks)?;
        check_block_count(layout, a.batch, &a.blocks)?;
        check_ptr("q", a.q, 4)?;
        check_ptr("k_new", a.k_new, 2)?;
        check_ptr("v_new", a.v_new, 2)?;
        check_ptr("out", a.out, 2)?;
        check_optional_ptr("lse", a.lse, 4)?;
        check_ptr("seq_lens", a.seq_lens, 4)?;
        check_optional_ptr("seq_lens_next", a.seq_lens_next, 4)?;
        check_optional_ptr("q_lens", a.q_lens, 4)?;
        if a.q_index > i32::MAX as u32 {
            return Err(RuntimeError::Limit {
                what: "q_index",
                value: a.q_index.into(),
                limit: format!("it must be at most {}", i32::MAX),
            });
        }
        check_optional_ptr("error_flag", a.error_flag, 4)?;
        check_ptr("part_acc", a.scratch.part_acc, 4)?;
        check_ptr("part_ml", a.scratch.part_ml, 4)?;
        check_ptr("counters", a.scratch.counters, 4)?;
        let lens_bytes = 4 * u64::from(a.batch);
        let overlaps = |other: CUdeviceptr| {
            a.seq_lens_next != 0
                && other != 0
                && a.seq_lens_next < other.saturating_add(lens_bytes)
                && other < a.seq_lens_next.saturating_add(lens_bytes)
        };
        for (other, name) in [(a.seq_lens, "seq_lens"), (a.q_lens, "q_lens")] {
            if overlaps(other) {
                return Err(RuntimeError::State(format!(
                    "seq_lens_next must not overlap {name} (other blocks of the step still read it)"
                )));
            }
        }
        if a.scratch.splits > i32::MAX as u32 {
            return Err(RuntimeError::Limit {
                what: "scratch splits",
                value: a.scratch.splits.into(),
                limit: format!("it must be at most {}", i32::MAX),
            });
        }
        let most = a.scratch.splits.min(MAX_SPLITS);
        if a.grid_splits == 0 || a.grid_splits > most {
            return Err(RuntimeError::Limit {
                what: "grid_splits",
                value: a.grid_splits.into(),
                limit: format!(
                    "it must be in 1..={most} (the scratch holds {} splits; the kernel merges at most {MAX_SPLITS})",
                    a.scratch.splits
                ),
            });
        }
        let scale = a
            .softmax_scale
            .unwrap_or(1.0 / (st.key_head_dim as f32).sqrt());
        if !(scale.is_finite() && scale > 0.0) {
            return Err(RuntimeError::State(format!(
                "softmax_scale {scale} must be finite and positive"
            )));
        }
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let (table, per_seq, pages) = a.blocks.kernel_args();
        let kv_heads = layout.num_kv_heads as i32;
        let q_index = a.q_index as i32;
        let fixed = self
            .kernels()
            .spec(KernelKind::DecodePartial)
            .tile
            .split_tokens as i32;
        let (stride, window) = (
            a.scratch.splits as i32,
            a.window.min(i32::MAX as u32) as i32,
        );
        let mut p = Params::new();
        p.push(&a.q)
            .push(&a.cache.k_codes)
            .push(&a.cache.k_params)
            .push(&a.cache.k_res)
            .push(&a.cache.v_codes)
            .push(&a.cache.v_scale)
            .push(&a.cache.v_mn)
            .push(&a.cache.v_res)
            .push(&a.k_new)
            .push(&a.v_new)
            .push(&a.seq_lens)
            .push(&a.seq_lens_next)
            .push(&a.q_lens)
            .push(&q_index)
            .push(&kv_heads)
            .push(&table)
            .push(&per_seq)
            .push(&pages)
            .push(&fixed)
            .push(&stride)
            .push(&window)
            .push(&scale_log2)
            .push(&a.scratch.part_acc)
            .push(&a.scratch.part_ml)
            .push(&a.scratch.counters)
            .push(&a.out)
            .push(&a.lse)
            .push(&a.error_flag);
        self.launch(
            KernelKind::DecodePartial,
            stream,
            (a.grid_splits, seqs * plan.head_tiles),
            &mut p,
        )
    }
}
