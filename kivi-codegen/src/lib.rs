//! kivi-codegen: a validated [`Layout`] plus a [`TileConfig`] becomes specialized CUDA C++.
//!
//! Data flows one way: `Layout` (kivi-dsl) -> [`KernelSpec`] (kind + layout + tile config) -> CUDA text
//! ([`generate_module`], rendered from the tera templates in the workspace's `templates/`, embedded at compile
//! time) -> the runtime compiles and launches it. This crate never talks to a GPU.
//!
//! Every derived number (words per group, masks, shared-memory bytes, the softmax scale) is computed here, in
//! Rust, and passed to templates that only substitute: see [`StorageLayout`] for the device storage layout the
//! kernels and the runtime share.

mod storage;
mod tile;

use std::fmt::Write as _;

use kivi_dsl::{Layout, LayoutError};
use serde_json::json;
use tera::{Context, Tera};

pub use storage::{CodePosition, MemoryBreakdown, StorageLayout};
pub use tile::{KernelTiles, TileConfig};

/// The largest static shared memory a kernel may use (bytes): the 48 KiB every CUDA GPU gives without opt-in.
pub const MAX_STATIC_SHARED_BYTES: u32 = 48 * 1024;

const PRELUDE: &str = include_str!("../../templates/prelude.cuh.tera");
const QUANT_COMMON: &str = include_str!("../../templates/quant_common.cuh.tera");
const TEMPLATES: [(KernelKind, &str); 4] = [
    (
        KernelKind::QuantizeKeys,
        include_str!("../../templates/quantize_keys.cu.tera"),
    ),
    (
        KernelKind::QuantizeValues,
        include_str!("../../templates/quantize_values.cu.tera"),
    ),
    (
        KernelKind::StoreResidual,
        include_str!("../../templates/store_residual.cu.tera"),
    ),
    (
        KernelKind::DecodePartial,
        include_str!("../../templates/decode_partial.cu.tera"),
    ),
];

/// The kinds of kernel a KIVI layout needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    /// Per-channel quantize + pack of whole key flush blocks (prefill and the decode-time key flush).
    QuantizeKeys,
    /// Per-token quantize + pack of value tokens (prefill and the decode-time value flush).
    QuantizeValues,
    /// Copy of full-precision tokens into a residual ring (prefill tail and the per-step append).
    StoreResidual,
    /// One whole decode step: append, split-K attention over quantized keys/values plus the full-precision
    /// residual, the log-sum-exp merge of the splits (by the last thread block of each sequence) and the flushes.
    DecodePartial,
}

impl KernelKind {
    /// Every kind, in the order a module lists them.
    pub const ALL: [KernelKind; 4] = [
        KernelKind::QuantizeKeys,
        KernelKind::QuantizeValues,
        KernelKind::StoreResidual,
        KernelKind::DecodePartial,
    ];

    /// The kind's part of a kernel name (`quant_keys`, `quant_values`, `store_residual`, `decode`).
    pub fn as_str(self) -> &'static str {
        match self {
            KernelKind::QuantizeKeys => "quant_keys",
            KernelKind::QuantizeValues => "quant_values",
            KernelKind::StoreResidual => "store_residual",
            KernelKind::DecodePartial => "decode",
        }
    }
}

/// Errors of code generation.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The layout is impossible or not yet supported by the generator.
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    /// The tile configuration cannot be used for this kernel.
    #[error("tile config for {kernel}: {message}")]
    Tile {
        /// The kernel's name.
        kernel: String,
        /// What is wrong and the limit.
        message: String,
    },
    /// A template failed to render (a bug in kivi: please report it).
    #[error("template {template}: {message}")]
    Template {
        /// The template's name.
        template: String,
        /// tera's message, with its causes.
        message: String,
    },
}

/// One kernel to generate: its kind, the layout it is specialized on and its tile configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// What the kernel does.
    pub kind: KernelKind,
    /// The layout (validated and supported: see [`KernelSpec::new`]).
    pub layout: Layout,
    /// Threads per block and, for [`KernelKind::DecodePartial`], tokens per split.
    pub tile: TileConfig,
}

