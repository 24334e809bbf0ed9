//! GPU tests of the serving features: ragged batches, paged caches, CUDA-graph replay, the log-sum-exp, a
//! sliding window and a custom softmax scale, and bad input through the raw launch API. The CPU reference
//! (kivi-reference) is the oracle; identities between GPU runs are bit for bit. They need a CUDA GPU, so they are
//! ignored by default; run them on one with `--include-ignored`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::f16;
use kivi_codegen::KernelTiles;
use kivi_dsl::Layout;
use kivi_reference::{attention_f32, RefCache};
use kivi_runtime::launch::{
    BlockAddressing, CacheBuffers, DecodeArgs, DecodeScratch, PrefillArgs, TokenRows,
    DEVICE_ERROR_LENGTH,
};
use kivi_runtime::{Compiler, DecodeOptions, Gpu, KiviCache, LayoutModule, RuntimeError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The CPU-reference tolerance of `kivi verify`: relative L2 error per (batch, head, step).
const TOL: f64 = 3e-3;

fn gpu() -> Gpu {
    let compiler = Compiler::new(None, None).expect("NVRTC");
    Gpu::new(0, Arc::new(compiler)).expect("a CUDA GPU")
}

fn layout(spec: &str) -> Layout {
    kivi_dsl::parse_spec(spec).unwrap()
}

fn module(gpu: &Gpu, l: &Layout, split_tokens: u32) -> Arc<LayoutModule> {
    let mut tiles = KernelTiles::heuristic(l);
    tiles.decode.split_tokens = split_tokens;
    gpu.load_layout(l, &tiles).unwrap()
}

fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.gen_range(-amp..amp)))
        .collect()
}

fn rel_l2(ours: &[f32], theirs: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(theirs) {
        let e = f64::from(a) - f64::from(b);
        err += e * e;
        norm += f64::from(b) * f64::from(b);
    }
    assert_eq!(ours.len(), theirs.len());
    if err == 0.0 {
        0.0
    } else {
        (err / norm.max(1e-30)).sqrt()
    }
}

/// Every head's row of `ours` (fp16, `[heads][d]`) within [`TOL`] of `expected` (relative L2); `what(head, err)`
/// names a failure.
fn assert_heads_within_tol(
    ours: &[f16],
    expected: &[f32],
    d: usize,
    what: &dyn Fn(usize, f64) -> String,
) {
    assert_eq!(ours.len(), expected.len());
    for (head, (mine, theirs)) in ours.chunks(d).zip(expected.chunks(d)).enumerate() {
        let mine: Vec<f32> = mine.iter().map(|x| x.to_f32()).collect();
        let e = rel_l2(&mine, theirs);
        assert!(e <= TOL, "{}", what(head, e));
    }
}

