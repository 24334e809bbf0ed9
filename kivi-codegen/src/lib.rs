//! kivi-codegen: a validated [`Layout`] plus a [`TileConfig`] becomes specialized CUDA C++.
//!
//! Data flows one way: `Layout` (kivi-dsl) -> [`KernelSpec`] (kind + layout + tile config) -> CUDA text
//! ([`generate_module`], rendered from the tera templates in the workspace's `templates/`, embedded at compile
//! time) -> the runtime compiles and launches it. This crate never talks to a GPU.
//!
//! Every derived number (words per group, masks, shared-memory bytes, the softmax scale) is computed here, in
//! Rust, and passed to templates that only substitute: see [`StorageLayout`] for the device storage layout the
//! kernels and the runtime share.

mod storage;
mod tile;

use std::fmt::Write as _;

use kivi_dsl::{Layout, LayoutError};
use serde_json::json;
use tera::{Context, Tera};

pub use storage::StorageLayout;
pub use tile::{KernelTiles, TileConfig};

/// The largest static shared memory a kernel may use (bytes): the 48 KiB every CUDA GPU gives without opt-in.
pub const MAX_STATIC_SHARED_BYTES: u32 = 48 * 1024;

const PRELUDE: &str = include_str!("../../templates/prelude.cuh.tera");
const TEMPLATES: [(KernelKind, &str); 5] = [
    (
        KernelKind::QuantizeKeys,
        include_str!("../../templates/quantize_keys.cu.tera"),
    ),
    (
        KernelKind::QuantizeValues,
        include_str!("../../templates/quantize_values.cu.tera"),
    ),
    (
        KernelKind::StoreResidual,
        include_str!("../../templates/store_residual.cu.tera"),
    ),
    (
        KernelKind::DecodePartial,
        include_str!("../../templates/decode_partial.cu.tera"),
    ),
    (
        KernelKind::DecodeCombine,
        include_str!("../../templates/decode_combine.cu.tera"),
    ),
];

/// The kinds of kernel a KIVI layout needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    /// Per-channel quantize + pack of whole key flush blocks (prefill and the decode-time key flush).
    QuantizeKeys,
    /// Per-token quantize + pack of value tokens (prefill and the decode-time value flush).
    QuantizeValues,
    /// Copy of full-precision tokens into a residual ring (prefill tail and the per-step append).
    StoreResidual,
    /// Split-K decode attention over quantized keys/values plus the full-precision residual.
    DecodePartial,
    /// Log-sum-exp merge of the split-K partials into the fp16 attention output.
    DecodeCombine,
}

impl KernelKind {
    /// Every kind, in the order a module lists them.
    pub const ALL: [KernelKind; 5] = [
        KernelKind::QuantizeKeys,
        KernelKind::QuantizeValues,
        KernelKind::StoreResidual,
        KernelKind::DecodePartial,
        KernelKind::DecodeCombine,
    ];

    /// The kind's part of a kernel name (`quant_keys`, `quant_values`, `store_residual`, `decode`, `combine`).
    pub fn as_str(self) -> &'static str {
        match self {
            KernelKind::QuantizeKeys => "quant_keys",
            KernelKind::QuantizeValues => "quant_values",
            KernelKind::StoreResidual => "store_residual",
            KernelKind::DecodePartial => "decode",
            KernelKind::DecodeCombine => "combine",
        }
    }
}

/// Errors of code generation.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The layout is impossible or not yet supported by the generator.
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    /// The tile configuration cannot be used for this kernel.
    #[error("tile config for {kernel}: {message}")]
    Tile {
        /// The kernel's name.
        kernel: String,
        /// What is wrong and the limit.
        message: String,
    },
    /// A template failed to render (a bug in kivi: please report it).
    #[error("template {template}: {message}")]
    Template {
        /// The template's name.
        template: String,
        /// tera's message, with its causes.
        message: String,
    },
}

/// One kernel to generate: its kind, the layout it is specialized on and its tile configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// What the kernel does.
    pub kind: KernelKind,
    /// The layout (validated and supported: see [`KernelSpec::new`]).
    pub layout: Layout,
    /// Threads per block and, for [`KernelKind::DecodePartial`], tokens per split.
    pub tile: TileConfig,
}