impl KernelSpec {
    /// A kernel spec, checked: the layout must pass `check_supported`, and the tile must fit the kernel
    /// (threads a multiple of 32 in 32..=1024; for decode: split_tokens 0 or a multiple of the iteration, 2..=4
    /// stages, min_blocks x threads <= 2048; shared memory <= 48 KiB).
    ///
    /// # Errors
    /// [`CodegenError::Layout`] or [`CodegenError::Tile`], naming the value and the limit.
    pub fn new(kind: KernelKind, layout: Layout, tile: TileConfig) -> Result<Self, CodegenError> {
        layout.check_supported()?;
        let spec = KernelSpec { kind, layout, tile };
        let err = |message: String| CodegenError::Tile {
            kernel: spec.name(),
            message,
        };
        if tile.threads < 32 || tile.threads > 1024 || !tile.threads.is_multiple_of(32) {
            return Err(err(format!(
                "threads {} must be a multiple of 32 in 32..=1024",
                tile.threads
            )));
        }
        if kind != KernelKind::DecodePartial && tile.paged {
            return Err(err(
                "paged applies to the decode kernel only (the prefill kernels take the table at run time)".into(),
            ));
        }
        if kind == KernelKind::DecodePartial {
            let plan = DecodePlan::new(&layout);
            if !tile.split_tokens.is_multiple_of(plan.iter_tokens) {
                return Err(err(format!(
                    "split_tokens {} must be a multiple of {} (the decode iteration) or 0 (chosen at launch)",
                    tile.split_tokens, plan.iter_tokens
                )));
            }
            if !(2..=4).contains(&tile.stages) {
                return Err(err(format!("stages {} must be in 2..=4", tile.stages)));
            }
            if u64::from(tile.min_blocks) * u64::from(tile.threads) > 2048 {
                return Err(err(format!(
                    "min_blocks {} x threads {} passes the 2048 threads a multiprocessor holds",
                    tile.min_blocks, tile.threads
                )));
            }
            let smallest = plan.shared_bytes(1, 2);
            if smallest > MAX_STATIC_SHARED_BYTES {
                return Err(CodegenError::Layout(LayoutError::NotYetSupported {
                    what: format!(
                        "this layout's decode iteration ({} tokens of {}-bit keys at head_dim {} and {}-bit values \
                         at head_dim {}): even one warp with a 2-stage pipeline needs {smallest} bytes of shared \
                         memory, more than the {MAX_STATIC_SHARED_BYTES} a kernel gets without opt-in (use fewer key \
                         or value bits, or a smaller head_dim)",
                        plan.iter_tokens,
                        layout.keys.bits,
                        layout.keys.head_dim,
                        layout.values.bits,
                        layout.values.head_dim
                    ),
                }));
            }
        }
        let shared = spec.shared_bytes();
        if shared > MAX_STATIC_SHARED_BYTES {
            return Err(err(format!(
                "needs {shared} bytes of shared memory, more than the {MAX_STATIC_SHARED_BYTES} bytes a kernel \
                 gets without opt-in: use fewer threads or stages"
            )));
        }
        Ok(spec)
    }

    /// The kernel's name: kind, then every parameter that changes its code, e.g.
    /// `kivi_decode_k2c32_v2t32_r128_d128_fp16_gqa4_t128_p3_b4` (`t` threads, `p` pipeline stages, `b` blocks
    /// per multiprocessor the registers are budgeted for; `_pg` for the paged variant).
    pub fn name(&self) -> String {
        let mut name = format!("kivi_{}_{}", self.kind.as_str(), layout_tag(&self.layout));
        let _ = write!(name, "_t{}", self.tile.threads);
        if self.kind == KernelKind::DecodePartial {
            let _ = write!(name, "_p{}", self.tile.stages);
            if self.tile.min_blocks > 0 {
                let _ = write!(name, "_b{}", self.tile.min_blocks);
            }
            if self.tile.paged {
                name.push_str("_pg");
            }
        }
        name
    }

