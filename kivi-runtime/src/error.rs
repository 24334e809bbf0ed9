//! The runtime's error type.

use std::path::PathBuf;

/// Everything the runtime can fail with. Never a panic: each variant names the value and the limit.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// libnvrtc could not be loaded.
    #[error(
        "libnvrtc (CUDA {cuda_major}) not found; looked in: {searched}. Install the CUDA toolkit or the \
         `nvidia-cuda-nvrtc` wheel (CUDA 13; `nvidia-cuda-nvrtc-cu12` for CUDA 12), then set KIVI_NVRTC to the library or its folder, CUDA_HOME to the toolkit, \
         or add its lib folder to LD_LIBRARY_PATH"
    )]
    NvrtcMissing {
        /// The CUDA major version this build loads (`libnvrtc.so.<major>`).
        cuda_major: u32,
        /// Every place that was tried, in order.
        searched: String,
    },
    /// The CUDA driver library (libcuda) could not be loaded: no NVIDIA driver, so no GPU.
    #[error("no CUDA driver: libcuda could not be loaded (a GPU and the NVIDIA driver are needed for this)")]
    DriverMissing,
    /// The driver is there but no GPU answered.
    #[error("no CUDA GPU: {0}")]
    NoGpu(String),
    /// NVRTC rejected the program; `log` is its full message.
    #[error("NVRTC failed to compile {module} for {arch}:\n{log}")]
    Compile {
        /// Module name.
        module: String,
        /// Target arch, e.g. `sm_90`.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(DriverError),
    /// An NVRTC call (other than compiling) failed.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// Code generation failed.
    #[error(transparent)]
    Codegen(#[from] kivi_codegen::CodegenError),
    /// The module cache on disk could not be read or written.
    #[error("module cache {path}: {source}")]
    Cache {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An input's size does not match the layout and the cache's shape.
    #[error("{what}: expected {expected} elements ({shape}), got {got}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// The shape it must have, spelled out.
        shape: String,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// A value is outside what the cache or the kernels accept.
    #[error("{what} is {value}, but {limit}")]
    Limit {
        /// Which value.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The rule it breaks.
        limit: String,
    },
    /// A device pointer given to the raw launch API is null or not aligned as the kernel reads it.
    #[error("{what}: device pointer {ptr:#x} {problem}")]
    Pointer {
        /// Which argument.
        what: &'static str,
        /// The pointer given.
        ptr: u64,
        /// What is wrong with it (null, or the alignment it needs).
        problem: String,
    },
    /// A kernel found bad input on the device (a sequence length out of range, a block table entry outside the
    /// pages, too few splits for a step) and set the error flag instead of touching memory out of range; the
    /// affected sequences' outputs are NaN and their cache state must be reset.
    #[error("the kernels reported: {0}")]
    Device(String),
    /// The operation does not fit the cache's state (e.g. prefill twice).
    #[error("{0}")]
    State(String),
}

/// A failed CUDA driver call: its `CUresult` code and the driver's description. kivi's own type, so that no
/// binding's type is part of the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverError {
    /// The `CUresult` value (e.g. 2 for CUDA_ERROR_OUT_OF_MEMORY, 700 for CUDA_ERROR_ILLEGAL_ADDRESS).
    pub code: i32,
    /// The driver's name and description of it.
    pub message: String,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CUresult {})", self.message, self.code)
    }
}

impl std::error::Error for DriverError {}

impl From<cudarc::driver::DriverError> for RuntimeError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        RuntimeError::Driver(DriverError {
            code: e.0 as i32,
            message: e.to_string(),
        })
    }
}

/// Short for `Result<T, RuntimeError>`.
pub type Result<T> = std::result::Result<T, RuntimeError>;
