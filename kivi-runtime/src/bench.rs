//! Timing helpers shared by `kivi bench`, the criterion benches and the autotuner: device-side random inputs,
//! rotating cache copies (so that the L2 cache does not flatter small shapes) and CUDA-event timings.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use crate::error::{Result, RuntimeError};
use crate::gpu::{Gpu, LayoutModule};
use crate::kv_cache::{ActivationElem, KiviCache};

const FILL_SOURCE: &str = r#"
extern "C" __global__ void kivi_fill_random(unsigned short* out, long long n, unsigned int seed, float amplitude,
                                            int bf16) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned int h = (unsigned int)i * 2654435761u ^ (unsigned int)(i >> 32) * 40503u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        // Sum of two uniforms: a triangular distribution on (-amplitude, amplitude), never constant.
        const float u = ((h & 0xffffu) + (h >> 16)) * (1.0f / 65536.0f) - 1.0f;
        unsigned short bits;
        if (bf16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(u * amplitude));
        else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(u * amplitude));
        out[i] = bits;
    }
}
"#;

/// Fills device buffers with pseudo-random fp16 or bf16 numbers in (-amplitude, amplitude), on the device (a hash
/// of the index and a seed: no host data, so multi-gigabyte inputs cost milliseconds).
pub struct RandomFill {
    gpu_stream: Arc<cudarc::driver::CudaStream>,
    kernel: CudaFunction,
    sm_count: u32,
}

impl RandomFill {
    /// Compiles (or loads from the caches) the fill kernel.
    ///
    /// # Errors
    /// NVRTC or driver errors.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let mut k = gpu.load_program("kivi_fill_random_v2", FILL_SOURCE, &["kivi_fill_random"])?;
        Ok(RandomFill {
            gpu_stream: gpu.stream().clone(),
            kernel: k.remove(0),
            sm_count: gpu.sm_count(),
        })
    }

    /// Fills `buf` (asynchronously, on the GPU's stream).
    ///
    /// # Errors
    /// Driver errors.
    pub fn fill<T: ActivationElem>(
        &self,
        buf: &mut CudaSlice<T>,
        seed: u32,
        amplitude: f32,
    ) -> Result<()> {
        let n = buf.len() as i64;
        let bf16 = i32::from(T::DTYPE == kivi_dsl::Dtype::Bf16);
        let cfg = LaunchConfig {
            grid_dim: (self.sm_count * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.gpu_stream.launch_builder(&self.kernel);
        b.arg(buf).arg(&n).arg(&seed).arg(&amplitude).arg(&bf16);
        // SAFETY: the kernel writes n = buf.len() 16-bit elements of buf.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// A new device buffer of `n` random numbers of type `T` (fp16 or bf16).
    ///
    /// # Errors
    /// Driver errors (e.g. out of memory).
    pub fn random<T: ActivationElem>(
        &self,
        n: usize,
        seed: u32,
        amplitude: f32,
    ) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by `fill` before anything reads it (same stream).
        let mut buf = unsafe { self.gpu_stream.alloc::<T>(n) }?;
        self.fill(&mut buf, seed, amplitude)?;
        Ok(buf)
    }
}

/// Summary of repeated timings, in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Median.
    pub median_ms: f64,
    /// Fastest.
    pub min_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// How many timings.
    pub samples: usize,
}

impl Timing {
    /// The summary of `samples` (milliseconds); `None` if empty.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median_ms = if n % 2 == 1 {
            samples[n / 2]
        } else {
            0.5 * (samples[n / 2 - 1] + samples[n / 2])
        };
        Some(Timing {
            median_ms,
            min_ms: samples[0],
            max_ms: samples[n - 1],
            samples: n,
        })
    }
}

/// The L2 cache size of the GPU in bytes.
///
/// # Errors
/// Driver errors.
pub fn l2_bytes(gpu: &Gpu) -> Result<u64> {
    Ok(gpu
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64)
}

/// Decode steps of one shape over several cache copies, for timing: every copy is prefilled with `context - 1`
/// random tokens, so that a step attends over `context` tokens; step i runs on copy i % copies.
pub struct DecodeBench {
    caches: Vec<KiviCache>,
    io: BenchIo,
    prefill: u32,
    next: usize,
}

/// The inputs and outputs of a [`DecodeBench`], in the layout's activation type.
enum BenchIo {
    F16(IoBuffers<f16>),
    Bf16(IoBuffers<bf16>),
}

/// The prefill source (shared by every copy) and each copy's step buffers.
struct IoBuffers<T> {
    src_k: CudaSlice<T>,
    src_v: CudaSlice<T>,
    q: Vec<CudaSlice<T>>,
    k: Vec<CudaSlice<T>>,
    v: Vec<CudaSlice<T>>,
    out: Vec<CudaSlice<T>>,
}

