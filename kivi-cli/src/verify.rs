//! `kivi verify`: the GPU kernels against the CPU reference (kivi-reference) and against the paper's reference
//! files. The same functions back the GPU tests, so what the tests check is what users run.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use kivi_codegen::KernelTiles;
use kivi_dsl::Layout;
use kivi_reference::{
    check_pack, check_stream, Activation, PackCase, RefCache, ReferenceFile, StreamCase, TensorDiff,
};
use kivi_runtime::{ActivationElem, CacheExport, Gpu, KiviCache};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// GPU output vs CPU reference: max relative L2 error per (batch, head, step) (fp16 output vs f32 oracle).
pub const GPU_VS_CPU_STEP_TOL: f64 = 3e-3;
/// [`GPU_VS_CPU_STEP_TOL`] for bf16 activations: the kernels' error plus the rounding of the bf16 output (up to
/// 2^-9 = 1.95e-3 relative per element, about 1.1e-3 relative L2 over a row), against the CPU reference's f32.
pub const GPU_VS_CPU_STEP_TOL_BF16: f64 = 5e-3;

/// The per-(batch, head, step) tolerance of GPU outputs against the CPU reference for `layout`'s dtype.
pub fn gpu_vs_cpu_step_tol(layout: &Layout) -> f64 {
    match layout.dtype {
        kivi_dsl::Dtype::F16 => GPU_VS_CPU_STEP_TOL,
        kivi_dsl::Dtype::Bf16 => GPU_VS_CPU_STEP_TOL_BF16,
    }
}
/// Ours vs a reference file's outputs: relative L2 error over a whole stream.
pub const FILE_STREAM_TOL: f64 = 5e-3;
/// Ours vs a reference file's outputs: max relative L2 error per (batch, head, step).
pub const FILE_STEP_TOL: f64 = 1e-2;

/// The prefill lengths `kivi verify` tries on every preset: around every multiple of the group and R = 128.
pub const AWKWARD_PREFILLS: [u32; 7] = [1, 31, 127, 128, 129, 300, 1000];

/// The outcome of one check.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The measured numbers.
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = if self.passed { "PASS" } else { "FAIL" };
        write!(f, "{tag} {}: {}", self.name, self.detail)
    }
}

fn check(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        passed,
        detail: detail.into(),
    }
}

/// Relative L2 error `||ours - theirs|| / ||theirs||` in f64: 0 when both are 0, infinite when ours has a NaN
/// that theirs has not (so an unwritten, NaN-poisoned output always fails).
pub fn rel_l2(ours: &[f32], theirs: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(theirs) {
        if a.is_nan() != b.is_nan() {
            return f64::INFINITY;
        }
        if a.is_nan() {
            continue;
        }
        let e = f64::from(a) - f64::from(b);
        err += e * e;
        norm += f64::from(b) * f64::from(b);
    }
    if ours.len() != theirs.len() {
        f64::INFINITY
    } else if err == 0.0 {
        0.0
    } else {
        (err / norm).sqrt()
    }
}

