//! Criterion benches of kivi.
//!
//! - CPU: the reference's per-channel key quantization of one flush block, and code generation of a layout.
//! - NVRTC: a cold compile of a layout's module, and a warm one from the disk cache in a fresh compiler (as a new
//!   process sees it) (skipped, with the reason printed, when libnvrtc is missing). Goals: cold < 1 s, warm < 5 ms.
//! - GPU: one KIVI decode step (append, attention, flush) with the heuristic decode tile and with the tuned one
//!   from the tuning cache (`kivi tune`; skipped with a printed reason when the shape is not tuned), and one
//!   prefill (quantize + pack), at two of the decode-speed issue's shapes, timed with CUDA events through
//!   `iter_custom` over two alternating cache copies; and loading a layout from the disk cache into the GPU
//!   context (skipped, with the reason printed, when there is no GPU). `kivi bench` gives the full table.
//!
//! Run: `cargo bench -p kivi-benches` (on the GPU machine: the packed bench binary with `--bench`).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::f16;
use kivi_cli::bench::Shape;
use kivi_cli::tune::{open_cache, tiles_for};
use kivi_codegen::{generate_module, KernelTiles, LayoutKernels};
use kivi_dsl::parse_spec;
use kivi_runtime::bench::{time_prefill, DecodeBench};
use kivi_runtime::{Arch, Compiler, Gpu};

const SPEC: &str = "kivi-2, llama-3-8b";

fn pseudo_random(n: usize, seed: u32) -> Vec<f16> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f16::from_f32((s as f32 / u32::MAX as f32) * 4.0 - 2.0)
        })
        .collect()
}

fn cpu(c: &mut Criterion) {
    let k = pseudo_random(128 * 128, 1);
    c.bench_function(
        "cpu/quantize_keys_per_channel 128 tokens x 128 ch, 2-bit G32",
        |b| b.iter(|| kivi_reference::quantize_keys_per_channel(&k, 128, 128, 2, 32).unwrap()),
    );
    let layout = parse_spec(SPEC).unwrap();
    let kernels = LayoutKernels::new(&layout, &KernelTiles::heuristic(&layout)).unwrap();
    c.bench_function("codegen/generate_module kivi-2 llama-3-8b", |b| {
        b.iter(|| generate_module(&kernels.specs).unwrap())
    });
}

fn nvrtc(c: &mut Criterion) {
    let compiler = match Compiler::new(None, None) {
        Ok(c) => c,
        Err(e) => {
            println!("skipping the NVRTC bench: {e}");
            return;
        }
    };
    let layout = parse_spec(SPEC).unwrap();
    let kernels = LayoutKernels::new(&layout, &KernelTiles::heuristic(&layout)).unwrap();
    let mut module = generate_module(&kernels.specs).unwrap();
    let arch = Arch::parse("sm_90").unwrap();
    let mut g = c.benchmark_group("nvrtc");
    g.sample_size(10);
    let mut n = 0u64;
    g.bench_function(
        "cold compile kivi-2 llama-3-8b sm_90 (one module, 4 kernels)",
        |b| {
            b.iter(|| {
                // A comment that changes every time defeats the in-memory cache: each iteration is a cold compile.
                n += 1;
                module.source.push_str(&format!("\n// {n}\n"));
                compiler
                    .compile(&module.name, &module.source, arch)
                    .unwrap()
            })
        },
    );
    // Warm: the module is on disk, a fresh compiler (empty memory cache) finds it there.
    let dir = std::env::temp_dir().join(format!("kivi-bench-modules-{}", std::process::id()));
    let disk = Compiler::new(None, Some(dir.clone())).unwrap();
    let module = generate_module(&kernels.specs).unwrap();
    disk.compile(&module.name, &module.source, arch).unwrap();
    g.bench_function(
        "warm load from the disk cache, fresh compiler, kivi-2 llama-3-8b sm_90",
        |b| {
            b.iter(|| {
                let fresh = Compiler::new(None, Some(dir.clone())).unwrap();
                let cubin = fresh.compile(&module.name, &module.source, arch).unwrap();
                assert!(
                    matches!(cubin.origin, kivi_runtime::CubinOrigin::Disk(_)),
                    "{:?}",
                    cubin.origin
                );
                cubin
            })
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    g.finish();
}

/// One decode step of `module` at (batch, context), timed with CUDA events over two alternating cache copies.
fn bench_decode(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    name: &str,
    module: &Arc<kivi_runtime::LayoutModule>,
    batch: u32,
    t: u32,
) {
    g.bench_function(name, |bench| {
        bench.iter_custom(|iters| {
            // Two cache copies, alternated, with room for this sample's steps.
            let mut db =
                DecodeBench::new(gpu, Arc::clone(module), batch, t, 2, iters as u32 / 2 + 1)
                    .unwrap();
            let stream = gpu.stream();
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            for _ in 0..iters {
                db.step().unwrap();
            }
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            end.synchronize().unwrap();
            Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).unwrap()) / 1e3)
        })
    });
}

