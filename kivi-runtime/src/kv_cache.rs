//! The KIVI KV cache on the GPU: Algorithm 1 of KIVI (Liu et al., ICML 2024) over the block-major layout of
//! [`kivi_codegen::StorageLayout`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;
use kivi_codegen::{DecodePlan, KernelKind, StorageLayout, MAX_SPLITS};
use kivi_dsl::Layout;
pub use kivi_reference::CacheExport;

use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, LayoutModule};

/// The largest capacity (tokens per sequence) a cache may have: positions are 32-bit in the kernels.
pub const MAX_CAPACITY: u32 = 1 << 28;

/// Tokens per split the automatic split never goes below (per-block overheads would dominate).
const MIN_AUTO_SPLIT: u32 = 2048;

/// The most splits the automatic split makes.
const AUTO_SPLITS: u32 = 64;

/// The number of splits the automatic split makes for `len` tokens: floor(len / 2048), between 1 and 64 (so a
/// split never holds fewer than 2048 tokens, and a sequence just past a multiple of 2048 gets no tiny split).
fn auto_splits(len: u32) -> u32 {
    (len / MIN_AUTO_SPLIT).clamp(1, AUTO_SPLITS)
}

/// Tokens per split for a decode over `len` tokens: `fixed` if tuned (non-zero), else `len` shared evenly among
/// [`auto_splits`] splits, rounded up to the decode iteration. Either way a function of the sequence's length and
/// the tile only, never of the batch or the GPU, so that a sequence gets the same splits, and the same fp32
/// merge, alone or in any batch (batch-invariant results).
fn split_tokens(fixed: u32, len: u32, plan: &DecodePlan) -> u32 {
    if fixed > 0 {
        return fixed;
    }
    let it = plan.iter_tokens;
    len.max(1).div_ceil(auto_splits(len)).div_ceil(it) * it
}

/// The most splits any decode step of a cache of `capacity` tokens can have (sizes the split-K scratch).
fn max_splits(fixed: u32, capacity: u32) -> u32 {
    if fixed > 0 {
        capacity.div_ceil(fixed)
    } else {
        auto_splits(capacity)
    }
}