fn bits(x: &[f16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The bits of numbers held as f32 (an export's scales, mins and residuals).
fn bits32(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One step's q, k and v of one batch entry.
type StepInputs = (Vec<f16>, Vec<f16>, Vec<f16>);

/// The inputs of a ragged run: per batch entry its prefill keys and values (`[Hkv][len][D]`) and per step its
/// q (`[H][D]`), k and v (`[Hkv][D]`).
struct Run {
    lens: Vec<u32>,
    prefill: Vec<(Vec<f16>, Vec<f16>)>,
    steps: Vec<Vec<StepInputs>>,
}

impl Run {
    fn new(l: &Layout, lens: &[u32], steps: usize, seed: u64) -> Run {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, hkv, d) = (
            l.num_heads as usize,
            l.num_kv_heads as usize,
            l.keys.head_dim as usize,
        );
        let prefill = lens
            .iter()
            .map(|&n| {
                let n = n as usize * hkv * d;
                (random(&mut rng, n, 2.0), random(&mut rng, n, 1.0))
            })
            .collect();
        let steps = (0..steps)
            .map(|_| {
                lens.iter()
                    .map(|_| {
                        (
                            random(&mut rng, h * d, 1.0),
                            random(&mut rng, hkv * d, 2.0),
                            random(&mut rng, hkv * d, 1.0),
                        )
                    })
                    .collect()
            })
            .collect();
        Run {
            lens: lens.to_vec(),
            prefill,
            steps,
        }
    }

    /// Batch entries `which`, prefill padded to their longest: `[B][Hkv][max][D]` keys and values, the max, lens.
    fn padded(&self, l: &Layout, which: &[usize]) -> (Vec<f16>, Vec<f16>, u32, Vec<u32>) {
        let (hkv, d) = (l.num_kv_heads as usize, l.keys.head_dim as usize);
        let max = which.iter().map(|&b| self.lens[b]).max().unwrap_or(0) as usize;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &b in which {
            let n = self.lens[b] as usize;
            for h in 0..hkv {
                for t in 0..max {
                    // Padding rows are NaN: a kernel that reads one poisons the output.
                    let src = |x: &[f16]| -> Vec<f16> {
                        if t < n {
                            x[(h * n + t) * d..(h * n + t + 1) * d].to_vec()
                        } else {
                            vec![f16::NAN; d]
                        }
                    };
                    k.extend(src(&self.prefill[b].0));
                    v.extend(src(&self.prefill[b].1));
                }
            }
        }
        let lens = which.iter().map(|&b| self.lens[b]).collect();
        (k, v, max as u32, lens)
    }

    /// Step `s`'s q, k, v of batch entries `which`, concatenated.
    fn step(&self, s: usize, which: &[usize]) -> (Vec<f16>, Vec<f16>, Vec<f16>) {
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for &b in which {
            let (a, bb, c) = &self.steps[s][b];
            q.extend_from_slice(a);
            k.extend_from_slice(bb);
            v.extend_from_slice(c);
        }
        (q, k, v)
    }
}

/// Runs batch entries `which` of `run` on `cache` (prefill, then every step): each step's output.
fn run_gpu(
    gpu: &Gpu,
    cache: &mut KiviCache,
    l: &Layout,
    run: &Run,
    which: &[usize],
) -> Vec<Vec<f16>> {
    let s = gpu.stream();
    let (k, v, max, lens) = run.padded(l, which);
    let (dk, dv) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
    cache.prefill_ragged(&dk, &dv, max, &lens).unwrap();
    (0..run.steps.len())
        .map(|i| {
            let (q, k, v) = run.step(i, which);
            cache.decode_step_host(&q, &k, &v).unwrap()
        })
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_ragged_batch_is_bit_identical_to_each_sequence_alone_and_matches_the_cpu_reference() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128");
    let (h, d) = (l.num_heads as usize, l.keys.head_dim as usize);
    // Empty, shorter than a group, around R = 128, and long enough for several automatic splits.
    let lens = [0u32, 1, 127, 128, 129, 300, 2100, 4500];
    let run = Run::new(&l, &lens, 3, 7);
    let all: Vec<usize> = (0..lens.len()).collect();
    // The automatic split and a tuned one (256 tokens: up to 18 splits).
    for split in [0u32, 256] {
        let m = module(&gpu, &l, split);
        let mut cache = KiviCache::new(&gpu, m.clone(), lens.len() as u32, 4600).unwrap();
        let batch = run_gpu(&gpu, &mut cache, &l, &run, &all);
        cache.check_device_errors().unwrap();
        assert_eq!(cache.lens(), &lens.map(|n| n + 3));
        for b in 0..lens.len() {
            let mut alone = KiviCache::new(&gpu, m.clone(), 1, 4600).unwrap();
            let single = run_gpu(&gpu, &mut alone, &l, &run, &[b]);
            let mut cpu = RefCache::new(&l, 1).unwrap();
            let (pk, pv) = &run.prefill[b];
            cpu.prefill(pk, pv, lens[b] as usize).unwrap();
            for (step, out) in batch.iter().enumerate() {
                let mine = &out[b * h * d..(b + 1) * h * d];
                assert_eq!(
                    bits(mine),
                    bits(&single[step]),
                    "split {split} entry {b} step {step}: batch vs alone"
                );
                let (q, k, v) = run.step(step, &[b]);
                let expected = cpu.decode_step(&q, &k, &v).unwrap();
                assert_heads_within_tol(mine, &expected, d, &|head, e| {
                    format!(
                        "split {split} entry {b} (len {}) step {step} head {head}: {e:.2e}",
                        lens[b]
                    )
                });
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_paged_cache_is_bit_identical_to_a_contiguous_one_and_flags_bad_table_entries() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128");
    let m = module(&gpu, &l, 0);
    let lens = [300u32, 1000, 77];
    // 130 steps: every sequence flushes a key block and values on the way.
    let run = Run::new(&l, &lens, 130, 11);
    let all = [0usize, 1, 2];
    let entries = 10u32; // 1280 tokens per sequence
    let pages = 40u32;
    let mut rng = StdRng::seed_from_u64(5);
    let mut free: Vec<i32> = (0..pages as i32).collect();
    let mut table = Vec::new();
    for _ in 0..lens.len() * entries as usize {
        let i = rng.gen_range(0..free.len());
        table.push(free.swap_remove(i));
    }
    let pm = gpu
        .load_layout(&l, &KernelTiles::heuristic(&l).paged())
        .unwrap();
    // Each kind of cache needs its own decode kernel.
    assert!(matches!(
        KiviCache::new_paged(&gpu, m.clone(), 3, entries, pages, &table),
        Err(RuntimeError::State(_))
    ));
    assert!(matches!(
        KiviCache::new(&gpu, pm.clone(), 3, 128),
        Err(RuntimeError::State(_))
    ));
    let mut contiguous = KiviCache::new(&gpu, m.clone(), 3, entries * 128).unwrap();
    let mut paged = KiviCache::new_paged(&gpu, pm.clone(), 3, entries, pages, &table).unwrap();
    let a = run_gpu(&gpu, &mut contiguous, &l, &run, &all);
    let b = run_gpu(&gpu, &mut paged, &l, &run, &all);
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(bits(x), bits(y), "step {step}");
    }
    paged.check_device_errors().unwrap();
    // The stored codes, scales, mins and rings are the same too (export needs one length: a uniform batch).
    let uniform = Run::new(&l, &[300, 300, 300], 130, 13);
    let mut contiguous = KiviCache::new(&gpu, m.clone(), 3, entries * 128).unwrap();
    let mut paged_u = KiviCache::new_paged(&gpu, pm.clone(), 3, entries, pages, &table).unwrap();
    let a_u = run_gpu(&gpu, &mut contiguous, &l, &uniform, &all);
    let b_u = run_gpu(&gpu, &mut paged_u, &l, &uniform, &all);
    assert_eq!(
        a_u.iter().map(|x| bits(x)).collect::<Vec<_>>(),
        b_u.iter().map(|x| bits(x)).collect::<Vec<_>>()
    );
    assert_eq!(contiguous.export().unwrap(), paged_u.export().unwrap());

    // Entry 1 of batch entry 1 points past the pages: its outputs are NaN, the flag says why, the others are
    // unchanged, and the context stays usable.
    let mut bad_table = table.clone();
    bad_table[entries as usize + 1] = pages as i32 + 5;
    let mut bad = KiviCache::new_paged(&gpu, pm, 3, entries, pages, &bad_table).unwrap();
    let c = run_gpu(&gpu, &mut bad, &l, &run, &all);
    let (h, d) = (l.num_heads as usize, l.keys.head_dim as usize);
    for (step, (x, y)) in a.iter().zip(&c).enumerate() {
        assert!(
            y[h * d..2 * h * d].iter().all(|v| v.is_nan()),
            "step {step}: entry 1 must be NaN"
        );
        assert_eq!(bits(&x[..h * d]), bits(&y[..h * d]), "step {step}: entry 0");
        assert_eq!(
            bits(&x[2 * h * d..]),
            bits(&y[2 * h * d..]),
            "step {step}: entry 2"
        );
    }
    match bad.check_device_errors() {
        Err(RuntimeError::Device(msg)) => assert!(msg.contains("block table"), "{msg}"),
        other => panic!("expected a device error, got {other:?}"),
    }
    bad.check_device_errors().unwrap(); // read and cleared
    bad.reset().unwrap();
    gpu.stream().synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_replays_are_bit_identical_to_direct_launches() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 32, num_kv_heads: 8, head_dim: 128");
    let m = module(&gpu, &l, 0);
    let lens = [5u32, 126, 2500, 700];
    let steps = 6;
    let run = Run::new(&l, &lens, steps, 3);
    let all = [0usize, 1, 2, 3];
    let mut direct = KiviCache::new(&gpu, m.clone(), 4, 5000).unwrap();
    let a = run_gpu(&gpu, &mut direct, &l, &run, &all);

    let s = gpu.stream().clone();
    let mut replayed = KiviCache::new(&gpu, m, 4, 5000).unwrap();
    let (k, v, max, plens) = run.padded(&l, &all);
    let (dk, dv) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
    replayed.prefill_ragged(&dk, &dv, max, &plens).unwrap();
    let (q0, k0, v0) = run.step(0, &all);
    let mut q = s.clone_htod(&q0).unwrap();
    let mut kn = s.clone_htod(&k0).unwrap();
    let mut vn = s.clone_htod(&v0).unwrap();
    let mut out = s.clone_htod(&vec![f16::NAN; q0.len()]).unwrap();
    let capture = gpu.context().new_stream().unwrap();
    let graph = replayed
        .capture_decode(&capture, &q, &kn, &vn, &mut out, DecodeOptions::default())
        .unwrap();
    assert_eq!(replayed.lens(), &lens, "capturing runs nothing");
    for (step, expected) in a.iter().enumerate() {
        let (qs, ks, vs) = run.step(step, &all);
        s.memcpy_htod(&qs, &mut q).unwrap();
        s.memcpy_htod(&ks, &mut kn).unwrap();
        s.memcpy_htod(&vs, &mut vn).unwrap();
        // SAFETY: q, kn, vn and out live until the end of the test.
        unsafe { replayed.replay_decode(&graph) }.unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        assert_eq!(bits(&got), bits(expected), "step {step}");
    }
    replayed.check_device_errors().unwrap();
    assert_eq!(replayed.lens(), direct.lens());
    assert_eq!(replayed.export().is_err(), direct.export().is_err());
    // A graph belongs to the cache it was captured on (SAFETY: q, kn, vn and out are alive).
    assert!(matches!(
        unsafe { direct.replay_decode(&graph) },
        Err(RuntimeError::State(_))
    ));
    // After set_module (which may move the scratch) the graph is refused too.
    let again = gpu.load_layout(&l, &KernelTiles::heuristic(&l)).unwrap();
    replayed.set_module(again).unwrap();
    assert!(matches!(
        unsafe { replayed.replay_decode(&graph) },
        Err(RuntimeError::State(_))
    ));
}

/// Exact attention of head `head` of batch entry `b` over the reference cache's tokens plus the new (k, v),
/// with a window and a scale: (output `[D]`, natural-log log-sum-exp of the scaled scores). The layout's sink
/// tokens (the first of the sequence) are always attended; the window counts the tokens after them.
fn expected_step(
    cpu: &RefCache,
    l: &Layout,
    (q, kn, vn): (&[f16], &[f16], &[f16]),
    head: usize,
    window: usize,
    scale: f64,
) -> (Vec<f32>, f64) {
    let (h, hkv, d) = (
        l.num_heads as usize,
        l.num_kv_heads as usize,
        l.keys.head_dim as usize,
    );
    let kvh = head / (h / hkv);
    let (mut k, mut v) = cpu.effective_kv(0, kvh).unwrap();
    k.extend(kn[kvh * d..(kvh + 1) * d].iter().map(|x| x.to_f32()));
    v.extend(vn[kvh * d..(kvh + 1) * d].iter().map(|x| x.to_f32()));
    let t = k.len() / d;
    let sinks = t.min(l.sink_tokens as usize);
    let lo = if window > 0 && t - sinks > window {
        t - window
    } else {
        sinks
    };
    let attended: Vec<usize> = (0..sinks).chain(lo..t).collect();
    let qh: Vec<f64> = q[head * d..(head + 1) * d]
        .iter()
        .map(|x| f64::from(x.to_f32()))
        .collect();
    let scores: Vec<f64> = attended
        .iter()
        .map(|&j| (0..d).map(|c| qh[c] * f64::from(k[j * d + c])).sum::<f64>() * scale)
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let sum: f64 = w.iter().sum();
    let out: Vec<f32> = (0..d)
        .map(|c| {
            (w.iter()
                .enumerate()
                .map(|(i, wi)| wi * f64::from(v[attended[i] * d + c]))
                .sum::<f64>()
                / sum) as f32
        })
        .collect();
    // Without window and scale, this is the reference's own attention.
    if window == 0 && (scale - 1.0 / (d as f64).sqrt()).abs() < 1e-12 {
        let qf: Vec<f32> = qh.iter().map(|&x| x as f32).collect();
        let r = attention_f32(&qf, &k, &v, d).unwrap();
        assert!(rel_l2(&out, &r) < 1e-6);
    }
    (out, mx + sum.ln())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn log_sum_exp_sliding_window_and_softmax_scale_match_the_cpu_reference() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128");
    let (h, d) = (l.num_heads as usize, l.keys.head_dim as usize);
    let s = gpu.stream().clone();
    for (split, window, scale) in [
        (0u32, 0u32, None),
        (0, 200, Some(0.05f32)),
        (256, 1000, None),
        (0, 1, Some(0.2)),
    ] {
        let m = module(&gpu, &l, split);
        let lens = [3000u32, 150, 40];
        let run = Run::new(&l, &lens, 3, 17);
        for (b, &len) in lens.iter().enumerate() {
            let mut cache = KiviCache::new(&gpu, m.clone(), 1, 3100).unwrap();
            let mut cpu = RefCache::new(&l, 1).unwrap();
            let (pk, pv) = &run.prefill[b];
            cache.prefill_host(pk, pv, len).unwrap();
            cpu.prefill(pk, pv, len as usize).unwrap();
            for step in 0..3 {
                let (q, k, v) = run.step(step, &[b]);
                let (dq, dk, dv) = (
                    s.clone_htod(&q).unwrap(),
                    s.clone_htod(&k).unwrap(),
                    s.clone_htod(&v).unwrap(),
                );
                let mut out = s.clone_htod(&vec![f16::NAN; q.len()]).unwrap();
                let mut lse: CudaSlice<f32> = s.clone_htod(&vec![f32::NAN; h]).unwrap();
                let options = DecodeOptions {
                    lse: Some(&mut lse),
                    window,
                    softmax_scale: scale,
                };
                cache
                    .decode_step_with(&dq, &dk, &dv, &mut out, options)
                    .unwrap();
                let (out, lse) = (s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap());
                let sc = f64::from(scale.unwrap_or(1.0 / (d as f32).sqrt()));
                for head in 0..h {
                    let (e_out, e_lse) =
                        expected_step(&cpu, &l, (&q, &k, &v), head, window as usize, sc);
                    let ours: Vec<f32> = out[head * d..(head + 1) * d]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let err = rel_l2(&ours, &e_out);
                    let what = format!("split {split} window {window} scale {scale:?} len {len} step {step} head {head}");
                    assert!(err <= TOL, "{what}: output {err:.2e}");
                    let lse_err = (f64::from(lse[head]) - e_lse).abs();
                    assert!(
                        lse_err <= 1e-3 * e_lse.abs().max(1.0),
                        "{what}: lse {} vs {e_lse}",
                        lse[head]
                    );
                }
                cpu.decode_step(&q, &k, &v).unwrap();
            }
            cache.check_device_errors().unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sink_tokens_ragged_paged_and_windowed_match_the_cpu_reference() {
    // Sink tokens (fp16 rows after the rings, attended by the first split): 4 (one partial iteration) and 70 (three
    // iterations over the warps), a ragged batch around the sink count (empty, inside, at, just past, past R, and
    // several splits), steps that turn sink steps into Algorithm 1 steps; a paged cache bit-identical to a
    // contiguous one; a sliding window that keeps the sinks.
    let gpu = gpu();
    let s = gpu.stream().clone();
    for sinks in [4u32, 70] {
        let l = layout(&format!(
            "kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128, sink_tokens: {sinks}"
        ));
        let (h, d) = (l.num_heads as usize, l.keys.head_dim as usize);
        let m = module(&gpu, &l, 0);
        let lens = [0u32, sinks - 2, sinks, sinks + 1, sinks + 129, 2300];
        let steps = 4;
        let run = Run::new(&l, &lens, steps, 23);
        let all: Vec<usize> = (0..lens.len()).collect();
        let entries = 20u32; // 2560 tokens after the sinks
        let mut contiguous =
            KiviCache::new(&gpu, m.clone(), lens.len() as u32, entries * 128 + sinks).unwrap();
        let batch = run_gpu(&gpu, &mut contiguous, &l, &run, &all);
        contiguous.check_device_errors().unwrap();
        for (b, &len) in lens.iter().enumerate() {
            let mut cpu = RefCache::new(&l, 1).unwrap();
            let (pk, pv) = &run.prefill[b];
            cpu.prefill(pk, pv, len as usize).unwrap();
            for (step, out) in batch.iter().enumerate() {
                let (q, k, v) = run.step(step, &[b]);
                let expected = cpu.decode_step(&q, &k, &v).unwrap();
                assert_heads_within_tol(
                    &out[b * h * d..(b + 1) * h * d],
                    &expected,
                    d,
                    &|head, e| {
                        format!(
                            "sinks {sinks} entry {b} (len {len}) step {step} head {head}: {e:.2e}"
                        )
                    },
                );
            }
        }
        // Paged: the same outputs, bit for bit.
        let pages = lens.len() as u32 * entries;
        let table: Vec<i32> = (0..pages as i32).rev().collect();
        let pm = gpu
            .load_layout(&l, &KernelTiles::heuristic(&l).paged())
            .unwrap();
        let mut paged =
            KiviCache::new_paged(&gpu, pm, lens.len() as u32, entries, pages, &table).unwrap();
        let paged_out = run_gpu(&gpu, &mut paged, &l, &run, &all);
        paged.check_device_errors().unwrap();
        for (step, (x, y)) in batch.iter().zip(&paged_out).enumerate() {
            assert_eq!(
                bits(x),
                bits(y),
                "sinks {sinks} step {step}: paged vs contiguous"
            );
        }
        // A sliding window of 100 tokens after the sinks: the sinks stay attended.
        for (b, &len) in lens.iter().enumerate().filter(|&(_, &n)| n > sinks + 100) {
            let mut cache = KiviCache::new(&gpu, m.clone(), 1, entries * 128 + sinks).unwrap();
            let mut cpu = RefCache::new(&l, 1).unwrap();
            let (pk, pv) = &run.prefill[b];
            cache.prefill_host(pk, pv, len).unwrap();
            cpu.prefill(pk, pv, len as usize).unwrap();
            for step in 0..steps {
                let (q, k, v) = run.step(step, &[b]);
                let (dq, dk, dv) = (
                    s.clone_htod(&q).unwrap(),
                    s.clone_htod(&k).unwrap(),
                    s.clone_htod(&v).unwrap(),
                );
                let mut out = s.clone_htod(&vec![f16::NAN; q.len()]).unwrap();
                let mut lse: CudaSlice<f32> = s.clone_htod(&vec![f32::NAN; h]).unwrap();
                let options = DecodeOptions {
                    lse: Some(&mut lse),
                    window: 100,
                    softmax_scale: None,
                };
                cache
                    .decode_step_with(&dq, &dk, &dv, &mut out, options)
                    .unwrap();
                let (out, lse) = (s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap());
                let sc = 1.0 / (d as f64).sqrt();
                for head in 0..h {
                    let (e_out, e_lse) = expected_step(&cpu, &l, (&q, &k, &v), head, 100, sc);
                    let ours: Vec<f32> = out[head * d..(head + 1) * d]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let err = rel_l2(&ours, &e_out);
                    let what =
                        format!("sinks {sinks} window 100 len {len} step {step} head {head}");
                    assert!(err <= TOL, "{what}: output {err:.2e}");
                    let lse_err = (f64::from(lse[head]) - e_lse).abs();
                    assert!(
                        lse_err <= 1e-3 * e_lse.abs().max(1.0),
                        "{what}: lse {} vs {e_lse}",
                        lse[head]
                    );
                }
                cpu.decode_step(&q, &k, &v).unwrap();
            }
            cache.check_device_errors().unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_raw_api_rejects_bad_arguments_and_flags_bad_lengths_without_breaking_the_context() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 64");
    let m = module(&gpu, &l, 0);
    let s = gpu.stream().clone();
    let st = kivi_codegen::StorageLayout::new(&l);
    let (batch, blocks_per_seq) = (2u32, 4u32);
    let seqs = (batch * l.num_kv_heads) as usize;
    let blocks = seqs * blocks_per_seq as usize;
    let d = st.key_head_dim as usize; // keys and values alike here
    let k_codes = s
        .alloc_zeros::<u32>(blocks * st.key_block_words() as usize)
        .unwrap();
    let k_params = s
        .alloc_zeros::<f16>(blocks * st.key_block_params() as usize)
        .unwrap();
    let k_res = s
        .alloc_zeros::<f16>(seqs * st.residual_length as usize * d)
        .unwrap();
    let v_codes = s
        .alloc_zeros::<u32>(blocks * st.value_block_words() as usize)
        .unwrap();
    let v_scale = s
        .alloc_zeros::<f16>(blocks * st.value_block_params() as usize)
        .unwrap();
    let v_mn = s
        .alloc_zeros::<f16>(blocks * st.value_block_params() as usize)
        .unwrap();
    let v_res = s
        .alloc_zeros::<f16>(seqs * st.value_ring as usize * d)
        .unwrap();
    let splits = m.graph_grid_splits(blocks_per_seq * st.residual_length);
    let (acc, ml, counters) = DecodeScratch::elements(&l, batch, splits);
    let part_acc = s.alloc_zeros::<f32>(acc).unwrap();
    let part_ml = s.alloc_zeros::<f32>(ml).unwrap();
    let counters = s.alloc_zeros::<u32>(counters).unwrap();
    let rows = (batch * l.num_heads) as usize;
    let q = s.clone_htod(&vec![f16::from_f32(0.5); rows * d]).unwrap();
    let kv = s.clone_htod(&vec![f16::from_f32(0.25); seqs * d]).unwrap();
    let out = s.clone_htod(&vec![f16::ZERO; rows * d]).unwrap();
    // Batch entry 1 claims more tokens than its storage holds (4 blocks of 128 = 512).
    let lens = s.clone_htod(&[3i32, 700]).unwrap();
    let flag = s.alloc_zeros::<u32>(1).unwrap();
    let p = |x: &dyn Fn() -> u64| x();
    let ptr = |x: &CudaSlice<u32>| x.device_ptr(&s).0;
    let ph = |x: &CudaSlice<f16>| x.device_ptr(&s).0;
    let pf = |x: &CudaSlice<f32>| x.device_ptr(&s).0;
    let good = DecodeArgs {
        batch,
        q: ph(&q),
        k_new: ph(&kv),
        v_new: ph(&kv),
        out: ph(&out),
        lse: 0,
        seq_lens: p(&|| lens.device_ptr(&s).0),
        seq_lens_next: 0,
        q_lens: 0,
        q_index: 0,
        cache: CacheBuffers {
            k_codes: ptr(&k_codes),
            k_params: ph(&k_params),
            k_res: ph(&k_res),
            v_codes: ptr(&v_codes),
            v_scale: ph(&v_scale),
            v_mn: ph(&v_mn),
            v_res: ph(&v_res),
        },
        blocks: BlockAddressing::Contiguous { blocks_per_seq },
        scratch: DecodeScratch {
            part_acc: pf(&part_acc),
            part_ml: pf(&part_ml),
            counters: ptr(&counters),
            splits,
        },
        grid_splits: splits,
        window: 0,
        softmax_scale: None,
        error_flag: ptr(&flag),
    };
    let cu = s.cu_stream() as kivi_runtime::launch::CUstream;
    let launch = |a: &DecodeArgs| unsafe { m.launch_decode(cu, a) };
    let cases: Vec<(&str, DecodeArgs)> = vec![
        ("null q", DecodeArgs { q: 0, ..good }),
        (
            "misaligned q",
            DecodeArgs {
                q: good.q + 2,
                ..good
            },
        ),
        (
            "misaligned k_codes",
            DecodeArgs {
                cache: CacheBuffers {
                    k_codes: good.cache.k_codes + 4,
                    ..good.cache
                },
                ..good
            },
        ),
        (
            "seq_lens_next = seq_lens",
            DecodeArgs {
                seq_lens_next: good.seq_lens,
                ..good
            },
        ),
        (
            "grid 0",
            DecodeArgs {
                grid_splits: 0,
                ..good
            },
        ),
        (
            "grid beyond the scratch",
            DecodeArgs {
                grid_splits: splits + 1,
                ..good
            },
        ),
        ("batch 0", DecodeArgs { batch: 0, ..good }),
        (
            "NaN scale",
            DecodeArgs {
                softmax_scale: Some(f32::NAN),
                ..good
            },
        ),
        (
            "null table",
            DecodeArgs {
                blocks: BlockAddressing::Paged {
                    block_table: 0,
                    entries_per_seq: 4,
                    pages: 8,
                },
                ..good
            },
        ),
    ];
    for (what, a) in &cases {
        let e = launch(a).expect_err(what);
        assert!(
            matches!(
                e,
                RuntimeError::Pointer { .. } | RuntimeError::Limit { .. } | RuntimeError::State(_)
            ),
            "{what}: {e}"
        );
    }
    // The good arguments launch; entry 1's bad length is flagged on the device and its output is NaN, entry 0
    // is attended normally.
    launch(&good).unwrap();
    let o = s.clone_dtoh(&out).unwrap();
    let per = l.num_heads as usize * d;
    assert!(o[per..].iter().all(|x| x.is_nan()));
    assert!(o[..per].iter().all(|x| x.is_finite()));
    assert_eq!(
        s.clone_dtoh(&flag).unwrap()[0] & DEVICE_ERROR_LENGTH,
        DEVICE_ERROR_LENGTH
    );
    // The context still works: a fresh cache runs a step.
    let mut cache = KiviCache::new(&gpu, m, 1, 64).unwrap();
    cache
        .prefill_host(&vec![f16::ONE; 2 * 10 * d], &vec![f16::ONE; 2 * 10 * d], 10)
        .unwrap();
    let out = cache
        .decode_step_host(
            &vec![f16::ONE; 8 * d],
            &vec![f16::ONE; 2 * d],
            &vec![f16::ONE; 2 * d],
        )
        .unwrap();
    assert!(out.iter().all(|x| (x.to_f32() - 1.0).abs() < 1e-3));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_sliding_window_over_a_ragged_batch_serves_every_length() {
    // With a window, a shorter sequence can need more splits than a longer one (2-bit, window 4095: lengths
    // 7295 and 7294 make 1 and 2 splits); the grid must serve both, bit-identical to each alone.
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128");
    let m = module(&gpu, &l, 0);
    let lens = [7294u32, 7293, 100];
    let run = Run::new(&l, &lens, 2, 23);
    let s = gpu.stream().clone();
    let step = |cache: &mut KiviCache, which: &[usize]| -> Vec<Vec<f16>> {
        let (k, v, max, plens) = run.padded(&l, which);
        let (dk, dv) = (s.clone_htod(&k).unwrap(), s.clone_htod(&v).unwrap());
        cache.prefill_ragged(&dk, &dv, max, &plens).unwrap();
        (0..2)
            .map(|i| {
                let (q, k, v) = run.step(i, which);
                let (dq, dk, dv) = (
                    s.clone_htod(&q).unwrap(),
                    s.clone_htod(&k).unwrap(),
                    s.clone_htod(&v).unwrap(),
                );
                let mut out = s.clone_htod(&vec![f16::NAN; q.len()]).unwrap();
                let options = DecodeOptions {
                    lse: None,
                    window: 4095,
                    softmax_scale: None,
                };
                cache
                    .decode_step_with(&dq, &dk, &dv, &mut out, options)
                    .unwrap();
                s.clone_dtoh(&out).unwrap()
            })
            .collect()
    };
    let mut batch = KiviCache::new(&gpu, m.clone(), 3, 7400).unwrap();
    let outs = step(&mut batch, &[0, 1, 2]);
    batch.check_device_errors().unwrap();
    let (h, d) = (l.num_heads as usize, l.keys.head_dim as usize);
    for b in 0..3 {
        let mut alone = KiviCache::new(&gpu, m.clone(), 1, 7400).unwrap();
        let single = step(&mut alone, &[b]);
        for (i, out) in outs.iter().enumerate() {
            let mine = &out[b * h * d..(b + 1) * h * d];
            assert!(
                mine.iter().all(|x| x.is_finite()),
                "entry {b} step {i}: not finite"
            );
            assert_eq!(bits(mine), bits(&single[i]), "entry {b} step {i}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn several_new_tokens_per_sequence_are_bit_identical_to_repeated_single_steps() {
    let gpu = gpu();
    let l = layout("kivi-2, num_heads: 8, num_kv_heads: 2, head_dim: 128");
    let (h, hkv, d) = (
        l.num_heads as usize,
        l.num_kv_heads as usize,
        l.keys.head_dim as usize,
    );
    // New tokens that cross a key flush (126 + 5 > R = 128), a value flush (250 + 8 > 2R), none, one, and a long
    // sequence over several automatic splits.
    let lens = [0u32, 126, 127, 250, 300, 2100];
    let q_lens = [3u32, 5, 0, 8, 1, 6];
    let q_len = 8usize;
    // q_len tokens, then one ordinary step after them.
    let run = Run::new(&l, &lens, q_len + 1, 11);
    let batch = lens.len();
    // Token-major slabs; rows of tokens past a sequence's q_lens are NaN (a kernel that reads one fails the test).
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..q_len {
        for (b, &n) in q_lens.iter().enumerate() {
            if j < n as usize {
                let (a, bb, c) = &run.steps[j][b];
                q.extend_from_slice(a);
                k.extend_from_slice(bb);
                v.extend_from_slice(c);
            } else {
                q.extend(vec![f16::NAN; h * d]);
                k.extend(vec![f16::NAN; hkv * d]);
                v.extend(vec![f16::NAN; hkv * d]);
            }
        }
    }
    let all: Vec<usize> = (0..batch).collect();
    for split in [0u32, 256] {
        let m = module(&gpu, &l, split);
        let s = gpu.stream();
        let mut cache = KiviCache::new(&gpu, m.clone(), batch as u32, 2400).unwrap();
        let (pk, pv, max, plens) = run.padded(&l, &all);
        let (dk, dv) = (s.clone_htod(&pk).unwrap(), s.clone_htod(&pv).unwrap());
        cache.prefill_ragged(&dk, &dv, max, &plens).unwrap();
        let out = cache
            .decode_tokens_host(&q, &k, &v, q_len as u32, Some(&q_lens))
            .unwrap();
        let after_lens: Vec<u32> = lens.iter().zip(&q_lens).map(|(a, b)| a + b).collect();
        assert_eq!(cache.lens(), &after_lens[..]);
        // One ordinary step after the tokens: the lengths on the device moved on as the host's did.
        let (q1, k1, v1) = run.step(q_len, &all);
        let next = cache.decode_step_host(&q1, &k1, &v1).unwrap();
        cache.check_device_errors().unwrap();
        for b in 0..batch {
            let mut alone = KiviCache::new(&gpu, m.clone(), 1, 2400).unwrap();
            let (pk, pv, max, plens) = run.padded(&l, &[b]);
            let (dk, dv) = (s.clone_htod(&pk).unwrap(), s.clone_htod(&pv).unwrap());
            alone.prefill_ragged(&dk, &dv, max, &plens).unwrap();
            let mut cpu = RefCache::new(&l, 1).unwrap();
            cpu.prefill(&run.prefill[b].0, &run.prefill[b].1, lens[b] as usize)
                .unwrap();
            let mut steps: Vec<usize> = (0..q_lens[b] as usize).collect();
            steps.push(q_len);
            for j in steps {
                let (qs, ks, vs) = run.step(j, &[b]);
                let single = alone.decode_step_host(&qs, &ks, &vs).unwrap();
                let expected = cpu.decode_step(&qs, &ks, &vs).unwrap();
                let mine = if j < q_len {
                    &out[(j * batch + b) * h * d..(j * batch + b + 1) * h * d]
                } else {
                    &next[b * h * d..(b + 1) * h * d]
                };
                assert_eq!(
                    bits(mine),
                    bits(&single),
                    "split {split} entry {b} (len {}) token {j}: q_len > 1 vs single steps",
                    lens[b]
                );
                assert_heads_within_tol(mine, &expected, d, &|head, e| {
                    format!("split {split} entry {b} token {j} head {head}: {e:.2e}")
                });
            }
            // Rows of tokens past q_lens[b] were not written.
            for j in q_lens[b] as usize..q_len {
                let row = &out[(j * batch + b) * h * d..(j * batch + b + 1) * h * d];
                assert!(
                    row.iter().all(|x| x.is_nan()),
                    "entry {b} token {j} was written"
                );
            }
        }
        // Without q_lens every sequence takes q_len tokens: the same as q_len ordinary steps of the batch.
        let full: Vec<Vec<StepInputs>> = run.steps[..q_len].to_vec();
        let uniform = Run {
            lens: run.lens.clone(),
            prefill: run.prefill.clone(),
            steps: full,
        };
        let mut stepped = KiviCache::new(&gpu, m.clone(), batch as u32, 2400).unwrap();
        let singles = run_gpu(&gpu, &mut stepped, &l, &uniform, &all);
        let mut multi = KiviCache::new(&gpu, m.clone(), batch as u32, 2400).unwrap();
        multi.prefill_ragged(&dk, &dv, max, &plens).unwrap();
        let (mut qa, mut ka, mut va) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..q_len {
            let (a, bb, c) = uniform.step(j, &all);
            qa.extend(a);
            ka.extend(bb);
            va.extend(c);
        }
        let together = multi
            .decode_tokens_host(&qa, &ka, &va, q_len as u32, None)
            .unwrap();
        multi.check_device_errors().unwrap();
        assert_eq!(
            bits(&together),
            bits(&singles.concat()),
            "split {split}: q_lens None"
        );
        // Bad input: a q_lens entry above q_len, a q_len of 0, a wrong slab size.
        let e = multi
            .decode_tokens_host(&qa, &ka, &va, q_len as u32, Some(&[9, 0, 0, 0, 0, 0]))
            .unwrap_err();
        assert!(matches!(e, RuntimeError::Limit { .. }), "{e}");
        let e = multi
            .decode_tokens_host::<f16>(&[], &[], &[], 0, None)
            .unwrap_err();
        assert!(
            matches!(e, RuntimeError::Limit { what: "q_len", .. }),
            "{e}"
        );
        let e = multi
            .decode_tokens_host(&qa[..h * d], &ka, &va, q_len as u32, None)
            .unwrap_err();
        assert!(matches!(e, RuntimeError::Shape { .. }), "{e}");

        // Options apply per token: the log-sum-exp slabs, a window and a scale equal the single steps' own.
        fn options(lse: Option<&mut CudaSlice<f32>>) -> DecodeOptions<'_> {
            DecodeOptions {
                lse,
                window: 200,
                softmax_scale: Some(0.07),
            }
        }
        let rows = batch * h;
        let mut stepped = KiviCache::new(&gpu, m.clone(), batch as u32, 2400).unwrap();
        stepped.prefill_ragged(&dk, &dv, max, &plens).unwrap();
        let (mut step_out, mut step_lse) = (Vec::new(), Vec::new());
        for j in 0..q_len {
            let (a, bb, c) = uniform.step(j, &all);
            let (dq1, dk1, dv1) = (
                s.clone_htod(&a).unwrap(),
                s.clone_htod(&bb).unwrap(),
                s.clone_htod(&c).unwrap(),
            );
            let mut o = s.alloc_zeros::<f16>(rows * d).unwrap();
            let mut l = s.alloc_zeros::<f32>(rows).unwrap();
            stepped
                .decode_step_with(&dq1, &dk1, &dv1, &mut o, options(Some(&mut l)))
                .unwrap();
            step_out.extend(s.clone_dtoh(&o).unwrap());
            step_lse.extend(s.clone_dtoh(&l).unwrap());
        }
        let mut multi = KiviCache::new(&gpu, m.clone(), batch as u32, 2400).unwrap();
        multi.prefill_ragged(&dk, &dv, max, &plens).unwrap();
        let (dqa, dka, dva) = (
            s.clone_htod(&qa).unwrap(),
            s.clone_htod(&ka).unwrap(),
            s.clone_htod(&va).unwrap(),
        );
        let mut o = s.alloc_zeros::<f16>(q_len * rows * d).unwrap();
        let mut l = s.alloc_zeros::<f32>(q_len * rows).unwrap();
        multi
            .decode_tokens(
                &dqa,
                &dka,
                &dva,
                &mut o,
                q_len as u32,
                None,
                options(Some(&mut l)),
            )
            .unwrap();
        multi.check_device_errors().unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&o).unwrap()),
            bits(&step_out),
            "split {split}: options"
        );
        let lse_bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            lse_bits(&s.clone_dtoh(&l).unwrap()),
            lse_bits(&step_lse),
            "split {split}: lse slabs"
        );
    }
}

/// A value of the crafted tensor at (token t, channel d): 32 x 32 tiles share one regime, so that every key group
/// (32 tokens of a channel) and value group (32 channels of a token) lies in one: ordinary values, values near
/// the fp16 limit (symmetric 8-bit mins overflow, fp32 ranges saturate), subnormals (scales round to 0), zeros of
/// both signs, a group holding an Inf (or a NaN), a constant group, and a one-sided range.
fn crafted(t: usize, d: usize, head: usize) -> f16 {
    let h = (t as u64 * 131 + d as u64 * 31 + head as u64 * 7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let u = ((h >> 11) as f64 / (1u64 << 53) as f64) as f32; // [0, 1)
    let x = match (t / 32 + d / 32 + head) % 7 {
        0 => 4.0 * u - 2.0,
        1 => {
            let m = 60000.0 + 5504.0 * u;
            if (t + d).is_multiple_of(2) {
                m
            } else {
                -m
            }
        }
        2 => 6e-8 * ((t * 3 + d) % 5) as f32 - 1.2e-7,
        3 => {
            if (t + d).is_multiple_of(3) {
                -0.0
            } else {
                0.0
            }
        }
        4 if t % 32 == 7 && d % 32 == 5 => {
            if head == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        4 => 2.0 * u - 1.0,
        5 => 3.0,
        _ => 1000.0 + 1000.0 * u,
    };
    f16::from_f32(x)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn edge_groups_quantize_exactly_as_the_cpu_reference_with_every_quantizer() {
    // Symmetric, fp32 rounding, and the codes by thresholds of asymmetric 1- to 3-bit fp16 layouts (fp16 and fp32
    // scales) at prefill, whose min/max runs in fp16 pairs (the -0 min of zero groups) and whose WIDE groups
    // fall back to the fp32 steps. 301 tokens: an odd count of prefill values (a half token pair at the end).
    let gpu = gpu();
    for spec in [
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, keys: { bits: 3 }, values: { bits: 1 }, \
         scale_dtype: fp32",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, keys: { bits: 1 }, values: { bits: 3, group_size: 16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, keys: { bits: 8, quant: symmetric }, \
         values: { bits: 8, quant: symmetric }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, quant: symmetric",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, keys: { bits: 1, rounding: fp32 }, \
         values: { bits: 4, rounding: fp32 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, keys: { bits: 4, quant: symmetric, rounding: fp32 }",
    ] {
        let l = layout(spec);
        let (h, hkv, d) = (
            l.num_heads as usize,
            l.num_kv_heads as usize,
            l.keys.head_dim as usize,
        );
        let (batch, len, steps) = (2usize, 301usize, 100usize);
        // [B][Hkv][T][D], the same crafted tensor for keys and values (value tiles are shifted by a token tile).
        let tensor = |shift: usize, tokens: std::ops::Range<usize>| -> Vec<f16> {
            let mut x = Vec::new();
            for b in 0..batch {
                for head in 0..hkv {
                    for t in tokens.clone() {
                        for c in 0..d {
                            x.push(crafted(t + shift, c, b * hkv + head));
                        }
                    }
                }
            }
            x
        };
        let (pk, pv) = (tensor(0, 0..len), tensor(32, 0..len));
        let m = module(&gpu, &l, 0);
        let mut cache = KiviCache::new(&gpu, m, batch as u32, (len + steps) as u32).unwrap();
        cache.prefill_host(&pk, &pv, len as u32).unwrap();
        let mut cpu = RefCache::new(&l, batch).unwrap();
        cpu.prefill(&pk, &pv, len).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for s in 0..steps {
            // Token-major for one step: [B][Hkv][D].
            let (k, v) = (tensor(0, len + s..len + s + 1), tensor(32, len + s..len + s + 1));
            let q = random(&mut rng, batch * h * d, 1.0);
            cache.decode_step_host(&q, &k, &v).unwrap();
            cpu.decode_step(&q, &k, &v).unwrap();
        }
        let (g, c) = (cache.export().unwrap(), cpu.export());
        assert_eq!(
            (g.quantized_keys, g.quantized_values),
            (c.quantized_keys, c.quantized_values),
            "{spec}"
        );
        assert!(g.quantized_keys >= 384 && g.quantized_values >= 250, "{spec}");
        assert_eq!(g.k_code, c.k_code, "{spec}: key codes");
        assert_eq!(g.v_code, c.v_code, "{spec}: value codes");
        for (what, a, b) in [
            ("key scales", &g.k_scale, &c.k_scale),
            ("key mins", &g.k_mn, &c.k_mn),
            ("value scales", &g.v_scale, &c.v_scale),
            ("value mins", &g.v_mn, &c.v_mn),
            ("key residual", &g.k_residual, &c.k_residual),
            ("value residual", &g.v_residual, &c.v_residual),
        ] {
            assert_eq!(bits32(a), bits32(b), "{spec}: {what}");
        }
        // The crafted regimes reached the cases they are for: some NaN parameters (Inf/NaN groups), some zero
        // scales (constant or subnormal groups).
        assert!(g.k_scale.iter().any(|x| x.is_nan()), "{spec}: no NaN key group");
        assert!(
            g.v_scale.contains(&0.0),
            "{spec}: no zero value scale"
        );
    }
}

/// A value of a tensor whose 16 x 32 tiles alternate between wide groups (values near 58000, positive on even
/// channels and negative on odd ones: a range wider than fp16's largest number, so a 1-bit scale above 65504) and
/// ordinary ones. A channel keeps its sign across tokens, so the attention output does not cancel (a sign that
/// alternated per token would leave outputs far smaller than the values, and the fp16 rounding of each
/// probability times a scale, the reference's precision, would dominate their relative error).
fn wide_value(t: usize, d: usize, head: usize, rng: &mut StdRng) -> f16 {
    let u: f32 = rng.gen_range(0.0..1.0);
    let x = if (t / 16 + d / 32 + head).is_multiple_of(2) {
        let m = 56000.0 + 4000.0 * u;
        if d.is_multiple_of(2) {
            m
        } else {
            -m
        }
    } else {
        2.0 * u - 1.0
    };
    f16::from_f32(x)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn value_groups_wider_than_fp16_decode_as_the_cpu_reference_with_every_scale_dtype() {
    // 1-bit value groups whose range passes 65504 keep scales above fp16's range in bf16 and fp32 (fp16 scales
    // saturate, as the reference's do); the decode kernel must not overflow when it folds them into the
    // probabilities (fast path) or dequantizes them (direct path).
    let gpu = gpu();
    for spec in [
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, values: { bits: 1, scale_dtype: fp32 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, values: { bits: 1, scale_dtype: bf16 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, values: { bits: 1, group_size: 16, rounding: fp32, \
         scale_dtype: fp32 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, values: { bits: 1 }",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 64, values: { bits: 2, scale_dtype: fp32 }",
    ] {
        let l = layout(spec);
        let (h, hkv, d) = (
            l.num_heads as usize,
            l.num_kv_heads as usize,
            l.keys.head_dim as usize,
        );
        let (batch, len, steps) = (2usize, 300usize, 40usize);
        let mut rng = StdRng::seed_from_u64(23);
        // [B][Hkv][tokens][D]
        let mut values = |tokens: std::ops::Range<usize>| -> Vec<f16> {
            let mut x = Vec::new();
            for b in 0..batch {
                for head in 0..hkv {
                    for t in tokens.clone() {
                        for c in 0..d {
                            x.push(wide_value(t, c, b * hkv + head, &mut rng));
                        }
                    }
                }
            }
            x
        };
        let pv = values(0..len);
        let mut rng_k = StdRng::seed_from_u64(24);
        let pk = random(&mut rng_k, batch * hkv * len * d, 2.0);
        let m = module(&gpu, &l, 0);
        let mut cache = KiviCache::new(&gpu, m, batch as u32, (len + steps) as u32).unwrap();
        cache.prefill_host(&pk, &pv, len as u32).unwrap();
        let mut cpu = RefCache::new(&l, batch).unwrap();
        cpu.prefill(&pk, &pv, len).unwrap();
        let mut wide = 0usize;
        for s in 0..steps {
            let v = values(len + s..len + s + 1);
            let k = random(&mut rng_k, batch * hkv * d, 2.0);
            let q = random(&mut rng_k, batch * h * d, 1.0);
            let ours = cache.decode_step_host(&q, &k, &v).unwrap();
            let expected = cpu.decode_step(&q, &k, &v).unwrap();
            assert!(ours.iter().all(|x| x.is_finite()), "{spec}: step {s}: a non-finite output");
            assert_heads_within_tol(&ours, &expected, d, &|head, e| {
                format!("{spec}: step {s} head {head}: {e:.2e}")
            });
        }
        let (g, c) = (cache.export().unwrap(), cpu.export());
        assert_eq!(g.v_code, c.v_code, "{spec}: value codes");
        assert_eq!(bits32(&g.v_scale), bits32(&c.v_scale), "{spec}: value scales");
        assert_eq!(bits32(&g.v_mn), bits32(&c.v_mn), "{spec}: value mins");
        wide += g.v_scale.iter().filter(|&&x| x > 65504.0).count();
        // The wide groups reached the case they are for: 1-bit scales beyond fp16 where the format holds them.
        let beyond = l.values.bits == 1 && !spec.contains("values: { bits: 1 }");
        assert_eq!(wide > 0, beyond, "{spec}: {wide} scales above 65504");
        cache.check_device_errors().unwrap();
    }
}

/// A prefill through the raw launch API from rows that are only 4-byte aligned (the first element 2 past an
/// allocation's start, rows head_dim + 2 apart, the gaps holding a number the data never has) takes the 4-byte
/// paths of the key kernel's stage, the value kernel's stage (a partial last warp included) and the residual
/// store; the cache it writes (codes, scales, mins, rings) is bit-identical to a prefill
/// from contiguous, 16-byte aligned rows, for 2-bit keys at head_dim 128 (one stage per block) and 3-bit keys at
/// head_dim 256 (two stages per block, lane rows split between threads).
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_prefill_from_rows_only_4_byte_aligned_writes_the_same_cache() {
    let gpu = gpu();
    for spec in [
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 128",
        "kivi-2, num_heads: 4, num_kv_heads: 2, head_dim: 256, keys: { bits: 3 }, values: { bits: 3 }",
    ] {
        let l = layout(spec);
        let m = module(&gpu, &l, 0);
        let s = gpu.stream().clone();
        let st = kivi_codegen::StorageLayout::new(&l);
        let (batch, len, blocks_per_seq) = (2u32, 300u32, 3u32);
        let seqs = (batch * l.num_kv_heads) as usize;
        let blocks = seqs * blocks_per_seq as usize;
        let d = st.key_head_dim as usize; // keys and values alike here
        let rows = seqs * len as usize;
        let mut rng = StdRng::seed_from_u64(41);
        let k = random(&mut rng, rows * d, 3.0);
        let v = random(&mut rng, rows * d, 3.0);
        // The same rows, 2 elements into the buffer and head_dim + 2 apart; 7.0 in the gaps.
        let padded = |x: &[f16]| {
            let mut out = vec![f16::from_f32(7.0); 2 + rows * (d + 2)];
            for r in 0..rows {
                let at = 2 + r * (d + 2);
                out[at..at + d].copy_from_slice(&x[r * d..(r + 1) * d]);
            }
            out
        };
        let lens = s.clone_htod(&vec![len as i32; batch as usize]).unwrap();
        let run = |k: &CudaSlice<f16>, v: &CudaSlice<f16>, offset: u64, stride_token: i64| {
            let k_codes = s.alloc_zeros::<u32>(blocks * st.key_block_words() as usize).unwrap();
            let k_params = s.alloc_zeros::<f16>(blocks * st.key_block_params() as usize).unwrap();
            let k_res = s.alloc_zeros::<f16>(seqs * st.residual_length as usize * d).unwrap();
            let v_codes = s.alloc_zeros::<u32>(blocks * st.value_block_words() as usize).unwrap();
            let v_scale = s.alloc_zeros::<f16>(blocks * st.value_block_params() as usize).unwrap();
            let v_mn = s.alloc_zeros::<f16>(blocks * st.value_block_params() as usize).unwrap();
            let v_res = s.alloc_zeros::<f16>(seqs * st.value_ring as usize * d).unwrap();
            let flag = s.alloc_zeros::<u32>(1).unwrap();
            let per_head = i64::from(len) * stride_token;
            let rows_of = |x: &CudaSlice<f16>| TokenRows {
                ptr: x.device_ptr(&s).0 + offset,
                stride_batch: i64::from(l.num_kv_heads) * per_head,
                stride_head: per_head,
                stride_token,
            };
            let args = PrefillArgs {
                batch,
                keys: rows_of(k),
                values: rows_of(v),
                seq_lens: lens.device_ptr(&s).0,
                max_len: len,
                cache: CacheBuffers {
                    k_codes: k_codes.device_ptr(&s).0,
                    k_params: k_params.device_ptr(&s).0,
                    k_res: k_res.device_ptr(&s).0,
                    v_codes: v_codes.device_ptr(&s).0,
                    v_scale: v_scale.device_ptr(&s).0,
                    v_mn: v_mn.device_ptr(&s).0,
                    v_res: v_res.device_ptr(&s).0,
                },
                blocks: BlockAddressing::Contiguous { blocks_per_seq },
                error_flag: flag.device_ptr(&s).0,
            };
            let cu = s.cu_stream() as kivi_runtime::launch::CUstream;
            // SAFETY: every buffer above is sized for this layout, batch and blocks_per_seq; the rows hold len
            // tokens of every sequence at the strides given.
            unsafe { m.launch_prefill(cu, &args) }.unwrap();
            let h = |x: &CudaSlice<f16>| bits(&s.clone_dtoh(x).unwrap());
            (
                s.clone_dtoh(&k_codes).unwrap(),
                s.clone_dtoh(&v_codes).unwrap(),
                [h(&k_params), h(&k_res), h(&v_scale), h(&v_mn), h(&v_res)],
                s.clone_dtoh(&flag).unwrap()[0],
            )
        };
        let aligned = run(&s.clone_htod(&k).unwrap(), &s.clone_htod(&v).unwrap(), 0, d as i64);
        let (kp, vp) = (s.clone_htod(&padded(&k)).unwrap(), s.clone_htod(&padded(&v)).unwrap());
        let strided = run(&kp, &vp, 4, d as i64 + 2);
        assert_eq!(aligned.3, 0, "{spec}: error flag");
        assert!(aligned.0.iter().any(|&w| w != 0), "{spec}: key codes written");
        assert_eq!(aligned, strided, "{spec}: the cache from 4-byte aligned rows");
    }
}
