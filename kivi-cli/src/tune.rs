//! `kivi tune`: the best decode tile configuration per GPU and shape, checked, timed and remembered in the
//! tuning cache (autotune issue). `kivi bench` (and any caller of [`tiles_for`]) uses a tuned entry when one
//! exists.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use kivi_autotune::cache::{batch_bucket, context_bucket, fnv1a, TuneCache, TuneEntry, TuneKey};
use kivi_autotune::{candidates, candidates_hash, decode_candidates, fills_gpu};
use kivi_codegen::{KernelKind, KernelTiles, TileConfig};
use kivi_dsl::Layout;
use kivi_runtime::bench::DecodeBench;
use kivi_runtime::Gpu;

use crate::bench::{layout_for, run_shape, BenchOptions, Shape};
use crate::verify::{rel_l2, verify_tiles_on_gpu};

/// Largest relative L2 difference allowed between a candidate's decode output and the heuristic's at the tuned
/// shape (they differ only in the fp32 order of the split-K merge).
pub const CANDIDATE_TOL: f64 = 2e-3;

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

/// The decode output of one step at `shape` with `tiles` (fixed random inputs: equal for every candidate).
fn one_step_output(
    gpu: &Gpu,
    layout: &Layout,
    tiles: &KernelTiles,
    shape: &Shape,
) -> Result<Vec<f32>, String> {
    let module = gpu.load_layout(layout, tiles).map_err(|e| e.to_string())?;
    let mut b = DecodeBench::new(gpu, module, shape.batch, shape.context, 1, 1)
        .map_err(|e| e.to_string())?;
    b.step().map_err(|e| e.to_string())?;
    Ok(b.output_host(0)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|h| h.to_f32())
        .collect())
}

/// One candidate's outcome.
#[derive(Clone, Debug)]
pub struct CandidateResult {
    /// The decode tile.
    pub tile: TileConfig,
    /// Median decode step, microseconds, if it passed its checks and was timed.
    pub median_us: Option<f64>,
    /// Why it was not timed (a failed check or an error).
    pub rejected: Option<String>,
}

/// Tunes the decode tile of one shape: every candidate (heuristic first) is checked against the CPU reference at
/// a small shape and against the heuristic's output at `shape`, then timed like `kivi bench` (median of `iters`
/// steps after `warmup`, rotating cache copies); candidates stop when `budget_s` seconds have passed. The winner
/// goes into `cache` (not saved: the caller saves). `progress` hears each candidate.
///
/// # Errors
/// A message if the heuristic itself fails its checks (nothing verified to compare with) or the shape is invalid.
#[allow(clippy::too_many_arguments)]
pub fn tune_shape(
    gpu: &Gpu,
    quant: &str,
    shape: &Shape,
    budget_s: f64,
    warmup: usize,
    iters: usize,
    cache: &mut TuneCache,
    progress: &mut dyn FnMut(usize, usize, &CandidateResult),
) -> Result<(TuneEntry, Vec<CandidateResult>), String> {
    let start = Instant::now();
    if !(budget_s.is_finite() && budget_s >= 0.0) {
        return Err(format!(
            "budget {budget_s} s: give a number of seconds >= 0"
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
    let reference = one_step_output(gpu, &layout, &heuristic, shape)?;
    let mut results: Vec<CandidateResult> = Vec::new();
    for (i, &tile) in candidates.iter().enumerate() {
        if i > 0 && start.elapsed().as_secs_f64() > budget_s {
            break;
        }
        let mut tiles = heuristic;
        tiles.decode = tile;
        let checked = (|| -> Result<(), String> {
            let checks = verify_tiles_on_gpu(
                gpu,
                &layout,
                &tiles,
                "tune",
                &[129, 300],
                &[1],
                20,
                &mut |_| {},
            );
            if let Some(c) = checks.iter().find(|c| !c.passed) {
                return Err(format!("CPU reference check failed: {}", c.detail));
            }
            let out = one_step_output(gpu, &layout, &tiles, shape)?;
            let d = rel_l2(&out, &reference);
            if d.is_nan() || d > CANDIDATE_TOL {
                return Err(format!(
                    "output differs from the heuristic's by {d:.2e} (limit {CANDIDATE_TOL:.0e})"
                ));
            }
            Ok(())
        })();
        let result = match checked.and_then(|()| {
            run_shape(
                gpu,
                shape,
                &BenchOptions {
                    quant: quant.to_string(),
                    warmup,
                    iters,
                    prefill: false,
                    decode_tile: Some(tile),
                },
            )
        }) {
            Ok(r) => CandidateResult {
                tile,
                median_us: Some(r.decode.median_ms * 1e3),
                rejected: None,
            },
            Err(e) => CandidateResult {
                tile,
                median_us: None,
                rejected: Some(e),
            },
        };
        progress(i, candidates.len(), &result);
        if i == 0 && result.median_us.is_none() {
            return Err(format!(
                "the heuristic tile failed: {}",
                result.rejected.unwrap_or_default()
            ));
        }
        results.push(result);
    }
    let timed: Vec<(TileConfig, f64)> = results
        .iter()
        .filter_map(|r| r.median_us.map(|t| (r.tile, t)))
        .collect();
    let (best_tile, best_us) = timed
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or("no candidate was timed")?;
    let worst_us = timed.iter().map(|t| t.1).fold(f64::MIN, f64::max);
    let entry = TuneEntry {
        tile: best_tile.into(),
        best_us,
        heuristic_us: timed[0].1,
        worst_us,
        candidates: timed.len(),
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
    Ok((entry, results))
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