    /// Static shared memory the kernel declares, in bytes: the decode kernel's pipeline (or merge and combine
    /// buffers), the key quantize kernel's stage ([`key_stage_tokens`]), the value quantize kernel's
    /// ([`value_stage_bytes`]), none for the residual store. The templates size their stages from the same
    /// functions (and assert it).
    pub fn shared_bytes(&self) -> u32 {
        match self.kind {
            KernelKind::DecodePartial => {
                DecodePlan::new(&self.layout).shared_bytes(self.tile.threads / 32, self.tile.stages)
            }
            KernelKind::QuantizeKeys => {
                // fp16 or bf16 activations: 2 bytes each.
                key_stage_tokens(&self.layout) * self.layout.keys.head_dim * 2
            }
            KernelKind::QuantizeValues => value_stage_bytes(&self.layout, self.tile.threads),
            _ => 0,
        }
    }
}

/// Bytes the prefill's value quantize kernel ([`KernelKind::QuantizeValues`]) stages in shared memory at most.
pub const VALUE_STAGE_BYTES: u32 = 32 * 1024;

/// Shared memory, in bytes, of the prefill's value quantize kernel with `threads` threads (a multiple of 32,
/// as [`KernelSpec::new`] requires): each warp stages its 8 tokens (rows of the values' head_dim fp16
/// activations, padded by 8 channels = 16 bytes so that `ldmatrix` reads them without bank conflicts) where the
/// layout codes values by thresholds (fp16 activations, asymmetric, the reference's fp16 rounding, 1 to 3 bits,
/// fp16 or fp32 scales: the template's VFAST) and the stage fits [`VALUE_STAGE_BYTES`]; 0 otherwise (the
/// kernel then reads each value with a 2-byte load). The template declares this many bytes (it asserts so).
pub fn value_stage_bytes(layout: &Layout, threads: u32) -> u32 {
    let v = &layout.values;
    let fast = layout.dtype == kivi_dsl::Dtype::F16
        && v.symmetry == kivi_dsl::Symmetry::Asymmetric
        && v.rounding == kivi_dsl::Rounding::Half
        && v.bits <= 3
        && matches!(
            v.scale_dtype,
            kivi_dsl::ScaleDtype::F16 | kivi_dsl::ScaleDtype::F32
        );
    let bytes = threads / 32 * 8 * (v.head_dim + 8) * 2;
    if fast && bytes <= VALUE_STAGE_BYTES {
        bytes
    } else {
        0
    }
}

/// Bytes the prefill's key quantize kernel ([`KernelKind::QuantizeKeys`]) stages in shared memory at most.
pub const KEY_STAGE_BYTES: u32 = 32 * 1024;

/// Tokens of one shared-memory stage of the prefill's key quantize kernel: the most whole units (max(key group,
/// key chunk) tokens, one pass of its per-channel quantization) that divide a flush block (R tokens) and fit
/// [`KEY_STAGE_BYTES`] with the keys' head_dim activations each; 0 when not one unit fits (the kernel then reads
/// the activation rows directly). The template takes its KSTAGE_UNITS from here (`key_stage_tokens` / KUNIT),
/// so the stage it declares is the one [`KernelSpec::shared_bytes`] counts.
pub fn key_stage_tokens(layout: &Layout) -> u32 {
    let st = StorageLayout::new(layout);
    let unit = st.key_group_size.max(st.key_chunk_tokens());
    let units = st.residual_length / unit;
    let row = layout.keys.head_dim * 2; // fp16 or bf16 activations
    (1..=units)
        .filter(|u| units.is_multiple_of(*u) && u * unit * row <= KEY_STAGE_BYTES)
        .max()
        .map_or(0, |u| u * unit)
}

