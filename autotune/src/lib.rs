//! kivi-autotune: the search space of tile configurations per kernel kind.
//!
//! This crate sits beside the spec -> CUDA -> module chain, above it: it asks `kivi-codegen` which
//! configurations are valid and (with the autotune issue) will time them through `kivi-runtime` and hand the
//! winner to the runtime. Today it enumerates and prunes the candidates and keeps the persistent tuning cache
//! ([`cache`]); the timing loop comes next. The runtime never depends on this crate.

pub mod cache;

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

/// The decode candidates worth timing for one shape: [`candidates`] for the decode kernel, each with the register
/// budget of 512 threads per multiprocessor (`min_blocks` = 512 / threads) and with the compiler's own (0); a
/// fixed split that would give fewer thread blocks than the GPU has multiprocessors (`sm_count`) is pruned, it
/// cannot fill the GPU. The heuristic configuration is always first.
pub fn decode_candidates(
    layout: &Layout,
    sequences: u32,
    context: u32,
    sm_count: u32,
) -> Vec<TileConfig> {
    let heuristic = KernelTiles::heuristic(layout).decode;
    let mut out = vec![heuristic];
    for base in candidates(KernelKind::DecodePartial, layout) {
        for min_blocks in [512 / base.threads, 0] {
            let tile = TileConfig { min_blocks, ..base };
            if out.contains(&tile)
                || KernelSpec::new(KernelKind::DecodePartial, *layout, tile).is_err()
            {
                continue;
            }
            if fills_gpu(layout, tile, sequences, context, sm_count) {
                out.push(tile);
            }
        }
    }
    out
}

/// Whether a decode tile gives at least one thread block per multiprocessor (`sm_count`) for `sequences`
/// sequences of `context` tokens: always for the automatic split (0), else sequences x head tiles x splits.
pub fn fills_gpu(
    layout: &Layout,
    tile: TileConfig,
    sequences: u32,
    context: u32,
    sm_count: u32,
) -> bool {
    if tile.split_tokens == 0 {
        return true;
    }
    let blocks = u64::from(sequences)
        * u64::from(kivi_codegen::DecodePlan::new(layout).head_tiles)
        * u64::from(context.div_ceil(tile.split_tokens));
    blocks >= u64::from(sm_count)
}

/// The hash that keys tuned results to this build's candidates and code: the candidate list and the generated
/// module of the layout (so any template or codegen change invalidates old results).
pub fn candidates_hash(layout: &Layout, candidates: &[TileConfig]) -> u64 {
    let mut text = format!("{candidates:?}");
    if let Ok(k) = kivi_codegen::LayoutKernels::new(layout, &KernelTiles::heuristic(layout)) {
        if let Ok(m) = kivi_codegen::generate_module(&k.specs) {
            text.push_str(&m.source);
        }
    }
    cache::fnv1a(text.as_bytes())
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
    fn decode_candidates_start_with_the_heuristic_and_prune_underfilled_splits() {
        let l = layout("kivi-2, llama-3-8b");
        let all = decode_candidates(&l, 64, 32768, 132);
        assert_eq!(all[0], default_tiles(&l).decode);
        assert!(all.iter().any(|t| t.min_blocks == 0));
        assert!(all.iter().any(|t| t.split_tokens == 4096));
        // One sequence of 4096 tokens: a fixed split of 4096 gives one block for 132 SMs: pruned; automatic kept.
        let few = decode_candidates(&l, 1, 4096, 132);
        assert!(few
            .iter()
            .all(|t| t.split_tokens == 0 || 4096u32.div_ceil(t.split_tokens) >= 132));
        assert!(few.iter().any(|t| t.split_tokens == 0));
        let mut dedup = all.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len());
    }

    #[test]
    fn the_candidates_hash_follows_the_candidates() {
        let l = layout("kivi-2, llama-3-8b");
        let c = decode_candidates(&l, 64, 32768, 132);
        assert_eq!(candidates_hash(&l, &c), candidates_hash(&l, &c));
        assert_ne!(candidates_hash(&l, &c), candidates_hash(&l, &c[1..]));
        let other = layout("kivi-4, llama-3-8b");
        assert_ne!(candidates_hash(&l, &c), candidates_hash(&other, &c));
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
