//! `kivi bench`: decode-step and prefill timings of KIVI layouts on the GPU, against FP16 attention and the
//! copy bandwidth measured in the same run (decode-speed issue).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kivi_codegen::{KernelTiles, StorageLayout, TileConfig};
use kivi_dsl::Layout;
use kivi_runtime::bench::{l2_bytes, time_prefill, DecodeBench, Timing};
use kivi_runtime::Gpu;

/// One benchmark shape: batch, query heads, KV heads, head_dim, context (tokens attended per decode step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Sequences.
    pub batch: u32,
    /// Query heads.
    pub num_heads: u32,
    /// KV heads.
    pub num_kv_heads: u32,
    /// head_dim.
    pub head_dim: u32,
    /// Tokens a decode step attends over (the new one included).
    pub context: u32,
}

/// The shapes of the decode-speed issue: (B, H, Hkv, D, T).
pub const ISSUE_SHAPES: [Shape; 5] = [
    Shape::new(8, 32, 32, 128, 4096),
    Shape::new(8, 32, 32, 128, 32768),
    Shape::new(8, 32, 8, 128, 32768),
    Shape::new(64, 32, 32, 128, 2048),
    Shape::new(1, 32, 8, 128, 131072),
];

impl Shape {
    /// A shape.
    pub const fn new(
        batch: u32,
        num_heads: u32,
        num_kv_heads: u32,
        head_dim: u32,
        context: u32,
    ) -> Self {
        Shape {
            batch,
            num_heads,
            num_kv_heads,
            head_dim,
            context,
        }
    }

    /// Parses `B,H,Hkv,D,T` (or with `x` between the numbers).
    ///
    /// # Errors
    /// A message naming the text and the expected form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split([',', 'x']).map(str::trim).collect();
        let bad = || {
            format!("shape {text:?}: expected B,H,Hkv,D,T (five positive integers, e.g. 8,32,8,128,32768)")
        };
        if parts.len() != 5 {
            return Err(bad());
        }
        let n: Vec<u32> = parts
            .iter()
            .map(|p| p.parse::<u32>().ok().filter(|&v| v > 0))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        Ok(Shape::new(n[0], n[1], n[2], n[3], n[4]))
    }

    /// `B,H,Hkv,D,T`.
    pub fn label(&self) -> String {
        format!(
            "{},{},{},{},{}",
            self.batch, self.num_heads, self.num_kv_heads, self.head_dim, self.context
        )
    }
}

/// The shapes to run: `texts` parsed (see [`Shape::parse`]), or the decode-speed issue's five when empty; each
/// checked against `quant` (its layout must be valid and supported) before any GPU work.
///
/// # Errors
/// The first shape that does not parse or does not make a supported layout.
pub fn shapes_for(quant: &str, texts: &[String]) -> Result<Vec<Shape>, String> {
    let shapes: Vec<Shape> = if texts.is_empty() {
        ISSUE_SHAPES.to_vec()
    } else {
        texts
            .iter()
            .map(|s| Shape::parse(s))
            .collect::<Result<_, _>>()?
    };
    for s in &shapes {
        layout_for(quant, s)?;
    }
    Ok(shapes)
}

/// The layout a shape runs with: `quant` (a quantization spec such as `kivi-2`) plus the shape's heads. The shape's
/// head_dim sets both keys' and values' (a note on stderr says so when `quant` names a head_dim of its own).
///
/// # Errors
/// The spec's parse or support error.
pub fn layout_for(quant: &str, shape: &Shape) -> Result<Layout, String> {
    if quant.contains("head_dim") {
        eprintln!(
            "note: the shape's head_dim {} replaces the spec's for keys and values (bench shapes have one head_dim)",
            shape.head_dim
        );
    }
    let spec = format!(
        "{quant}, num_heads: {}, num_kv_heads: {}, head_dim: {}",
        shape.num_heads, shape.num_kv_heads, shape.head_dim
    );
    kivi_dsl::parse_spec_supported(&spec).map_err(|e| format!("{spec}: {e}"))
}

/// Measured numbers of one shape.
#[derive(Clone, Debug)]
pub struct ShapeResult {
    /// The shape.
    pub shape: Shape,
    /// The decode tile it ran with.
    pub tile: TileConfig,
    /// Decode step (append, attention, flush) timings.
    pub decode: Timing,
    /// Bytes a step must read (codes, scales, mins, residual, queries), all sequences.
    pub decode_bytes: u64,
    /// Cache copies the steps rotate over.
    pub copies: usize,
    /// Tokens per split-K block and splits of a step.
    pub split: (u32, u32),
    /// Prefill (quantize + pack + residual store) timings, if measured.
    pub prefill: Option<Timing>,
    /// Bytes a prefill reads (fp16 keys and values) plus writes (the quantized cache and residual).
    pub prefill_bytes: u64,
}

