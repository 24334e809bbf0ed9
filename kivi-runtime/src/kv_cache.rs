//! The KIVI KV cache on the GPU: Algorithm 1 of KIVI (Liu et al., ICML 2024) over the block-major layout of
//! [`kivi_codegen::StorageLayout`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::{bf16, f16};
use kivi_codegen::{DecodePlan, KernelKind, StorageLayout, MAX_SPLITS};
use kivi_dsl::{Dtype, Layout, ScaleDtype};
pub use kivi_reference::{Activation, CacheExport};

use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, LayoutModule};
use crate::launch::{
    check_block_count, check_paged_kernel, describe_device_error, BlockAddressing, BufferBytes,
    CUstream, CacheBuffers, DecodeArgs, DecodeScratch, PrefillArgs, TokenRows, MAX_CAPACITY,
};

/// [`DecodePlan::max_splits`] of `module`'s decode tile at `capacity`, or the error if the kernel cannot merge
/// that many.
fn checked_max_splits(module: &LayoutModule, capacity: u32) -> Result<u32> {
    let splits = module.graph_grid_splits(capacity);
    if splits > MAX_SPLITS {
        return Err(RuntimeError::Limit {
            what: "split-K blocks per sequence (capacity / split_tokens)",
            value: splits.into(),
            limit: format!(
                "the decode kernel merges at most {MAX_SPLITS}: use a larger split_tokens or 0 (automatic)"
            ),
        });
    }
    Ok(splits)
}

/// Options of a decode step beyond the defaults of [`KiviCache::decode_step`].
#[derive(Debug, Default)]
pub struct DecodeOptions<'a> {
    /// f32 `[batch, num_heads]` on the GPU: receives the natural-log log-sum-exp of each row's scaled scores
    /// (to merge partial attention results).
    pub lse: Option<&'a mut CudaSlice<f32>>,
    /// Attend only the newest `window` tokens after the sink tokens, and the sink tokens (0: all).
    pub window: u32,
    /// The softmax scale of the scores (None: 1 / sqrt(key head_dim)).
    pub softmax_scale: Option<f32>,
}

/// An activation type a [`KiviCache`] takes and returns: [`f16`] or [`bf16`], which must be the layout's `dtype`
/// (a mismatch is a [`RuntimeError::State`] naming both). Sealed: the kernels read 2-byte elements of exactly
/// these two formats, so no other type can implement it.
pub trait ActivationElem:
    Activation + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Unpin + sealed::Sealed
{
}

mod sealed {
    /// The types [`super::ActivationElem`] is implemented for, and no others.
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl ActivationElem for f16 {}
impl ActivationElem for bf16 {}

/// The inputs and outputs of one decode step.
struct DecodeIo<'a, T> {
    q: &'a CudaSlice<T>,
    k: &'a CudaSlice<T>,
    v: &'a CudaSlice<T>,
    out: &'a mut CudaSlice<T>,
    lse: Option<&'a mut CudaSlice<f32>>,
}

/// Number `i` of a buffer of `fmt` numbers held as raw 16-bit words (fp32 numbers take two, low first), as f32.
fn param_at(raw: &[u16], fmt: ScaleDtype, i: usize) -> f32 {
    match fmt {
        ScaleDtype::F16 => f16::from_bits(raw[i]).to_f32(),
        ScaleDtype::Bf16 => bf16::from_bits(raw[i]).to_f32(),
        ScaleDtype::F32 => {
            f32::from_bits(u32::from(raw[2 * i]) | (u32::from(raw[2 * i + 1]) << 16))
        }
    }
}

/// Activations `[i, i + n)` of a raw 16-bit buffer of `dtype`, as f32.
fn acts_at(raw: &[u16], dtype: Dtype, i: usize, n: usize) -> impl Iterator<Item = f32> + '_ {
    raw[i..i + n].iter().map(move |&b| match dtype {
        Dtype::F16 => f16::from_bits(b).to_f32(),
        Dtype::Bf16 => bf16::from_bits(b).to_f32(),
    })
}

/// The scalar options of a step.
struct StepOptions {
    window: u32,
    softmax_scale: Option<f32>,
    /// Token `j` of the per-sequence new tokens in `q_lens_dev` ([`KiviCache::decode_tokens`]), or None.
    q_index: Option<u32>,
}

fn options_only(o: &DecodeOptions<'_>) -> StepOptions {
    StepOptions {
        window: o.window,
        softmax_scale: o.softmax_scale,
        q_index: None,
    }
}

/// A decode step captured in CUDA graphs ([`KiviCache::capture_decode`]), replayed with
/// [`KiviCache::replay_decode`].
pub struct DecodeGraph {
    graphs: [cudarc::driver::CudaGraph; 2],
    stream: Arc<CudaStream>,
    cache_id: u64,
    generation: u64,
    /// Keeps the captured kernels loaded.
    _module: Arc<LayoutModule>,
}

impl std::fmt::Debug for DecodeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraph")
            .field("graphs", &2)
            .field("cache_id", &self.cache_id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The block table of a paged cache.
#[derive(Debug)]
struct Paging {
    table: CudaSlice<i32>,
    entries_per_seq: u32,
    pages: u32,
}

/// A KIVI KV cache of `batch x num_kv_heads` sequences on one GPU, with preallocated capacity.
///
/// Quantized keys and values live in blocks of R tokens ([`StorageLayout`]), contiguous per sequence or in pages
/// through a block table ([`KiviCache::new_paged`]); full-precision tokens in rings, so appends and flushes never
/// copy the cache. Every batch entry has its own length (a ragged batch, [`KiviCache::prefill_ragged`]); a
/// sequence's results never depend on the others in the batch. The lengths live on the GPU too (the kernels read
/// them, so a step needs no host synchronization); the host keeps a copy to size the grids. Every method
/// launches on the GPU's stream through the raw contract of [`crate::launch`] and returns without waiting, except
/// the `_host` conveniences, [`KiviCache::export`] and [`KiviCache::check_device_errors`], which synchronize.
#[derive(Debug)]
pub struct KiviCache {
    layout: Layout,
    storage: StorageLayout,
    module: Arc<LayoutModule>,
    stream: Arc<CudaStream>,
    batch: u32,
    capacity: u32,
    blocks_per_seq: u32,
    paging: Option<Paging>,
    k_codes: CudaSlice<u32>,
    /// Raw 16-bit words: the keys' scale dtype (an fp32 number takes two).
    k_params: CudaSlice<u16>,
    /// Raw 16-bit words: activations of the layout's dtype.
    k_res: CudaSlice<u16>,
    v_codes: CudaSlice<u32>,
    v_scale: CudaSlice<u16>,
    v_mn: CudaSlice<u16>,
    v_res: CudaSlice<u16>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    counters: CudaSlice<u32>,
    /// Lengths on the GPU, double-buffered: a step reads `lens_dev[cur]` and writes the next lengths into the
    /// other buffer (a kernel may not rewrite what its other blocks still read).
    lens_dev: [CudaSlice<i32>; 2],
    cur: usize,
    /// The new tokens of each sequence in a [`KiviCache::decode_tokens`] call.
    q_lens_dev: CudaSlice<i32>,
    error_flag: CudaSlice<u32>,
    plan: DecodePlan,
    max_splits: u32,
    /// The host's copy of the lengths.
    lens: Vec<u32>,
    /// Unique per cache (process-wide), and bumped by set_module: a captured graph serves this cache as it was.
    id: u64,
    generation: u64,
}

/// Source of [`KiviCache`] ids.
static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A raw device pointer of `s` for a launch on `stream`; the guard (cudarc's event bookkeeping) must live until
/// the launch is queued.
fn dptr<'a, T>(
    s: &'a CudaSlice<T>,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> u64 {
    let (p, g) = s.device_ptr(stream);
    guards.push(g);
    p
}

/// As [`dptr`], for memory the launch writes.
fn dptr_mut<'a, T>(
    s: &'a mut CudaSlice<T>,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> u64 {
    let (p, g) = s.device_ptr_mut(stream);
    guards.push(g);
    p
}

