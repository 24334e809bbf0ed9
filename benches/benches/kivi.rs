//! Criterion benches of kivi.
//!
//! - CPU: the reference's per-channel key quantization of one flush block, and code generation of a layout.
//! - NVRTC: a cold compile of a layout's module (skipped, with the reason printed, when libnvrtc is missing).
//! - GPU: one KIVI decode step (append, attention, combine, flush) and one prefill (quantize + pack) at two of the
//!   decode-speed issue's shapes, timed with CUDA events through `iter_custom` over two alternating cache copies
//!   (skipped, with the reason printed, when there is no GPU). `kivi bench` gives the full table.
//!
//! Run: `cargo bench -p kivi-benches` (on the GPU machine: the packed bench binary with `--bench`).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::f16;
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
    g.bench_function("cold compile kivi-2 llama-3-8b sm_90 (5 kernels)", |b| {
        b.iter(|| {
            // A comment that changes every time defeats the in-memory cache: each iteration is a cold compile.
            n += 1;
            module.source.push_str(&format!("\n// {n}\n"));
            compiler
                .compile(&module.name, &module.source, arch)
                .unwrap()
        })
    });
    g.finish();
}

fn gpu(c: &mut Criterion) {
    let gpu = match Compiler::new(None, None).and_then(|comp| Gpu::new(0, Arc::new(comp))) {
        Ok(g) => g,
        Err(e) => {
            println!("skipping the GPU bench: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
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
        let name = format!("decode_step kivi-2 B{batch} H{h} Hkv{hkv} D{d} T{t}");
        g.bench_function(&name, |bench| {
            bench.iter_custom(|iters| {
                // Two cache copies, alternated, with room for this sample's steps.
                let mut db =
                    DecodeBench::new(&gpu, Arc::clone(&module), batch, t, 2, iters as u32 / 2 + 1)
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