/// fp16 values widened to f32.
pub(crate) fn to_f32(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Per-tensor mismatches between two exports in the reference layouts (numbers compared by bits, NaN equal to
/// NaN); returns `(total, description of the tensors that differ)`.
fn compare_cache(
    ours: &CacheExport,
    k_code: &[i32],
    k_scale: &[f32],
    k_mn: &[f32],
    k_res: &[f32],
    v: (&[i32], &[f32], &[f32], &[f32]),
) -> (usize, String) {
    summarize(&[
        TensorDiff::i32("k_code", k_code, &ours.k_code),
        TensorDiff::values("k_scale", k_scale, &ours.k_scale),
        TensorDiff::values("k_mn", k_mn, &ours.k_mn),
        TensorDiff::values("k_residual", k_res, &ours.k_residual),
        TensorDiff::i32("v_code", v.0, &ours.v_code),
        TensorDiff::values("v_scale", v.1, &ours.v_scale),
        TensorDiff::values("v_mn", v.2, &ours.v_mn),
        TensorDiff::values("v_residual", v.3, &ours.v_residual),
    ])
}

/// Total mismatches of `diffs` and a description of the tensors that differ.
fn summarize(diffs: &[TensorDiff]) -> (usize, String) {
    let total = diffs.iter().map(|t| t.mismatches).sum();
    let text = diffs
        .iter()
        .filter(|t| t.mismatches > 0)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    (total, text)
}

/// [`compare_cache`] against a CPU reference cache, plus its sink tokens and its token counts.
fn compare_with_reference(
    ours: &CacheExport,
    cpu: &kivi_reference::CacheExport,
) -> (usize, String) {
    let (mut total, text) = compare_cache(
        ours,
        &cpu.k_code,
        &cpu.k_scale,
        &cpu.k_mn,
        &cpu.k_residual,
        (&cpu.v_code, &cpu.v_scale, &cpu.v_mn, &cpu.v_residual),
    );
    let (sinks, sink_text) = summarize(&[
        TensorDiff::values("k_sink", &cpu.k_sink, &ours.k_sink),
        TensorDiff::values("v_sink", &cpu.v_sink, &ours.v_sink),
    ]);
    total += sinks;
    let mut parts: Vec<String> = [text, sink_text]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect();
    let counts = |e: &CacheExport| (e.len, e.sink_tokens, e.quantized_keys, e.quantized_values);
    if counts(ours) != counts(cpu) {
        total += 1;
        parts.push(format!(
            "(len, sinks, quantized keys, quantized values) {:?} vs the reference's {:?}",
            counts(ours),
            counts(cpu)
        ));
    }
    (total, parts.join(", "))
}

/// Per-step output errors, accumulated over a run.
#[derive(Default)]
struct StepErrors {
    max_step: f64,
    worst: (usize, usize, usize),
    err2: f64,
    norm2: f64,
}

impl StepErrors {
    /// Adds step `step`'s output `[B, H, D]` (ours vs theirs).
    fn add(&mut self, step: usize, ours: &[f32], theirs: &[f32], heads: usize, d: usize) {
        for (row, (a, b)) in ours.chunks(d).zip(theirs.chunks(d)).enumerate() {
            let e = rel_l2(a, b);
            if e > self.max_step || e.is_nan() {
                self.max_step = if e.is_nan() { f64::INFINITY } else { e };
                self.worst = (row / heads, row % heads, step);
            }
            for (&x, &y) in a.iter().zip(b) {
                let diff = f64::from(x) - f64::from(y);
                self.err2 += if diff.is_nan() {
                    f64::INFINITY
                } else {
                    diff * diff
                };
                self.norm2 += f64::from(y) * f64::from(y);
            }
        }
    }

    fn stream(&self) -> f64 {
        if self.err2 == 0.0 {
            0.0
        } else {
            (self.err2 / self.norm2).sqrt()
        }
    }
}

/// What a CPU replay of a run produces: the output of each step and the final cache.
struct CpuRun {
    outputs: Vec<Vec<f32>>,
    export: CacheExport,
}

/// Inputs of one run: prefill K, V `[B, Hkv, P, D]` and per-step q `[B, H, D]`, k, v `[B, Hkv, D]`.
struct RunInputs {
    layout: Layout,
    batch: u32,
    prefill: u32,
    prefill_k: Vec<f16>,
    prefill_v: Vec<f16>,
    steps: Vec<(Vec<f16>, Vec<f16>, Vec<f16>)>,
}

fn cpu_run(inp: &RunInputs) -> Result<CpuRun, String> {
    match inp.layout.dtype {
        kivi_dsl::Dtype::F16 => cpu_run_as::<f16>(inp),
        kivi_dsl::Dtype::Bf16 => cpu_run_as::<bf16>(inp),
    }
}

/// The inputs (generated as fp16) as activations of type `T`: rounded to bf16 for a bf16 layout.
fn as_act<T: Activation>(x: &[f16]) -> Vec<T> {
    kivi_reference::dtype::from_f16s(x)
}

fn cpu_run_as<T: Activation>(inp: &RunInputs) -> Result<CpuRun, String> {
    let mut c = RefCache::new(&inp.layout, inp.batch as usize).map_err(|e| e.to_string())?;
    c.prefill(
        &as_act::<T>(&inp.prefill_k),
        &as_act::<T>(&inp.prefill_v),
        inp.prefill as usize,
    )
    .map_err(|e| e.to_string())?;
    let mut outputs = Vec::with_capacity(inp.steps.len());
    for (q, k, v) in &inp.steps {
        outputs.push(
            c.decode_step(&as_act::<T>(q), &as_act::<T>(k), &as_act::<T>(v))
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(CpuRun {
        outputs,
        export: c.export(),
    })
}

/// GPU replay: outputs of each step (fp16 widened to f32), the final cache, and the counts after each step.
struct GpuRun {
    outputs: Vec<Vec<f32>>,
    export: CacheExport,
}

fn gpu_run(gpu: &Gpu, inp: &RunInputs, tiles: &KernelTiles) -> Result<GpuRun, String> {
    match inp.layout.dtype {
        kivi_dsl::Dtype::F16 => gpu_run_as::<f16>(gpu, inp, tiles),
        kivi_dsl::Dtype::Bf16 => gpu_run_as::<bf16>(gpu, inp, tiles),
    }
}

fn gpu_run_as<T: ActivationElem>(
    gpu: &Gpu,
    inp: &RunInputs,
    tiles: &KernelTiles,
) -> Result<GpuRun, String> {
    let module = gpu
        .load_layout(&inp.layout, tiles)
        .map_err(|e| e.to_string())?;
    let capacity = inp.prefill + inp.steps.len() as u32;
    let mut cache = KiviCache::new(gpu, Arc::clone(&module), inp.batch, capacity.max(1))
        .map_err(|e| e.to_string())?;
    cache
        .prefill_host(
            &as_act::<T>(&inp.prefill_k),
            &as_act::<T>(&inp.prefill_v),
            inp.prefill,
        )
        .map_err(|e| e.to_string())?;
    let mut outputs = Vec::with_capacity(inp.steps.len());
    for (q, k, v) in &inp.steps {
        let out = cache
            .decode_step_host(&as_act::<T>(q), &as_act::<T>(k), &as_act::<T>(v))
            .map_err(|e| e.to_string())?;
        outputs.push(kivi_reference::dtype::to_f32s(&out));
    }
    Ok(GpuRun {
        outputs,
        export: cache.export().map_err(|e| e.to_string())?,
    })
}

/// The CPU replay computed on a thread, or why there is none.
fn join_cpu(
    cpu: std::thread::ScopedJoinHandle<'_, Result<CpuRun, String>>,
) -> Result<CpuRun, String> {
    cpu.join()
        .unwrap_or_else(|_| Err("the CPU reference panicked".into()))
}

/// Pairs a GPU run with the CPU replay of the same inputs, or says which side failed.
fn pair(
    gpu: Result<GpuRun, String>,
    cpu: &Result<CpuRun, String>,
) -> Result<(GpuRun, &CpuRun), String> {
    match (gpu, cpu) {
        (Ok(g), Ok(c)) => Ok((g, c)),
        (Err(e), _) => Err(format!("GPU: {e}")),
        (_, Err(e)) => Err(format!("CPU reference: {e}")),
    }
}

/// The check of one generated run: the GPU run against the CPU replay of the same inputs.
fn check_run(
    label: &str,
    inp: &RunInputs,
    gpu: Result<GpuRun, String>,
    cpu: &Result<CpuRun, String>,
) -> Check {
    let name = format!("{label} batch {} prefill {}", inp.batch, inp.prefill);
    match pair(gpu, cpu) {
        Ok((g, c)) => compare_runs(name, inp, &g, c),
        Err(e) => check(name, false, e),
    }
}

/// The seeded random inputs of the run (batch `b`, prefill `p`): the same for every tile configuration.
fn case_inputs(layout: &Layout, b: u32, p: u32, steps: u32) -> RunInputs {
    random_inputs(layout, b, p, steps, u64::from(p) * 7919 + u64::from(b))
}

fn random_inputs(layout: &Layout, batch: u32, prefill: u32, steps: u32, seed: u64) -> RunInputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let (d, dv) = (
        layout.keys.head_dim as usize,
        layout.values.head_dim as usize,
    );
    let (h, hkv, b) = (
        layout.num_heads as usize,
        layout.num_kv_heads as usize,
        batch as usize,
    );
    // Roughly normal values; keys get a few large-magnitude channels (channel % 16 == 3, +6), as real
    // post-RoPE keys have (the reason keys are quantized per-channel).
    let mut sample = |n: usize, keys: bool| -> Vec<f16> {
        (0..n)
            .map(|i| {
                let s: f32 = (0..4).map(|_| rng.gen::<f32>()).sum();
                let bias = if keys && i % d % 16 == 3 { 6.0 } else { 0.0 };
                f16::from_f32((s - 2.0) * 1.7 + bias)
            })
            .collect()
    };
    let prefill_k = sample(b * hkv * prefill as usize * d, true);
    let prefill_v = sample(b * hkv * prefill as usize * dv, false);
    let steps = (0..steps)
        .map(|_| {
            let q = sample(b * h * d, false);
            let k = sample(b * hkv * d, true);
            let v = sample(b * hkv * dv, false);
            (q, k, v)
        })
        .collect();
    RunInputs {
        layout: *layout,
        batch,
        prefill,
        prefill_k,
        prefill_v,
        steps,
    }
}

fn compare_runs(name: String, inp: &RunInputs, gpu: &GpuRun, cpu: &CpuRun) -> Check {
    // Outputs are [B, H, value head_dim].
    let (h, d) = (
        inp.layout.num_heads as usize,
        inp.layout.values.head_dim as usize,
    );
    let mut e = StepErrors::default();
    for (s, (g, c)) in gpu.outputs.iter().zip(&cpu.outputs).enumerate() {
        e.add(s, g, c, h, d);
    }
    let (mismatches, which) = compare_with_reference(&gpu.export, &cpu.export);
    let passed = mismatches == 0 && e.max_step <= gpu_vs_cpu_step_tol(&inp.layout);
    let detail = format!(
        "{} steps, max per-(b,h,step) rel-L2 {:.2e} at {:?}, stream {:.2e}; final cache ({} quantized keys, {} \
         quantized values) {}",
        inp.steps.len(),
        e.max_step,
        e.worst,
        e.stream(),
        gpu.export.quantized_keys,
        gpu.export.quantized_values,
        if mismatches == 0 {
            "identical to the CPU reference".to_string()
        } else {
            format!("differs from the CPU reference: {which}")
        }
    );
    check(name, passed, detail)
}

/// CPU reference replays of random runs of one layout, computed once, to check many tile configurations of it
/// on the GPU (the autotuner checks every candidate against them).
pub struct ReferenceRuns {
    runs: Vec<(RunInputs, Result<CpuRun, String>)>,
}

impl ReferenceRuns {
    /// Random inputs (seeded as in [`verify_tiles_on_gpu`]) for every prefill length and batch, `steps` decode
    /// steps each, replayed on the CPU reference (in parallel).
    pub fn new(layout: &Layout, prefills: &[u32], batches: &[u32], steps: u32) -> Self {
        let inputs: Vec<RunInputs> = batches
            .iter()
            .flat_map(|&b| prefills.iter().map(move |&p| (b, p)))
            .map(|(b, p)| case_inputs(layout, b, p, steps))
            .collect();
        let cpu: Vec<Result<CpuRun, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = inputs.iter().map(|inp| s.spawn(|| cpu_run(inp))).collect();
            handles.into_iter().map(join_cpu).collect()
        });
        ReferenceRuns {
            runs: inputs.into_iter().zip(cpu).collect(),
        }
    }

    /// Runs every input on the GPU with `tiles` and compares with the CPU replay, as [`verify_tiles_on_gpu`]
    /// does: one [`Check`] per run.
    pub fn check(&self, gpu: &Gpu, tiles: &KernelTiles, label: &str) -> Vec<Check> {
        self.runs
            .iter()
            .map(|(inp, cpu)| check_run(label, inp, gpu_run(gpu, inp, tiles), cpu))
            .collect()
    }
}

/// Runs `layout` on the GPU and on the CPU reference for every prefill length in `prefills`, each batch in
/// `batches`, then `steps` decode steps, on random data (seeded); each run is one [`Check`]: every decode output
/// within [`GPU_VS_CPU_STEP_TOL`] per (batch, head, step), final codes/scales/mins/residual identical. The CPU
/// replays run on all cores while the GPU works.
pub fn verify_layout_on_gpu(
    gpu: &Gpu,
    layout: &Layout,
    label: &str,
    prefills: &[u32],
    batches: &[u32],
    steps: u32,
    report: &mut dyn FnMut(&Check),
) -> Vec<Check> {
    let tiles = KernelTiles::heuristic(layout);
    verify_tiles_on_gpu(gpu, layout, &tiles, label, prefills, batches, steps, report)
}

/// [`verify_layout_on_gpu`] with the given tile configurations (the autotuner checks every candidate so).
#[allow(clippy::too_many_arguments)]
pub fn verify_tiles_on_gpu(
    gpu: &Gpu,
    layout: &Layout,
    tiles: &KernelTiles,
    label: &str,
    prefills: &[u32],
    batches: &[u32],
    steps: u32,
    report: &mut dyn FnMut(&Check),
) -> Vec<Check> {
    let mut cases = Vec::new();
    for &b in batches {
        for &p in prefills {
            cases.push((b, p));
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let mut checks = Vec::new();
    for chunk in cases.chunks(threads) {
        let inputs: Vec<RunInputs> = chunk
            .iter()
            .map(|&(b, p)| case_inputs(layout, b, p, steps))
            .collect();
        std::thread::scope(|s| {
            let cpu: Vec<_> = inputs.iter().map(|inp| s.spawn(|| cpu_run(inp))).collect();
            let gpu_runs: Vec<_> = inputs.iter().map(|inp| gpu_run(gpu, inp, tiles)).collect();
            for ((inp, g), c) in inputs.iter().zip(gpu_runs).zip(cpu) {
                let result = check_run(label, inp, g, &join_cpu(c));
                report(&result);
                checks.push(result);
            }
        });
    }
    checks
}

/// Checks a reference file on the CPU reference alone: pack cases bit-exact; streams with identical final
/// caches, outputs within [`FILE_STREAM_TOL`] over the stream and [`FILE_STEP_TOL`] per (batch, head, step).
///
/// # Errors
/// The file cannot be read or is not one of the reference formats.
pub fn verify_file_on_cpu(
    path: &Path,
    report: &mut dyn FnMut(&Check),
) -> Result<Vec<Check>, String> {
    let file = ReferenceFile::open(path).map_err(|e| e.to_string())?;
    let mut checks = Vec::new();
    let mut push = |c: Check| {
        report(&c);
        checks.push(c);
    };
    for case in &file.pack_cases {
        let name = format!("cpu pack {}", case.name);
        match check_pack(case) {
            Ok(r) => push(check(
                name,
                r.mismatches() == 0,
                without_case_name(&r.to_string(), &case.name),
            )),
            Err(e) => push(check(name, false, e.to_string())),
        }
    }
    for case in &file.stream_cases {
        let name = format!("cpu stream {}", case.name);
        match check_stream(case) {
            Ok(r) => push(check(
                name,
                r.passes(FILE_STREAM_TOL, FILE_STEP_TOL),
                without_case_name(&r.to_string(), &case.name),
            )),
            Err(e) => push(check(name, false, e.to_string())),
        }
    }
    Ok(checks)
}

/// A report's text without its leading `name: ` (the check's own name already holds the case name).
fn without_case_name(report: &str, name: &str) -> String {
    report
        .strip_prefix(&format!("{name}: "))
        .unwrap_or(report)
        .to_string()
}

fn stream_inputs(case: &StreamCase) -> Result<RunInputs, String> {
    let steps = (0..case.steps)
        .map(|s| case.step_inputs(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RunInputs {
        layout: case.layout(),
        batch: case.batch as u32,
        prefill: case.prefill as u32,
        prefill_k: case.prefill_k.clone(),
        prefill_v: case.prefill_v.clone(),
        steps,
    })
}

/// Checks a reference file on the GPU: every stream replayed by the GPU cache, its outputs against the file
/// (stream and per-step tolerances) and against the CPU reference (per step, [`GPU_VS_CPU_STEP_TOL`]), its final
/// cache identical to the file's and the CPU's; every pack case quantized by the GPU kernels (prefill of all T
/// tokens with R = G, then R decode steps to flush the remaining values) with codes, scales and mins identical to
/// the file's.
///
/// # Errors
/// The file cannot be read or is not one of the reference formats.
pub fn verify_file_on_gpu(
    gpu: &Gpu,
    path: &Path,
    report: &mut dyn FnMut(&Check),
) -> Result<Vec<Check>, String> {
    let file = ReferenceFile::open(path).map_err(|e| e.to_string())?;
    let mut checks = Vec::new();
    let mut push = |c: Check| {
        report(&c);
        checks.push(c);
    };
    for case in &file.pack_cases {
        push(gpu_pack_case(gpu, case));
    }
    for case in &file.stream_cases {
        let name = format!("gpu stream {}", case.name);
        let inp = match stream_inputs(case) {
            Ok(i) => i,
            Err(e) => {
                push(check(name, false, e));
                continue;
            }
        };
        let tiles = KernelTiles::heuristic(&inp.layout);
        let (g, cpu) = std::thread::scope(|s| {
            let c = s.spawn(|| cpu_run(&inp));
            (gpu_run(gpu, &inp, &tiles), join_cpu(c))
        });
        let (g, c) = match pair(g, &cpu) {
            Ok(r) => r,
            Err(e) => {
                push(check(name, false, e));
                continue;
            }
        };
        push(compare_runs(format!("{name} vs cpu"), &inp, &g, c));
        let (h, d, steps) = (case.heads, case.head_dim, case.steps);
        let mut e = StepErrors::default();
        for (s, out) in g.outputs.iter().enumerate() {
            let theirs: Vec<f32> = (0..case.batch * h)
                .flat_map(|bh| {
                    // A file whose step_out is too short gives a short row, which fails the check.
                    let row = case
                        .step_out
                        .get((bh * steps + s) * d..(bh * steps + s + 1) * d);
                    to_f32(row.unwrap_or(&[]))
                })
                .collect();
            e.add(s, out, &theirs, h, d);
        }
        let (mismatches, which) = compare_cache(
            &g.export,
            &case.final_k_code,
            &to_f32(&case.final_k_scale),
            &to_f32(&case.final_k_mn),
            &to_f32(&case.final_k_residual),
            (
                &case.final_v_code,
                &to_f32(&case.final_v_scale),
                &to_f32(&case.final_v_mn),
                &to_f32(&case.final_v_residual),
            ),
        );
        let passed =
            mismatches == 0 && e.stream() <= FILE_STREAM_TOL && e.max_step <= FILE_STEP_TOL;
        push(check(
            format!("{name} vs file"),
            passed,
            format!(
                "stream rel-L2 {:.2e}, max per-(b,h,step) {:.2e} at {:?}; final cache {}",
                e.stream(),
                e.max_step,
                e.worst,
                if mismatches == 0 {
                    "identical to the file's".to_string()
                } else {
                    format!("differs: {which}")
                }
            ),
        ));
    }
    Ok(checks)
}

fn gpu_pack_case(gpu: &Gpu, case: &PackCase) -> Check {
    let name = format!("gpu pack {}", case.name);
    let (b, h, t, d, g) = (
        case.batch,
        case.heads,
        case.tokens,
        case.head_dim,
        case.group,
    );
    if t == 0 || g == 0 || t % g != 0 || b * h * d == 0 {
        return check(
            name,
            false,
            format!("the GPU pack check needs T a positive multiple of G (T {t}, G {g}) and B, H, D > 0"),
        );
    }
    // Values of this case use G too when head_dim allows it, else any valid group (their check is skipped).
    let vg = if case.values.is_some() { g } else { 32.min(d) };
    let spec = format!(
        "keys: {{ bits: {bits}, group_size: {g} }}, values: {{ bits: {bits}, group_size: {vg} }}, residual_length: \
         {g}, head_dim: {d}, num_heads: {h}, num_kv_heads: {h}",
        bits = case.bits
    );
    let layout = match kivi_dsl::parse_spec(&spec) {
        Ok(l) => l,
        Err(e) => return check(name, false, format!("layout `{spec}`: {e}")),
    };
    let zeros_q = vec![f16::ZERO; b * h * d];
    let inp = RunInputs {
        layout,
        batch: b as u32,
        prefill: t as u32,
        prefill_k: case.k.clone(),
        prefill_v: case
            .values
            .as_ref()
            .map_or_else(|| vec![f16::ZERO; case.k.len()], |v| v.v.clone()),
        steps: vec![(zeros_q.clone(), zeros_q.clone(), zeros_q); g],
    };
    let run = match gpu_run(gpu, &inp, &KernelTiles::heuristic(&layout)) {
        Ok(r) => r,
        Err(e) => return check(name, false, format!("GPU: {e}")),
    };
    // Keys: all T prefill tokens were quantized; the R = G decode tokens flushed one more block after them.
    let e = &run.export;
    let (kw, kg) = (e.k_code.len() / (b * h * d), e.k_scale.len() / (b * h * d));
    let (tw, tg) = (t / (32 / case.bits as usize), t / g);
    if kw < tw || kg < tg || e.quantized_values != t {
        return check(
            name,
            false,
            format!(
                "the GPU cache holds {} quantized keys and {} quantized values, expected at least {t} of each",
                e.quantized_keys, e.quantized_values
            ),
        );
    }
    let take = |x: &[f32], per: usize, keep: usize| -> Vec<f32> {
        x.chunks(per).flat_map(|c| c[..keep].to_vec()).collect()
    };
    let k_code: Vec<i32> = e.k_code.chunks(kw).flat_map(|c| c[..tw].to_vec()).collect();
    let mut diffs = vec![
        TensorDiff::i32("k_code", &case.k_code, &k_code),
        TensorDiff::f16_values("k_scale", &case.k_scale, &take(&e.k_scale, kg, tg)),
        TensorDiff::f16_values("k_mn", &case.k_mn, &take(&e.k_mn, kg, tg)),
    ];
    if let Some(v) = &case.values {
        // Values: T + G tokens, of which exactly the T prefill tokens are quantized after G steps (checked above).
        diffs.push(TensorDiff::i32("v_code", &v.v_code, &e.v_code));
        diffs.push(TensorDiff::f16_values("v_scale", &v.v_scale, &e.v_scale));
        diffs.push(TensorDiff::f16_values("v_mn", &v.v_mn, &e.v_mn));
    }
    let (mismatches, which) = summarize(&diffs);
    let what = if case.values.is_some() {
        "keys and values"
    } else {
        "keys"
    };
    if mismatches == 0 {
        check(
            name,
            true,
            format!("{what}: every code, scale and min identical ({b}x{h} heads, {t} tokens)"),
        )
    } else {
        check(name, false, format!("{what} differ: {which}"))
    }
}

/// `kivi verify`'s default set: presets kivi-2 and kivi-4 with the llama-2-7b, llama-3-8b and smollm2-135m shapes.
pub const VERIFY_PRESETS: [&str; 11] = [
    "kivi-2, llama-2-7b",
    "kivi-2, llama-3-8b",
    "kivi-2, smollm2-135m",
    "kivi-4, llama-2-7b",
    "kivi-4, llama-3-8b",
    "kivi-4, smollm2-135m",
    // MQA: batch 1 gives B * Hkv = 1 (one sequence), the split-K kernel's loneliest case.
    "kivi-2, num_heads: 8, num_kv_heads: 1, head_dim: 128",
    // 32 query heads on one KV head: two head tiles of 16.
    "kivi-2, num_heads: 32, num_kv_heads: 1, head_dim: 64",
    // Other widths and groups through the same kernels: 8-bit keys (one token per word), 1-bit values,
    // 16-token key groups (two per iteration), 64-channel value groups, head_dim 96.
    "kivi-2, llama-3-8b, keys: { bits: 8 }, values: { bits: 1, group_size: 64 }",
    "kivi-2, num_heads: 12, num_kv_heads: 4, head_dim: 96, keys: { group_size: 16 }, values: { group_size: 16 }",
    "kivi-4, num_heads: 4, num_kv_heads: 4, head_dim: 64, keys: { bits: 1 }, values: { bits: 8 }",
];

/// The head_dims of `kivi verify --matrix`: every one the layout issue lists.
pub const MATRIX_HEAD_DIMS: [u32; 8] = [32, 64, 80, 96, 112, 128, 192, 256];

/// `kivi verify --matrix`: a sampled matrix of 80 layouts the generator emits. Every pair (head_dim of
/// [`MATRIX_HEAD_DIMS`], key bits of 1, 2, 3, 4, 8) appears twice, with value bits, query/KV head arrangements
/// (MHA, GQA 3, 4 and 8, MQA, two head tiles), key groups (16 to 128 tokens and per_block), value groups (16 to 64
/// channels and per_block), residual lengths (64, 128, 192), symmetric quantization, fp32 rounding, sink tokens
/// (4, 33, 200), value head_dims other than the keys', bf16 activations (a third of the samples) and bf16 and
/// fp32 scales rotating through the samples.
pub fn sampled_matrix() -> Vec<String> {
    const BITS: [u32; 5] = [1, 2, 3, 4, 8];
    const HEADS: [(u32, u32); 6] = [(8, 8), (8, 2), (6, 1), (12, 4), (16, 2), (32, 1)];
    const RESIDUAL: [u32; 3] = [128, 64, 192];
    let mut out = Vec::new();
    for pass in 0..2usize {
        for (i, &d) in MATRIX_HEAD_DIMS.iter().enumerate() {
            for (j, &kb) in BITS.iter().enumerate() {
                let n = (pass * 40 + i * 5 + j) as u32;
                let vb = BITS[(i + 2 * j + 3 * pass + 1) % 5];
                let (h, hkv) = HEADS[(i + j + pass) % HEADS.len()];
                let r = RESIDUAL[(i + 2 * j + pass) % RESIDUAL.len()];
                // Key groups divide R; per_block needs a power-of-two R (192 takes 64).
                let kg = match n % 5 {
                    0 if r.is_power_of_two() => "per_block".to_string(),
                    0 => "64".to_string(),
                    k => (8u32 << k).min(1 << r.trailing_zeros()).to_string(),
                };
                // Every fifth sample gives the values another head_dim than the keys.
                let dv = if n % 5 == 2 {
                    MATRIX_HEAD_DIMS[(i + 3 + pass) % MATRIX_HEAD_DIMS.len()]
                } else {
                    d
                };
                let vg = match (n / 2) % 4 {
                    0 => "per_block".to_string(),
                    // The largest of 16, 32, 64 dividing the values' head_dim (80 and 112 take 16).
                    k => (8u32 << k)
                        .min(1 << dv.trailing_zeros())
                        .max(16)
                        .to_string(),
                };
                // per_block value groups need a power-of-two head_dim.
                let vg = if vg == "per_block" && !dv.is_power_of_two() {
                    "16".to_string()
                } else {
                    vg
                };
                // Symmetric quantization needs at least 2 bits.
                let (kq, vq) = match n % 7 {
                    3 if kb > 1 => (", quant: symmetric", ""),
                    5 if vb > 1 => ("", ", quant: symmetric"),
                    _ => ("", ""),
                };
                let (kr, vr) = match n % 6 {
                    2 => (", rounding: fp32", ", rounding: fp32"),
                    4 => ("", ", rounding: fp32"),
                    _ => ("", ""),
                };
                // Sink tokens on every fourth: fewer than a group, more than an iteration, more than R.
                let sinks = match n % 12 {
                    1 => ", sink_tokens: 4",
                    5 => ", sink_tokens: 33",
                    9 => ", sink_tokens: 200",
                    _ => "",
                };
                // bf16 activations on every third; bf16 and fp32 scales rotate through keys and values.
                let dtype = if n % 3 == 1 { ", dtype: bf16" } else { "" };
                let ks = match n % 8 {
                    1 | 6 => ", scale_dtype: bf16",
                    3 => ", scale_dtype: fp32",
                    _ => "",
                };
                let vs = match n % 10 {
                    2 | 7 => ", scale_dtype: fp32",
                    4 => ", scale_dtype: bf16",
                    _ => "",
                };
                out.push(format!(
                    "num_heads: {h}, num_kv_heads: {hkv}, head_dim: {d}, residual_length: {r}{sinks}{dtype}, \
                     keys: {{ bits: {kb}, group_size: {kg}{kq}{kr}{ks} }}, \
                     values: {{ bits: {vb}, group_size: {vg}, head_dim: {dv}{vq}{vr}{vs} }}"
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampled_matrix_covers_the_layout_issue_and_is_all_supported() {
        let specs = sampled_matrix();
        assert!(specs.len() >= 60, "{}", specs.len());
        let layouts: Vec<kivi_dsl::Layout> = specs
            .iter()
            .map(|s| {
                let l = kivi_dsl::parse_spec_supported(s).unwrap_or_else(|e| panic!("{s}: {e}"));
                kivi_codegen::LayoutKernels::new(&l, &kivi_codegen::KernelTiles::heuristic(&l))
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
                l
            })
            .collect();
        for bits in [1, 2, 3, 4, 8] {
            assert!(
                layouts.iter().any(|l| l.keys.bits == bits),
                "key bits {bits}"
            );
            assert!(
                layouts.iter().any(|l| l.values.bits == bits),
                "value bits {bits}"
            );
        }
        for d in MATRIX_HEAD_DIMS {
            assert!(layouts.iter().any(|l| l.keys.head_dim == d), "head_dim {d}");
        }
        assert!(layouts.iter().any(|l| l.num_kv_heads == 1), "MQA");
        assert!(
            layouts
                .iter()
                .any(|l| l.gqa_ratio() > 1 && l.num_kv_heads > 1),
            "GQA"
        );
        assert!(layouts.iter().any(|l| l.gqa_ratio() > 16), "two head tiles");
        assert!(
            layouts
                .iter()
                .filter(|l| l.dtype == kivi_dsl::Dtype::Bf16)
                .count()
                >= 20,
            "bf16 activations"
        );
        for sd in [kivi_dsl::ScaleDtype::Bf16, kivi_dsl::ScaleDtype::F32] {
            assert!(
                layouts.iter().any(|l| l.keys.scale_dtype == sd),
                "key scales {sd:?}"
            );
            assert!(
                layouts.iter().any(|l| l.values.scale_dtype == sd),
                "value scales {sd:?}"
            );
            assert!(
                layouts
                    .iter()
                    .any(|l| l.dtype == kivi_dsl::Dtype::Bf16 && l.keys.scale_dtype == sd),
                "bf16 activations with {sd:?} key scales"
            );
        }
        for t in [
            |l: &kivi_dsl::Layout| l.keys,
            |l: &kivi_dsl::Layout| l.values,
        ] {
            assert!(layouts
                .iter()
                .any(|l| t(l).symmetry == kivi_dsl::Symmetry::Symmetric));
            assert!(layouts
                .iter()
                .any(|l| t(l).rounding == kivi_dsl::Rounding::F32));
            assert!(layouts
                .iter()
                .any(|l| t(l).group_size == kivi_dsl::GroupSize::PerBlock));
        }
        assert!(
            layouts
                .iter()
                .filter(|l| l.keys.head_dim != l.values.head_dim)
                .count()
                >= 10,
            "different key and value head_dims"
        );
        for sinks in [4, 33, 200] {
            assert!(
                layouts.iter().any(|l| l.sink_tokens == sinks),
                "sinks {sinks}"
            );
        }
        let distinct: std::collections::HashSet<_> = layouts.iter().collect();
        assert_eq!(distinct.len(), layouts.len(), "duplicate layouts");
    }
}