fn gpu(c: &mut Criterion) {
    let gpu = match Compiler::new(None, None).and_then(|comp| Gpu::new(0, Arc::new(comp))) {
        Ok(g) => g,
        Err(e) => {
            println!("skipping the GPU bench: {e}");
            return;
        }
    };
    let tune_cache = open_cache(None);
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    // A layout's module from the disk cache (a fresh compiler, as in a new process) loaded into the context.
    let dir = std::env::temp_dir().join(format!("kivi-bench-load-{}", std::process::id()));
    let layout = parse_spec(SPEC).unwrap();
    let tiles = KernelTiles::heuristic(&layout);
    let warm = Compiler::new(None, Some(dir.clone())).unwrap();
    Gpu::new(0, Arc::new(warm))
        .unwrap()
        .load_layout(&layout, &tiles)
        .unwrap();
    g.bench_function(
        "load_layout from the disk cache into the context, kivi-2 llama-3-8b",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let fresh = Arc::new(Compiler::new(None, Some(dir.clone())).unwrap());
                    let g2 = Gpu::new(0, fresh).unwrap();
                    let start = std::time::Instant::now();
                    let m = g2.load_layout(&layout, &tiles).unwrap();
                    total += start.elapsed();
                    assert!(matches!(m.origin(), kivi_runtime::CubinOrigin::Disk(_)));
                }
                total
            })
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
    // Two of the decode-speed issue's shapes (B, H, Hkv, D, T); `kivi bench` runs all five with the baselines.
    for (batch, h, hkv, d, t) in [
        (8u32, 32u32, 8u32, 128u32, 32768u32),
        (8, 32, 32, 128, 4096),
    ] {
        let spec = format!("kivi-2, num_heads: {h}, num_kv_heads: {hkv}, head_dim: {d}");
        let layout = parse_spec(&spec).unwrap();
        let module = gpu
            .load_layout(&layout, &KernelTiles::heuristic(&layout))
            .unwrap();
        let name = format!("decode_step kivi-2 B{batch} H{h} Hkv{hkv} D{d} T{t} heuristic tile");
        bench_decode(&mut g, &gpu, &name, &module, batch, t);
        let shape = Shape::new(batch, h, hkv, d, t);
        match &tune_cache {
            Ok(tc) => match tiles_for(&gpu, tc, &layout, &shape) {
                (tiles, true) => {
                    let tuned = gpu.load_layout(&layout, &tiles).unwrap();
                    let name = format!(
                        "decode_step kivi-2 B{batch} H{h} Hkv{hkv} D{d} T{t} tuned tile {}",
                        kivi_autotune::cache::StoredTile::from(tiles.decode)
                    );
                    bench_decode(&mut g, &gpu, &name, &tuned, batch, t);
                }
                (_, false) => println!(
                    "skipping the tuned decode bench of {}: not in the tuning cache {} (run `kivi tune --shapes {}`)",
                    shape.label(),
                    tc.path().display(),
                    shape.label()
                ),
            },
            Err(e) => println!("skipping the tuned decode benches: {e}"),
        }
        let name = format!("prefill kivi-2 B{batch} Hkv{hkv} D{d} T{t}");
        g.bench_function(&name, |bench| {
            bench.iter_custom(|iters| {
                let (times, _) =
                    time_prefill(&gpu, Arc::clone(&module), batch, t, 1, iters as usize).unwrap();
                Duration::from_secs_f64(times.iter().sum::<f64>() / 1e3)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, cpu, nvrtc, gpu);
criterion_main!(benches);
