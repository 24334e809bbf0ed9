//! Criterion benches of kivi.
//!
//! - CPU: the reference's per-channel key quantization of one flush block, and code generation of a layout.
//! - NVRTC: a cold compile of a layout's module (skipped, with the reason printed, when libnvrtc is missing).
//! - GPU: one KIVI decode step (append, attention, flush) at batch 8, llama-3-8b shape, 4096 cached tokens, timed
//!   with CUDA events through `iter_custom` (skipped, with the reason printed, when there is no GPU).
//!
//! Run: `cargo bench -p kivi-benches` (on the GPU machine: the packed bench binary with `--bench`).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::f16;
use kivi_codegen::{generate_module, KernelTiles, LayoutKernels};
use kivi_dsl::parse_spec;
use kivi_runtime::{Arch, Compiler, Gpu, KiviCache};

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
    let layout = parse_spec(SPEC).unwrap();
    let module = gpu
        .load_layout(&layout, &KernelTiles::heuristic(&layout))
        .unwrap();
    let (batch, prefill) = (8u32, 4096u32);
    let (h, hkv, d) = (
        layout.num_heads as usize,
        layout.num_kv_heads as usize,
        layout.keys.head_dim as usize,
    );
    let b = batch as usize;
    let stream = gpu.stream().clone();
    let pk = stream
        .clone_htod(&pseudo_random(b * hkv * prefill as usize * d, 2))
        .unwrap();
    let pv = stream
        .clone_htod(&pseudo_random(b * hkv * prefill as usize * d, 3))
        .unwrap();
    let q = stream.clone_htod(&pseudo_random(b * h * d, 4)).unwrap();
    let k = stream.clone_htod(&pseudo_random(b * hkv * d, 5)).unwrap();
    let v = stream.clone_htod(&pseudo_random(b * hkv * d, 6)).unwrap();
    let mut out = stream.alloc_zeros::<f16>(b * h * d).unwrap();
    let mut g = c.benchmark_group("gpu");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("decode_step kivi-2 llama-3-8b B8 T4096", |bench| {
        bench.iter_custom(|iters| {
            let mut cache =
                KiviCache::new(&gpu, Arc::clone(&module), batch, prefill + iters as u32).unwrap();
            cache.prefill(&pk, &pv, prefill).unwrap();
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            for _ in 0..iters {
                cache.decode_step(&q, &k, &v, &mut out).unwrap();
            }
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            end.synchronize().unwrap();
            Duration::from_secs_f64(f64::from(start.elapsed_ms(&end).unwrap()) / 1e3)
        })
    });
    g.finish();
}

criterion_group!(benches, cpu, nvrtc, gpu);
criterion_main!(benches);