/// Where code k (1 <= k <= 255) of a NORMAL group starts, as a bound on the exact quotient d / scale of a
/// difference d = x - min and the group's scale: `(bound, strict)` with code(d) >= k exactly when d / scale >=
/// bound (> bound when `strict`). code(d) is the reference's chain (kivi-reference's fp16 rounding): the f32
/// quotient (rounded to nearest), rounded to fp16, then to an integer with ties to even. Derived backwards
/// through the three roundings: c = the least fp16 number that rounds to an integer >= k (k - 1/2 for even k, as
/// the tie goes to k; the next fp16 number above it for odd k); m = the least f32 number that rounds to fp16 c or
/// more (the midpoint between c and its fp16 predecessor when c's significand is even, so that the tie goes to c,
/// else the next f32 number above that midpoint); the bound = the midpoint between m and its f32 predecessor, itself
/// included when m's significand is even. The bound is exact in f64 (25 significant bits), and so is its product
/// with an f32 scale: the kernels' thresholds (`kivi_code_threshold`) round that product up to fp16.
pub fn code_threshold_bound(k: u32) -> (f64, bool) {
    assert!((1..=255).contains(&k), "code {k} outside 1..=255");
    // The fp16 spacing at x, a normal fp16 number in [0.5, 255) (11 significant bits).
    let ulp16 = |x: f64| 2f64.powi(x.log2().floor() as i32 - 10);
    let tie = f64::from(k) - 0.5;
    let c = if k.is_multiple_of(2) {
        tie
    } else {
        tie + ulp16(tie)
    };
    // c is no power of two (k - 1/2 is one only for k = 1, which is odd): its predecessor is one ulp16(c) below.
    let step = ulp16(c);
    let c_even = ((c / step) as u64).is_multiple_of(2);
    let mid = ((c - step + c) / 2.0) as f32; // exact: 12 significant bits
    let m = if c_even {
        mid
    } else {
        f32::from_bits(mid.to_bits() + 1)
    };
    let below = f32::from_bits(m.to_bits() - 1);
    (
        (f64::from(below) + f64::from(m)) / 2.0,
        m.to_bits() % 2 == 1,
    )
}

/// [`code_threshold_bound`] as a C++ hexadecimal floating literal (exact), e.g. `0x1.0020010000000p-1`.
fn hex_double(x: f64) -> String {
    assert!(x.is_normal() && x > 0.0, "{x}");
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    format!("0x1.{:013x}p{exp}", bits & ((1u64 << 52) - 1))
}

/// The most split-K blocks one sequence's decode step may have (the combine keeps a weight per split in shared
/// memory).
pub const MAX_SPLITS: u32 = 1024;

/// Value tokens one block of the prefill value-quantize kernel ([`KernelKind::QuantizeValues`]) quantizes with
/// `threads` threads: eight lanes take a token pair (the even and odd token of a stored code word), so
/// `threads / 4`. The launch's grid is ceil(tokens to quantize / this) blocks per sequence.
pub fn value_tokens_per_block(threads: u32) -> u32 {
    threads / 4
}

/// Tokens per split the automatic split never goes below (per-block overheads would dominate).
pub const AUTO_SPLIT_MIN_TOKENS: u32 = 2048;

/// The most splits the automatic split makes.
pub const AUTO_SPLITS: u32 = 64;

/// The numbers of the decode kernel's plan that do not depend on the tile configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodePlan {
    /// Tokens one warp handles per iteration: max(key chunk, 16), the chunk being 64 / key bits (64 for 3 bits).
    /// Splits are multiples of it.
    pub iter_tokens: u32,
    /// Key groups an iteration touches (1 unless the key group is shorter than an iteration).
    pub key_groups_per_iter: u32,
    /// Query heads one thread block serves (at most 16: one m16 tile of the score mma).
    pub heads_per_tile: u32,
    /// Thread blocks per (sequence, split): ceil(gqa / 16); the cache is read once per head tile.
    pub head_tiles: u32,
    /// Bytes of one cp.async pipeline stage of one warp (one iteration's codes, scales and mins).
    pub stage_bytes: u32,
    /// The keys' head_dim (the query fragments' channels).
    pub key_head_dim: u32,
    /// The values' head_dim (the output accumulator's channels).
    pub value_head_dim: u32,
    /// The layout's sink tokens: splits cut the tokens after them (the first split attends them too).
    pub sink_tokens: u32,
}