impl KiviCache {
    /// Allocates a cache for `batch` sequences of up to `capacity` tokens each (per KV head), for the layout of
    /// `module` (from [`Gpu::load_layout`]); blocks contiguous per sequence.
    ///
    /// # Errors
    /// [`RuntimeError::Limit`] for batch 0, capacity 0 or above [`MAX_CAPACITY`], more than 65535 sequences
    /// (batch x num_kv_heads x head tiles, a grid limit); [`RuntimeError::State`] if `module` was loaded with
    /// the paged decode kernel (`KernelTiles::paged`); driver errors (e.g. out of memory).
    pub fn new(gpu: &Gpu, module: Arc<LayoutModule>, batch: u32, capacity: u32) -> Result<Self> {
        Self::allocate(gpu, module, batch, capacity, None)
    }

    /// Allocates a paged cache: `pages` pages of one block (R tokens) of every KV head, addressed through
    /// `block_table` (i32 `[batch][entries_per_seq]`, host; page indices, copied to the GPU), as vLLM-style
    /// engines store them; `module` must hold the paged decode kernel (loaded with
    /// [`kivi_codegen::KernelTiles::paged`] tiles). Each sequence holds up to `entries_per_seq * R + sink_tokens`
    /// tokens. Entries are checked on the
    /// device when used: an entry outside `[0, pages)` makes the sequence's output NaN and sets the error flag
    /// ([`KiviCache::check_device_errors`]) instead of reading out of range.
    ///
    /// # Errors
    /// As [`KiviCache::new`]; [`RuntimeError::Shape`] if the table is not `batch * entries_per_seq` long;
    /// [`RuntimeError::Limit`] for 0 entries or pages.
    pub fn new_paged(
        gpu: &Gpu,
        module: Arc<LayoutModule>,
        batch: u32,
        entries_per_seq: u32,
        pages: u32,
        block_table: &[i32],
    ) -> Result<Self> {
        let expected = batch as usize * entries_per_seq as usize;
        if block_table.len() != expected {
            return Err(RuntimeError::Shape {
                what: "block_table",
                shape: format!("[batch {batch}, entries_per_seq {entries_per_seq}]"),
                expected,
                got: block_table.len(),
            });
        }
        if entries_per_seq == 0 || pages == 0 || pages > i32::MAX as u32 {
            return Err(RuntimeError::Limit {
                what: "entries_per_seq x pages",
                value: u64::from(entries_per_seq) * u64::from(pages),
                limit: format!("both must be at least 1 and pages at most {}", i32::MAX),
            });
        }
        let st = StorageLayout::new(&module.kernels().layout);
        let capacity =
            u64::from(entries_per_seq) * u64::from(st.residual_length) + u64::from(st.sink_tokens);
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        let paging = Some((block_table, entries_per_seq, pages));
        Self::allocate(gpu, module, batch, capacity, paging)
    }

