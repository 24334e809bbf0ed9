//! A GPU, its stream, and the compiled kernels of a layout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "cudarc-api")]
use cudarc::driver::CudaStream;
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use kivi_codegen::{generate_module, KernelKind, KernelTiles, LayoutKernels, ModuleSource};
use kivi_dsl::Layout;

use crate::compile::{Arch, Compiler, CubinOrigin};
use crate::error::{Result, RuntimeError};
use crate::toolkit::driver_present;

/// One CUDA GPU: its context, the stream kivi launches on, its arch and a compiler.
#[derive(Debug, Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    #[cfg(feature = "cudarc-api")]
    stream: Arc<CudaStream>,
    arch: Arch,
    sm_count: u32,
    driver_version: i32,
    name: String,
    compiler: Arc<Compiler>,
}

impl Gpu {
    /// Opens GPU `ordinal` through its primary context (the one the CUDA runtime and PyTorch use: streams of
    /// theirs serve the raw launches) and, with `cudarc-api`, its default stream; modules will be compiled for its
    /// own arch.
    ///
    /// # Errors
    /// [`RuntimeError::DriverMissing`] without libcuda, [`RuntimeError::NoGpu`] if no such GPU answers.
    pub fn new(ordinal: usize, compiler: Arc<Compiler>) -> Result<Self> {
        if !driver_present() {
            return Err(RuntimeError::DriverMissing);
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| RuntimeError::NoGpu(format!("GPU {ordinal}: {e}")))?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        #[cfg(feature = "cudarc-api")]
        let stream = ctx.default_stream();
        let mut driver_version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int; the driver is loaded (checked above).
        let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) };
        if rc != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            driver_version = 0;
        }
        Ok(Gpu {
            ctx,
            #[cfg(feature = "cudarc-api")]
            stream,
            arch: Arch {
                major: major as u32,
                minor: minor as u32,
            },
            name,
            sm_count,
            driver_version,
            compiler,
        })
    }

    /// The CUDA driver's version as `cuDriverGetVersion` reports it (13000 for CUDA 13.0; 0 if it would not say).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// Streaming multiprocessors of the device (132 on an H200 SXM).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The device's arch (its own compute capability).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream kivi launches on.
    #[cfg(feature = "cudarc-api")]
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    #[cfg(feature = "cudarc-api")]
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compiler.
    pub fn compiler(&self) -> &Arc<Compiler> {
        &self.compiler
    }

    /// Generates, compiles (or loads from the caches) and loads every kernel of `layout` with `tiles`.
    ///
    /// # Errors
    /// Codegen errors (layout not supported, tile invalid), NVRTC errors, driver errors.
    pub fn load_layout(&self, layout: &Layout, tiles: &KernelTiles) -> Result<Arc<LayoutModule>> {
        if self.arch.major < 8 {
            return Err(RuntimeError::Limit {
                what: "the GPU's compute capability",
                value: u64::from(self.arch.major * 10 + self.arch.minor),
                limit: "kivi's decode kernel needs 80 or more (sm_80: A100, Ada, Hopper, Blackwell): it uses \
                        mma.sync, cp.async and movmatrix"
                    .into(),
            });
        }
        let kernels = LayoutKernels::new(layout, tiles)?;
        let source = generate_module(&kernels.specs)?;
        let cubin = self
            .compiler
            .compile(&source.name, &source.source, self.arch)?;
        let start = Instant::now();
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.image.to_vec()))?;
        let mut functions = HashMap::new();
        for (spec, name) in &source.kernels {
            functions.insert(spec.kind, module.load_function(name)?);
        }
        Ok(Arc::new(LayoutModule {
            ctx: self.ctx.clone(),
            kernels,
            source,
            functions,
            origin: cubin.origin,
            load_time: start.elapsed(),
        }))
    }
}

impl Gpu {
    /// Compiles (or loads from the caches) a stand-alone CUDA C++ program and returns the named `extern "C"`
    /// kernels, in order. For kivi's own utility kernels (e.g. the benchmark's random fill).
    ///
    /// # Errors
    /// NVRTC errors, driver errors (e.g. a name that is not in the program).
    #[cfg(feature = "cudarc-api")]
    pub fn load_program(
        &self,
        name: &str,
        source: &str,
        kernels: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        let cubin = self.compiler.compile(name, source, self.arch)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.image.to_vec()))?;
        kernels
            .iter()
            .map(|k| module.load_function(k).map_err(RuntimeError::from))
            .collect()
    }
}

/// The resources one compiled kernel takes (from the driver's function attributes and occupancy calculator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// Registers per thread.
    pub registers: u32,
    /// Local memory per thread in bytes (register spills and stack); 0 when nothing spills.
    pub local_bytes: u32,
    /// Static shared memory per block in bytes.
    pub shared_bytes: u32,
    /// The most threads a block of this kernel may have (fewer than 1024 when registers run out).
    pub max_threads_per_block: u32,
    /// Threads per block the kernel is launched with (its tile).
    pub threads: u32,
    /// Blocks of `threads` threads resident per multiprocessor (0: the kernel cannot run at this block size).
    pub blocks_per_sm: u32,
}

impl KernelResources {
    /// Resident warps per multiprocessor.
    pub fn warps_per_sm(&self) -> u32 {
        self.blocks_per_sm * self.threads.div_ceil(32)
    }
}

/// The loaded kernels of one layout.
#[derive(Debug)]
pub struct LayoutModule {
    ctx: Arc<CudaContext>,
    kernels: LayoutKernels,
    source: ModuleSource,
    functions: HashMap<KernelKind, CudaFunction>,
    origin: CubinOrigin,
    load_time: Duration,
}

impl LayoutModule {
    /// The layout and the specs of its kernels.
    pub fn kernels(&self) -> &LayoutKernels {
        &self.kernels
    }

    /// The generated source it was compiled from.
    pub fn source(&self) -> &ModuleSource {
        &self.source
    }

    /// Where the CUBIN came from (compiled cold, disk cache, memory) and how long that took.
    pub fn origin(&self) -> CubinOrigin {
        self.origin
    }

    /// Time to load the CUBIN into the context and look up its functions.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The context the module was loaded into (for the launches).
    pub(crate) fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The context the module was loaded into.
    #[cfg(feature = "cudarc-api")]
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// What the compiled kernel of `kind` needs per thread and block, read from the loaded module (the driver's
    /// function attributes), and how many of its blocks fit on one multiprocessor (the driver's occupancy
    /// calculator, at the kernel's own block size and no dynamic shared memory). The autotuner prunes with it.
    ///
    /// # Errors
    /// Driver errors.
    pub fn resources(&self, kind: KernelKind) -> Result<KernelResources> {
        let f = self.function(kind);
        let threads = self.kernels.spec(kind).tile.threads;
        Ok(KernelResources {
            registers: f.num_regs()? as u32,
            local_bytes: f.local_size_bytes()? as u32,
            shared_bytes: f.shared_size_bytes()? as u32,
            max_threads_per_block: f.max_threads_per_block()? as u32,
            threads,
            blocks_per_sm: f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)?,
        })
    }

    pub(crate) fn function(&self, kind: KernelKind) -> &CudaFunction {
        // load_layout inserts one function per spec of LayoutKernels, which has one spec per kind.
        &self.functions[&kind]
    }
}
