//! Tile configurations: how a kernel's work is cut into thread blocks.

use kivi_dsl::Layout;

use crate::{DecodePlan, KernelKind, MAX_STATIC_SHARED_BYTES};

/// The launch shape of one kernel. The runtime takes one from whoever asks: [`KernelTiles::heuristic`] now, the
/// autotuner later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// Threads per block: a multiple of 32 in 32..=1024.
    pub threads: u32,
    /// Decode only: tokens per split-K block, a multiple of the decode kernel's iteration
    /// ([`DecodePlan::iter_tokens`]); 0 lets the runtime choose at launch from the sequence length, the number
    /// of sequences and the GPU's multiprocessor count. It is a launch parameter, not part of the code.
    pub split_tokens: u32,
    /// Decode only: cp.async pipeline stages per warp (2..=4); 0 for other kinds.
    pub stages: u32,
    /// Decode only: the thread blocks per multiprocessor the register allocation must allow
    /// (`__launch_bounds__`' second argument: 65536 registers / (blocks x threads) per thread at most); 0 leaves
    /// the compiler free. More blocks hide more latency, fewer registers may spill.
    pub min_blocks: u32,
    /// Decode only: the kernel reads the quantized blocks through a block table (a paged cache,
    /// `kivi_runtime::launch::BlockAddressing::Paged`) instead of contiguously per sequence. A separate kernel,
    /// so that the contiguous one carries no table in its registers; false for other kinds.
    pub paged: bool,
}

impl TileConfig {
    /// A configuration for the non-decode kinds: `threads` per block, no split, no stages.
    pub fn plain(threads: u32) -> Self {
        TileConfig {
            threads,
            split_tokens: 0,
            stages: 0,
            min_blocks: 0,
            paged: false,
        }
    }
}

/// One [`TileConfig`] per [`KernelKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelTiles {
    /// For [`KernelKind::QuantizeKeys`].
    pub quantize_keys: TileConfig,
    /// For [`KernelKind::QuantizeValues`].
    pub quantize_values: TileConfig,
    /// For [`KernelKind::StoreResidual`].
    pub store_residual: TileConfig,
    /// For [`KernelKind::DecodePartial`].
    pub decode: TileConfig,
}

impl KernelTiles {
    /// The default when nothing was tuned: 128 threads everywhere; the decode kernel with 4 warps, a 3-stage
    /// pipeline (fewer stages, then fewer warps, where its shared memory would pass 48 KiB), its split chosen at
    /// launch, and registers budgeted for 512 threads per multiprocessor (16 warps: 128 registers each; on the
    /// H200 that beat the compiler's own choice on the short and the batched shapes, see docs/BENCHMARKS.md)
    /// where the output accumulator (or the query fragments, with wider keys) fits that budget (max(key, value
    /// head_dim) / 16 x ceil(heads per tile / 8) x 4 <= 64 registers), else the compiler's own choice (at head_dim 256 with 16 heads, 128 registers spilled 1.2 KB
    /// per thread and ran 1.85x slower on the H200). 3-bit keys (three code words per lane and 16-channel step)
    /// get 256 threads' worth (255 registers): at 128 they spilled 280 bytes per thread and ran 1.25-1.40x slower
    /// on the H200's 32k and 128k shapes.
    pub fn heuristic(layout: &Layout) -> Self {
        let plain = TileConfig::plain(128);
        let plan = DecodePlan::new(layout);
        // The output accumulator, or the query fragments where keys are wider (both live through the loop).
        let widest = plan.key_head_dim.max(plan.value_head_dim);
        let accumulator = widest / 16 * plan.heads_per_tile.div_ceil(8) * 4;
        let per_sm = if layout.keys.bits == 3 { 256 } else { 512 };
        let budget = |threads: u32| {
            if accumulator <= 64 {
                per_sm / threads
            } else {
                0
            }
        };
        let mut decode = TileConfig {
            threads: 128,
            split_tokens: 0,
            stages: 3,
            min_blocks: budget(128),
            paged: false,
        };
        for (threads, stages) in [(128, 3), (128, 2), (64, 3), (64, 2), (32, 2)] {
            decode = TileConfig {
                threads,
                split_tokens: 0,
                stages,
                min_blocks: budget(threads),
                paged: false,
            };
            if plan.shared_bytes(threads / 32, stages) <= MAX_STATIC_SHARED_BYTES {
                break;
            }
        }
        KernelTiles {
            quantize_keys: plain,
            quantize_values: plain,
            store_residual: plain,
            decode,
        }
    }

    /// These tiles with the decode kernel for a paged cache ([`TileConfig::paged`]).
    pub fn paged(mut self) -> Self {
        self.decode.paged = true;
        self
    }

    /// The configuration of one kind.
    pub fn get(&self, kind: KernelKind) -> TileConfig {
        match kind {
            KernelKind::QuantizeKeys => self.quantize_keys,
            KernelKind::QuantizeValues => self.quantize_values,
            KernelKind::StoreResidual => self.store_residual,
            KernelKind::DecodePartial => self.decode,
        }
    }
}