/// Options of one bench run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Quantization spec (e.g. `kivi-2`).
    pub quant: String,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub iters: usize,
    /// Also time the prefill of every shape.
    pub prefill: bool,
    /// Decode tile to run instead of the heuristic one (threads, stages, split_tokens; split 0 = automatic).
    pub decode_tile: Option<TileConfig>,
}

/// Cache copies a timing of `shape` rotates over: at least 2, and together at least 4x the GPU's L2 cache, so
/// that no step finds its cache in L2.
///
/// # Errors
/// Driver errors reading the L2 size.
pub fn bench_copies(gpu: &Gpu, layout: &Layout, shape: &Shape) -> Result<usize, String> {
    let st = StorageLayout::new(layout);
    let seqs = u64::from(shape.batch) * u64::from(shape.num_kv_heads);
    let per_copy = seqs * st.bytes_per_sequence(shape.context);
    let l2 = l2_bytes(gpu).map_err(|e| e.to_string())?;
    Ok(((4 * l2).div_ceil(per_copy.max(1)) as usize).max(2))
}

/// Times one shape: decode steps over rotating cache copies (their total at least 4x the L2 cache), then the
/// prefill of the same context.
///
/// # Errors
/// Layout, compile, allocation and launch errors, as messages.
pub fn run_shape(gpu: &Gpu, shape: &Shape, opts: &BenchOptions) -> Result<ShapeResult, String> {
    let layout = layout_for(&opts.quant, shape)?;
    let mut tiles = KernelTiles::heuristic(&layout);
    if let Some(t) = opts.decode_tile {
        tiles.decode = t;
    }
    let module = gpu
        .load_layout(&layout, &tiles)
        .map_err(|e| e.to_string())?;
    let st = StorageLayout::new(&layout);
    let seqs = u64::from(shape.batch) * u64::from(shape.num_kv_heads);
    let copies = bench_copies(gpu, &layout, shape)?;
    let steps = (opts.warmup + opts.iters) as u32;
    let mut bench = DecodeBench::new(
        gpu,
        Arc::clone(&module),
        shape.batch,
        shape.context,
        copies,
        steps.div_ceil(copies as u32) + 1,
    )
    .map_err(|e| e.to_string())?;
    let cache = bench.next_cache();
    let (len, qk, qv) = (
        u64::from(cache.len()) + 1,
        u64::from(cache.quantized_keys()),
        u64::from(cache.quantized_values()),
    );
    let split = cache.split_plan(len as u32);
    let q_bytes =
        u64::from(shape.batch) * u64::from(shape.num_heads) * u64::from(shape.head_dim) * 2;
    let decode_bytes = seqs * st.decode_read_bytes(len, qk, qv) + q_bytes;
    let samples = bench
        .time(gpu, opts.warmup, opts.iters)
        .map_err(|e| e.to_string())?;
    drop(bench);
    let decode = Timing::of(samples).ok_or("no timings")?;
    let (prefill, prefill_bytes) = if opts.prefill {
        let (t, cache) = time_prefill(
            gpu,
            module,
            shape.batch,
            shape.context,
            2,
            10.max(opts.iters / 5),
        )
        .map_err(|e| e.to_string())?;
        let (len, qk, qv) = (
            u64::from(cache.len()),
            u64::from(cache.quantized_keys()),
            u64::from(cache.quantized_values()),
        );
        let read = seqs * len * u64::from(shape.head_dim) * 2 * 2;
        (
            Timing::of(t),
            read + seqs * st.decode_read_bytes(len, qk, qv),
        )
    } else {
        (None, 0)
    };
    Ok(ShapeResult {
        shape: *shape,
        tile: tiles.decode,
        decode,
        decode_bytes,
        copies,
        split,
        prefill,
        prefill_bytes,
    })
}

/// What the FP16 baseline script measured.
#[derive(Clone, Debug, Default)]
pub struct Baseline {
    /// Device-to-device copy bandwidth, (read + written) bytes / s, in GB/s.
    pub copy_gbps: Option<f64>,
    /// Per shape label: (best SDPA backend, its median milliseconds).
    pub sdpa: Vec<(String, String, f64)>,
    /// The script's whole JSON output, or why there is none.
    pub raw: String,
}