impl KernelSpec {
    /// A kernel spec, checked: the layout must pass `check_supported`, and the tile must fit the kernel
    /// (threads a multiple of 32 in 32..=1024, split_tokens >= 1 for decode, shared memory <= 48 KiB).
    ///
    /// # Errors
    /// [`CodegenError::Layout`] or [`CodegenError::Tile`], naming the value and the limit.
    pub fn new(kind: KernelKind, layout: Layout, tile: TileConfig) -> Result<Self, CodegenError> {
        layout.check_supported()?;
        let spec = KernelSpec { kind, layout, tile };
        let err = |message: String| CodegenError::Tile {
            kernel: spec.name(),
            message,
        };
        if tile.threads < 32 || tile.threads > 1024 || tile.threads % 32 != 0 {
            return Err(err(format!(
                "threads {} must be a multiple of 32 in 32..=1024",
                tile.threads
            )));
        }
        if kind == KernelKind::DecodePartial {
            if tile.split_tokens == 0 {
                return Err(err("split_tokens must be at least 1".into()));
            }
            let shared = spec.shared_bytes();
            if shared > MAX_STATIC_SHARED_BYTES {
                return Err(err(format!(
                    "needs {shared} bytes of shared memory ({} query heads per KV head x head_dim {}), more than \
                     the {MAX_STATIC_SHARED_BYTES} bytes a kernel gets without opt-in: not yet supported",
                    layout.gqa_ratio(),
                    layout.keys.head_dim
                )));
            }
        }
        Ok(spec)
    }

    /// The kernel's name: kind, then every parameter that changes its code, e.g.
    /// `kivi_decode_k2c32_v2t32_r128_d128_f16_gqa4_t128_s256`.
    pub fn name(&self) -> String {
        let mut name = format!("kivi_{}_{}", self.kind.as_str(), layout_tag(&self.layout));
        let _ = write!(name, "_t{}", self.tile.threads);
        if self.kind == KernelKind::DecodePartial {
            let _ = write!(name, "_s{}", self.tile.split_tokens);
        }
        name
    }

    /// Static shared memory the kernel declares, in bytes.
    pub fn shared_bytes(&self) -> u32 {
        match self.kind {
            KernelKind::DecodePartial => {
                let gqa = self.layout.gqa_ratio();
                let warps = self.tile.threads / 32;
                4 * (2 * warps * gqa + gqa * self.layout.keys.head_dim)
            }
            _ => 0,
        }
    }
}

/// The layout part of kernel and module names: key bits/axis/group, value bits/axis/group, residual, head_dim,
/// dtype, GQA ratio, e.g. `k2c32_v2t32_r128_d128_f16_gqa4` (`c` per-channel, `t` per-token).
pub fn layout_tag(layout: &Layout) -> String {
    let axis = |a: kivi_dsl::QuantAxis| match a {
        kivi_dsl::QuantAxis::PerChannel => 'c',
        kivi_dsl::QuantAxis::PerToken => 't',
    };
    let r = layout.residual_length;
    format!(
        "k{}{}{}_v{}{}{}_r{}_d{}_{}_gqa{}",
        layout.keys.bits,
        axis(layout.keys.axis),
        layout.keys.group_elems(r),
        layout.values.bits,
        axis(layout.values.axis),
        layout.values.group_elems(r),
        r,
        layout.keys.head_dim,
        layout.dtype.as_str(),
        layout.gqa_ratio()
    )
}

/// The kernels of one layout, with their names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayoutKernels {
    /// The layout.
    pub layout: Layout,
    /// One spec per kind, in [`KernelKind::ALL`] order.
    pub specs: Vec<KernelSpec>,
}

impl LayoutKernels {
    /// Every kernel a layout needs, with the given tile configurations.
    ///
    /// # Errors
    /// As [`KernelSpec::new`].
    pub fn new(layout: &Layout, tiles: &KernelTiles) -> Result<Self, CodegenError> {
        let specs = KernelKind::ALL
            .iter()
            .map(|&kind| KernelSpec::new(kind, *layout, tiles.get(kind)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LayoutKernels {
            layout: *layout,
            specs,
        })
    }

    /// The spec of one kind.
    pub fn spec(&self, kind: KernelKind) -> &KernelSpec {
        self.specs
            .iter()
            .find(|s| s.kind == kind)
            .expect("LayoutKernels::new creates one spec per kind")
    }
}

/// CUDA C++ for one NVRTC program: a prelude plus one or more `extern "C"` kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSource {
    /// Module name: `kivi_<layout tag>_<hash of the kernel names>`; a valid file name.
    pub name: String,
    /// The whole CUDA C++ text (no `#include`s: it compiles with NVRTC alone).
    pub source: String,
    /// The kernels in it: spec and entry-point name.
    pub kernels: Vec<(KernelSpec, String)>,
}

