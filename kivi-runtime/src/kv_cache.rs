//! The KIVI KV cache on the GPU: Algorithm 1 of KIVI (Liu et al., ICML 2024) over the block-major layout of
//! [`kivi_codegen::StorageLayout`].

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;
use kivi_codegen::{KernelKind, StorageLayout};
use kivi_dsl::Layout;
pub use kivi_reference::CacheExport;

use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, LayoutModule};

/// The largest capacity (tokens per sequence) a cache may have: positions are 32-bit in the kernels.
pub const MAX_CAPACITY: u32 = 1 << 28;

/// The largest grid y (and z) dimension CUDA accepts.
const MAX_GRID_Y: u32 = 65535;

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
    k_scale: CudaSlice<f16>,
    k_mn: CudaSlice<f16>,
    k_res: CudaSlice<f16>,
    v_codes: CudaSlice<u32>,
    v_scale: CudaSlice<f16>,
    v_mn: CudaSlice<f16>,
    v_res: CudaSlice<f16>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
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
        if seqs > 65535 {
            return Err(RuntimeError::Limit {
                what: "batch x num_kv_heads",
                value: seqs,
                limit: "it must be at most 65535 (the grid's y and z limit)".into(),
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
        let max_splits = capacity.div_ceil(
            module
                .kernels()
                .spec(KernelKind::DecodePartial)
                .tile
                .split_tokens,
        ) as usize;
        let rows = seqs as usize * layout.gqa_ratio() as usize;
        Ok(KiviCache {
            k_codes: stream.alloc_zeros(blocks * storage.key_block_words() as usize)?,
            k_scale: stream.alloc_zeros(blocks * storage.key_block_params() as usize)?,
            k_mn: stream.alloc_zeros(blocks * storage.key_block_params() as usize)?,
            k_res: stream.alloc_zeros(seqs as usize * storage.residual_length as usize * d)?,
            v_codes: stream.alloc_zeros(blocks * storage.value_block_words() as usize)?,
            v_scale: stream.alloc_zeros(blocks * storage.value_block_params() as usize)?,
            v_mn: stream.alloc_zeros(blocks * storage.value_block_params() as usize)?,
            v_res: stream.alloc_zeros(seqs as usize * storage.value_ring as usize * d)?,
            part_acc: stream.alloc_zeros(rows * max_splits * d)?,
            part_ml: stream.alloc_zeros(rows * max_splits * 2)?,
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
        self.quantize_keys(Some(k), seq_stride, 0, qk / r)?;
        self.quantize_values(Some(v), seq_stride, 0, i32::MAX, 0, qv)?;
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
            // A failed launch leaves the counters where they were, so the flush rules stay consistent.
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
        let d = i64::from(self.storage.head_dim);
        let pos = self.len;
        self.store_residual(k, d, 0, 1, Ring::Keys, pos)?;
        self.store_residual(v, d, 0, 1, Ring::Values, pos)?;
        self.len += 1;
        self.attend(q, out)?;
        let r = self.storage.residual_length;
        if self.len - self.quantized_keys >= r {
            let ring_stride = i64::from(r) * d;
            self.quantize_keys(None, ring_stride, self.quantized_keys / r, 1)?;
            self.quantized_keys += r;
        }
        if self.len - self.quantized_values > r {
            let ring = self.storage.value_ring;
            let ring_stride = i64::from(ring) * d;
            let first = self.quantized_values;
            self.quantize_values(
                None,
                ring_stride,
                (first % ring) as i32,
                ring as i32,
                first,
                1,
            )?;
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

    /// Quantizes `blocks` key blocks from `src` (`None`: the key residual ring) into blocks `first_block..`.
    fn quantize_keys(
        &mut self,
        src: Option<&CudaSlice<f16>>,
        seq_stride: i64,
        first_block: u32,
        blocks: u32,
    ) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let spec = self.module.kernels().spec(KernelKind::QuantizeKeys);
        let threads = spec.tile.threads;
        let items = self.storage.head_dim * self.storage.key_groups_per_channel;
        let (first_block, bps) = (first_block as i32, self.blocks_per_seq as i32);
        let seqs = self.seqs();
        let KiviCache {
            module,
            stream,
            k_codes,
            k_scale,
            k_mn,
            k_res,
            ..
        } = self;
        let src = src.unwrap_or(k_res);
        // Grid y holds at most 65535 blocks: longer prefills launch in slices.
        for offset in (0..blocks).step_by(MAX_GRID_Y as usize) {
            let n = (blocks - offset).min(MAX_GRID_Y);
            let cfg = launch_cfg((items.div_ceil(threads), n, seqs), threads);
            let offset = offset as i32;
            let mut b = stream.launch_builder(module.function(KernelKind::QuantizeKeys));
            b.arg(src)
                .arg(&seq_stride)
                .arg(&mut *k_codes)
                .arg(&mut *k_scale)
                .arg(&mut *k_mn)
                .arg(&first_block)
                .arg(&offset)
                .arg(&bps);
            // SAFETY: the argument list matches the kernel's signature (templates/quantize_keys.cu.tera); every
            // index the kernel forms is inside the buffers allocated in `new` for this layout and capacity.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// Quantizes `tokens` value tokens from `src` (`None`: the value residual ring) to positions `dst_pos0..`.
    fn quantize_values(
        &mut self,
        src: Option<&CudaSlice<f16>>,
        seq_stride: i64,
        src_tok0: i32,
        src_ring: i32,
        dst_pos0: u32,
        tokens: u32,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let spec = self.module.kernels().spec(KernelKind::QuantizeValues);
        let threads = spec.tile.threads;
        let groups = self.storage.value_groups_per_token;
        let bps = self.blocks_per_seq as i32;
        let seqs = self.seqs();
        let KiviCache {
            module,
            stream,
            v_codes,
            v_scale,
            v_mn,
            v_res,
            ..
        } = self;
        let src = src.unwrap_or(v_res);
        // At most 2^20 tokens per launch, so that tokens x groups stays far below the kernel's 32-bit indices.
        const TOKENS_PER_LAUNCH: u32 = 1 << 20;
        for offset in (0..tokens).step_by(TOKENS_PER_LAUNCH as usize) {
            let n = (tokens - offset).min(TOKENS_PER_LAUNCH);
            let cfg = launch_cfg(((n * groups).div_ceil(threads), seqs, 1), threads);
            let (tok0, pos0, n) = (
                src_tok0 + offset as i32,
                (dst_pos0 + offset) as i32,
                n as i32,
            );
            let mut b = stream.launch_builder(module.function(KernelKind::QuantizeValues));
            b.arg(src)
                .arg(&seq_stride)
                .arg(&tok0)
                .arg(&src_ring)
                .arg(&mut *v_codes)
                .arg(&mut *v_scale)
                .arg(&mut *v_mn)
                .arg(&pos0)
                .arg(&n)
                .arg(&bps);
            // SAFETY: as in quantize_keys (templates/quantize_values.cu.tera).
            unsafe { b.launch(cfg) }?;
        }
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

    fn attend(&mut self, q: &CudaSlice<f16>, out: &mut CudaSlice<f16>) -> Result<()> {
        let partial = self.module.kernels().spec(KernelKind::DecodePartial);
        let splits = self.len.div_ceil(partial.tile.split_tokens);
        let cfg = launch_cfg((splits, self.seqs(), 1), partial.tile.threads);
        let f = self.module.function(KernelKind::DecodePartial);
        let (len, qk, qv) = (
            self.len as i32,
            self.quantized_keys as i32,
            self.quantized_values as i32,
        );
        let (bps, nsplits) = (self.blocks_per_seq as i32, splits as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(q)
            .arg(&self.k_codes)
            .arg(&self.k_scale)
            .arg(&self.k_mn)
            .arg(&self.k_res)
            .arg(&self.v_codes)
            .arg(&self.v_scale)
            .arg(&self.v_mn)
            .arg(&self.v_res)
            .arg(&len)
            .arg(&qk)
            .arg(&qv)
            .arg(&bps)
            .arg(&nsplits)
            .arg(&mut self.part_acc)
            .arg(&mut self.part_ml);
        // SAFETY: templates/decode_partial.cu.tera; part_acc/part_ml hold capacity / split_tokens splits.
        unsafe { b.launch(cfg) }?;
        let combine = self.module.kernels().spec(KernelKind::DecodeCombine);
        let rows = self.seqs() * self.layout.gqa_ratio();
        let cfg = launch_cfg((rows, 1, 1), combine.tile.threads);
        let f = self.module.function(KernelKind::DecodeCombine);
        let mut b = self.stream.launch_builder(f);
        b.arg(&self.part_acc)
            .arg(&self.part_ml)
            .arg(&nsplits)
            .arg(out);
        // SAFETY: templates/decode_combine.cu.tera; out holds rows x head_dim (checked by the caller).
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
        let (k_codes, k_scale, k_mn, k_res) = (
            s.clone_dtoh(&self.k_codes)?,
            s.clone_dtoh(&self.k_scale)?,
            s.clone_dtoh(&self.k_mn)?,
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
        let (kwpc, kgpc) = (
            st.key_words_per_channel as usize,
            st.key_groups_per_channel as usize,
        );
        let (kbw, kbp) = (
            st.key_block_words() as usize,
            st.key_block_params() as usize,
        );
        let (vwpt, vgpt) = (
            st.value_words_per_token as usize,
            st.value_groups_per_token as usize,
        );
        let vring = st.value_ring as usize;
        for seq in 0..self.seqs() as usize {
            let block0 = seq * bps;
            for c in 0..d {
                for w in 0..qk / st.key_codes_per_word as usize {
                    e.k_code
                        .push(k_codes[(block0 + w / kwpc) * kbw + c * kwpc + w % kwpc] as i32);
                }
                for g in 0..qk / st.key_group_size as usize {
                    let i = (block0 + g / kgpc) * kbp + c * kgpc + g % kgpc;
                    e.k_scale.push(k_scale[i]);
                    e.k_mn.push(k_mn[i]);
                }
            }
            for p in qk..len {
                let row = (seq * r + p % r) * d;
                e.k_residual.extend_from_slice(&k_res[row..row + d]);
            }
            for p in 0..qv {
                let row = (block0 + p / r) * r + p % r;
                e.v_code.extend(
                    v_codes[row * vwpt..(row + 1) * vwpt]
                        .iter()
                        .map(|&w| w as i32),
                );
                e.v_scale
                    .extend_from_slice(&v_scale[row * vgpt..(row + 1) * vgpt]);
                e.v_mn
                    .extend_from_slice(&v_mn[row * vgpt..(row + 1) * vgpt]);
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