    fn allocate(
        gpu: &Gpu,
        module: Arc<LayoutModule>,
        batch: u32,
        capacity: u32,
        paging: Option<(&[i32], u32, u32)>,
    ) -> Result<Self> {
        let layout = module.kernels().layout;
        if batch == 0 {
            return Err(RuntimeError::Limit {
                what: "batch",
                value: 0,
                limit: "it must be at least 1".into(),
            });
        }
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RuntimeError::Limit {
                what: "capacity",
                value: capacity.into(),
                limit: format!("it must be in 1..={MAX_CAPACITY} tokens"),
            });
        }
        let seqs = u64::from(batch) * u64::from(layout.num_kv_heads);
        let head_tiles = u64::from(DecodePlan::new(&layout).head_tiles);
        if seqs * head_tiles > 65535 {
            return Err(RuntimeError::Limit {
                what: "batch x num_kv_heads x head tiles (ceil(gqa / 16))",
                value: seqs * head_tiles,
                limit: "it must be at most 65535 (the grid's y limit)".into(),
            });
        }
        if !Arc::ptr_eq(module.context(), gpu.context()) {
            return Err(RuntimeError::State(
                "the module was loaded on another GPU context than the one given: load it with this Gpu".into(),
            ));
        }
        let storage = StorageLayout::new(&layout);
        let blocks_per_seq = storage.blocks_for(capacity);
        let addressing = match paging {
            None => BlockAddressing::Contiguous { blocks_per_seq },
            Some((_, entries_per_seq, pages)) => BlockAddressing::Paged {
                block_table: 0,
                entries_per_seq,
                pages,
            },
        };
        // Whole blocks plus the sink tokens must stay addressable by the kernels' 32-bit positions (the launch
        // checks this too: refuse here rather than allocate a cache every launch would refuse).
        let max_tokens = addressing.max_tokens(&storage);
        if max_tokens > u64::from(MAX_CAPACITY) {
            return Err(RuntimeError::Limit {
                what: "capacity in whole blocks plus sink tokens",
                value: max_tokens,
                limit: format!(
                    "it must be at most {MAX_CAPACITY} tokens (capacity {capacity} rounds up to blocks of {} tokens, \
                     plus {} sink tokens)",
                    storage.residual_length, storage.sink_tokens
                ),
            });
        }
        check_paged_kernel(&module, &addressing)?;
        check_block_count(&layout, batch, &addressing)?;
        let stream = gpu.stream().clone();
        let paging = match paging {
            None => None,
            Some((table, entries_per_seq, pages)) => Some(Paging {
                table: stream.clone_htod(table)?,
                entries_per_seq,
                pages,
            }),
        };
        let plan = DecodePlan::new(&layout);
        let max_splits = checked_max_splits(&module, capacity)?;
        // The raw API's size calculator sizes every buffer (elements = bytes / element size).
        let bytes = BufferBytes::new(&layout, batch, &addressing, max_splits);
        let n = |b: u64, size: u64| (b / size) as usize;
        Ok(KiviCache {
            k_codes: stream.alloc_zeros(n(bytes.k_codes, 4))?,
            k_params: stream.alloc_zeros(n(bytes.k_params, 2))?,
            k_res: stream.alloc_zeros(n(bytes.k_res, 2))?,
            v_codes: stream.alloc_zeros(n(bytes.v_codes, 4))?,
            v_scale: stream.alloc_zeros(n(bytes.v_scale, 2))?,
            v_mn: stream.alloc_zeros(n(bytes.v_mn, 2))?,
            v_res: stream.alloc_zeros(n(bytes.v_res, 2))?,
            part_acc: stream.alloc_zeros(n(bytes.part_acc, 4))?,
            part_ml: stream.alloc_zeros(n(bytes.part_ml, 4))?,
            counters: stream.alloc_zeros(n(bytes.counters, 4))?,
            lens_dev: [
                stream.alloc_zeros(batch as usize)?,
                stream.alloc_zeros(batch as usize)?,
            ],
            cur: 0,
            q_lens_dev: stream.alloc_zeros(batch as usize)?,
            error_flag: stream.alloc_zeros(1)?,
            plan,
            max_splits,
            layout,
            storage,
            module,
            stream,
            batch,
            capacity,
            blocks_per_seq,
            paging,
            lens: vec![0; batch as usize],
            id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: 0,
        })
    }

    /// The split-K plan of a decode step over `len` tokens (the new one included), no sliding window:
    /// (tokens per split, number of splits), as [`DecodePlan::split_plan`] computes it for this cache's decode
    /// tile. A function of the length and the tile only, never of the batch, the GPU or the data.
    pub fn split_plan(&self, len: u32) -> (u32, u32) {
        let tile = self.module.kernels().spec(KernelKind::DecodePartial).tile;
        self.plan.split_plan(tile.split_tokens, len, 0)
    }

    /// Runs later steps with `module`: the same layout compiled with other tiles (the autotuner times candidates
    /// on one cache this way). The stored tokens stay valid, since the storage layout depends on the layout only;
    /// the split-K scratch grows if the new decode tile can make more splits at this capacity.
    ///
    /// # Errors
    /// [`RuntimeError::State`] if `module` has another layout or was loaded on another context;
    /// [`RuntimeError::Limit`] if its split would exceed the kernel's merge limit at this capacity; driver errors.
    pub fn set_module(&mut self, module: Arc<LayoutModule>) -> Result<()> {
        if module.kernels().layout != self.layout {
            return Err(RuntimeError::State(format!(
                "the module is for layout `{}`, this cache holds `{}`",
                module.kernels().layout.to_spec(),
                self.layout.to_spec()
            )));
        }
        if !Arc::ptr_eq(module.context(), self.module.context()) {
            return Err(RuntimeError::State(
                "the module was loaded on another GPU context than this cache's".into(),
            ));
        }
        check_paged_kernel(&module, &self.addressing())?;
        let needed = checked_max_splits(&module, self.capacity)?;
        if needed > self.max_splits {
            let (acc, ml, _) = DecodeScratch::elements(&self.layout, self.batch, needed);
            self.part_acc = self.stream.alloc_zeros(acc)?;
            self.part_ml = self.stream.alloc_zeros(ml)?;
            self.max_splits = needed;
        }
        self.module = module;
        // Graphs captured before hold the old kernels and perhaps the old scratch.
        self.generation += 1;
        Ok(())
    }

    /// Empties the cache (every length 0), so it can take a new prefill: what it held is never read again (every
    /// read is bounded by the new lengths). Also zeroes the decode kernel's per-sequence completion counters (left
    /// non-zero only by a launch that failed while running) and the error flag.
    ///
    /// # Errors
    /// Driver errors (the memsets are queued on the stream).
    pub fn reset(&mut self) -> Result<()> {
        self.stream.memset_zeros(&mut self.counters)?;
        self.stream.memset_zeros(&mut self.error_flag)?;
        for l in &mut self.lens_dev {
            self.stream.memset_zeros(l)?;
        }
        self.lens.iter_mut().for_each(|l| *l = 0);
        Ok(())
    }

    /// Reads and clears the error flag the kernels set on bad input found on the device (a length or block
    /// table entry out of range); synchronizes the stream.
    ///
    /// # Errors
    /// [`RuntimeError::Device`] naming what the kernels found (the affected outputs are NaN and those sequences
    /// kept their length on the device while the host's copy moved on: [`KiviCache::reset`] the cache); driver
    /// errors.
    pub fn check_device_errors(&mut self) -> Result<()> {
        let bits = self.stream.clone_dtoh(&self.error_flag)?[0];
        if bits == 0 {
            return Ok(());
        }
        self.stream.memset_zeros(&mut self.error_flag)?;
        Err(RuntimeError::Device(describe_device_error(bits)))
    }

    /// The device storage layout.
    pub fn storage(&self) -> &StorageLayout {
        &self.storage
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Batch size.
    pub fn batch(&self) -> u32 {
        self.batch
    }

    /// Tokens per sequence the cache can hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Tokens of the longest sequence (every sequence's, after a uniform prefill and steps).
    pub fn len(&self) -> u32 {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Tokens of each batch entry.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// True while every sequence is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Quantized keys of the longest sequence (a multiple of `residual_length`; sink tokens are never quantized).
    pub fn quantized_keys(&self) -> u32 {
        self.storage.quantized_keys(self.len())
    }

    /// Quantized values of the longest sequence.
    pub fn quantized_values(&self) -> u32 {
        self.storage.quantized_values(self.len())
    }

    /// The loaded kernels.
    pub fn module(&self) -> &Arc<LayoutModule> {
        &self.module
    }

    fn seqs(&self) -> u32 {
        self.batch * self.layout.num_kv_heads
    }

    /// Checks a tensor of `[batch, heads, tokens, d]` elements, `d` the keys' head_dim (keys and queries) or the
    /// values' (values and outputs).
    fn check_len(
        &self,
        what: &'static str,
        got: usize,
        tokens: usize,
        heads: u32,
        d: u32,
    ) -> Result<()> {
        let d = d as usize;
        let expected = self.batch as usize * heads as usize * tokens * d;
        if got != expected {
            return Err(RuntimeError::Shape {
                what,
                shape: format!(
                    "[batch {}, heads {heads}, tokens {tokens}, head_dim {d}]",
                    self.batch
                ),
                expected,
                got,
            });
        }
        Ok(())
    }

    /// Checks that `T` is the layout's activation dtype.
    fn check_dtype<T: ActivationElem>(&self, what: &str) -> Result<()> {
        if T::DTYPE != self.layout.dtype {
            return Err(RuntimeError::State(format!(
                "{what}: {} tensors for a layout of {} activations",
                T::DTYPE.as_str(),
                self.layout.dtype.as_str()
            )));
        }
        Ok(())
    }

    fn check_empty(&self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        Err(RuntimeError::State(format!(
            "prefill needs an empty cache, this one holds up to {} tokens per sequence",
            self.len()
        )))
    }

    fn check_room(&self, tokens: u32) -> Result<()> {
        let needed = u64::from(self.len()) + u64::from(tokens);
        if needed > u64::from(self.capacity) {
            return Err(RuntimeError::Limit {
                what: "tokens per sequence",
                value: needed,
                limit: format!("the cache's capacity is {}", self.capacity),
            });
        }
        Ok(())
    }

    fn addressing(&self) -> BlockAddressing {
        match &self.paging {
            None => BlockAddressing::Contiguous {
                blocks_per_seq: self.blocks_per_seq,
            },
            Some(p) => BlockAddressing::Paged {
                block_table: self.paging_table_ptr(p),
                entries_per_seq: p.entries_per_seq,
                pages: p.pages,
            },
        }
    }

    fn paging_table_ptr(&self, p: &Paging) -> u64 {
        // The table is written once (new_paged, on this stream) and only read after: no event bookkeeping.
        let (ptr, _sync) = p.table.device_ptr(&self.stream);
        ptr
    }

    /// Prefill (KIVI Algorithm 1): `k`, `v` are `[batch, num_kv_heads, len, head_dim]` on the GPU, of the layout's
    /// activation dtype (`T`: [`f16`] or [`bf16`]; the keys' head_dim for `k`, the values' for `v`). The first
    /// `min(len, sink_tokens)` tokens are sinks, kept in full precision;
    /// of the `n` after them, keys: if `n < R` all stay full precision, else the first `n - n % R` are quantized
    /// per-channel; values: if `n <= R` all stay full precision, else all but the newest R are quantized
    /// per-token.
    ///
    /// # Errors
    /// [`RuntimeError::State`] if the cache is not empty or `T` is not the layout's dtype; [`RuntimeError::Shape`]
    /// if a length does not match; [`RuntimeError::Limit`] if `len` exceeds the capacity; driver errors.
    pub fn prefill<T: ActivationElem>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        len: u32,
    ) -> Result<()> {
        let lens = vec![len; self.batch as usize];
        self.prefill_ragged(k, v, len, &lens)
    }

    /// Prefill of a ragged batch: `k`, `v` are `[batch, num_kv_heads, max_len, head_dim]` (the layout's dtype) on the GPU
    /// (padded), and batch entry `b` holds `lens[b] <= max_len` tokens (the rest of its rows is never read).
    /// Each sequence is prefilled as [`KiviCache::prefill`] would prefill it alone.
    ///
    /// # Errors
    /// As [`KiviCache::prefill`]; [`RuntimeError::Shape`] if `lens` is not `batch` long; [`RuntimeError::Limit`]
    /// if a length exceeds `max_len`.
    pub fn prefill_ragged<T: ActivationElem>(
        &mut self,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        max_len: u32,
        lens: &[u32],
    ) -> Result<()> {
        self.check_dtype::<T>("prefill")?;
        self.check_empty()?;
        let kv_heads = self.layout.num_kv_heads;
        let (dk, dv) = (self.storage.key_head_dim, self.storage.value_head_dim);
        self.check_len("prefill k", k.len(), max_len as usize, kv_heads, dk)?;
        self.check_len("prefill v", v.len(), max_len as usize, kv_heads, dv)?;
        if lens.len() != self.batch as usize {
            return Err(RuntimeError::Shape {
                what: "prefill lens",
                shape: format!("[batch {}]", self.batch),
                expected: self.batch as usize,
                got: lens.len(),
            });
        }
        if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l > max_len) {
            return Err(RuntimeError::Limit {
                what: "prefill length",
                value: l.into(),
                limit: format!("batch entry {b}'s length must be at most max_len {max_len}"),
            });
        }
        self.check_room(max_len)?;
        if max_len == 0 {
            // Every sequence stays empty: nothing to launch (and k, v hold no memory to point at).
            return Ok(());
        }
        match lens.first() {
            Some(&l) if lens.iter().all(|&x| x == l) => {
                // One length for the whole batch (prefill): a stream-ordered memset, no host-to-device copy.
                let (ptr, _sync) = self.lens_dev[self.cur].device_ptr_mut(&self.stream);
                // SAFETY: lens_dev[cur] holds batch = lens.len() i32s on this stream's context; the memset is
                // ordered on the stream like the copy it replaces.
                unsafe {
                    cudarc::driver::sys::cuMemsetD32Async(
                        ptr,
                        l,
                        lens.len(),
                        self.stream.cu_stream(),
                    )
                }
                .result()?;
            }
            _ => {
                let as_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                self.stream
                    .memcpy_htod(&as_i32, &mut self.lens_dev[self.cur])?;
            }
        }
        let (dk, dv) = (self.storage.key_head_dim, self.storage.value_head_dim);
        let addressing = self.addressing();
        let stream = self.stream.clone();
        let mut g = Vec::new();
        let args = PrefillArgs {
            batch: self.batch,
            keys: TokenRows::heads_major(dptr(k, &stream, &mut g), kv_heads, max_len, dk),
            values: TokenRows::heads_major(dptr(v, &stream, &mut g), kv_heads, max_len, dv),
            seq_lens: dptr(&self.lens_dev[self.cur], &stream, &mut g),
            max_len,
            cache: CacheBuffers {
                k_codes: dptr_mut(&mut self.k_codes, &stream, &mut g),
                k_params: dptr_mut(&mut self.k_params, &stream, &mut g),
                k_res: dptr_mut(&mut self.k_res, &stream, &mut g),
                v_codes: dptr_mut(&mut self.v_codes, &stream, &mut g),
                v_scale: dptr_mut(&mut self.v_scale, &stream, &mut g),
                v_mn: dptr_mut(&mut self.v_mn, &stream, &mut g),
                v_res: dptr_mut(&mut self.v_res, &stream, &mut g),
            },
            blocks: addressing,
            error_flag: dptr_mut(&mut self.error_flag, &stream, &mut g),
        };
        // SAFETY: every buffer was allocated for this layout, batch and capacity (allocate); k and v were checked
        // against [batch, num_kv_heads, max_len, head_dim]; the lengths were checked against max_len and the
        // capacity.
        unsafe {
            self.module
                .launch_prefill(stream.cu_stream() as CUstream, &args)
        }?;
        drop(g);
        self.lens.copy_from_slice(lens);
        Ok(())
    }

    /// [`KiviCache::prefill`] from host slices (copies them to the GPU first).
    ///
    /// # Errors
    /// As [`KiviCache::prefill`].
    pub fn prefill_host<T: ActivationElem>(&mut self, k: &[T], v: &[T], len: u32) -> Result<()> {
        self.check_dtype::<T>("prefill")?;
        let kv_heads = self.layout.num_kv_heads;
        let (dk, dv) = (self.storage.key_head_dim, self.storage.value_head_dim);
        self.check_len("prefill k", k.len(), len as usize, kv_heads, dk)?;
        self.check_len("prefill v", v.len(), len as usize, kv_heads, dv)?;
        if len == 0 {
            // Nothing to copy: the same checks as a device prefill of 0 tokens.
            return self.check_empty();
        }
        let dk = self.stream.clone_htod(k)?;
        let dv = self.stream.clone_htod(v)?;
        self.prefill(&dk, &dv, len)
    }

    /// One decode step (KIVI Algorithm 1): appends `k`, `v` (`[batch, num_kv_heads, head_dim]`; the keys'
    /// head_dim for `k`, the values' for `v`) to every sequence, writes the attention of `q` (`[batch, num_heads,
    /// key head_dim]`; query head h reads KV head `h / (H / Hkv)`) over every cached token of its sequence,
    /// the new one included (sink tokens too), into `out` (`[batch, num_heads, value head_dim]`; scores scaled
    /// by 1/sqrt(key head_dim), softmax in fp32), then flushes
    /// as the reference does: the full-precision keys once they number R (one block), the oldest full-precision
    /// value once they number R + 1. One kernel launch; the sequences may have different lengths. Every tensor is
    /// of the layout's activation dtype (`T`: [`f16`] or [`bf16`]); the tensor cores compute in fp16 either way, so
    /// bf16 activations must lie within fp16's range (|x| <= 65504) or the output becomes infinite or NaN.
    ///
    /// # Errors
    /// [`RuntimeError::Shape`] if a length does not match; [`RuntimeError::Limit`] when a sequence is full;
    /// [`RuntimeError::State`] if `T` is not the layout's dtype; driver errors.
    pub fn decode_step<T: ActivationElem>(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.decode_step_with(q, k, v, out, DecodeOptions::default())
    }

    /// [`KiviCache::decode_step`] with options: the log-sum-exp of each output row, a sliding window, a softmax
    /// scale.
    ///
    /// # Errors
    /// As [`KiviCache::decode_step`]; [`RuntimeError::Shape`] if `lse` is not `[batch, num_heads]`;
    /// [`RuntimeError::State`] for a softmax scale that is not finite and positive.
    pub fn decode_step_with<T: ActivationElem>(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        options: DecodeOptions<'_>,
    ) -> Result<()> {
        // One step is one token of each sequence.
        self.decode_tokens(q, k, v, out, 1, None, options)
    }

    /// Several new tokens per sequence (q_len > 1: draft-token verification, chunked prefill), causal: sequence
    /// `b` appends its first `q_lens[b]` tokens (all `q_len` when `q_lens` is None) and token `j` attends to
    /// every earlier token and itself. Exactly `q_lens[b]` repeated [`KiviCache::decode_step`]s (flushes
    /// included, so the results are those of single steps, bit for bit), queued as `q_len` launches of the
    /// decode kernel that leave a sequence alone once its tokens are done. No device synchronization; `q_lens`
    /// is copied from host memory first (pageable: the copy may wait for the host side of the transfer).
    ///
    /// Shapes (the layout's dtype, token-major so that token `j`'s rows are one step's): `q` and `out`
    /// `[q_len, batch, num_heads, head_dim]`, `k` and `v` `[q_len, batch, num_kv_heads, head_dim]` (`q` and `k` with
    /// the keys' head_dim, `v` and `out` with the values'), `lse` (in
    /// `options`) f32 `[q_len, batch, num_heads]`. Rows of tokens past a sequence's `q_lens[b]` are neither read
    /// nor written. Options apply to every token (a window counts back from each token). A launch error at token
    /// `j` returns with the tokens before it appended ([`KiviCache::lens`] tells).
    ///
    /// # Errors
    /// [`RuntimeError::Limit`] for `q_len` 0, a `q_lens` entry above `q_len`, or a sequence without room for its
    /// tokens; [`RuntimeError::Shape`] if a buffer or `q_lens` does not match; as
    /// [`KiviCache::decode_step_with`] otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_tokens<T: ActivationElem>(
        &mut self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        q_len: u32,
        q_lens: Option<&[u32]>,
        options: DecodeOptions<'_>,
    ) -> Result<()> {
        self.check_dtype::<T>("decode")?;
        if q_len == 0 {
            return Err(RuntimeError::Limit {
                what: "q_len",
                value: 0,
                limit: "it must be at least 1".into(),
            });
        }
        if let Some(l) = q_lens {
            if l.len() != self.batch as usize {
                return Err(RuntimeError::Shape {
                    what: "q_lens",
                    shape: format!("[batch {}]", self.batch),
                    expected: self.batch as usize,
                    got: l.len(),
                });
            }
            if let Some(&bad) = l.iter().find(|&&n| n > q_len) {
                return Err(RuntimeError::Limit {
                    what: "q_lens entry",
                    value: bad.into(),
                    limit: format!("it must be at most q_len {q_len}"),
                });
            }
        }
        // The new tokens of batch entry b (no allocation on the one-token path of decode_step).
        let takes = |b: usize| q_lens.map_or(q_len, |l| l[b]);
        self.check_step_io(q, k, v, out, options.lse.as_deref(), q_len)?;
        let (heads, kv_heads) = (self.layout.num_heads, self.layout.num_kv_heads);
        for (b, &len) in self.lens.iter().enumerate() {
            let n = takes(b);
            let needed = u64::from(len) + u64::from(n);
            if needed > u64::from(self.capacity) {
                return Err(RuntimeError::Limit {
                    what: "tokens per sequence",
                    value: needed,
                    limit: format!(
                        "batch entry {b} holds {len} and takes {n}; the cache's capacity is {}",
                        self.capacity
                    ),
                });
            }
        }
        let most = self
            .lens
            .iter()
            .enumerate()
            .map(|(b, &l)| l + takes(b))
            .max()
            .unwrap_or(0);
        let grid_splits = self.module.decode_splits(most, options.window);
        if let Some(l) = q_lens {
            let as_i32: Vec<i32> = l.iter().map(|&n| n as i32).collect();
            self.stream.memcpy_htod(&as_i32, &mut self.q_lens_dev)?;
        }
        let (dk, dv) = (
            u64::from(self.storage.key_head_dim),
            u64::from(self.storage.value_head_dim),
        );
        let batch = u64::from(self.batch);
        let (q_slab, out_slab, k_slab, v_slab, lse_slab) = (
            2 * batch * u64::from(heads) * dk,
            2 * batch * u64::from(heads) * dv,
            2 * batch * u64::from(kv_heads) * dk,
            2 * batch * u64::from(kv_heads) * dv,
            4 * batch * u64::from(heads),
        );
        let mut lse = options.lse;
        for j in 0..q_len {
            let step = StepOptions {
                window: options.window,
                softmax_scale: options.softmax_scale,
                q_index: q_lens.map(|_| j),
            };
            let stream = self.stream.clone();
            let module = self.module.clone();
            let cur = self.cur;
            let mut g = Vec::new();
            let io = DecodeIo {
                q,
                k,
                v,
                out: &mut *out,
                lse: lse.as_deref_mut(),
            };
            let mut args = self.decode_args(&stream, io, cur, grid_splits, &step, &mut g);
            let jj = u64::from(j);
            args.q += jj * q_slab;
            args.out += jj * out_slab;
            args.k_new += jj * k_slab;
            args.v_new += jj * v_slab;
            if args.lse != 0 {
                args.lse += jj * lse_slab;
            }
            // SAFETY: every buffer was allocated for this layout, batch and capacity (allocate), the scratch for
            // max_splits >= grid_splits splits (checked_max_splits at the capacity, which bounds every length);
            // q, k, v, out and lse were checked against the layout, batch and q_len, so token j's rows lie inside
            // them; every sequence has room for its tokens.
            unsafe { module.launch_decode(stream.cu_stream() as CUstream, &args) }?;
            drop(g);
            self.cur = 1 - self.cur;
            for (b, l) in self.lens.iter_mut().enumerate() {
                if j < takes(b) {
                    *l += 1;
                }
            }
        }
        Ok(())
    }

    /// [`KiviCache::decode_tokens`] from host slices; returns `out` `[q_len, batch, num_heads, value head_dim]`
    /// (NaN in the rows of tokens past a sequence's `q_lens[b]`).
    ///
    /// # Errors
    /// As [`KiviCache::decode_tokens`].
    pub fn decode_tokens_host<T: ActivationElem>(
        &mut self,
        q: &[T],
        k: &[T],
        v: &[T],
        q_len: u32,
        q_lens: Option<&[u32]>,
    ) -> Result<Vec<T>> {
        self.check_dtype::<T>("decode")?;
        if q_len == 0 {
            return Err(RuntimeError::Limit {
                what: "q_len",
                value: 0,
                limit: "it must be at least 1".into(),
            });
        }
        let t = q_len as usize;
        let (heads, kv_heads) = (self.layout.num_heads, self.layout.num_kv_heads);
        let (dkh, dvh) = (self.storage.key_head_dim, self.storage.value_head_dim);
        self.check_len("decode q", q.len(), t, heads, dkh)?;
        self.check_len("decode k", k.len(), t, kv_heads, dkh)?;
        self.check_len("decode v", v.len(), t, kv_heads, dvh)?;
        let dq = self.stream.clone_htod(q)?;
        let dk = self.stream.clone_htod(k)?;
        let dv = self.stream.clone_htod(v)?;
        // Poisoned (NaN) so that an element the kernels fail to write cannot pass a check.
        let out_len =
            t * self.batch as usize * heads as usize * self.storage.value_head_dim as usize;
        let mut out = self
            .stream
            .clone_htod(&vec![T::from_f32(f32::NAN); out_len])?;
        self.decode_tokens(
            &dq,
            &dk,
            &dv,
            &mut out,
            q_len,
            q_lens,
            DecodeOptions::default(),
        )?;
        Ok(self.stream.clone_dtoh(&out)?)
    }

    /// Checks the q, k, v, out and lse of `tokens` new tokens per sequence against the layout and batch.
    fn check_step_io<T>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &CudaSlice<T>,
        lse: Option<&CudaSlice<f32>>,
        tokens: u32,
    ) -> Result<()> {
        let (heads, kv_heads) = (self.layout.num_heads, self.layout.num_kv_heads);
        let t = tokens as usize;
        let (dk, dv) = (self.storage.key_head_dim, self.storage.value_head_dim);
        self.check_len("decode q", q.len(), t, heads, dk)?;
        self.check_len("decode k", k.len(), t, kv_heads, dk)?;
        self.check_len("decode v", v.len(), t, kv_heads, dv)?;
        self.check_len("decode out", out.len(), t, heads, dv)?;
        if let Some(lse) = lse {
            let rows = t * self.batch as usize * heads as usize;
            if lse.len() != rows {
                let q_len = if tokens == 1 {
                    String::new()
                } else {
                    format!("q_len {tokens}, ")
                };
                return Err(RuntimeError::Shape {
                    what: "decode lse",
                    shape: format!("[{q_len}batch {}, num_heads {heads}]", self.batch),
                    expected: rows,
                    got: lse.len(),
                });
            }
        }
        Ok(())
    }

    /// After a queued step: the other length buffer is current, and the host's copy of the lengths grows by one.
    fn advance(&mut self) {
        self.cur = 1 - self.cur;
        self.lens.iter_mut().for_each(|l| *l += 1);
    }

    /// The raw arguments of a step that reads lengths buffer `cur` and writes the next lengths into the other.
    fn decode_args<'a, T>(
        &'a mut self,
        stream: &'a CudaStream,
        io: DecodeIo<'a, T>,
        cur: usize,
        grid_splits: u32,
        options: &StepOptions,
        g: &mut Vec<SyncOnDrop<'a>>,
    ) -> DecodeArgs {
        let addressing = self.addressing();
        let [lens_a, lens_b] = &mut self.lens_dev;
        let (lens_now, lens_next) = if cur == 0 {
            (lens_a, lens_b)
        } else {
            (lens_b, lens_a)
        };
        DecodeArgs {
            batch: self.batch,
            q: dptr(io.q, stream, g),
            k_new: dptr(io.k, stream, g),
            v_new: dptr(io.v, stream, g),
            out: dptr_mut(io.out, stream, g),
            lse: match io.lse {
                Some(l) => dptr_mut(l, stream, g),
                None => 0,
            },
            seq_lens: dptr(lens_now, stream, g),
            seq_lens_next: dptr_mut(lens_next, stream, g),
            q_lens: match options.q_index {
                Some(_) => dptr(&self.q_lens_dev, stream, g),
                None => 0,
            },
            q_index: options.q_index.unwrap_or(0),
            cache: CacheBuffers {
                k_codes: dptr_mut(&mut self.k_codes, stream, g),
                k_params: dptr_mut(&mut self.k_params, stream, g),
                k_res: dptr_mut(&mut self.k_res, stream, g),
                v_codes: dptr_mut(&mut self.v_codes, stream, g),
                v_scale: dptr_mut(&mut self.v_scale, stream, g),
                v_mn: dptr_mut(&mut self.v_mn, stream, g),
                v_res: dptr_mut(&mut self.v_res, stream, g),
            },
            blocks: addressing,
            scratch: DecodeScratch {
                part_acc: dptr_mut(&mut self.part_acc, stream, g),
                part_ml: dptr_mut(&mut self.part_ml, stream, g),
                counters: dptr_mut(&mut self.counters, stream, g),
                splits: self.max_splits,
            },
            grid_splits,
            window: options.window,
            softmax_scale: options.softmax_scale,
            error_flag: dptr_mut(&mut self.error_flag, stream, g),
        }
    }

    /// Captures a decode step into CUDA graphs on `capture_stream` (a stream of this cache's context other than
    /// its own, e.g. `gpu.context().new_stream()`: the legacy default stream cannot be captured). The graphs read
    /// `q`, `k`, `v` and write `out` (and `lse`) where they are now, so the caller refills those buffers before
    /// each [`KiviCache::replay_decode`]. The grid is fixed at the splits of the capacity
    /// ([`LayoutModule::graph_grid_splits`]) and the lengths are read on the device, so one capture serves
    /// every later step: two graphs are captured, one per length buffer, and replays alternate. The graphs
    /// hold the addresses of the cache's buffers and of `q`, `k`, `v`, `out` and `lse`: they serve this cache until
    /// [`KiviCache::set_module`] (which may move the scratch; replay then refuses them), and the io buffers must
    /// outlive every replay ([`KiviCache::replay_decode`] is `unsafe` for that reason).
    ///
    /// # Errors
    /// As [`KiviCache::decode_step_with`]; [`RuntimeError::State`] if `capture_stream` is this cache's stream
    /// or of another context; driver errors (a capture that fails is ended).
    pub fn capture_decode<T: ActivationElem>(
        &mut self,
        capture_stream: &Arc<CudaStream>,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        options: DecodeOptions<'_>,
    ) -> Result<DecodeGraph> {
        self.check_dtype::<T>("capture_decode")?;
        if Arc::ptr_eq(capture_stream, &self.stream)
            || !Arc::ptr_eq(capture_stream.context(), self.stream.context())
        {
            return Err(RuntimeError::State(
                "capture_decode needs a stream of the cache's context other than the cache's own (the legacy default \
                 stream cannot be captured): gpu.context().new_stream()"
                    .into(),
            ));
        }
        self.check_step_io(q, k, v, out, options.lse.as_deref(), 1)?;
        let grid_splits = self.module.graph_grid_splits(self.capacity);
        let step = options_only(&options);
        let mut lse = options.lse;
        let mut graphs = Vec::with_capacity(2);
        for cur in 0..2 {
            let stream = self.stream.clone();
            let module = self.module.clone();
            let mut g = Vec::new();
            let io = DecodeIo {
                q,
                k,
                v,
                out: &mut *out,
                lse: lse.as_deref_mut(),
            };
            let args = self.decode_args(&stream, io, cur, grid_splits, &step, &mut g);
            // cudarc's event bookkeeping happens now, on the cache's stream, outside the capture.
            drop(g);
            capture_stream.join(&self.stream)?;
            capture_stream.begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )?;
            // SAFETY: as in decode_tokens; the graph keeps the pointers, which stay valid while the cache
            // and the io buffers live (replay_decode checks the graph belongs to this cache).
            let launched =
                unsafe { module.launch_decode(capture_stream.cu_stream() as CUstream, &args) };
            let graph =
                capture_stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
            launched?;
            graphs.push(
                graph?.ok_or_else(|| RuntimeError::State("the capture recorded nothing".into()))?,
            );
        }
        let [a, b]: [cudarc::driver::CudaGraph; 2] = graphs
            .try_into()
            .map_err(|_| RuntimeError::State("expected two graphs".into()))?;
        Ok(DecodeGraph {
            graphs: [a, b],
            stream: capture_stream.clone(),
            cache_id: self.id,
            generation: self.generation,
            _module: self.module.clone(),
        })
    }

    /// Replays a captured decode step ([`KiviCache::capture_decode`]): one step over every sequence, with the
    /// inputs now in the captured buffers; ordered after the cache's earlier work and before its later work.
    ///
    /// # Errors
    /// [`RuntimeError::State`] if the graph was captured on another cache, or before a
    /// [`KiviCache::set_module`]; [`RuntimeError::Limit`] when a sequence is full; driver errors.
    ///
    /// # Safety
    /// The `q`, `k`, `v`, `out` and `lse` buffers given to [`KiviCache::capture_decode`] are still allocated (the
    /// graph writes `out` and `lse` and reads the others at the addresses they had then).
    pub unsafe fn replay_decode(&mut self, graph: &DecodeGraph) -> Result<()> {
        if graph.cache_id != self.id || graph.generation != self.generation {
            return Err(RuntimeError::State(
                "the decode graph was captured on another cache, or before set_module: capture it again".into(),
            ));
        }
        self.check_room(1)?;
        graph.stream.join(&self.stream)?;
        graph.graphs[self.cur].launch()?;
        self.stream.join(&graph.stream)?;
        self.advance();
        Ok(())
    }

    /// [`KiviCache::decode_step`] from host slices; returns the output `[batch, num_heads, value head_dim]`.
    ///
    /// # Errors
    /// As [`KiviCache::decode_step`].
    pub fn decode_step_host<T: ActivationElem>(
        &mut self,
        q: &[T],
        k: &[T],
        v: &[T],
    ) -> Result<Vec<T>> {
        self.decode_tokens_host(q, k, v, 1, None)
    }

    /// Copies the cache to the host in the reference code's layouts (the `final_*` tensors of the reference
    /// files; see [`CacheExport`]), for tests and `kivi verify`. Synchronizes the stream.
    ///
    /// # Errors
    /// Driver errors.
    pub fn export(&self) -> Result<CacheExport> {
        if self.lens.iter().any(|&l| l != self.len()) {
            return Err(RuntimeError::State(format!(
                "export needs every sequence at one length (the reference layout has one), these have {:?}",
                self.lens
            )));
        }
        let st = &self.storage;
        let s = &self.stream;
        let (k_codes, k_params, k_res) = (
            s.clone_dtoh(&self.k_codes)?,
            s.clone_dtoh(&self.k_params)?,
            s.clone_dtoh(&self.k_res)?,
        );
        let (v_codes, v_scale, v_mn, v_res) = (
            s.clone_dtoh(&self.v_codes)?,
            s.clone_dtoh(&self.v_scale)?,
            s.clone_dtoh(&self.v_mn)?,
            s.clone_dtoh(&self.v_res)?,
        );
        let (dk, dv) = (st.key_head_dim as usize, st.value_head_dim as usize);
        let r = st.residual_length as usize;
        let bps = self.blocks_per_seq as usize;
        let (len, qk, qv) = (
            self.len() as usize,
            self.quantized_keys() as usize,
            self.quantized_values() as usize,
        );
        // Positions below count the tokens after the sinks, n of them.
        let n = st.after_sinks(self.len()) as usize;
        let sinks = len - n;
        let (key_rows, value_rows) = (st.key_res_rows() as usize, st.value_res_rows() as usize);
        let mut e = CacheExport {
            batch: self.batch as usize,
            kv_heads: self.layout.num_kv_heads as usize,
            head_dim: dk,
            value_head_dim: dv,
            dtype: self.layout.dtype,
            k_axis: self.layout.keys.axis,
            v_axis: self.layout.values.axis,
            k_scale_dtype: self.layout.keys.scale_dtype,
            v_scale_dtype: self.layout.values.scale_dtype,
            k_bits: self.layout.keys.bits,
            v_bits: self.layout.values.bits,
            k_group: st.key_group_size as usize,
            v_group: st.value_group_size as usize,
            len,
            sink_tokens: sinks,
            quantized_keys: qk,
            residual_keys: n - qk,
            quantized_values: qv,
            residual_values: n - qv,
            ..CacheExport::default()
        };
        let (kbw, kbp) = (
            st.key_block_words() as usize,
            st.key_block_params() as usize,
        );
        let (vbw, vbp) = (
            st.value_block_words() as usize,
            st.value_block_params() as usize,
        );
        let (kb, vb) = (st.key_bits, st.value_bits);
        let (dtype, kfmt, vfmt) = (
            self.layout.dtype,
            self.layout.keys.scale_dtype,
            self.layout.values.scale_dtype,
        );
        // The reference layouts are bit streams (kivi_reference::pack_codes_padded): per channel along tokens for
        // keys (a whole number of words: R is a multiple of 64), per token along head_dim for values (zero-padded to
        // whole words, kivi_reference::value_words_per_token).
        let pack = |codes: &[u8], bits: u32| {
            kivi_reference::pack_codes_padded(codes, bits)
                .map_err(|e| RuntimeError::State(format!("export: packing codes: {e}")))
        };
        let (kg, vg) = (st.key_group_size as usize, st.value_group_size as usize);
        let vring = st.value_ring as usize;
        let table = match &self.paging {
            Some(p) => {
                let t = s.clone_dtoh(&p.table)?;
                // Only the entries of blocks that hold quantized tokens are read (vLLM-style padding may be -1).
                let used = (self.quantized_keys() as usize).div_ceil(r);
                let per_seq = p.entries_per_seq as usize;
                let live = t
                    .chunks(per_seq.max(1))
                    .flat_map(|row| row.iter().take(used));
                if let Some(bad) = live.into_iter().find(|&&e| e < 0 || e as u32 >= p.pages) {
                    return Err(RuntimeError::State(format!(
                        "export: block table entry {bad} is outside [0, {})",
                        p.pages
                    )));
                }
                Some((t, p.entries_per_seq as usize))
            }
            None => None,
        };
        let hkv = self.layout.num_kv_heads as usize;
        // The storage index of block i of sequence seq (contiguous, or through the block table).
        let block_of = |seq: usize, i: usize| -> usize {
            match &table {
                None => seq * bps + i,
                Some((t, per_seq)) => t[(seq / hkv) * per_seq + i] as usize * hkv + seq % hkv,
            }
        };
        for seq in 0..self.seqs() as usize {
            // Keys in the reference layout: codes [D][qk / cpw] packed along tokens, params [D][qk / G].
            for c in 0..dk {
                let codes: Vec<u8> = (0..qk)
                    .map(|t| {
                        let base = block_of(seq, t / r) * kbw;
                        let pos = st.key_code_position((t % r) as u32, c as u32);
                        pos.read(&k_codes[base..base + kbw], kb) as u8
                    })
                    .collect();
                e.k_code
                    .extend(pack(&codes, kb)?.into_iter().map(|w| w as i32));
                for g in 0..qk / kg {
                    let t = g * kg;
                    let (scale, min) = st.key_param_index((t % r) as u32, c as u32);
                    let base = block_of(seq, t / r) * kbp;
                    e.k_scale.push(param_at(&k_params, kfmt, base + scale));
                    e.k_mn.push(param_at(&k_params, kfmt, base + min));
                }
            }
            for p in qk..n {
                let row = (seq * key_rows + p % r) * dk;
                e.k_residual.extend(acts_at(&k_res, dtype, row, dk));
            }
            for i in 0..sinks {
                let (kr, vr) = (
                    (seq * key_rows + r + i) * dk,
                    (seq * value_rows + vring + i) * dv,
                );
                e.k_sink.extend(acts_at(&k_res, dtype, kr, dk));
                e.v_sink.extend(acts_at(&v_res, dtype, vr, dv));
            }
            // Values: codes [qv][ceil(Dv * bits / 32)] packed along head_dim, params [qv][Dv / G].
            for p in 0..qv {
                let (base, tb) = (block_of(seq, p / r) * vbw, (p % r) as u32);
                let block = &v_codes[base..base + vbw];
                let codes: Vec<u8> = (0..dv as u32)
                    .map(|c| st.value_code_position(tb, c).read(block, vb) as u8)
                    .collect();
                e.v_code
                    .extend(pack(&codes, vb)?.into_iter().map(|w| w as i32));
                for g in 0..dv / vg {
                    let i = block_of(seq, p / r) * vbp + st.value_param_index(tb, (g * vg) as u32);
                    e.v_scale.push(param_at(&v_scale, vfmt, i));
                    e.v_mn.push(param_at(&v_mn, vfmt, i));
                }
            }
            for p in qv..n {
                let row = (seq * value_rows + p % vring) * dv;
                e.v_residual.extend(acts_at(&v_res, dtype, row, dv));
            }
        }
        Ok(e)
    }
}
