//! `kivi tune`: the best decode tile configuration per GPU and shape, checked, timed and remembered in the
//! tuning cache (autotune issue). `kivi bench` (and any caller of [`tiles_for`]) uses a tuned entry when one
//! exists.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use kivi_autotune::cache::{batch_bucket, context_bucket, fnv1a, TuneCache, TuneEntry, TuneKey};
use kivi_autotune::{
    candidates, candidates_hash, compile_parallel, decode_candidates, fills_gpu, resource_verdict,
};
use kivi_codegen::{KernelKind, KernelTiles, TileConfig};
use kivi_dsl::Layout;
use kivi_runtime::bench::{DecodeBench, Timing};
use kivi_runtime::{Gpu, KernelResources};

use crate::bench::{bench_copies, layout_for, Shape};
use crate::verify::{rel_l2, ReferenceRuns};

/// Largest relative L2 difference allowed between a candidate's decode output and the heuristic's at the tuned
/// shape (they differ in the fp32 order of their sums: tokens per warp, the split-K merge; measured differences
/// are below 5e-4 since the value codes are centred, see docs/BENCHMARKS.md).
pub const CANDIDATE_TOL: f64 = 2e-3;
/// [`CANDIDATE_TOL`] for bf16 outputs: two fp32 results a few ulp apart may round to neighbouring bf16 numbers
/// (2^-8 relative apart), so the limit adds that much.
pub const CANDIDATE_TOL_BF16: f64 = CANDIDATE_TOL + 1.0 / 256.0;

/// Sequences (batch x KV heads) of a shape, or an error naming the overflow.
fn sequences(shape: &Shape) -> Result<u32, String> {
    shape.batch.checked_mul(shape.num_kv_heads).ok_or_else(|| {
        format!(
            "shape {}: batch x num_kv_heads overflows 32 bits",
            shape.label()
        )
    })
}

/// The cache key of a shape's decode tuning on `gpu`. The candidate hash is over the layout's whole decode
/// candidate set (not the shape-pruned one), so every shape of a bucket shares the key.
pub fn key_for(gpu: &Gpu, layout: &Layout, shape: &Shape) -> Result<TuneKey, String> {
    let all = candidates(KernelKind::DecodePartial, layout);
    let nvrtc = gpu.compiler().nvrtc().version;
    Ok(TuneKey {
        gpu: gpu.name().to_string(),
        compute_capability: format!("{}.{}", gpu.arch().major, gpu.arch().minor),
        sm_count: gpu.sm_count(),
        driver: gpu.driver_version(),
        nvrtc: format!("{}.{}", nvrtc.0, nvrtc.1),
        kind: "decode".into(),
        layout_hash: fnv1a(layout.to_spec().as_bytes()),
        candidates_hash: candidates_hash(layout, &all),
        context_bucket: context_bucket(shape.context),
        batch_bucket: batch_bucket(sequences(shape)?),
    })
}

/// The tiles to run `layout` with at `shape`: the heuristic, with the decode tile of a tuned entry when the cache
/// has one for this GPU, layout, code and shape bucket and its split still fills the GPU at this exact shape.
/// Returns the tiles and whether they were tuned.
pub fn tiles_for(
    gpu: &Gpu,
    cache: &TuneCache,
    layout: &Layout,
    shape: &Shape,
) -> (KernelTiles, bool) {
    let mut tiles = KernelTiles::heuristic(layout);
    let (Ok(key), Ok(seqs)) = (key_for(gpu, layout, shape), sequences(shape)) else {
        return (tiles, false);
    };
    match cache.get(&key) {
        Some(e) => {
            let tile: TileConfig = e.tile.into();
            if !fills_gpu(layout, tile, seqs, shape.context, gpu.sm_count()) {
                return (tiles, false);
            }
            tiles.decode = tile;
            (tiles, true)
        }
        None => (tiles, false),
    }
}

/// Whether the cache holds a complete tuning of this shape's bucket (every candidate tried).
pub fn tuned_completely(gpu: &Gpu, cache: &TuneCache, layout: &Layout, shape: &Shape) -> bool {
    key_for(gpu, layout, shape)
        .ok()
        .and_then(|k| cache.get(&k).map(|e| e.complete))
        .unwrap_or(false)
}

/// Candidates in the order they are tried: the heuristic first, then round-robin over thread counts, so that a
/// budget that runs out has still seen every block size.
fn interleaved(c: Vec<TileConfig>) -> Vec<TileConfig> {
    let Some((first, rest)) = c.split_first() else {
        return c;
    };
    let mut by_threads: BTreeMap<u32, std::collections::VecDeque<TileConfig>> = BTreeMap::new();
    for t in rest {
        by_threads.entry(t.threads).or_default().push_back(*t);
    }
    let mut out = vec![*first];
    while by_threads.values().any(|q| !q.is_empty()) {
        for q in by_threads.values_mut() {
            if let Some(t) = q.pop_front() {
                out.push(t);
            }
        }
    }
    out
}