impl DecodePlan {
    /// The plan of a layout that passed `check_supported`.
    pub fn new(layout: &Layout) -> Self {
        let st = StorageLayout::new(layout);
        let iter_tokens = st.key_chunk_tokens().max(16);
        let key_groups_per_iter = (iter_tokens / st.key_group_size).max(1);
        let gqa = layout.gqa_ratio();
        let head_tiles = gqa.div_ceil(16);
        let heads_per_tile = gqa.div_ceil(head_tiles);
        let (dk, dv) = (st.key_head_dim, st.value_head_dim);
        let value_tiles = iter_tokens / 16;
        let stage_bytes = iter_tokens * dk * st.key_bits / 8
            + 2 * key_groups_per_iter * dk * st.key_param_bytes
            + value_tiles * 32 * st.value_words_per_lane() * 4
            + 2 * value_tiles * 16 * st.value_groups_per_token() * st.value_param_bytes;
        DecodePlan {
            iter_tokens,
            key_groups_per_iter,
            heads_per_tile,
            head_tiles,
            stage_bytes,
            key_head_dim: dk,
            value_head_dim: dv,
            sink_tokens: layout.sink_tokens,
        }
    }

    /// Splits of the automatic split for `span` attended tokens (from the first split's start to the end):
    /// floor(span / [`AUTO_SPLIT_MIN_TOKENS`]), between 1 and [`AUTO_SPLITS`]. A sequence just past a multiple of
    /// 2048 tokens gets no tiny extra split.
    pub fn auto_splits(span: u32) -> u32 {
        (span / AUTO_SPLIT_MIN_TOKENS).clamp(1, AUTO_SPLITS)
    }

    /// Tokens per split for `span` attended tokens: `fixed` if non-zero (a tuned tile), else `span` shared
    /// evenly among [`DecodePlan::auto_splits`] splits, rounded up to the iteration. A function of the sequence's
    /// own length and the tile only, never of the batch or the GPU, so a sequence gets the same splits and the
    /// same fp32 merge alone or in any batch (batch-invariant results). The decode kernel computes the same
    /// (`kivi_auto_split` in templates/decode_partial.cu.tera).
    pub fn split_tokens(&self, fixed: u32, span: u32) -> u32 {
        if fixed > 0 {
            return fixed;
        }
        let it = self.iter_tokens;
        span.max(1).div_ceil(Self::auto_splits(span)).div_ceil(it) * it
    }

    /// The first attended token (inclusive) and the start of the first split, for a step over `len` tokens after
    /// the sinks with a sliding `window` (0: none): tokens [len - window, len) when len > window, the start rounded
    /// down to the iteration.
    pub fn attended(&self, len: u32, window: u32) -> (u32, u32) {
        let lo = if window > 0 && len > window {
            len - window
        } else {
            0
        };
        (lo, lo / self.iter_tokens * self.iter_tokens)
    }

    /// (tokens per split, splits) of a decode step over `len` tokens (the new one and the sink tokens included)
    /// with split `fixed` (0: automatic) and sliding `window` (0: none), as the decode kernel computes them: the
    /// splits cut the tokens after the sinks, at least one split.
    pub fn split_plan(&self, fixed: u32, len: u32, window: u32) -> (u32, u32) {
        let len = len.saturating_sub(self.sink_tokens);
        let (_, base) = self.attended(len, window);
        let span = len - base;
        let split = self.split_tokens(fixed, span);
        (split, span.max(1).div_ceil(split))
    }

    /// The most splits a decode step of any sequence of at most `max_len` tokens (the new one and the sinks
    /// included; the splits cut the tokens after the sinks) makes with
    /// split `fixed` (0: automatic) and sliding `window` (0: none): the grid a ragged batch needs. The split count
    /// is not monotone in the length (a window's start is rounded down to the iteration, and the automatic split
    /// rounds up to it), so this bounds it: a sequence's span is at most `max_len`, and with a window at most
    /// `window + iter_tokens - 1`; [`DecodePlan::auto_splits`] and `ceil(span / fixed)` grow with the span and are
    /// never below the splits actually made.
    pub fn grid_splits(&self, fixed: u32, max_len: u32, window: u32) -> u32 {
        let mut span = max_len.saturating_sub(self.sink_tokens).max(1);
        if window > 0 {
            span = span.min(window.saturating_add(self.iter_tokens - 1));
        }
        Self::splits_for_span(fixed, span)
    }

    /// The most splits any decode step of up to `capacity` tokens per sequence (sinks included) can make with
    /// split `fixed` (0: automatic): sizes the split-K scratch and the grid of a CUDA-graph-captured step.
    pub fn max_splits(&self, fixed: u32, capacity: u32) -> u32 {
        Self::splits_for_span(fixed, capacity.saturating_sub(self.sink_tokens).max(1))
    }

