//! kivi-runtime: compiles kivi's generated CUDA with NVRTC (to CUBIN for the device's own arch, cached in memory
//! and on disk) and runs the KIVI KV cache on the GPU (Algorithm 1 of KIVI, Liu et al., ICML 2024: prefill and
//! decode steps), launching on a stream.
//!
//! The runtime takes tile configurations from whoever asks ([`kivi_codegen::KernelTiles::heuristic`], or the
//! autotuner's tuned tiles); it never edits CUDA text.
//!
//! Two ways in:
//! - [`KiviCache`] owns its buffers (cudarc): equal-length or ragged prefills, decode steps with options (the
//!   log-sum-exp, a sliding window, a softmax scale), paged storage through a block table, and CUDA-graph capture
//!   of a step ([`KiviCache::capture_decode`]).
//! - [`launch`] is the contract on raw device addresses and a stream handle, for engines that own their memory
//!   and streams (the C ABI in `kivi-capi` and the Python package sit on it).
//!
//! Features: `cuda-13` (the default; `libnvrtc.so.13`) or `cuda-12` (`libnvrtc.so.12`; build with
//! `--no-default-features --features cuda-12`), exactly one; `cudarc-api` (default) for what takes or returns
//! cudarc types (`KiviCache`, `Gpu::stream`, `Gpu::context`, `LayoutModule::context`, `Gpu::load_program`, the
//! `bench` module). Without it no signature, field or variant holds a cudarc type ([`RuntimeError::Driver`]
//! carries kivi's own [`DriverError`]; the one trace of the binding is `From<cudarc::driver::DriverError> for
//! RuntimeError`), so an engine on another cudarc version, or none, embeds kivi without a clash: [`Gpu`],
//! [`LayoutModule`] and [`launch`].

#[cfg(feature = "cudarc-api")]
pub mod bench;
mod compile;
mod error;
mod gpu;
#[cfg(feature = "cudarc-api")]
mod kv_cache;
pub mod launch;
pub mod toolkit;

pub use compile::{Arch, Compiler, Cubin, CubinOrigin, NVRTC_OPTIONS};
pub use error::{DriverError, Result, RuntimeError};
pub use gpu::{Gpu, KernelResources, LayoutModule};
#[cfg(feature = "cudarc-api")]
pub use kv_cache::{ActivationElem, CacheExport, DecodeGraph, DecodeOptions, KiviCache};
pub use launch::MAX_CAPACITY;