/// How `kivi tune` searches one shape.
#[derive(Clone, Copy, Debug)]
pub struct TuneOptions {
    /// Wall-clock seconds per shape: screening stops early enough that the finals still fit (estimated from the
    /// heuristic's own step time), so a shape takes about this long at most.
    pub budget_s: f64,
    /// Timed steps per candidate in the screening round (after 2 untimed).
    pub screen_iters: usize,
    /// Candidates (besides the heuristic) that go from the screening round to the final.
    pub finalists: usize,
    /// Untimed steps before each final timing.
    pub warmup: usize,
    /// Timed steps of each final timing; the final times every finalist twice, alternating, and keeps the lower
    /// median.
    pub iters: usize,
    /// Threads that compile candidates at once.
    pub compile_workers: usize,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            budget_s: 15.0,
            screen_iters: 10,
            finalists: 4,
            warmup: 5,
            iters: 40,
            compile_workers: std::thread::available_parallelism().map_or(4, |n| n.get()),
        }
    }
}

/// Prefill lengths of the small-shape CPU-reference check of every candidate: 129 makes the first step flush a
/// value block, 255 a key block; with a split of 256 tokens, 255 + steps crosses a split boundary.
const CHECK_PREFILLS: [u32; 2] = [129, 255];
/// Decode steps of each small-shape check.
const CHECK_STEPS: u32 = 6;

/// One candidate's outcome.
#[derive(Clone, Debug)]
pub struct CandidateResult {
    /// The decode tile.
    pub tile: TileConfig,
    /// The compiled decode kernel's registers, spills and occupancy, once loaded.
    pub resources: Option<KernelResources>,
    /// Median decode step of the screening round, microseconds.
    pub screen_us: Option<f64>,
    /// Median decode step of the final, microseconds (finalists only).
    pub final_us: Option<f64>,
    /// Why it was not timed (pruned, a failed check or an error).
    pub rejected: Option<String>,
}

/// What tuning one shape did, and how long each part took (seconds).
#[derive(Clone, Debug)]
pub struct TuneReport {
    /// The stored result.
    pub entry: TuneEntry,
    /// Every candidate visited, in order.
    pub results: Vec<CandidateResult>,
    /// Candidates of the shape (after the pre-compile pruning of the candidate set).
    pub candidates: usize,
    /// Distinct modules compiled (in parallel) and the wall time of that.
    pub compiled: (usize, f64),
    /// Seconds: CPU reference replays; checks and screening; final.
    pub phases: [f64; 3],
}