    /// The most splits of a span of at most `span` tokens (after the sinks): `ceil(span / fixed)`, or the
    /// automatic split's count.
    fn splits_for_span(fixed: u32, span: u32) -> u32 {
        if fixed > 0 {
            span.max(1).div_ceil(fixed)
        } else {
            Self::auto_splits(span)
        }
    }

    /// Static shared memory of the decode kernel with `warps` warps and `stages` stages: the pipeline, or the
    /// warp-merge buffers if larger (they reuse it).
    pub fn shared_bytes(&self, warps: u32, stages: u32) -> u32 {
        let pipe = warps * stages * self.stage_bytes;
        let merge = 4 * (2 * warps * 16 + self.heads_per_tile * self.value_head_dim);
        // The combine of the last block of a sequence: a weight per split and a reduction buffer.
        let combine = 4 * (MAX_SPLITS + 64);
        // + the block's "last one done" flag, padded to 16 bytes.
        pipe.max(merge).max(combine) + 16
    }
}

/// The layout part of kernel and module names: key bits/axis/group, value bits/axis/group, residual, head_dim,
/// dtype, GQA ratio, e.g. `k2c32_v2t32_r128_d128_fp16_gqa4` (`c` per-channel, `t` per-token). Options away from
/// the defaults follow a tensor's group: `s` symmetric quantization, `f` fp32 rounding, `pb16` and `p32` scales and
/// mins stored as bf16 and fp32 (`k4c32sfp32_...`); the dtype is `fp16` or `bf16`; sink
/// tokens follow the residual (`r128_s4`), and different key and value head_dims are spelled `d192x128`.
pub fn layout_tag(layout: &Layout) -> String {
    let axis = |a: kivi_dsl::QuantAxis| match a {
        kivi_dsl::QuantAxis::PerChannel => 'c',
        kivi_dsl::QuantAxis::PerToken => 't',
    };
    let options = |t: &kivi_dsl::TensorQuant| {
        let mut o = String::new();
        if t.symmetry == kivi_dsl::Symmetry::Symmetric {
            o.push('s');
        }
        if t.rounding == kivi_dsl::Rounding::F32 {
            o.push('f');
        }
        match t.scale_dtype {
            kivi_dsl::ScaleDtype::F16 => {}
            kivi_dsl::ScaleDtype::Bf16 => o.push_str("pb16"),
            kivi_dsl::ScaleDtype::F32 => o.push_str("p32"),
        }
        o
    };
    let r = layout.residual_length;
    let sinks = if layout.sink_tokens > 0 {
        format!("_s{}", layout.sink_tokens)
    } else {
        String::new()
    };
    // head_dim, or the keys' x the values' where they differ (`d192x128`).
    let dims = if layout.keys.head_dim == layout.values.head_dim {
        layout.keys.head_dim.to_string()
    } else {
        format!("{}x{}", layout.keys.head_dim, layout.values.head_dim)
    };
    format!(
        "k{}{}{}{}_v{}{}{}{}_r{}{sinks}_d{dims}_{}_gqa{}",
        layout.keys.bits,
        axis(layout.keys.axis),
        layout.keys.group_elems(r),
        options(&layout.keys),
        layout.values.bits,
        axis(layout.values.axis),
        layout.values.group_elems(r),
        options(&layout.values),
        r,
        layout.dtype.as_str(),
        layout.gqa_ratio()
    )
}

/// The kernels of one layout, with their names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayoutKernels {
    /// The layout.
    pub layout: Layout,
    /// One spec per kind, in [`KernelKind::ALL`] order.
    pub specs: Vec<KernelSpec>,
}