impl<T: ActivationElem> IoBuffers<T> {
    /// Random buffers for `copies` copies of `batch` sequences of `layout`, `prefill` tokens of source.
    fn new(
        fill: &RandomFill,
        layout: &kivi_dsl::Layout,
        batch: u32,
        prefill: usize,
        copies: usize,
    ) -> Result<Self> {
        let (d, dv) = (
            layout.keys.head_dim as usize,
            layout.values.head_dim as usize,
        );
        let kv = batch as usize * layout.num_kv_heads as usize;
        let heads = batch as usize * layout.num_heads as usize;
        let mut io = IoBuffers {
            src_k: fill.random((kv * prefill).max(1) * d, 11, 2.0)?,
            src_v: fill.random((kv * prefill).max(1) * dv, 12, 2.0)?,
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            out: Vec::new(),
        };
        for c in 0..copies {
            let seed = 100 + 4 * c as u32;
            io.q.push(fill.random(heads * d, seed, 1.0)?);
            io.k.push(fill.random(kv * d, seed + 1, 2.0)?);
            io.v.push(fill.random(kv * dv, seed + 2, 2.0)?);
            io.out.push(fill.random(heads * dv, seed + 3, 1.0)?);
        }
        Ok(io)
    }

    fn prefill(&self, cache: &mut KiviCache, len: u32) -> Result<()> {
        cache.prefill(&self.src_k, &self.src_v, len)
    }

    fn step(&mut self, cache: &mut KiviCache, i: usize) -> Result<()> {
        cache.decode_step(&self.q[i], &self.k[i], &self.v[i], &mut self.out[i])
    }

    fn output_host(&self, cache: &KiviCache, copy: usize) -> Result<Vec<f32>> {
        let out = self.out.get(copy).ok_or(RuntimeError::Limit {
            what: "cache copy",
            value: copy as u64,
            limit: format!("there are {}", self.out.len()),
        })?;
        let stream = cache.module().context().default_stream();
        Ok(stream.clone_dtoh(out)?.iter().map(|x| x.to_f32()).collect())
    }
}

/// `$body` with `$io` bound to the [`IoBuffers`] of whichever activation type `$bench_io` holds.
macro_rules! with_io {
    ($bench_io:expr, $io:ident => $body:expr) => {
        match $bench_io {
            BenchIo::F16($io) => $body,
            BenchIo::Bf16($io) => $body,
        }
    };
}

impl DecodeBench {
    /// Builds `copies` caches of `batch` sequences for `module`'s layout, each with room for `context +
    /// extra_steps` tokens, prefilled with `context - 1` random tokens (keys and values uniform-ish in (-2, 2),
    /// queries in (-1, 1)).
    ///
    /// # Errors
    /// [`RuntimeError::Limit`] for context 0 or copies 0; driver errors (e.g. out of memory).
    pub fn new(
        gpu: &Gpu,
        module: Arc<LayoutModule>,
        batch: u32,
        context: u32,
        copies: usize,
        extra_steps: u32,
    ) -> Result<Self> {
        if context == 0 || copies == 0 {
            return Err(RuntimeError::Limit {
                what: if context == 0 { "context" } else { "copies" },
                value: 0,
                limit: "it must be at least 1".into(),
            });
        }
        let fill = RandomFill::new(gpu)?;
        let layout = module.kernels().layout;
        let prefill = (context - 1) as usize;
        // One random prefill source, reused by every copy (each copy still has its own memory) and by
        // [`DecodeBench::restart`].
        let io = match layout.dtype {
            kivi_dsl::Dtype::F16 => {
                BenchIo::F16(IoBuffers::new(&fill, &layout, batch, prefill, copies)?)
            }
            kivi_dsl::Dtype::Bf16 => {
                BenchIo::Bf16(IoBuffers::new(&fill, &layout, batch, prefill, copies)?)
            }
        };
        let mut caches = Vec::with_capacity(copies);
        for _ in 0..copies {
            let mut cache =
                KiviCache::new(gpu, module.clone(), batch, context + extra_steps.max(1))?;
            if prefill > 0 {
                with_io!(&io, b => b.prefill(&mut cache, prefill as u32))?;
            }
            caches.push(cache);
        }
        gpu.stream().synchronize()?;
        Ok(DecodeBench {
            caches,
            io,
            prefill: prefill as u32,
            next: 0,
        })
    }

    /// The output buffer of cache copy `copy` (`[batch, num_heads, value head_dim]`, the layout's activations)
    /// after its last step, copied to the host and widened to f32 (synchronizes).
    ///
    /// # Errors
    /// Driver errors; [`RuntimeError::Limit`] for a copy index out of range.
    pub fn output_host(&self, copy: usize) -> Result<Vec<f32>> {
        with_io!(&self.io, b => b.output_host(&self.caches[0], copy))
    }