fn stop(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Tunes the decode tile of one shape. Candidates ([`decode_candidates`], the heuristic first, block sizes
/// interleaved) are compiled in parallel; each one is then loaded, pruned by the resources of its compiled kernel
/// ([`resource_verdict`]), checked against the CPU reference at small shapes (codes identical, outputs within
/// tolerance, flushes included) and against the heuristic's output at `shape`, and screened (median of
/// `screen_iters` steps). The heuristic and the `finalists` fastest are timed again in a final (twice each,
/// alternating) and the fastest final wins, so the stored tile is never slower than the heuristic in the final.
/// All timing runs on one set of cache copies (rotated past 4x L2), refilled identically before each
/// candidate. The winner goes into `cache` (the caller saves). `progress` hears each candidate.
///
/// # Errors
/// A message if the heuristic itself fails (nothing verified to compare with) or the shape is invalid.
pub fn tune_shape(
    gpu: &Gpu,
    quant: &str,
    shape: &Shape,
    opts: &TuneOptions,
    cache: &mut TuneCache,
    progress: &mut dyn FnMut(usize, usize, &CandidateResult),
) -> Result<TuneReport, String> {
    let start = Instant::now();
    if !(opts.budget_s.is_finite() && opts.budget_s >= 0.0) {
        return Err(format!(
            "budget {} s: give a number of seconds >= 0",
            opts.budget_s
        ));
    }
    if opts.iters == 0 || opts.screen_iters == 0 {
        return Err(format!(
            "timed steps: final {}, screening {}: give at least 1 of each",
            opts.iters, opts.screen_iters
        ));
    }
    let layout = layout_for(quant, shape)?;
    let candidates = interleaved(decode_candidates(
        &layout,
        sequences(shape)?,
        shape.context,
        gpu.sm_count(),
    ));
    let key = key_for(gpu, &layout, shape)?;
    let heuristic = KernelTiles::heuristic(&layout);
    let all_tiles: Vec<KernelTiles> = candidates
        .iter()
        .map(|&t| KernelTiles {
            decode: t,
            ..heuristic
        })
        .collect();

    // Compile every candidate's module in parallel (split-only variants share one).
    let t = Instant::now();
    let (compiled, modules) = compile_parallel(
        gpu.compiler(),
        gpu.arch(),
        &layout,
        &all_tiles,
        opts.compile_workers,
    );
    let compiled_info = (modules, t.elapsed().as_secs_f64());

    let t = Instant::now();
    let reference_runs = ReferenceRuns::new(&layout, &CHECK_PREFILLS, &[1], CHECK_STEPS);
    let cpu_s = t.elapsed().as_secs_f64();

    // One set of cache copies for every candidate.
    let t = Instant::now();
    let heuristic_module = gpu.load_layout(&layout, &heuristic).map_err(stop)?;
    let copies = bench_copies(gpu, &layout, shape)?;
    let per_restart = (opts.warmup + opts.iters).max(3 + opts.screen_iters) as u32;
    let mut bench = DecodeBench::new(
        gpu,
        heuristic_module,
        shape.batch,
        shape.context,
        copies,
        per_restart.div_ceil(copies as u32) + 1,
    )
    .map_err(stop)?;
    bench.step().map_err(stop)?;
    let reference = bench.output_host(0).map_err(stop)?;

    let mut results: Vec<CandidateResult> = Vec::new();
    let mut final_estimate = 0.0;
    let mut restart_s = 0.0;
    let mut last_candidate_s = 0.0;
    for (i, (&tile, tiles)) in candidates.iter().zip(&all_tiles).enumerate() {
        // Stop when the next candidate (about as long as the last one) and the final would pass the budget.
        let now = start.elapsed().as_secs_f64();
        if i > 0 && now + last_candidate_s + final_estimate > opts.budget_s {
            break;
        }
        let candidate_start = Instant::now();
        let mut result = CandidateResult {
            tile,
            resources: None,
            screen_us: None,
            final_us: None,
            rejected: None,
        };
        let outcome = (|| -> Result<f64, String> {
            compiled[i].clone()?;
            let module = gpu.load_layout(&layout, tiles).map_err(stop)?;
            let r = module.resources(KernelKind::DecodePartial).map_err(stop)?;
            result.resources = Some(r);
            if i > 0 {
                if let Some(why) = resource_verdict(&r) {
                    return Err(format!("pruned: {why}"));
                }
            }
            if let Some(c) = reference_runs
                .check(gpu, tiles, "tune")
                .iter()
                .find(|c| !c.passed)
            {
                return Err(format!("CPU reference check failed: {}", c.detail));
            }
            bench.set_module(&module).map_err(stop)?;
            let t = Instant::now();
            bench.restart().map_err(stop)?;
            gpu.stream().synchronize().map_err(stop)?;
            restart_s = t.elapsed().as_secs_f64();
            bench.step().map_err(stop)?;
            let out = bench.output_host(0).map_err(stop)?;
            let d = rel_l2(&out, &reference);
            let tol = match layout.dtype {
                kivi_dsl::Dtype::F16 => CANDIDATE_TOL,
                kivi_dsl::Dtype::Bf16 => CANDIDATE_TOL_BF16,
            };
            if d.is_nan() || d > tol {
                return Err(format!(
                    "output differs from the heuristic's by {d:.2e} (limit {tol:.1e})"
                ));
            }
            let samples = bench.time(gpu, 2, opts.screen_iters).map_err(stop)?;
            Ok(Timing::of(samples).ok_or("no timings")?.median_ms * 1e3)
        })();
        match outcome {
            Ok(us) => result.screen_us = Some(us),
            Err(e) => result.rejected = Some(e),
        }
        last_candidate_s = candidate_start.elapsed().as_secs_f64();
        progress(i, candidates.len(), &result);
        if i == 0 {
            let Some(us) = result.screen_us else {
                return Err(format!(
                    "the heuristic tile failed: {}",
                    result.rejected.unwrap_or_default()
                ));
            };
            // Finals: (finalists + 1) x 2 timings of warmup + iters steps, plus a refill each.
            let steps = (opts.warmup + opts.iters) as f64;
            final_estimate = (opts.finalists + 1) as f64 * 2.0 * (steps * us * 1e-6 + restart_s);
        }
        results.push(result);
    }
    let screen_s = t.elapsed().as_secs_f64();

    // The final: the heuristic and the fastest screened, each timed twice, alternating.
    let t = Instant::now();
    let mut order: Vec<usize> = (1..results.len())
        .filter(|&i| results[i].screen_us.is_some())
        .collect();
    order.sort_by(|&a, &b| {
        results[a]
            .screen_us
            .unwrap_or(f64::MAX)
            .total_cmp(&results[b].screen_us.unwrap_or(f64::MAX))
    });
    order.truncate(opts.finalists);
    order.insert(0, 0);
    let modules: Vec<_> = order
        .iter()
        .map(|&i| gpu.load_layout(&layout, &all_tiles[i]).map_err(stop))
        .collect::<Result<_, _>>()?;
    for _pass in 0..2 {
        for (&i, module) in order.iter().zip(&modules) {
            bench.set_module(module).map_err(stop)?;
            bench.restart().map_err(stop)?;
            let samples = bench.time(gpu, opts.warmup, opts.iters).map_err(stop)?;
            let us = Timing::of(samples).ok_or("no timings")?.median_ms * 1e3;
            let r = &mut results[i];
            r.final_us = Some(r.final_us.map_or(us, |old: f64| old.min(us)));
        }
    }
    let final_s = t.elapsed().as_secs_f64();

    let (best, best_us) = order
        .iter()
        .filter_map(|&i| results[i].final_us.map(|us| (i, us)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or("no candidate was timed")?;
    let worst_us = results
        .iter()
        .filter_map(|r| r.screen_us)
        .fold(f64::MIN, f64::max);
    let entry = TuneEntry {
        tile: results[best].tile.into(),
        best_us,
        heuristic_us: results[0].final_us.unwrap_or(f64::NAN),
        worst_us,
        candidates: results.iter().filter(|r| r.screen_us.is_some()).count(),
        complete: results.len() == candidates.len(),
        shape: [
            shape.batch,
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim,
            shape.context,
        ],
        tuned_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    cache.insert(&key, entry.clone())?;
    Ok(TuneReport {
        entry,
        results,
        candidates: candidates.len(),
        compiled: compiled_info,
        phases: [cpu_s, screen_s, final_s],
    })
}

/// The cache as a table (for `kivi tune --show`).
pub fn show(cache: &TuneCache) -> String {
    let mut s = format!(
        "tuning cache {} ({} entries)\n",
        cache.path().display(),
        cache.entries().len()
    );
    if cache.entries().is_empty() {
        return s;
    }
    s.push_str("| shape B,H,Hkv,D,T | tile (threads, stages, split, blocks) | best us | heuristic us | worst us | candidates | key |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for (k, e) in cache.entries() {
        let sh = e.shape;
        s.push_str(&format!(
            "| {},{},{},{},{} | {} | {:.1} | {:.1} | {:.1} | {} | {k} |\n",
            sh[0],
            sh[1],
            sh[2],
            sh[3],
            sh[4],
            e.tile,
            e.best_us,
            e.heuristic_us,
            e.worst_us,
            e.candidates
        ));
    }
    s
}

/// Opens the tuning cache at `path` (or the default), printing a warning if the file had to be discarded.
///
/// # Errors
/// No cache folder can be found (no `KIVI_CACHE_DIR`, `XDG_CACHE_HOME` or `HOME`) and none was given.
pub fn open_cache(path: Option<&Path>) -> Result<TuneCache, String> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => TuneCache::default_path()
            .ok_or("no tuning cache path: set KIVI_CACHE_DIR or HOME, or pass --cache FILE")?,
    };
    let (cache, warning) = TuneCache::load(&path);
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kivi_autotune::cache::StoredTile;

    #[test]
    fn candidates_interleave_block_sizes_after_the_heuristic() {
        let t = |threads, split_tokens| TileConfig {
            threads,
            split_tokens,
            stages: 3,
            min_blocks: 0,
            paged: false,
        };
        let order = interleaved(vec![
            t(128, 0),
            t(64, 0),
            t(64, 512),
            t(128, 512),
            t(256, 0),
        ]);
        assert_eq!(
            order,
            vec![t(128, 0), t(64, 0), t(128, 512), t(256, 0), t(64, 512)]
        );
        assert!(interleaved(Vec::new()).is_empty());
    }

    #[test]
    fn show_lists_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = TuneCache::load(&dir.path().join("tune.json"));
        assert!(show(&c).contains("(0 entries)"));
        let key = TuneKey {
            gpu: "G".into(),
            compute_capability: "9.0".into(),
            sm_count: 1,
            driver: 1,
            nvrtc: "13.0".into(),
            kind: "decode".into(),
            layout_hash: 1,
            candidates_hash: 2,
            context_bucket: 4096,
            batch_bucket: 8,
        };
        c.insert(
            &key,
            TuneEntry {
                tile: StoredTile {
                    threads: 64,
                    split_tokens: 0,
                    stages: 4,
                    min_blocks: 8,
                },
                best_us: 10.0,
                heuristic_us: 12.5,
                worst_us: 30.0,
                candidates: 9,
                complete: true,
                shape: [8, 32, 8, 128, 4096],
                tuned_at: 0,
            },
        )
        .unwrap();
        let t = show(&c);
        assert!(
            t.contains("| 8,32,8,128,4096 | 64,4,0,8 | 10.0 | 12.5 | 30.0 | 9 |"),
            "{t}"
        );
    }
}
