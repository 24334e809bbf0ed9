//! kivi-autotune: the search space of tile configurations per kernel kind.
//!
//! This crate sits beside the spec -> CUDA -> module chain, above it: it asks `kivi-codegen` which
//! configurations are valid ([`candidates`], [`decode_candidates`]), compiles them in parallel through
//! `kivi-runtime` ([`compile_parallel`]), prunes what the compiled kernels show cannot run or cannot win
//! ([`resource_verdict`]) and keeps the persistent tuning cache ([`cache`]). The timing loop that checks and
//! times the survivors on a GPU is `kivi tune` (kivi-cli's `tune` module). The runtime never depends on this
//! crate.

pub mod cache;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kivi_codegen::{
    generate_module, KernelKind, KernelSpec, KernelTiles, LayoutKernels, TileConfig,
};
use kivi_dsl::Layout;
use kivi_runtime::{Arch, Compiler, KernelResources};

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
                    paged: false,
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
/// budgets of 512 and 384 threads per multiprocessor (`min_blocks` = 512 / threads, 384 / threads: 128 and 170
/// registers) and with the compiler's own (0); a
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
        for min_blocks in REGISTER_BUDGETS
            .iter()
            .map(|&t| t / base.threads)
            .chain([0])
        {
            if min_blocks == 1 {
                continue; // one block per SM: the same 255-register cap as the compiler's own choice (0)
            }
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
    let mut text = format!("{candidates:?} register budgets {REGISTER_BUDGETS:?}");
    if let Ok(k) = kivi_codegen::LayoutKernels::new(layout, &KernelTiles::heuristic(layout)) {
        if let Ok(m) = kivi_codegen::generate_module(&k.specs) {
            text.push_str(&m.source);
        }
    }
    cache::fnv1a(text.as_bytes())
}

/// Generates and compiles the module of `layout` with each of `tiles` for `arch`, on up to `workers` threads at
/// once (NVRTC programs are independent), filling `compiler`'s memory and disk caches so that a later
/// `Gpu::load_layout` of the same tiles only loads. Tile sets whose modules are identical (decode tiles that differ
/// only in `split_tokens`, a launch parameter) compile once. Returns, per entry of `tiles`, the compile's wall
/// time in seconds or the codegen or NVRTC error as text, and the number of distinct modules compiled.
pub fn compile_parallel(
    compiler: &Compiler,
    arch: Arch,
    layout: &Layout,
    tiles: &[KernelTiles],
    workers: usize,
) -> (Vec<Result<f64, String>>, usize) {
    let sources: Vec<Result<(String, String), String>> = tiles
        .iter()
        .map(|t| {
            let k = LayoutKernels::new(layout, t).map_err(|e| e.to_string())?;
            let m = generate_module(&k.specs).map_err(|e| e.to_string())?;
            Ok((m.name, m.source))
        })
        .collect();
    // The first index of every distinct source; the others reuse its result.
    let mut first: Vec<usize> = (0..sources.len()).collect();
    for i in 0..sources.len() {
        if let Ok(s) = &sources[i] {
            if let Some(j) = (0..i).find(|&j| sources[j].as_ref().ok() == Some(s)) {
                first[i] = j;
            }
        }
    }
    let distinct: Vec<usize> = (0..sources.len()).filter(|&i| first[i] == i).collect();
    let results: Mutex<Vec<Option<Result<f64, String>>>> = Mutex::new(vec![None; sources.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, distinct.len().max(1)) {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = distinct.get(n) else { break };
                let r = match &sources[i] {
                    Ok((name, source)) => {
                        let start = std::time::Instant::now();
                        // A panic in one compile (a bug) fails that candidate, not the whole tuning run.
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            compiler.compile(name, source, arch)
                        }))
                        .map_err(|_| {
                            "the compile panicked (a kivi bug: please report it)".to_string()
                        })
                        .and_then(|r| r.map_err(|e| e.to_string()))
                        .map(|_| start.elapsed().as_secs_f64())
                    }
                    Err(e) => Err(e.clone()),
                };
                if let Ok(mut all) = results.lock() {
                    all[i] = Some(r);
                }
            });
        }
    });
    let done = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let per_tile: Vec<Result<f64, String>> = (0..sources.len())
        .map(|i| match &sources[i] {
            Err(e) => Err(e.clone()),
            Ok(_) => done[first[i]]
                .clone()
                .unwrap_or_else(|| Err("the compile did not run".into())),
        })
        .collect();
    let modules = distinct.iter().filter(|&&i| sources[i].is_ok()).count();
    (per_tile, modules)
}

