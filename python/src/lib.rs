//! `kivi._kivi`: the native half of kivi's Python package. It loads the kernels of a layout (NVRTC, cached) and
//! launches prefill and decode steps (KIVI Algorithm 1, Liu et al., ICML 2024) on raw device addresses and a raw
//! stream handle, through `kivi_runtime::launch`. The Python half (`kivi/__init__.py`) owns the PyTorch tensors,
//! checks their device, dtype, shape and layout, and passes `tensor.data_ptr()` and torch's current stream, so no
//! data is copied. Every error is a Python exception naming the value and the rule.

use std::ffi::c_void;
use std::sync::Arc;

use kivi_codegen::{KernelKind, KernelTiles, StorageLayout};
use kivi_runtime::launch::{
    BlockAddressing, BufferBytes, CacheBuffers, DecodeArgs, DecodeScratch, PrefillArgs, TokenRows,
};
use kivi_runtime::{Compiler, Gpu, LayoutModule, RuntimeError};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Bad arguments are `ValueError`s; everything else (no GPU, NVRTC, the driver, state) `RuntimeError`s.
fn py_err(e: RuntimeError) -> PyErr {
    match e {
        RuntimeError::Shape { .. }
        | RuntimeError::Limit { .. }
        | RuntimeError::Pointer { .. }
        | RuntimeError::Codegen(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The kernels of one layout, loaded on one GPU (the device's primary context: the one PyTorch uses).
#[pyclass(module = "kivi._kivi", frozen)]
struct Module {
    gpu: Gpu,
    module: Arc<LayoutModule>,
}

fn cache(ptrs: [u64; 7]) -> CacheBuffers {
    CacheBuffers {
        k_codes: ptrs[0],
        k_params: ptrs[1],
        k_res: ptrs[2],
        v_codes: ptrs[3],
        v_scale: ptrs[4],
        v_mn: ptrs[5],
        v_res: ptrs[6],
    }
}

#[pymethods]
impl Module {
    /// Loads the kernels of `spec` (kivi's spec text, e.g. "kivi-2, llama-3-8b") on CUDA device `device`,
    /// compiled with NVRTC for its arch (cached); `paged` selects the decode kernel that reads blocks through a
    /// block table.
    #[new]
    #[pyo3(signature = (spec, device = 0, paged = false))]
    fn new(spec: &str, device: usize, paged: bool) -> PyResult<Self> {
        let layout = kivi_dsl::parse_spec_supported(spec)
            .map_err(|e| PyValueError::new_err(format!("spec `{spec}`: {e}")))?;
        let gpu = Gpu::new(device, Compiler::shared().map_err(py_err)?).map_err(py_err)?;
        let mut tiles = KernelTiles::heuristic(&layout);
        if paged {
            tiles = tiles.paged();
        }
        let module = gpu.load_layout(&layout, &tiles).map_err(py_err)?;
        Ok(Module { gpu, module })
    }

    /// The layout: num_heads, num_kv_heads, head_dim (keys and queries), value_head_dim (values and outputs),
    /// residual_length, value_ring, sink_tokens, dtype (`fp16` or `bf16`: the activations'), paged, spec, gpu.
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let layout = &self.module.kernels().layout;
        let st = StorageLayout::new(layout);
        let d = PyDict::new(py);
        d.set_item("num_heads", layout.num_heads)?;
        d.set_item("num_kv_heads", layout.num_kv_heads)?;
        d.set_item("head_dim", st.key_head_dim)?;
        d.set_item("value_head_dim", st.value_head_dim)?;
        d.set_item("residual_length", st.residual_length)?;
        d.set_item("value_ring", st.value_ring)?;
        d.set_item("sink_tokens", st.sink_tokens)?;
        d.set_item("dtype", layout.dtype.as_str())?;
        d.set_item(
            "paged",
            self.module
                .kernels()
                .spec(KernelKind::DecodePartial)
                .tile
                .paged,
        )?;
        d.set_item("spec", layout.to_spec())?;
        d.set_item("gpu", self.gpu.name())?;
        Ok(d)
    }

    /// Bytes of every buffer of a cache of `batch` entries (contiguous: `per_seq` blocks each; paged: `pages`
    /// pages) with decode scratch for `splits` splits per row.
    #[pyo3(signature = (batch, per_seq, pages, paged, splits))]
    fn buffer_bytes<'py>(
        &self,
        py: Python<'py>,
        batch: u32,
        per_seq: u32,
        pages: u32,
        paged: bool,
        splits: u32,
    ) -> PyResult<Bound<'py, PyDict>> {
        let addressing = BlockAddressing::from_table(u64::from(paged), per_seq, pages);
        let b = BufferBytes::new(&self.module.kernels().layout, batch, &addressing, splits);
        let d = PyDict::new(py);
        for (k, v) in [
            ("k_codes", b.k_codes),
            ("k_params", b.k_params),
            ("k_res", b.k_res),
            ("v_codes", b.v_codes),
            ("v_scale", b.v_scale),
            ("v_mn", b.v_mn),
            ("v_res", b.v_res),
            ("part_acc", b.part_acc),
            ("part_ml", b.part_ml),
            ("counters", b.counters),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// The least grid splits of a decode step over sequences of at most `max_len` tokens (the new one included).
    #[pyo3(signature = (max_len, window = 0))]
    fn decode_splits(&self, max_len: u32, window: u32) -> u32 {
        self.module.decode_splits(max_len, window)
    }

    /// The splits that serve every length up to `capacity` (scratch size; CUDA-graph grids).
    fn graph_grid_splits(&self, capacity: u32) -> u32 {
        self.module.graph_grid_splits(capacity)
    }

    /// Queues a prefill on `stream` (a CUstream handle as an int). `keys`, `values`: (address, stride_batch,
    /// stride_head, stride_token) of rows of the layout's dtype (fp16 or bf16); `cache`: the 7 buffer addresses (k_codes, k_params, k_res,
    /// v_codes, v_scale, v_mn, v_res).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (stream, batch, keys, values, seq_lens, max_len, cache, block_table, per_seq, pages, error_flag))]
    fn prefill(
        &self,
        stream: usize,
        batch: u32,
        keys: (u64, i64, i64, i64),
        values: (u64, i64, i64, i64),
        seq_lens: u64,
        max_len: u32,
        cache: [u64; 7],
        block_table: u64,
        per_seq: u32,
        pages: u32,
        error_flag: u64,
    ) -> PyResult<()> {
        let rows = |r: (u64, i64, i64, i64)| TokenRows {
            ptr: r.0,
            stride_batch: r.1,
            stride_head: r.2,
            stride_token: r.3,
        };
        let args = PrefillArgs {
            batch,
            keys: rows(keys),
            values: rows(values),
            seq_lens,
            max_len,
            cache: self::cache(cache),
            blocks: BlockAddressing::from_table(block_table, per_seq, pages),
            error_flag,
        };
        // SAFETY: the Python half passes addresses of live CUDA tensors of this device whose shapes it checked
        // against the layout and batch, on torch's current stream of that device.
        unsafe { self.module.launch_prefill(stream as *mut c_void, &args) }.map_err(py_err)
    }

    /// Queues one decode step on `stream`. Addresses as in `prefill`; `scratch`: (part_acc, part_ml, counters,
    /// splits); `softmax_scale` None for 1 / sqrt(head_dim); `q_lens` (i32 `[batch]`, or 0) and `q_index`: token
    /// `q_index` of each sequence's `q_lens` new tokens (q_len > 1, one launch per token).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (stream, batch, q, k_new, v_new, out, lse, seq_lens, seq_lens_next, cache, block_table, per_seq, pages, scratch, grid_splits, window, softmax_scale, error_flag, q_lens = 0, q_index = 0))]
    fn decode(
        &self,
        stream: usize,
        batch: u32,
        q: u64,
        k_new: u64,
        v_new: u64,
        out: u64,
        lse: u64,
        seq_lens: u64,
        seq_lens_next: u64,
        cache: [u64; 7],
        block_table: u64,
        per_seq: u32,
        pages: u32,
        scratch: (u64, u64, u64, u32),
        grid_splits: u32,
        window: u32,
        softmax_scale: Option<f32>,
        error_flag: u64,
        q_lens: u64,
        q_index: u32,
    ) -> PyResult<()> {
        let args = DecodeArgs {
            batch,
            q,
            k_new,
            v_new,
            out,
            lse,
            seq_lens,
            seq_lens_next,
            q_lens,
            q_index,
            cache: self::cache(cache),
            blocks: BlockAddressing::from_table(block_table, per_seq, pages),
            scratch: DecodeScratch {
                part_acc: scratch.0,
                part_ml: scratch.1,
                counters: scratch.2,
                splits: scratch.3,
            },
            grid_splits,
            window,
            softmax_scale,
            error_flag,
        };
        // SAFETY: as in prefill.
        unsafe { self.module.launch_decode(stream as *mut c_void, &args) }.map_err(py_err)
    }
}

/// The error flag's bits in words.
#[pyfunction]
fn describe_device_error(bits: u32) -> String {
    kivi_runtime::launch::describe_device_error(bits)
}

#[pymodule]
fn _kivi(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Module>()?;
    m.add_function(wrap_pyfunction!(describe_device_error, m)?)?;
    // Which CUDA major version this build's NVRTC and driver bindings load (libnvrtc.so.N): the wheel's name does
    // not say, so `kivi.CUDA_MAJOR` does.
    m.add(
        "CUDA_MAJOR",
        if cfg!(feature = "cuda-12") { 12 } else { 13 },
    )?;
    Ok(())
}
