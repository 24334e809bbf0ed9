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
/// Tokens per split tried for the decode kernel.
pub const SPLIT_TOKENS: [u32; 6] = [64, 128, 256, 512, 1024, 2048];

/// Every tile configuration of `kind` that the code generator accepts for `layout` (threads in [`THREADS`];
/// for the decode kernel, also every split in [`SPLIT_TOKENS`]), in a fixed order. Configurations the codegen
/// rejects (e.g. more shared memory than a block gets) are pruned here, before anything is compiled.
pub fn candidates(kind: KernelKind, layout: &Layout) -> Vec<TileConfig> {
    let splits: &[u32] = if kind == KernelKind::DecodePartial {
        &SPLIT_TOKENS
    } else {
        &[0]
    };
    THREADS
        .iter()
        .flat_map(|&threads| {
            splits.iter().map(move |&split_tokens| TileConfig {
                threads,
                split_tokens,
            })
        })
        .filter(|&tile| KernelSpec::new(kind, *layout, tile).is_ok())
        .collect()
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
        assert_eq!(c.len(), THREADS.len() * SPLIT_TOKENS.len());
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
        // MQA with 64 query heads and head_dim 256: 64 * 256 * 4 bytes of partial sums alone is 64 KiB.
        let l = layout("kivi-2, num_heads: 64, num_kv_heads: 1, head_dim: 256");
        assert!(candidates(KernelKind::DecodePartial, &l).is_empty());
        // The other kernels do not use shared memory and stay.
        assert_eq!(
            candidates(KernelKind::QuantizeValues, &l).len(),
            THREADS.len()
        );
    }
}