/// Threads per multiprocessor whose registers a decode candidate budgets (`min_blocks` = budget / threads): 512
/// and 384 give 128 and 170 registers per thread; the compiler's own choice (`min_blocks` 0) is always tried too.
pub const REGISTER_BUDGETS: [u32; 2] = [512, 384];

/// Fewest resident warps per multiprocessor a decode candidate may have: below one warp per scheduler (an SM has
/// four) nothing hides the latency of the cache's loads, so a memory-bound kernel cannot approach bandwidth and
/// cannot win.
pub const MIN_WARPS_PER_SM: u32 = 4;

/// Why a compiled kernel should not be timed, from the resources the driver reports for it, or `None` if it
/// should: it cannot run (its registers allow fewer threads per block than it launches with, or no block fits on
/// a multiprocessor), or it cannot win (fewer than [`MIN_WARPS_PER_SM`] resident warps).
pub fn resource_verdict(r: &KernelResources) -> Option<String> {
    if r.max_threads_per_block < r.threads {
        return Some(format!(
            "cannot run: {} registers per thread allow {} threads per block, the tile launches {}",
            r.registers, r.max_threads_per_block, r.threads
        ));
    }
    if r.blocks_per_sm == 0 {
        return Some(format!(
            "cannot run: no block of {} threads ({} registers, {} B shared) fits on a multiprocessor",
            r.threads, r.registers, r.shared_bytes
        ));
    }
    if r.warps_per_sm() < MIN_WARPS_PER_SM {
        return Some(format!(
            "cannot win: {} resident warps per multiprocessor (fewest kept: {MIN_WARPS_PER_SM})",
            r.warps_per_sm()
        ));
    }
    None
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

    fn resources(threads: u32, max_threads: u32, blocks: u32) -> KernelResources {
        KernelResources {
            registers: 128,
            local_bytes: 0,
            shared_bytes: 24576,
            max_threads_per_block: max_threads,
            threads,
            blocks_per_sm: blocks,
        }
    }

    #[test]
    fn resources_prune_what_cannot_run_or_cannot_win() {
        assert_eq!(resource_verdict(&resources(128, 512, 4)), None);
        let too_many = resource_verdict(&resources(512, 256, 1)).unwrap();
        assert!(too_many.contains("allow 256 threads"), "{too_many}");
        let none = resource_verdict(&resources(256, 1024, 0)).unwrap();
        assert!(none.contains("no block"), "{none}");
        // 64 threads x 1 block = 2 warps per SM: below 4.
        let few = resource_verdict(&resources(64, 1024, 1)).unwrap();
        assert!(few.contains("2 resident warps"), "{few}");
        assert_eq!(resource_verdict(&resources(64, 1024, 2)), None);
    }

    #[test]
    fn tile_sets_differing_only_in_the_split_compile_once() {
        // Needs libnvrtc (no GPU): skipped with a message without it, unless KIVI_REQUIRE_NVRTC=1 (CI).
        let l = layout("kivi-2, llama-3-8b");
        let h = KernelTiles::heuristic(&l);
        let mut split = h;
        split.decode.split_tokens = 512;
        let mut bad = h;
        bad.decode.threads = 48;
        let compiler = match Compiler::new(None, None) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    !std::env::var("KIVI_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
                    "KIVI_REQUIRE_NVRTC=1 but {e}"
                );
                eprintln!("skipping: {e}");
                return;
            }
        };
        let arch = Arch::parse("sm_90").unwrap();
        let (r, modules) = compile_parallel(&compiler, arch, &l, &[h, split, bad], 4);
        assert_eq!(r.len(), 3);
        assert_eq!(
            modules, 1,
            "one module for the heuristic and its split variant"
        );
        assert!(r[0].is_ok(), "{:?}", r[0]);
        assert_eq!(r[0], r[1], "the split variant reuses the first compile");
        assert!(r[2].as_ref().unwrap_err().contains("48"), "{:?}", r[2]);
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