/// [`max_splits`] of `module`'s decode tile at `capacity`, or the error if the kernel cannot merge that many.
fn checked_max_splits(module: &LayoutModule, capacity: u32) -> Result<u32> {
    let tile = module.kernels().spec(KernelKind::DecodePartial).tile;
    let splits = max_splits(tile.split_tokens, capacity);
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

/// A KIVI KV cache of `batch x num_kv_heads` sequences on one GPU, with preallocated capacity.
///
/// Quantized keys and values live in blocks of R tokens ([`StorageLayout`]), full-precision tokens in rings, so
/// appends and flushes never copy the cache. All sequences have the same length. Every method launches on the
/// GPU's stream and returns without waiting, except the `_host` conveniences and [`KiviCache::export`], which
/// copy to or from the host and so synchronize.
#[derive(Debug)]
pub struct KiviCache {
    layout: Layout,
    storage: StorageLayout,
    module: Arc<LayoutModule>,
    stream: Arc<CudaStream>,
    batch: u32,
    capacity: u32,
    blocks_per_seq: u32,
    k_codes: CudaSlice<u32>,
    k_params: CudaSlice<f16>,
    k_res: CudaSlice<f16>,
    v_codes: CudaSlice<u32>,
    v_scale: CudaSlice<f16>,
    v_mn: CudaSlice<f16>,
    v_res: CudaSlice<f16>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    counters: CudaSlice<u32>,
    plan: DecodePlan,
    max_splits: u32,
    len: u32,
    quantized_keys: u32,
    quantized_values: u32,
}

fn launch_cfg(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl KiviCache {
    /// Allocates a cache for `batch` sequences of up to `capacity` tokens each (per KV head), for the layout of
    /// `module` (from [`Gpu::load_layout`]).
    ///
    /// # Errors
    /// [`RuntimeError::Limit`] for batch 0, capacity 0 or above [`MAX_CAPACITY`], more than 65535 sequences
    /// (batch x num_kv_heads, a grid limit); driver errors (e.g. out of memory).
    pub fn new(gpu: &Gpu, module: Arc<LayoutModule>, batch: u32, capacity: u32) -> Result<Self> {
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
        let blocks = seqs as usize * blocks_per_seq as usize;
        let stream = gpu.stream().clone();
        let d = storage.head_dim as usize;
        let plan = DecodePlan::new(&layout);
        let max_splits = checked_max_splits(&module, capacity)?;
        let rows = seqs as usize * layout.gqa_ratio() as usize;
        Ok(KiviCache {
            k_codes: stream.alloc_zeros(blocks * storage.key_block_words() as usize)?,
            k_params: stream.alloc_zeros(blocks * storage.key_block_params() as usize)?,
            k_res: stream.alloc_zeros(seqs as usize * storage.residual_length as usize * d)?,
            v_codes: stream.alloc_zeros(blocks * storage.value_block_words() as usize)?,
            v_scale: stream.alloc_zeros(blocks * storage.value_block_params() as usize)?,
            v_mn: stream.alloc_zeros(blocks * storage.value_block_params() as usize)?,
            v_res: stream.alloc_zeros(seqs as usize * storage.value_ring as usize * d)?,
            part_acc: stream.alloc_zeros(rows * max_splits as usize * d)?,
            part_ml: stream.alloc_zeros(rows * max_splits as usize * 2)?,
            counters: stream.alloc_zeros(seqs as usize)?,
            plan,
            max_splits,
            layout,
            storage,
            module,
            stream,
            batch,
            capacity,
            blocks_per_seq,
            len: 0,
            quantized_keys: 0,
            quantized_values: 0,
        })
    }

    /// The split-K plan of a decode step over `len` tokens per sequence: (tokens per split, number of splits).
    /// A tuned `split_tokens` in the decode tile is used as is; 0 (the default) shares `len` evenly among
    /// floor(len / 2048) splits (1 to 64). Both depend on the length and the tile only, never on the batch or
    /// the GPU. Either way the split of a sequence depends only on its length
    /// and this cache's configuration, never on the data.
    pub fn split_plan(&self, len: u32) -> (u32, u32) {
        let tile = self.module.kernels().spec(KernelKind::DecodePartial).tile;
        let split = split_tokens(tile.split_tokens, len, &self.plan);
        let splits = len.div_ceil(split);
        // max_splits bounds every len <= capacity by construction (see max_splits and split_tokens).
        debug_assert!(splits <= self.max_splits, "{splits} > {}", self.max_splits);
        (split, splits)
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
        let needed = checked_max_splits(&module, self.capacity)?;
        if needed > self.max_splits {
            let rows = self.seqs() as usize * self.layout.gqa_ratio() as usize;
            let d = self.storage.head_dim as usize;
            self.part_acc = self.stream.alloc_zeros(rows * needed as usize * d)?;
            self.part_ml = self.stream.alloc_zeros(rows * needed as usize * 2)?;
            self.max_splits = needed;
        }
        self.module = module;
        Ok(())
    }

    /// Empties the cache (length 0), so it can take a new prefill: what it held is never read again (every read
    /// is bounded by the new length). Also zeroes the decode kernel's per-sequence completion counters (left
    /// non-zero only by a launch that failed while running).
    ///
    /// # Errors
    /// Driver errors (the memset is queued on the stream).
    pub fn reset(&mut self) -> Result<()> {
        self.stream.memset_zeros(&mut self.counters)?;
        self.len = 0;
        self.quantized_keys = 0;
        self.quantized_values = 0;
        Ok(())
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

    /// Tokens per sequence now.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True before any token was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Quantized keys per sequence (a multiple of `residual_length`).
    pub fn quantized_keys(&self) -> u32 {
        self.quantized_keys
    }

    /// Quantized values per sequence.
    pub fn quantized_values(&self) -> u32 {
        self.quantized_values
    }

    /// The loaded kernels.
    pub fn module(&self) -> &Arc<LayoutModule> {
        &self.module
    }

    fn seqs(&self) -> u32 {
        self.batch * self.layout.num_kv_heads
    }

    fn check_len(&self, what: &'static str, got: usize, tokens: usize, heads: u32) -> Result<()> {
        let d = self.storage.head_dim as usize;
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

    fn check_empty(&self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        Err(RuntimeError::State(format!(
            "prefill needs an empty cache, this one holds {} tokens per sequence",
            self.len
        )))
    }

    fn check_room(&self, tokens: u32) -> Result<()> {
        let needed = u64::from(self.len) + u64::from(tokens);
        if needed > u64::from(self.capacity) {
            return Err(RuntimeError::Limit {
                what: "tokens per sequence",
                value: needed,
                limit: format!("the cache's capacity is {}", self.capacity),
            });
        }
        Ok(())
    }

    /// Prefill (KIVI Algorithm 1): `k`, `v` are `[batch, num_kv_heads, len, head_dim]` fp16 on the GPU. Keys: if
    /// `len < R` all stay full precision, else the first `len - len % R` are quantized per-channel. Values: if
    /// `len <= R` all stay full precision, else all but the newest R are quantized per-token.
    ///
    /// # Errors
    /// [`RuntimeError::State`] if the cache is not empty; [`RuntimeError::Shape`] if a length does not match;
    /// [`RuntimeError::Limit`] if `len` exceeds the capacity; driver errors.
    pub fn prefill(&mut self, k: &CudaSlice<f16>, v: &CudaSlice<f16>, len: u32) -> Result<()> {
        self.check_empty()?;
        let kv_heads = self.layout.num_kv_heads;
        self.check_len("prefill k", k.len(), len as usize, kv_heads)?;
        self.check_len("prefill v", v.len(), len as usize, kv_heads)?;
        self.check_room(len)?;
        if len == 0 {
            return Ok(());
        }
        let r = self.storage.residual_length;
        let d = i64::from(self.storage.head_dim);
        let seq_stride = i64::from(len) * d;
        let qk = if len >= r { len - len % r } else { 0 };
        let qv = len.saturating_sub(r);
        self.quantize_keys(k, seq_stride, qk / r)?;
        self.quantize_values(v, seq_stride, qv)?;
        self.store_residual(k, seq_stride, qk, len - qk, Ring::Keys, qk)?;
        self.store_residual(v, seq_stride, qv, len - qv, Ring::Values, qv)?;
        self.len = len;
        self.quantized_keys = qk;
        self.quantized_values = qv;
        Ok(())
    }

    /// [`KiviCache::prefill`] from host slices (copies them to the GPU first).
    ///
    /// # Errors
    /// As [`KiviCache::prefill`].
    pub fn prefill_host(&mut self, k: &[f16], v: &[f16], len: u32) -> Result<()> {
        let kv_heads = self.layout.num_kv_heads;
        self.check_len("prefill k", k.len(), len as usize, kv_heads)?;
        self.check_len("prefill v", v.len(), len as usize, kv_heads)?;
        if len == 0 {
            // Nothing to copy: the same checks as a device prefill of 0 tokens.
            return self.check_empty();
        }
        let dk = self.stream.clone_htod(k)?;
        let dv = self.stream.clone_htod(v)?;
        self.prefill(&dk, &dv, len)
    }

    /// One decode step (KIVI Algorithm 1): appends `k`, `v` (`[batch, num_kv_heads, head_dim]` fp16), writes the
    /// attention of `q` (`[batch, num_heads, head_dim]` fp16; query head h reads KV head `h / (H / Hkv)`) over
    /// every cached token including the new one into `out` (`[batch, num_heads, head_dim]` fp16; scores scaled
    /// by 1/sqrt(head_dim), softmax in fp32), then flushes as the reference does: the full-precision keys once
    /// they number R (one block), the oldest full-precision value once they number R + 1.
    ///
    /// # Errors
    /// [`RuntimeError::Shape`] if a length does not match; [`RuntimeError::Limit`] when the cache is full;
    /// driver errors.
    pub fn decode_step(
        &mut self,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        out: &mut CudaSlice<f16>,
    ) -> Result<()> {
        let (heads, kv_heads) = (self.layout.num_heads, self.layout.num_kv_heads);
        self.check_len("decode q", q.len(), 1, heads)?;
        self.check_len("decode k", k.len(), 1, kv_heads)?;
        self.check_len("decode v", v.len(), 1, kv_heads)?;
        self.check_len("decode out", out.len(), 1, heads)?;
        self.check_room(1)?;
        let before = (self.len, self.quantized_keys, self.quantized_values);
        let result = self.append_attend_flush(q, k, v, out);
        if result.is_err() {
            // A launch that could not be queued leaves the host counters (len, quantized keys and values) where
            // they were, so the flush rules stay consistent; a kernel that fails while running leaves the CUDA
            // context in error, and `reset` zeroes the device's completion counters.
            (self.len, self.quantized_keys, self.quantized_values) = before;
        }
        result
    }

    fn append_attend_flush(
        &mut self,
        q: &CudaSlice<f16>,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        out: &mut CudaSlice<f16>,
    ) -> Result<()> {
        // One launch: append k and v to the rings, attend over all len + 1 tokens (split-K), merge the splits
        // into `out` and run the flushes of Algorithm 1 that follow the step.
        let len = self.len + 1;
        let r = self.storage.residual_length;
        let flush_key_block = if len - self.quantized_keys >= r {
            (self.quantized_keys / r) as i32
        } else {
            -1
        };
        let flush_value_pos = if len - self.quantized_values > r {
            self.quantized_values as i32
        } else {
            -1
        };
        let (split, splits) = self.split_plan(len);
        let partial = self.module.kernels().spec(KernelKind::DecodePartial);
        let cfg = launch_cfg(
            (splits, self.seqs() * self.plan.head_tiles, 1),
            partial.tile.threads,
        );
        let f = self.module.function(KernelKind::DecodePartial);
        let (len_i, qk, qv) = (
            len as i32,
            self.quantized_keys as i32,
            self.quantized_values as i32,
        );
        let (bps, split_i, nsplits) = (self.blocks_per_seq as i32, split as i32, splits as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(&mut self.k_codes)
            .arg(&mut self.k_params)
            .arg(&mut self.k_res)
            .arg(&mut self.v_codes)
            .arg(&mut self.v_scale)
            .arg(&mut self.v_mn)
            .arg(&mut self.v_res)
            .arg(k)
            .arg(v)
            .arg(&len_i)
            .arg(&qk)
            .arg(&qv)
            .arg(&bps)
            .arg(&split_i)
            .arg(&nsplits)
            .arg(&mut self.part_acc)
            .arg(&mut self.part_ml)
            .arg(&mut self.counters)
            .arg(out)
            .arg(&flush_key_block)
            .arg(&flush_value_pos);
        // SAFETY: templates/decode_partial.cu.tera; part_acc/part_ml hold max_splits >= splits splits and
        // counters one zeroed counter per sequence (the kernel resets it); the caller checked q, k, v and out
        // against the layout and batch; the flushed block and position lie inside the blocks (len <= capacity).
        unsafe { b.launch(cfg) }?;
        self.len = len;
        if flush_key_block >= 0 {
            self.quantized_keys += r;
        }
        if flush_value_pos >= 0 {
            self.quantized_values += 1;
        }
        Ok(())
    }

    /// [`KiviCache::decode_step`] from host slices; returns the output `[batch, num_heads, head_dim]` fp16.
    ///
    /// # Errors
    /// As [`KiviCache::decode_step`].
    pub fn decode_step_host(&mut self, q: &[f16], k: &[f16], v: &[f16]) -> Result<Vec<f16>> {
        let (heads, kv_heads) = (self.layout.num_heads, self.layout.num_kv_heads);
        self.check_len("decode q", q.len(), 1, heads)?;
        self.check_len("decode k", k.len(), 1, kv_heads)?;
        self.check_len("decode v", v.len(), 1, kv_heads)?;
        let dq = self.stream.clone_htod(q)?;
        let dk = self.stream.clone_htod(k)?;
        let dv = self.stream.clone_htod(v)?;
        // Poisoned (NaN) so that an element the kernels fail to write cannot pass a check.
        let mut out = self.stream.clone_htod(&vec![f16::NAN; q.len()])?;
        self.decode_step(&dq, &dk, &dv, &mut out)?;
        Ok(self.stream.clone_dtoh(&out)?)
    }

    /// Quantizes the first `blocks` key blocks of `src` (`[seqs][seq_stride]` fp16) into blocks `0..blocks`.
    fn quantize_keys(&mut self, src: &CudaSlice<f16>, seq_stride: i64, blocks: u32) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let threads = self
            .module
            .kernels()
            .spec(KernelKind::QuantizeKeys)
            .tile
            .threads;
        let cfg = launch_cfg((blocks, self.seqs(), 1), threads);
        let (first_block, bps) = (0i32, self.blocks_per_seq as i32);
        let mut b = self
            .stream
            .launch_builder(self.module.function(KernelKind::QuantizeKeys));
        b.arg(src)
            .arg(&seq_stride)
            .arg(&mut self.k_codes)
            .arg(&mut self.k_params)
            .arg(&first_block)
            .arg(&bps);
        // SAFETY: the argument list matches the kernel's signature (templates/quantize_keys.cu.tera); every
        // index the kernel forms is inside the buffers allocated in `new` for this layout and capacity.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Quantizes the first `tokens` value tokens of `src` (`[seqs][seq_stride]` fp16) to positions `0..tokens`.
    fn quantize_values(
        &mut self,
        src: &CudaSlice<f16>,
        seq_stride: i64,
        tokens: u32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let threads = self
            .module
            .kernels()
            .spec(KernelKind::QuantizeValues)
            .tile
            .threads;
        let cfg = launch_cfg((tokens.div_ceil(threads / 8), self.seqs(), 1), threads);
        let (tok0, ring, pos0, count, bps) = (
            0i32,
            i32::MAX,
            0i32,
            tokens as i32,
            self.blocks_per_seq as i32,
        );
        let mut b = self
            .stream
            .launch_builder(self.module.function(KernelKind::QuantizeValues));
        b.arg(src)
            .arg(&seq_stride)
            .arg(&tok0)
            .arg(&ring)
            .arg(&mut self.v_codes)
            .arg(&mut self.v_scale)
            .arg(&mut self.v_mn)
            .arg(&pos0)
            .arg(&count)
            .arg(&bps);
        // SAFETY: as in quantize_keys (templates/quantize_values.cu.tera).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn store_residual(
        &mut self,
        src: &CudaSlice<f16>,
        seq_stride: i64,
        src_tok0: u32,
        tokens: u32,
        ring: Ring,
        dst_pos0: u32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let spec = self.module.kernels().spec(KernelKind::StoreResidual);
        let threads = spec.tile.threads;
        let items = tokens * self.storage.head_dim;
        let cfg = launch_cfg((items.div_ceil(threads), self.seqs(), 1), threads);
        let f = self.module.function(KernelKind::StoreResidual);
        let (src_tok0, tokens, dst_pos0) = (src_tok0 as i32, tokens as i32, dst_pos0 as i32);
        let (dst, ring_size) = match ring {
            Ring::Keys => (&mut self.k_res, self.storage.residual_length as i32),
            Ring::Values => (&mut self.v_res, self.storage.value_ring as i32),
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(src)
            .arg(&seq_stride)
            .arg(&src_tok0)
            .arg(&tokens)
            .arg(dst)
            .arg(&ring_size)
            .arg(&dst_pos0);
        // SAFETY: as in quantize_keys (templates/store_residual.cu.tera).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Copies the cache to the host in the reference code's layouts (the `final_*` tensors of the reference
    /// files; see [`CacheExport`]), for tests and `kivi verify`. Synchronizes the stream.
    ///
    /// # Errors
    /// Driver errors.
    pub fn export(&self) -> Result<CacheExport> {
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
        let d = st.head_dim as usize;
        let r = st.residual_length as usize;
        let bps = self.blocks_per_seq as usize;
        let (len, qk, qv) = (
            self.len as usize,
            self.quantized_keys as usize,
            self.quantized_values as usize,
        );
        let mut e = CacheExport {
            batch: self.batch as usize,
            kv_heads: self.layout.num_kv_heads as usize,
            head_dim: d,
            k_bits: self.layout.keys.bits,
            v_bits: self.layout.values.bits,
            k_group: st.key_group_size as usize,
            v_group: st.value_group_size as usize,
            len,
            quantized_keys: qk,
            residual_keys: len - qk,
            quantized_values: qv,
            residual_values: len - qv,
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
        let (kcpw, vcpw) = (32 / kb as usize, 32 / vb as usize);
        if !d.is_multiple_of(vcpw) {
            return Err(RuntimeError::State(format!(
                "export: the reference layout packs {vcpw} value codes per 32-bit word along head_dim, and head_dim \
                 {d} is not a multiple of {vcpw}"
            )));
        }
        let (kg, vg) = (st.key_group_size as usize, st.value_group_size as usize);
        let code_at = |words: &[u32], base: usize, pos: kivi_codegen::CodePosition, bits: u32| {
            (words[base + pos.word] >> pos.bit) & ((1u32 << bits) - 1)
        };
        let vring = st.value_ring as usize;
        for seq in 0..self.seqs() as usize {
            let block0 = seq * bps;
            // Keys in the reference layout: codes [D][qk / cpw] packed along tokens, params [D][qk / G].
            for c in 0..d {
                for w in 0..qk / kcpw {
                    let mut word = 0u32;
                    for j in 0..kcpw {
                        let t = w * kcpw + j;
                        let pos = st.key_code_position((t % r) as u32, c as u32);
                        word |=
                            code_at(&k_codes, (block0 + t / r) * kbw, pos, kb) << (kb as usize * j);
                    }
                    e.k_code.push(word as i32);
                }
                for g in 0..qk / kg {
                    let t = g * kg;
                    let (scale, min) = st.key_param_index((t % r) as u32, c as u32);
                    let base = (block0 + t / r) * kbp;
                    e.k_scale.push(k_params[base + scale]);
                    e.k_mn.push(k_params[base + min]);
                }
            }
            for p in qk..len {
                let row = (seq * r + p % r) * d;
                e.k_residual.extend_from_slice(&k_res[row..row + d]);
            }
            // Values: codes [qv][D / cpw] packed along head_dim, params [qv][D / G].
            for p in 0..qv {
                let (base, tb) = ((block0 + p / r) * vbw, (p % r) as u32);
                for w in 0..d / vcpw {
                    let mut word = 0u32;
                    for j in 0..vcpw {
                        let pos = st.value_code_position(tb, (w * vcpw + j) as u32);
                        word |= code_at(&v_codes, base, pos, vb) << (vb as usize * j);
                    }
                    e.v_code.push(word as i32);
                }
                for g in 0..d / vg {
                    let i = (block0 + p / r) * vbp + st.value_param_index(tb, (g * vg) as u32);
                    e.v_scale.push(v_scale[i]);
                    e.v_mn.push(v_mn[i]);
                }
            }
            for p in qv..len {
                let row = (seq * vring + p % vring) * d;
                e.v_residual.extend_from_slice(&v_res[row..row + d]);
            }
        }
        Ok(e)
    }
}

#[derive(Clone, Copy)]
enum Ring {
    Keys,
    Values,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: &str) -> DecodePlan {
        DecodePlan::new(&kivi_dsl::parse_spec(spec).unwrap())
    }

    #[test]
    fn the_automatic_split_depends_on_the_length_only_and_covers_the_sequence() {
        let p = plan("kivi-2, llama-3-8b");
        for len in [
            1u32,
            31,
            1300,
            2048,
            2049,
            4095,
            4096,
            4097,
            32768,
            131072,
            1 << 20,
        ] {
            let split = split_tokens(0, len, &p);
            let splits = len.div_ceil(split);
            assert_eq!(split % p.iter_tokens, 0, "{len}");
            assert!(splits * split >= len);
            assert_eq!(
                splits,
                auto_splits(len),
                "{len}: the rounding never adds a split"
            );
            assert!(splits <= max_splits(0, len.max(2048)), "{len}");
            assert!(
                split >= MIN_AUTO_SPLIT.min(len.div_ceil(p.iter_tokens) * p.iter_tokens),
                "{len}"
            );
        }
        // Just past 2048 tokens: one split, not a tiny second one.
        assert_eq!(split_tokens(0, 2049, &p), 2080);
        assert_eq!(split_tokens(0, 131072, &p), 2048);
        // A tuned split is used as is.
        assert_eq!(split_tokens(1024, 131072, &p), 1024);
        assert_eq!(max_splits(1024, 131072), 128);
    }
}
