//! kivi-autotune: the search space of tile configurations per kernel kind.
//!
//! This crate sits beside the spec -> CUDA -> module chain, above it: it asks `kivi-codegen` which
//! configurations are valid and (with the autotune issue) will time them through `kivi-runtime` and hand the
//! winner to the runtime. Today it enumerates and prunes the candidates; timing and the persistent cache come
//! next. The runtime never depends on this crate.

use kivi_codegen::{KernelKind, KernelSpec, KernelTiles, TileConfig};
use kivi_dsl::Layout;

/// Threads per block tried for every kernel kind.
pub const THREADS: [u32; 4] = [64, 128, 256, 512];
/// Tokens per split tried for the decode kernel (0: chosen at launch from the shape and the GPU).
pub const SPLIT_TOKENS: [u32; 6] = [0, 256, 512, 1024, 2048, 4096];
/// cp.async pipeline stages tried for the decode kernel.
pub const STAGES: [u32; 3] = [2, 3, 4];

/// Every tile configuration of `kind` that the code generator accepts for `layout` (threads in [`THREADS`];
/// for the decode kernel, also every split in [`SPLIT_TOKENS`] and stage count in [`STAGES`]), in a fixed
/// order. Configurations the codegen rejects (e.g. more shared memory than a block gets) are pruned here,
/// before anything is compiled.
pub fn candidates(kind: KernelKind, layout: &Layout) -> Vec<TileConfig> {
    let decode = kind == KernelKind::DecodePartial;
    let splits: &[u32] = if decode { &SPLIT_TOKENS } else { &[0] };
    let stages: &[u32] = if decode { &STAGES } else { &[0] };
    let mut out = Vec::new();
    for &threads in &THREADS {
        for &split_tokens in splits {
            for &stages in stages {
                let tile = TileConfig {
                    threads,
                    split_tokens,
                    stages,
                    min_blocks: if decode { 512 / threads } else { 0 },
                };
                if KernelSpec::new(kind, *layout, tile).is_ok() {
                    out.push(tile);
                }
            }
        }
    }
    out
}

/// The configuration to use until one is tuned: the codegen's heuristic.
pub fn default_tiles(layout: &Layout) -> KernelTiles {
    KernelTiles::heuristic(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(spec: &str) -> Layout {
        kivi_dsl::parse_spec(spec).unwrap()
    }

    #[test]
    fn decode_candidates_cover_threads_and_splits() {
        let l = layout("kivi-2, llama-3-8b");
        let c = candidates(KernelKind::DecodePartial, &l);
        // 512 threads with 4 stages passes 48 KiB of shared memory; everything else fits.
        assert!(c.len() > THREADS.len() * SPLIT_TOKENS.len(), "{}", c.len());
        assert!(c.len() < THREADS.len() * SPLIT_TOKENS.len() * STAGES.len());
        assert!(
            c.contains(&default_tiles(&l).decode),
            "the heuristic is a candidate"
        );
    }

    #[test]
    fn other_kinds_have_no_split() {
        let l = layout("kivi-4, smollm2-135m");
        let c = candidates(KernelKind::QuantizeKeys, &l);
        assert_eq!(c.len(), THREADS.len());
        assert!(c.iter().all(|t| t.split_tokens == 0));
    }

    #[test]
    fn candidates_over_the_shared_memory_limit_are_pruned() {
        // head_dim 256 at 8 bits: one stage of one warp is 16 KiB, so only small pipelines fit in 48 KiB.
        let l = layout("kivi-2, num_heads: 64, num_kv_heads: 1, head_dim: 256, keys: { bits: 8 }, values: { bits: 8 }");
        let c = candidates(KernelKind::DecodePartial, &l);
        assert!(!c.is_empty());
        assert!(c.iter().all(|t| t.threads * t.stages <= 128), "{c:?}");
        // The other kernels do not use shared memory and stay.
        assert_eq!(
            candidates(KernelKind::QuantizeValues, &l).len(),
            THREADS.len()
        );
    }
}