impl LayoutKernels {
    /// Every kernel a layout needs, with the given tile configurations.
    ///
    /// # Errors
    /// As [`KernelSpec::new`].
    pub fn new(layout: &Layout, tiles: &KernelTiles) -> Result<Self, CodegenError> {
        let specs = KernelKind::ALL
            .iter()
            .map(|&kind| KernelSpec::new(kind, *layout, tiles.get(kind)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LayoutKernels {
            layout: *layout,
            specs,
        })
    }

    /// The spec of one kind.
    pub fn spec(&self, kind: KernelKind) -> &KernelSpec {
        self.specs
            .iter()
            .find(|s| s.kind == kind)
            .expect("LayoutKernels::new creates one spec per kind")
    }
}

/// CUDA C++ for one NVRTC program: a prelude plus one or more `extern "C"` kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSource {
    /// Module name: `kivi_<layout tag>_<hash of the kernel names>`; a valid file name.
    pub name: String,
    /// The whole CUDA C++ text (no `#include`s: it compiles with NVRTC alone).
    pub source: String,
    /// The kernels in it: spec and entry-point name.
    pub kernels: Vec<(KernelSpec, String)>,
}

/// Renders one NVRTC program holding the given kernels (all of one layout).
///
/// # Errors
/// [`CodegenError::Template`] if a template fails (a kivi bug); the specs are already checked by
/// [`KernelSpec::new`].
pub fn generate_module(specs: &[KernelSpec]) -> Result<ModuleSource, CodegenError> {
    let tera = templates()?;
    let layout = specs
        .first()
        .map(|s| s.layout)
        .ok_or_else(|| CodegenError::Template {
            template: "module".into(),
            message: "a module needs at least one kernel".into(),
        })?;
    let names: Vec<String> = specs.iter().map(KernelSpec::name).collect();
    let module_name = format!(
        "kivi_{}_{:016x}",
        layout_tag(&layout),
        fnv1a(names.join(",").as_bytes())
    );
    let mut ctx = Context::new();
    ctx.insert("version", env!("CARGO_PKG_VERSION"));
    ctx.insert("layout_spec", &layout.to_spec().replace('\n', " "));
    ctx.insert("module_name", &module_name);
    ctx.insert("dtype", layout.dtype.as_str());
    ctx.insert("act_fmt", act_fmt(layout.dtype));
    let bounds: Vec<serde_json::Value> = (1..=7)
        .map(|k| {
            let (bound, strict) = code_threshold_bound(k);
            json!({ "k": k, "quotient": hex_double(bound), "strict": strict })
        })
        .collect();
    ctx.insert("code_bounds", &bounds);
    let mut source = tera
        .render("prelude", &ctx)
        .map_err(|e| template_error("prelude", &e))?;
    let mut kernels = Vec::with_capacity(specs.len());
    for (spec, name) in specs.iter().zip(names) {
        let ctx = kernel_context(spec, &name, specs)?;
        let text = tera
            .render(spec.kind.as_str(), &ctx)
            .map_err(|e| template_error(spec.kind.as_str(), &e))?;
        source.push_str(&text);
        kernels.push((*spec, name));
    }
    Ok(ModuleSource {
        name: module_name,
        source,
        kernels,
    })
}

/// The templates, parsed once per process (parsing them is most of a module's generation time).
fn templates() -> Result<&'static Tera, CodegenError> {
    static TERA: std::sync::OnceLock<Result<Tera, (String, String)>> = std::sync::OnceLock::new();
    TERA.get_or_init(|| {
        let err = |name: &str, e: &tera::Error| match template_error(name, e) {
            CodegenError::Template { template, message } => (template, message),
            other => (name.to_string(), other.to_string()),
        };
        let mut tera = Tera::default();
        tera.add_raw_template("prelude", PRELUDE)
            .map_err(|e| err("prelude", &e))?;
        tera.add_raw_template("quant_common", QUANT_COMMON)
            .map_err(|e| err("quant_common", &e))?;
        for (kind, text) in TEMPLATES {
            tera.add_raw_template(kind.as_str(), text)
                .map_err(|e| err(kind.as_str(), &e))?;
        }
        Ok(tera)
    })
    .as_ref()
    .map_err(|(template, message)| CodegenError::Template {
        template: template.clone(),
        message: message.clone(),
    })
}