/// Runs `python3 script --shapes ...` and reads its JSON (the last line of its output).
pub fn run_baseline(python: &str, script: &Path, shapes: &[Shape]) -> Baseline {
    let list: Vec<String> = shapes.iter().map(Shape::label).collect();
    let out = Command::new(python)
        .arg(script)
        .arg("--shapes")
        .arg(list.join(";"))
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return Baseline {
                raw: format!(
                    "{} {} failed ({}): {}",
                    python,
                    script.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
                ..Baseline::default()
            }
        }
        Err(e) => {
            return Baseline {
                raw: format!("cannot run {python} {}: {e}", script.display()),
                ..Baseline::default()
            }
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let last = text.lines().last().unwrap_or("").to_string();
    let json: serde_json::Value = match serde_json::from_str(&last) {
        Ok(v) => v,
        Err(e) => {
            return Baseline {
                raw: format!("unreadable baseline output ({e}): {last}"),
                ..Baseline::default()
            }
        }
    };
    let mut sdpa = Vec::new();
    if let Some(list) = json["shapes"].as_array() {
        for s in list {
            let label = s["shape"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            if let (Some(b), Some(ms)) = (s["best"].as_str(), s["best_ms"].as_f64()) {
                sdpa.push((label, b.to_string(), ms));
            }
        }
    }
    Baseline {
        copy_gbps: json["copy_gbps"].as_f64(),
        sdpa,
        raw: last,
    }
}

/// The result table (markdown), one row per shape.
pub fn table(results: &[ShapeResult], base: &Baseline) -> String {
    let mut s = String::new();
    s.push_str(
        "| shape B,H,Hkv,D,T | decode tile | decode step us (median) | split x n | MB read | GB/s | % copy | FP16 SDPA us (backend) | speedup | prefill ms | prefill GB/s | prefill % copy |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let us = r.decode.median_ms * 1e3;
        let gbps = r.decode_bytes as f64 / (r.decode.median_ms * 1e-3) / 1e9;
        let pct = |g: f64| {
            base.copy_gbps
                .map_or("-".to_string(), |c| format!("{:.0}%", 100.0 * g / c))
        };
        let label = r.shape.label();
        let sdpa = base.sdpa.iter().find(|(l, _, _)| *l == label);
        let (sdpa_s, speed) = match sdpa {
            Some((_, b, ms)) => (
                format!("{:.1} ({b})", ms * 1e3),
                format!("{:.2}x", ms / r.decode.median_ms),
            ),
            None => ("-".into(), "-".into()),
        };
        let (pms, pg, pp) = match &r.prefill {
            Some(t) => {
                let g = r.prefill_bytes as f64 / (t.median_ms * 1e-3) / 1e9;
                (format!("{:.3}", t.median_ms), format!("{g:.0}"), pct(g))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        s.push_str(&format!(
            "| {label} | t{} p{} s{} b{} | {us:.1} | {} x {} | {:.1} | {gbps:.0} | {} | {sdpa_s} | {speed} | {pms} | {pg} | {pp} |\n",
            r.tile.threads,
            r.tile.stages,
            r.tile.split_tokens,
            r.tile.min_blocks,
            r.split.0,
            r.split.1,
            r.decode_bytes as f64 / 1e6,
            pct(gbps),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_with_commas_or_x_and_reject_junk() {
        assert_eq!(
            Shape::parse("8,32,8,128,32768").unwrap(),
            Shape::new(8, 32, 8, 128, 32768)
        );
        assert_eq!(Shape::parse("1x32x8x128x131072").unwrap(), ISSUE_SHAPES[4]);
        for bad in [
            "8,32,8,128",
            "8,32,8,128,0",
            "a,b,c,d,e",
            "8,32,8,128,4096,1",
        ] {
            let e = Shape::parse(bad).unwrap_err();
            assert!(e.contains("B,H,Hkv,D,T"), "{bad}: {e}");
        }
    }

    #[test]
    fn shapes_take_their_heads_into_the_layout() {
        let l = layout_for("kivi-4", &Shape::new(2, 12, 4, 96, 100)).unwrap();
        assert_eq!((l.num_heads, l.num_kv_heads, l.keys.head_dim), (12, 4, 96));
        assert_eq!(l.keys.bits, 4);
        let e = layout_for("kivi-2", &Shape::new(1, 6, 4, 128, 10)).unwrap_err();
        assert!(e.contains("num_heads"), "{e}");
    }

    fn result(shape: Shape, ms: f64) -> ShapeResult {
        ShapeResult {
            shape,
            tile: KernelTiles::heuristic(&layout_for("kivi-2", &shape).unwrap()).decode,
            decode: Timing::of(vec![ms]).unwrap(),
            decode_bytes: 400_000_000,
            copies: 2,
            split: (512, 8),
            prefill: None,
            prefill_bytes: 0,
        }
    }

    #[test]
    fn the_table_divides_bytes_by_time_and_compares_with_the_baseline() {
        let s = ISSUE_SHAPES[2];
        let base = Baseline {
            copy_gbps: Some(4000.0),
            sdpa: vec![(s.label(), "cudnn".into(), 0.5)],
            raw: String::new(),
        };
        let t = table(&[result(s, 0.1)], &base);
        // 400 MB in 0.1 ms = 4000 GB/s = 100% of copy; SDPA 0.5 ms / 0.1 ms = 5x.
        assert!(
            t.contains("| 100.0 | 512 x 8 | 400.0 | 4000 | 100% | 500.0 (cudnn) | 5.00x |"),
            "{t}"
        );
        let none = table(&[result(s, 0.1)], &Baseline::default());
        assert!(none.contains("| 4000 | - | - | - |"), "{none}");
    }
}