    /// Empties every copy and prefills it again with the same `context - 1` tokens, so the next step (on copy 0)
    /// sees exactly the state after [`DecodeBench::new`]: the autotuner restarts between candidates so that each
    /// is timed at the same context and checked on the same inputs. Asynchronous.
    ///
    /// # Errors
    /// As [`KiviCache::reset`] and [`KiviCache::prefill`].
    pub fn restart(&mut self) -> Result<()> {
        for cache in &mut self.caches {
            cache.reset()?;
            if self.prefill > 0 {
                with_io!(&self.io, b => b.prefill(cache, self.prefill))?;
            }
        }
        self.next = 0;
        Ok(())
    }

    /// Runs later steps of every copy with `module` (the same layout with other tiles; see
    /// [`KiviCache::set_module`]).
    ///
    /// # Errors
    /// As [`KiviCache::set_module`].
    pub fn set_module(&mut self, module: &Arc<LayoutModule>) -> Result<()> {
        for cache in &mut self.caches {
            cache.set_module(Arc::clone(module))?;
        }
        Ok(())
    }

    /// The cache copy the next step runs on.
    pub fn next_cache(&self) -> &KiviCache {
        &self.caches[self.next]
    }

    /// Runs one decode step on the next copy (asynchronously).
    ///
    /// # Errors
    /// As [`KiviCache::decode_step`] (e.g. a full cache).
    pub fn step(&mut self) -> Result<()> {
        let i = self.next;
        with_io!(&mut self.io, b => b.step(&mut self.caches[i], i))?;
        self.next = (i + 1) % self.caches.len();
        Ok(())
    }

    /// Times `iters` steps after `warmup` untimed ones: one CUDA-event pair around each step (milliseconds).
    ///
    /// # Errors
    /// As [`DecodeBench::step`], and driver errors.
    pub fn time(&mut self, gpu: &Gpu, warmup: usize, iters: usize) -> Result<Vec<f64>> {
        let stream = gpu.stream().clone();
        for _ in 0..warmup {
            self.step()?;
        }
        let ctx = gpu.context();
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = ctx.new_event(flags)?;
            let end = ctx.new_event(flags)?;
            start.record(&stream)?;
            self.step()?;
            end.record(&stream)?;
            events.push((start, end));
        }
        stream.synchronize()?;
        events
            .iter()
            .map(|(s, e)| Ok(f64::from(s.elapsed_ms(e)?)))
            .collect()
    }
}

/// Prefill timings of one shape: a cache of `batch` sequences, `context` random tokens per sequence (per KV
/// head), quantized `iters` times after `warmup` untimed runs ([`KiviCache::reset`] between runs); returns the
/// milliseconds of each timed prefill and the cache after the last one.
///
/// # Errors
/// As [`KiviCache::new`] and [`KiviCache::prefill`], and driver errors.
pub fn time_prefill(
    gpu: &Gpu,
    module: Arc<LayoutModule>,
    batch: u32,
    context: u32,
    warmup: usize,
    iters: usize,
) -> Result<(Vec<f64>, KiviCache)> {
    match module.kernels().layout.dtype {
        kivi_dsl::Dtype::F16 => time_prefill_as::<f16>(gpu, module, batch, context, warmup, iters),
        kivi_dsl::Dtype::Bf16 => {
            time_prefill_as::<bf16>(gpu, module, batch, context, warmup, iters)
        }
    }
}

fn time_prefill_as<T: ActivationElem>(
    gpu: &Gpu,
    module: Arc<LayoutModule>,
    batch: u32,
    context: u32,
    warmup: usize,
    iters: usize,
) -> Result<(Vec<f64>, KiviCache)> {
    let fill = RandomFill::new(gpu)?;
    let layout = module.kernels().layout;
    let n = batch as usize * layout.num_kv_heads as usize * context as usize;
    let k = fill.random::<T>(n * layout.keys.head_dim as usize, 21, 2.0)?;
    let v = fill.random::<T>(n * layout.values.head_dim as usize, 22, 2.0)?;
    let mut cache = KiviCache::new(gpu, module, batch, context)?;
    let stream = gpu.stream().clone();
    for _ in 0..warmup {
        cache.reset()?;
        cache.prefill(&k, &v, context)?;
    }
    let ctx = gpu.context();
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut events = Vec::with_capacity(iters);
    for _ in 0..iters {
        cache.reset()?;
        let start = ctx.new_event(flags)?;
        let end = ctx.new_event(flags)?;
        start.record(&stream)?;
        cache.prefill(&k, &v, context)?;
        end.record(&stream)?;
        events.push((start, end));
    }
    stream.synchronize()?;
    let times = events
        .iter()
        .map(|(s, e)| Ok(f64::from(s.elapsed_ms(e)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((times, cache))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_summaries() {
        let t = Timing::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!(
            (t.median_ms, t.min_ms, t.max_ms, t.samples),
            (2.0, 1.0, 3.0, 3)
        );
        assert_eq!(Timing::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median_ms, 2.5);
        assert!(Timing::of(Vec::new()).is_none());
    }
}