fn template_error(template: &str, e: &tera::Error) -> CodegenError {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(message, ": {c}");
        cause = c.source();
    }
    CodegenError::Template {
        template: template.into(),
        message,
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free hash for module names (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The templates' name of an activation format (`KIVI_FMT_F16`, `KIVI_FMT_BF16`).
fn act_fmt(d: kivi_dsl::Dtype) -> &'static str {
    match d {
        kivi_dsl::Dtype::F16 => "KIVI_FMT_F16",
        kivi_dsl::Dtype::Bf16 => "KIVI_FMT_BF16",
    }
}

/// The templates' name of a scale format (`KIVI_FMT_F16`, `KIVI_FMT_BF16`, `KIVI_FMT_F32`).
fn scale_fmt(d: kivi_dsl::ScaleDtype) -> &'static str {
    match d {
        kivi_dsl::ScaleDtype::F16 => "KIVI_FMT_F16",
        kivi_dsl::ScaleDtype::Bf16 => "KIVI_FMT_BF16",
        kivi_dsl::ScaleDtype::F32 => "KIVI_FMT_F32",
    }
}

/// The template values of one kernel: every derived number computed here.
fn kernel_context(
    spec: &KernelSpec,
    name: &str,
    _module: &[KernelSpec],
) -> Result<Context, CodegenError> {
    let st = StorageLayout::new(&spec.layout);
    let l = &spec.layout;
    let threads = spec.tile.threads;
    let value = match spec.kind {
        KernelKind::QuantizeValues => {
            json!({
                "tokens_per_block": value_tokens_per_block(threads),
                "value_stage_bytes": value_stage_bytes(l, threads),
            })
        }
        KernelKind::DecodePartial => {
            let plan = DecodePlan::new(l);
            json!({
                "warps": threads / 32,
                "stages": spec.tile.stages,
                "gqa": l.gqa_ratio(),
                "heads_per_tile": plan.heads_per_tile,
                "head_tiles": plan.head_tiles,
                "iter_tokens": plan.iter_tokens,
                "max_splits": MAX_SPLITS,
                "min_blocks": spec.tile.min_blocks,
                "paged": spec.tile.paged,
                "auto_split_min": AUTO_SPLIT_MIN_TOKENS,
                "auto_splits": AUTO_SPLITS,
            })
        }
        _ => json!({}),
    };
    let mut ctx = Context::from_value(value).map_err(|e| template_error(name, &e))?;
    ctx.insert("name", name);
    ctx.insert("threads", &threads);
    // The layout constants every template (and quant_common) reads.
    ctx.insert("layout_tag", &layout_tag(l));
    ctx.insert("key_head_dim", &st.key_head_dim);
    ctx.insert("value_head_dim", &st.value_head_dim);
    ctx.insert("residual_length", &st.residual_length);
    ctx.insert("value_ring", &st.value_ring);
    ctx.insert("sink_tokens", &st.sink_tokens);
    ctx.insert("key_bits", &st.key_bits);
    ctx.insert("key_max_code", &((1u32 << st.key_bits) - 1));
    ctx.insert("key_group_size", &st.key_group_size);
    ctx.insert("key_chunk_tokens", &st.key_chunk_tokens());
    ctx.insert("key_stage_tokens", &key_stage_tokens(l));
    ctx.insert("key_words_per_step", &st.key_words_per_step());
    ctx.insert("key_block_words", &st.key_block_words());
    ctx.insert("key_block_params", &st.key_block_params());
    ctx.insert("value_bits", &st.value_bits);
    ctx.insert("value_max_code", &((1u32 << st.value_bits) - 1));
    ctx.insert("value_group_size", &st.value_group_size);
    ctx.insert("value_words_per_pair", &st.value_words_per_pair());
    ctx.insert("value_block_words", &st.value_block_words());
    ctx.insert("value_block_params", &st.value_block_params());
    ctx.insert("act_fmt", act_fmt(l.dtype));
    ctx.insert("dtype", l.dtype.as_str());
    for (prefix, t) in [("key", &l.keys), ("value", &l.values)] {
        ctx.insert(format!("{prefix}_fmt"), scale_fmt(t.scale_dtype));
        ctx.insert(
            format!("{prefix}_symmetric"),
            &(t.symmetry == kivi_dsl::Symmetry::Symmetric),
        );
        ctx.insert(
            format!("{prefix}_rounding_f32"),
            &(t.rounding == kivi_dsl::Rounding::F32),
        );
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests;