/// Renders one NVRTC program holding the given kernels (all of one layout).
///
/// # Errors
/// [`CodegenError::Template`] if a template fails (a kivi bug); the specs are already checked by
/// [`KernelSpec::new`].
pub fn generate_module(specs: &[KernelSpec]) -> Result<ModuleSource, CodegenError> {
    let mut tera = Tera::default();
    tera.add_raw_template("prelude", PRELUDE)
        .map_err(|e| template_error("prelude", &e))?;
    for (kind, text) in TEMPLATES {
        tera.add_raw_template(kind.as_str(), text)
            .map_err(|e| template_error(kind.as_str(), &e))?;
    }
    let layout = specs
        .first()
        .map(|s| s.layout)
        .ok_or_else(|| CodegenError::Template {
            template: "module".into(),
            message: "a module needs at least one kernel".into(),
        })?;
    let names: Vec<String> = specs.iter().map(KernelSpec::name).collect();
    let module_name = format!(
        "kivi_{}_{:016x}",
        layout_tag(&layout),
        fnv1a(names.join(",").as_bytes())
    );
    let mut ctx = Context::new();
    ctx.insert("version", env!("CARGO_PKG_VERSION"));
    ctx.insert("layout_spec", &layout.to_spec().replace('\n', " "));
    ctx.insert("module_name", &module_name);
    let mut source = tera
        .render("prelude", &ctx)
        .map_err(|e| template_error("prelude", &e))?;
    let mut kernels = Vec::with_capacity(specs.len());
    for (spec, name) in specs.iter().zip(names) {
        let ctx = kernel_context(spec, &name, specs)?;
        let text = tera
            .render(spec.kind.as_str(), &ctx)
            .map_err(|e| template_error(spec.kind.as_str(), &e))?;
        source.push_str(&text);
        kernels.push((*spec, name));
    }
    Ok(ModuleSource {
        name: module_name,
        source,
        kernels,
    })
}

fn template_error(template: &str, e: &tera::Error) -> CodegenError {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(message, ": {c}");
        cause = c.source();
    }
    CodegenError::Template {
        template: template.into(),
        message,
    }
}

/// FNV-1a, 64 bit: a stable, dependency-free hash for module names (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The template values of one kernel: every derived number computed here.
fn kernel_context(
    spec: &KernelSpec,
    name: &str,
    module: &[KernelSpec],
) -> Result<Context, CodegenError> {
    let st = StorageLayout::new(&spec.layout);
    let l = &spec.layout;
    let threads = spec.tile.threads;
    let value = match spec.kind {
        KernelKind::QuantizeKeys => json!({
            "bits": l.keys.bits,
            "max_code": (1u32 << l.keys.bits) - 1,
            "codes_per_word": st.key_codes_per_word,
            "group_size": st.key_group_size,
            "groups_per_channel": st.key_groups_per_channel,
            "words_per_channel": st.key_words_per_channel,
            "words_per_group": st.key_group_size / st.key_codes_per_word,
            "block_code_words": st.key_block_words(),
            "block_param_count": st.key_block_params(),
            "grid_x": (st.head_dim * st.key_groups_per_channel).div_ceil(threads),
        }),
        KernelKind::QuantizeValues => json!({
            "bits": l.values.bits,
            "max_code": (1u32 << l.values.bits) - 1,
            "codes_per_word": st.value_codes_per_word,
            "group_size": st.value_group_size,
            "groups_per_token": st.value_groups_per_token,
            "words_per_token": st.value_words_per_token,
            "words_per_group": st.value_group_size / st.value_codes_per_word,
        }),
        KernelKind::StoreResidual => json!({}),
        KernelKind::DecodePartial => json!({
            "split_tokens": spec.tile.split_tokens,
            "warps": threads / 32,
            "gqa": l.gqa_ratio(),
            "dims_per_lane": st.head_dim.div_ceil(32),
            "value_ring": st.value_ring,
            "softmax_scale": format!("{:.9e}f", 1.0f64 / f64::from(st.head_dim).sqrt()),
            "key_bits": l.keys.bits,
            "key_mask": (1u32 << l.keys.bits) - 1,
            "key_codes_per_word": st.key_codes_per_word,
            "key_group_size": st.key_group_size,
            "key_groups_per_channel": st.key_groups_per_channel,
            "key_words_per_channel": st.key_words_per_channel,
            "key_block_words": st.key_block_words(),
            "key_block_params": st.key_block_params(),
            "value_bits": l.values.bits,
            "value_mask": (1u32 << l.values.bits) - 1,
            "value_codes_per_word": st.value_codes_per_word,
            "value_group_size": st.value_group_size,
            "value_groups_per_token": st.value_groups_per_token,
            "value_words_per_token": st.value_words_per_token,
        }),
        KernelKind::DecodeCombine => {
            let partial = module
                .iter()
                .find(|s| s.kind == KernelKind::DecodePartial)
                .map(KernelSpec::name)
                .unwrap_or_else(|| "the decode kernel".into());
            json!({ "gqa": l.gqa_ratio(), "partial_name": partial })
        }
    };
    let mut ctx = Context::from_value(value).map_err(|e| template_error(name, &e))?;
    ctx.insert("name", name);
    ctx.insert("threads", &threads);
    ctx.insert("head_dim", &st.head_dim);
    ctx.insert("residual_length", &st.residual_length);
    Ok(ctx)
}

#[cfg(test)]
mod tests;
