//! Tile configurations: how a kernel's work is cut into thread blocks.

use kivi_dsl::Layout;

use crate::KernelKind;

/// The launch shape of one kernel. The runtime takes one from whoever asks: [`KernelTiles::heuristic`] now, the
/// autotuner later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    /// Threads per block: a multiple of 32 in 32..=1024.
    pub threads: u32,
    /// Tokens per split-K block of the decode kernel (ignored by other kinds; 0 there).
    pub split_tokens: u32,
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
    /// For [`KernelKind::DecodeCombine`].
    pub combine: TileConfig,
}

impl KernelTiles {
    /// The default when nothing was tuned: 128 threads everywhere, 4 warps per decode block, 256 tokens per
    /// split (enough splits to fill a GPU at batch 1 and 8k tokens, few enough to keep the combine cheap).
    pub fn heuristic(_layout: &Layout) -> Self {
        let plain = TileConfig {
            threads: 128,
            split_tokens: 0,
        };
        KernelTiles {
            quantize_keys: plain,
            quantize_values: plain,
            store_residual: plain,
            decode: TileConfig {
                threads: 128,
                split_tokens: 256,
            },
            combine: plain,
        }
    }

    /// The configuration of one kind.
    pub fn get(&self, kind: KernelKind) -> TileConfig {
        match kind {
            KernelKind::QuantizeKeys => self.quantize_keys,
            KernelKind::QuantizeValues => self.quantize_values,
            KernelKind::StoreResidual => self.store_residual,
            KernelKind::DecodePartial => self.decode,
            KernelKind::DecodeCombine => self.combine,
        }
    }
}
