//! kivi-runtime: compiles kivi's generated CUDA with NVRTC (to CUBIN for the device's own arch, cached in memory
//! and on disk) and runs the KIVI KV cache on the GPU (Algorithm 1 of KIVI, Liu et al., ICML 2024: prefill and
//! decode steps), launching on a stream.
//!
//! The runtime takes tile configurations from whoever asks ([`kivi_codegen::KernelTiles::heuristic`] now, the
//! autotuner later); it never edits CUDA text.

pub mod bench;
mod compile;
mod error;
mod gpu;
mod kv_cache;
pub mod launch;
pub mod toolkit;

pub use compile::{Arch, Compiler, Cubin, CubinOrigin, NVRTC_OPTIONS};
pub use error::{Result, RuntimeError};
pub use gpu::{Gpu, KernelResources, LayoutModule};
pub use kv_cache::{CacheExport, DecodeGraph, DecodeOptions, KiviCache, MAX_CAPACITY};
