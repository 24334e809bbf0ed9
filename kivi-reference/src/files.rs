//! Loaders for the reference data files (safetensors 0.7, metadata key `configs` holding JSON) and checks that
//! replay their cases through this crate.
//!
//! Three formats are recognized (see `tests/data/README.md`):
//!
//! - **pack vectors** (`kivi_pack_vectors.safetensors`): per config `{cfg}.k`, `.k_code`, `.k_scale`, `.k_mn`
//!   and optionally `.v`, `.v_code`, `.v_scale`, `.v_mn`. Bits and group size are read from the shapes.
//! - **decode streams** (`kivi_decode_streams.safetensors`): metadata `configs` = `{name: {B, H, Hkv, D,
//!   prefill, steps, group, residual, k_bits, v_bits}}`; tensors `{name}.prefill_k`, ..., `{name}.step_out`,
//!   `{name}.final_*`.
//! - **real-model streams** (`real_kv_smollm2_135m.safetensors`): configs carry `variants: {variant: [k_bits,
//!   v_bits]}` instead of bits; inputs are `{name}.*`, the outputs of each variant `{name}.{variant}.step_out`
//!   and `{name}.{variant}.final_*`; `{name}.step_out_fp32_unquantized` holds the unquantized attention.
//!
//! A file captured by a user in one of these formats loads the same way ([`ReferenceFile::open`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::f16;
use kivi_dsl::{Dtype, GroupSize, Layout, QuantAxis, Rounding, ScaleDtype, Symmetry, TensorQuant};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::cache::RefCache;
use crate::error::RefError;
use crate::quant::{
    check_bits, codes_per_pack, codes_per_word, quantize_keys_per_channel,
    quantize_values_per_token,
};

/// The directory of the reference data: `$KIVI_DATA` if set (and non-empty), else `tests/data` of this
/// workspace (`<CARGO_MANIFEST_DIR>/../tests/data`, fixed at compile time).
pub fn data_dir() -> PathBuf {
    match std::env::var_os("KIVI_DATA") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("tests")
            .join("data"),
    }
}

/// Which of the three reference formats a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// Quantize+pack vectors (`kivi_pack_vectors.safetensors`): only [`PackCase`]s.
    PackVectors,
    /// Synthetic decode streams (`kivi_decode_streams.safetensors`): one [`StreamCase`] per config.
    DecodeStreams,
    /// Real-model streams with variants (`real_kv_smollm2_135m.safetensors`): one [`StreamCase`] per config and
    /// variant.
    RealModel,
}

/// The values part of a [`PackCase`] (absent in the file where D is not a multiple of G).
#[derive(Clone, Debug, PartialEq)]
pub struct PackValues {
    /// Input values `[B, H, T, D]` fp16.
    pub v: Vec<f16>,
    /// Expected codes `[B, H, T, D/cpw]` (packed u32 words stored as int32).
    pub v_code: Vec<i32>,
    /// Expected scales `[B, H, T, D/G]` fp16.
    pub v_scale: Vec<f16>,
    /// Expected mins `[B, H, T, D/G]` fp16.
    pub v_mn: Vec<f16>,
}

/// One quantize+pack case: inputs and the reference's codes, scales and mins, for keys (per-channel) and
/// optionally values (per-token), with the same bits and group size.
#[derive(Clone, Debug, PartialEq)]
pub struct PackCase {
    /// The config name (tensor prefix), e.g. `b2_g32_d128`.
    pub name: String,
    /// Bits per code (from the code tensor's shape).
    pub bits: u32,
    /// Group size G (from the scale tensor's shape).
    pub group: usize,
    /// Batch B.
    pub batch: usize,
    /// Heads H.
    pub heads: usize,
    /// Tokens T.
    pub tokens: usize,
    /// Head dim D.
    pub head_dim: usize,
    /// Input keys `[B, H, T, D]` fp16.
    pub k: Vec<f16>,
    /// Expected key codes `[B, H, D, T/cpw]` (packed along tokens; u32 words stored as int32).
    pub k_code: Vec<i32>,
    /// Expected key scales `[B, H, D, T/G]` fp16.
    pub k_scale: Vec<f16>,
    /// Expected key mins `[B, H, D, T/G]` fp16.
    pub k_mn: Vec<f16>,
    /// The values part, if the file has it.
    pub values: Option<PackValues>,
}

/// One decode stream: prefill, per-step inputs and the reference's per-step outputs and final cache.
///
/// Tensors absent from the file (final parts that are empty, the unquantized output) are empty vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamCase {
    /// The case name: the config name, plus `.{variant}` for real-model files (e.g. `smollm2-135m_l0.kivi2`).
    pub name: String,
    /// Batch B.
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// KV heads Hkv.
    pub kv_heads: usize,
    /// Head dim D.
    pub head_dim: usize,
    /// Prefill length P.
    pub prefill: usize,
    /// Decode steps S.
    pub steps: usize,
    /// Group size G (keys: tokens; values: head-dim entries).
    pub group: usize,
    /// Residual length R.
    pub residual: usize,
    /// Key bits.
    pub k_bits: u32,
    /// Value bits.
    pub v_bits: u32,
    /// Prefill keys `[B, Hkv, P, D]` fp16.
    pub prefill_k: Vec<f16>,
    /// Prefill values `[B, Hkv, P, D]` fp16.
    pub prefill_v: Vec<f16>,
    /// Queries `[B, H, S, D]` fp16.
    pub step_q: Vec<f16>,
    /// New keys `[B, Hkv, S, D]` fp16.
    pub step_k: Vec<f16>,
    /// New values `[B, Hkv, S, D]` fp16.
    pub step_v: Vec<f16>,
    /// The reference's attention output of each step `[B, H, S, D]` fp16.
    pub step_out: Vec<f16>,
    /// Exact unquantized attention `[B, H, S, D]` f32 (`step_out_fp32_unquantized`; empty if absent).
    pub step_out_unquantized: Vec<f32>,
    /// Final key codes `[B, Hkv, D, nqk/cpw]` int32.
    pub final_k_code: Vec<i32>,
    /// Final key scales `[B, Hkv, D, nqk/G]` fp16.
    pub final_k_scale: Vec<f16>,
    /// Final key mins `[B, Hkv, D, nqk/G]` fp16.
    pub final_k_mn: Vec<f16>,
    /// Final fp16 keys `[B, Hkv, nrk, D]`.
    pub final_k_residual: Vec<f16>,
    /// Final value codes `[B, Hkv, nqv, D/cpw]` int32.
    pub final_v_code: Vec<i32>,
    /// Final value scales `[B, Hkv, nqv, D/G]` fp16.
    pub final_v_scale: Vec<f16>,
    /// Final value mins `[B, Hkv, nqv, D/G]` fp16.
    pub final_v_mn: Vec<f16>,
    /// Final fp16 values `[B, Hkv, nrv, D]`.
    pub final_v_residual: Vec<f16>,
}

/// A loaded reference file: its format and all its cases.
#[derive(Clone, Debug)]
pub struct ReferenceFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The detected format.
    pub kind: FileKind,
    /// Quantize+pack cases (pack-vector files), sorted by name.
    pub pack_cases: Vec<PackCase>,
    /// Decode streams (stream and real-model files), sorted by name.
    pub stream_cases: Vec<StreamCase>,
}

/// Typed access to the tensors of one safetensors file, with errors naming the file and tensor.
struct Tensors<'a> {
    file: String,
    st: SafeTensors<'a>,
}

impl Tensors<'_> {
    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    fn shape_of(&self, name: &str) -> Result<Vec<usize>, RefError> {
        self.st
            .tensor(name)
            .map(|t| t.shape().to_vec())
            .map_err(|_| RefError::MissingTensor {
                file: self.file.clone(),
                name: name.to_string(),
            })
    }

    /// Raw little-endian bytes of `name`, checking dtype and (if given) shape.
    fn raw(&self, name: &str, dtype: StDtype, shape: Option<&[usize]>) -> Result<&[u8], RefError> {
        let t = self.st.tensor(name).map_err(|_| RefError::MissingTensor {
            file: self.file.clone(),
            name: name.to_string(),
        })?;
        if t.dtype() != dtype {
            return Err(RefError::TensorDtype {
                file: self.file.clone(),
                name: name.to_string(),
                expected: format!("{dtype:?}"),
                got: format!("{:?}", t.dtype()),
            });
        }
        if let Some(s) = shape {
            if t.shape() != s {
                return Err(RefError::TensorShape {
                    file: self.file.clone(),
                    name: name.to_string(),
                    expected: s.to_vec(),
                    got: t.shape().to_vec(),
                });
            }
        }
        Ok(t.data())
    }

    fn f16(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>, RefError> {
        let b = self.raw(name, StDtype::F16, Some(shape))?;
        Ok(b.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect())
    }

    fn i32(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>, RefError> {
        let b = self.raw(name, StDtype::I32, Some(shape))?;
        Ok(b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, RefError> {
        let b = self.raw(name, StDtype::F32, Some(shape))?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// An optional tensor: empty if absent or if `shape` has no elements (then it must be absent or empty).
    fn f16_opt(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>, RefError> {
        if self.has(name) {
            self.f16(name, shape)
        } else {
            Ok(Vec::new())
        }
    }

    fn i32_opt(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>, RefError> {
        if self.has(name) {
            self.i32(name, shape)
        } else {
            Ok(Vec::new())
        }
    }

    fn f32_opt(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, RefError> {
        if self.has(name) {
            self.f32(name, shape)
        } else {
            Ok(Vec::new())
        }
    }
}

/// Final Algorithm-1 counts after `len` tokens with residual `r`: (nqk, nrk, nqv, nrv).
fn final_counts(len: usize, r: usize) -> (usize, usize, usize, usize) {
    let nqk = len / r * r;
    let nqv = len.saturating_sub(r);
    (nqk, len - nqk, nqv, len - nqv)
}

impl ReferenceFile {
    /// Reads and parses a reference file, detecting its format: metadata `configs` with `variants` ->
    /// [`FileKind::RealModel`], `configs` without -> [`FileKind::DecodeStreams`], no `configs` but tensors named
    /// `*.k_code` -> [`FileKind::PackVectors`].
    ///
    /// # Errors
    /// [`RefError::Io`], [`RefError::SafeTensors`] for unreadable files; [`RefError::Metadata`] for malformed
    /// `configs` or an unrecognized format; [`RefError::MissingTensor`], [`RefError::TensorShape`],
    /// [`RefError::TensorDtype`] naming the offending tensor; [`RefError::Unsupported`] for unsupported bits.
    pub fn open(path: impl AsRef<Path>) -> Result<ReferenceFile, RefError> {
        let path = path.as_ref().to_path_buf();
        let file = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|source| RefError::Io {
            file: file.clone(),
            source,
        })?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|source| RefError::SafeTensors {
                file: file.clone(),
                source,
            })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|source| RefError::SafeTensors {
            file: file.clone(),
            source,
        })?;
        let tensors = Tensors {
            file: file.clone(),
            st,
        };
        let configs = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("configs"))
            .cloned();
        let (kind, pack_cases, stream_cases) = match configs {
            Some(json) => {
                let v: Value = serde_json::from_str(&json).map_err(|e| RefError::Metadata {
                    file: file.clone(),
                    msg: format!("`configs` is not JSON: {e}"),
                })?;
                let obj = v.as_object().ok_or_else(|| RefError::Metadata {
                    file: file.clone(),
                    msg: "`configs` is not a JSON object".into(),
                })?;
                let real = obj.values().any(|c| c.get("variants").is_some());
                let mut cases = Vec::new();
                for (name, cfg) in obj {
                    cases.extend(load_streams(&tensors, name, cfg)?);
                }
                cases.sort_by(|a, b| a.name.cmp(&b.name));
                (
                    if real {
                        FileKind::RealModel
                    } else {
                        FileKind::DecodeStreams
                    },
                    Vec::new(),
                    cases,
                )
            }
            None => {
                let mut names: Vec<String> = tensors
                    .st
                    .names()
                    .iter()
                    .filter_map(|n| n.strip_suffix(".k_code").map(str::to_string))
                    .collect();
                if names.is_empty() {
                    return Err(RefError::Metadata {
                        file,
                        msg: "unrecognized format: no `configs` metadata (stream files) and no `*.k_code` tensors \
                              (pack-vector files)"
                            .into(),
                    });
                }
                names.sort();
                let cases = names
                    .iter()
                    .map(|n| load_pack(&tensors, n))
                    .collect::<Result<Vec<_>, _>>()?;
                (FileKind::PackVectors, cases, Vec::new())
            }
        };
        Ok(ReferenceFile {
            path,
            kind,
            pack_cases,
            stream_cases,
        })
    }

    /// The stream case named `name` (e.g. `mha_d128_b2`, `smollm2-135m_l0.kivi4`), if present.
    pub fn stream(&self, name: &str) -> Option<&StreamCase> {
        self.stream_cases.iter().find(|c| c.name == name)
    }

    /// The pack case named `name` (e.g. `b2_g32_d128`), if present.
    pub fn pack(&self, name: &str) -> Option<&PackCase> {
        self.pack_cases.iter().find(|c| c.name == name)
    }
}

fn bits_from_words(t: &Tensors, name: &str, elems: usize, words: usize) -> Result<u32, RefError> {
    let bad = || {
        RefError::Metadata {
        file: t.file.clone(),
        msg: format!("`{name}`: {elems} codes in {words} words is not 32/bits codes per word for bits 1, 2, 4, 8"),
    }
    };
    if words == 0 || !elems.is_multiple_of(words) {
        return Err(bad());
    }
    let cpw = elems / words;
    if cpw == 0 || 32 % cpw != 0 {
        return Err(bad());
    }
    let bits = (32 / cpw) as u32;
    check_bits(bits).map_err(|_| bad())?;
    Ok(bits)
}

fn load_pack(t: &Tensors, name: &str) -> Result<PackCase, RefError> {
    let ks = t.shape_of(&format!("{name}.k"))?;
    if ks.len() != 4 {
        return Err(RefError::Metadata {
            file: t.file.clone(),
            msg: format!("`{name}.k` must be [B, H, T, D], got {ks:?}"),
        });
    }
    let (b, h, tok, d) = (ks[0], ks[1], ks[2], ks[3]);
    let cs = t.shape_of(&format!("{name}.k_code"))?;
    let ss = t.shape_of(&format!("{name}.k_scale"))?;
    let words = if cs.len() == 4 { cs[3] } else { 0 };
    let bits = bits_from_words(t, &format!("{name}.k_code"), tok, words)?;
    let ng = if ss.len() == 4 { ss[3] } else { 0 };
    if ng == 0 || tok % ng != 0 {
        return Err(RefError::Metadata {
            file: t.file.clone(),
            msg: format!(
                "`{name}.k_scale` shape {ss:?} does not give a group size dividing T={tok}"
            ),
        });
    }
    let group = tok / ng;
    let cpw = codes_per_word(bits);
    let k = t.f16(&format!("{name}.k"), &[b, h, tok, d])?;
    let k_code = t.i32(&format!("{name}.k_code"), &[b, h, d, tok / cpw])?;
    let k_scale = t.f16(&format!("{name}.k_scale"), &[b, h, d, ng])?;
    let k_mn = t.f16(&format!("{name}.k_mn"), &[b, h, d, ng])?;
    let values = if t.has(&format!("{name}.v")) {
        if d % group != 0 || d % cpw != 0 {
            return Err(RefError::Metadata {
                file: t.file.clone(),
                msg: format!(
                    "`{name}.v` present but D={d} is not a multiple of G={group} and {cpw}"
                ),
            });
        }
        Some(PackValues {
            v: t.f16(&format!("{name}.v"), &[b, h, tok, d])?,
            v_code: t.i32(&format!("{name}.v_code"), &[b, h, tok, d / cpw])?,
            v_scale: t.f16(&format!("{name}.v_scale"), &[b, h, tok, d / group])?,
            v_mn: t.f16(&format!("{name}.v_mn"), &[b, h, tok, d / group])?,
        })
    } else {
        None
    };
    Ok(PackCase {
        name: name.to_string(),
        bits,
        group,
        batch: b,
        heads: h,
        tokens: tok,
        head_dim: d,
        k,
        k_code,
        k_scale,
        k_mn,
        values,
    })
}

fn cfg_usize(t: &Tensors, name: &str, cfg: &Value, key: &str) -> Result<usize, RefError> {
    cfg.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| RefError::Metadata {
            file: t.file.clone(),
            msg: format!("config `{name}`: missing or non-integer `{key}`"),
        })
}

fn load_streams(t: &Tensors, name: &str, cfg: &Value) -> Result<Vec<StreamCase>, RefError> {
    let get = |k: &str| cfg_usize(t, name, cfg, k);
    let (b, h, hkv, d) = (get("B")?, get("H")?, get("Hkv")?, get("D")?);
    let (p, s, group, r) = (
        get("prefill")?,
        get("steps")?,
        get("group")?,
        get("residual")?,
    );
    let meta_err = |msg: String| RefError::Metadata {
        file: t.file.clone(),
        msg: format!("config `{name}`: {msg}"),
    };
    if group == 0 || r == 0 || d == 0 || hkv == 0 || h % hkv != 0 {
        return Err(meta_err(format!(
            "invalid sizes (D {d}, group {group}, residual {r}, H {h}, Hkv {hkv})"
        )));
    }
    // (case name, tensor prefix of outputs, k_bits, v_bits)
    let mut variants: Vec<(String, String, u32, u32)> = Vec::new();
    if let Some(vs) = cfg.get("variants") {
        let obj = vs
            .as_object()
            .ok_or_else(|| meta_err("`variants` is not an object".into()))?;
        for (vn, bits) in obj {
            let arr = bits.as_array().filter(|a| a.len() == 2);
            let kb = arr.and_then(|a| a[0].as_u64());
            let vb = arr.and_then(|a| a[1].as_u64());
            match (kb, vb) {
                (Some(kb), Some(vb)) => variants.push((
                    format!("{name}.{vn}"),
                    format!("{name}.{vn}."),
                    kb as u32,
                    vb as u32,
                )),
                _ => return Err(meta_err(format!("variant `{vn}` is not [k_bits, v_bits]"))),
            }
        }
    } else {
        variants.push((
            name.to_string(),
            format!("{name}."),
            get("k_bits")? as u32,
            get("v_bits")? as u32,
        ));
    }
    let inp = |n: &str| format!("{name}.{n}");
    let (prefill_k, prefill_v) = if p == 0 {
        (
            t.f16_opt(&inp("prefill_k"), &[b, hkv, 0, d])?,
            t.f16_opt(&inp("prefill_v"), &[b, hkv, 0, d])?,
        )
    } else {
        (
            t.f16(&inp("prefill_k"), &[b, hkv, p, d])?,
            t.f16(&inp("prefill_v"), &[b, hkv, p, d])?,
        )
    };
    let step_q = t.f16(&inp("step_q"), &[b, h, s, d])?;
    let step_k = t.f16(&inp("step_k"), &[b, hkv, s, d])?;
    let step_v = t.f16(&inp("step_v"), &[b, hkv, s, d])?;
    let step_out_unquantized = t.f32_opt(&inp("step_out_fp32_unquantized"), &[b, h, s, d])?;
    let (nqk, nrk, nqv, nrv) = final_counts(p + s, r);
    let mut out = Vec::new();
    for (case, pre, kb, vb) in variants {
        check_bits(kb)?;
        check_bits(vb)?;
        let (kc, vc) = (codes_per_pack(kb), codes_per_pack(vb));
        if r % group != 0 || r % kc != 0 || d % group != 0 || d % vc != 0 {
            return Err(meta_err(format!(
                "residual {r} and D {d} must be multiples of group {group} and of the codes that fill whole \
                 words ({kc} keys, {vc} values)"
            )));
        }
        let o = |n: &str| format!("{pre}{n}");
        out.push(StreamCase {
            name: case,
            batch: b,
            heads: h,
            kv_heads: hkv,
            head_dim: d,
            prefill: p,
            steps: s,
            group,
            residual: r,
            k_bits: kb,
            v_bits: vb,
            prefill_k: prefill_k.clone(),
            prefill_v: prefill_v.clone(),
            step_q: step_q.clone(),
            step_k: step_k.clone(),
            step_v: step_v.clone(),
            step_out: t.f16(&o("step_out"), &[b, h, s, d])?,
            step_out_unquantized: step_out_unquantized.clone(),
            final_k_code: t.i32_opt(&o("final_k_code"), &[b, hkv, d, nqk / kc])?,
            final_k_scale: t.f16_opt(&o("final_k_scale"), &[b, hkv, d, nqk / group])?,
            final_k_mn: t.f16_opt(&o("final_k_mn"), &[b, hkv, d, nqk / group])?,
            final_k_residual: t.f16_opt(&o("final_k_residual"), &[b, hkv, nrk, d])?,
            final_v_code: t.i32_opt(&o("final_v_code"), &[b, hkv, nqv, d / vc])?,
            final_v_scale: t.f16_opt(&o("final_v_scale"), &[b, hkv, nqv, d / group])?,
            final_v_mn: t.f16_opt(&o("final_v_mn"), &[b, hkv, nqv, d / group])?,
            final_v_residual: t.f16_opt(&o("final_v_residual"), &[b, hkv, nrv, d])?,
        });
    }
    Ok(out)
}

/// The inputs of one decode step: `(q [B, H, D], k [B, Hkv, D], v [B, Hkv, D])`, fp16.
pub type StepInputs = (Vec<f16>, Vec<f16>, Vec<f16>);

impl StreamCase {
    /// The kivi layout of this stream: the paper's (keys per-channel, values per-token, asymmetric, fp16 scales,
    /// half rounding, fp16 activations), group G for both, residual R, no sink tokens.
    pub fn layout(&self) -> Layout {
        let tq = |bits: u32, axis: QuantAxis| TensorQuant {
            bits,
            axis,
            group_size: GroupSize::Elements(self.group as u32),
            head_dim: self.head_dim as u32,
            symmetry: Symmetry::Asymmetric,
            scale_dtype: ScaleDtype::F16,
            rounding: Rounding::Half,
        };
        Layout {
            keys: tq(self.k_bits, QuantAxis::PerChannel),
            values: tq(self.v_bits, QuantAxis::PerToken),
            residual_length: self.residual as u32,
            sink_tokens: 0,
            num_heads: self.heads as u32,
            num_kv_heads: self.kv_heads as u32,
            dtype: Dtype::F16,
        }
    }

    /// The inputs of decode step `step` (< steps): `(q [B, H, D], k [B, Hkv, D], v [B, Hkv, D])` fp16, sliced
    /// out of `step_q`, `step_k`, `step_v`.
    ///
    /// # Errors
    /// [`RefError::Invalid`] if `step >= steps`.
    pub fn step_inputs(&self, step: usize) -> Result<StepInputs, RefError> {
        if step >= self.steps {
            return Err(RefError::Invalid(format!(
                "step {step} out of range ({} steps)",
                self.steps
            )));
        }
        let slice = |x: &[f16], heads: usize| {
            let mut o = Vec::with_capacity(self.batch * heads * self.head_dim);
            for bh in 0..self.batch * heads {
                let at = (bh * self.steps + step) * self.head_dim;
                o.extend_from_slice(&x[at..at + self.head_dim]);
            }
            o
        };
        Ok((
            slice(&self.step_q, self.heads),
            slice(&self.step_k, self.kv_heads),
            slice(&self.step_v, self.kv_heads),
        ))
    }
}

/// How one tensor of ours compares with the file's.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiff {
    /// The tensor's name (e.g. `final_k_code`, `k_scale`).
    pub name: String,
    /// Elements in the file's tensor (0 if absent).
    pub file_len: usize,
    /// Elements in ours.
    pub ours_len: usize,
    /// Mismatching elements: bitwise comparison (two NaNs match); if the lengths differ, the larger length.
    pub mismatches: usize,
}

impl TensorDiff {
    fn new<T>(name: &str, file: &[T], ours: &[T], eq: impl Fn(&T, &T) -> bool) -> TensorDiff {
        let mismatches = if file.len() != ours.len() {
            file.len().max(ours.len())
        } else {
            file.iter().zip(ours).filter(|(a, b)| !eq(a, b)).count()
        };
        TensorDiff {
            name: name.to_string(),
            file_len: file.len(),
            ours_len: ours.len(),
            mismatches,
        }
    }

    /// Compares fp16 tensors by bits (two NaNs match).
    pub fn f16(name: &str, file: &[f16], ours: &[f16]) -> TensorDiff {
        TensorDiff::new(name, file, ours, |a, b| {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        })
    }

    /// Compares tensors of numbers held as f32 (fp16, bf16 or fp32 values, as in [`crate::CacheExport`]) by
    /// bits (so `-0` differs from `+0`; two NaNs match).
    pub fn values(name: &str, file: &[f32], ours: &[f32]) -> TensorDiff {
        TensorDiff::new(name, file, ours, |a, b| {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        })
    }

    /// Compares a file's fp16 tensor with ours held as f32 ([`TensorDiff::values`] after the exact widening).
    pub fn f16_values(name: &str, file: &[f16], ours: &[f32]) -> TensorDiff {
        TensorDiff::values(name, &crate::dtype::to_f32s(file), ours)
    }

    /// Compares int32 tensors (packed codes).
    pub fn i32(name: &str, file: &[i32], ours: &[i32]) -> TensorDiff {
        TensorDiff::new(name, file, ours, |a, b| a == b)
    }
}

impl fmt::Display for TensorDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} mismatches", self.name, self.mismatches)?;
        if self.file_len != self.ours_len {
            write!(
                f,
                " (file has {} elements, ours {})",
                self.file_len, self.ours_len
            )?;
        }
        Ok(())
    }
}

/// The result of [`check_pack`].
#[derive(Clone, Debug, PartialEq)]
pub struct PackReport {
    /// The case name.
    pub name: String,
    /// `k_code`, `k_scale`, `k_mn`, and (if the case has values) `v_code`, `v_scale`, `v_mn`.
    pub tensors: Vec<TensorDiff>,
}

impl PackReport {
    /// Total mismatching elements over all tensors (0: bit-exact).
    pub fn mismatches(&self) -> usize {
        self.tensors.iter().map(|t| t.mismatches).sum()
    }
}

impl fmt::Display for PackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} mismatches", self.name, self.mismatches())?;
        for t in self.tensors.iter().filter(|t| t.mismatches > 0) {
            write!(f, "; {t}")?;
        }
        Ok(())
    }
}

/// Quantizes a pack case's inputs with [`quantize_keys_per_channel`] / [`quantize_values_per_token`] (per
/// (batch, head), over all T tokens) and compares every code word, scale and min with the file's.
///
/// # Errors
/// [`RefError`] from quantization (bad bits or shapes in a hand-built case).
pub fn check_pack(case: &PackCase) -> Result<PackReport, RefError> {
    let (t, d) = (case.tokens, case.head_dim);
    let mut kc = Vec::new();
    let mut kss = Vec::new();
    let mut kmn = Vec::new();
    let heads = case.batch * case.heads;
    let per = t * d;
    if case.k.len() != heads * per {
        return Err(RefError::shape(
            format!("{}: k [B, H, T, D]", case.name),
            heads * per,
            case.k.len(),
        ));
    }
    for bh in 0..heads {
        let q = quantize_keys_per_channel(
            &case.k[bh * per..(bh + 1) * per],
            t,
            d,
            case.bits,
            case.group,
        )?;
        kc.extend(q.codes.iter().map(|&w| w as i32));
        kss.extend(q.scale);
        kmn.extend(q.mn);
    }
    let mut tensors = vec![
        TensorDiff::i32("k_code", &case.k_code, &kc),
        TensorDiff::f16_values("k_scale", &case.k_scale, &kss),
        TensorDiff::f16_values("k_mn", &case.k_mn, &kmn),
    ];
    if let Some(v) = &case.values {
        if v.v.len() != heads * per {
            return Err(RefError::shape(
                format!("{}: v [B, H, T, D]", case.name),
                heads * per,
                v.v.len(),
            ));
        }
        let (mut vc, mut vs, mut vm) = (Vec::new(), Vec::new(), Vec::new());
        for bh in 0..heads {
            let q = quantize_values_per_token(
                &v.v[bh * per..(bh + 1) * per],
                t,
                d,
                case.bits,
                case.group,
            )?;
            vc.extend(q.codes.iter().map(|&w| w as i32));
            vs.extend(q.scale);
            vm.extend(q.mn);
        }
        tensors.push(TensorDiff::i32("v_code", &v.v_code, &vc));
        tensors.push(TensorDiff::f16_values("v_scale", &v.v_scale, &vs));
        tensors.push(TensorDiff::f16_values("v_mn", &v.v_mn, &vm));
    }
    Ok(PackReport {
        name: case.name.clone(),
        tensors,
    })
}

/// The result of [`check_stream`]. Relative L2 errors are `||ours - theirs|| / ||theirs||` (0 if both are 0,
/// infinite if ours has NaN where theirs does not).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamReport {
    /// The case name.
    pub name: String,
    /// Decode steps replayed.
    pub steps: usize,
    /// The final cache, tensor by tensor (`final_k_code`, ..., `final_v_residual`).
    pub cache: Vec<TensorDiff>,
    /// Relative L2 error of our outputs vs the file's `step_out` over the whole stream (all b, h, steps, d).
    pub out_rel_l2: f64,
    /// Max over (batch, head, step) of the relative L2 error of that step's `[D]` output.
    pub max_step_rel_l2: f64,
    /// The (batch, head, step) where `max_step_rel_l2` occurs.
    pub worst: (usize, usize, usize),
    /// Relative L2 error of our outputs vs `step_out_fp32_unquantized` (the quantization error), if present.
    pub ours_vs_unquantized: Option<f64>,
    /// Relative L2 error of the file's `step_out` vs `step_out_fp32_unquantized`, if present.
    pub reference_vs_unquantized: Option<f64>,
}

impl StreamReport {
    /// Total mismatching elements of the final cache (0: identical).
    pub fn cache_mismatches(&self) -> usize {
        self.cache.iter().map(|t| t.mismatches).sum()
    }

    /// True if the cache is identical, `out_rel_l2 <= stream_tol` and `max_step_rel_l2 <= step_tol`.
    pub fn passes(&self, stream_tol: f64, step_tol: f64) -> bool {
        self.cache_mismatches() == 0
            && self.out_rel_l2 <= stream_tol
            && self.max_step_rel_l2 <= step_tol
    }
}

impl fmt::Display for StreamReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} steps, cache mismatches {}, out rel-L2 {:.3e}, max per-(b,h,step) rel-L2 {:.3e} at {:?}",
            self.name,
            self.steps,
            self.cache_mismatches(),
            self.out_rel_l2,
            self.max_step_rel_l2,
            self.worst
        )?;
        if let (Some(o), Some(r)) = (self.ours_vs_unquantized, self.reference_vs_unquantized) {
            write!(f, ", vs unquantized: ours {o:.3e}, reference {r:.3e}")?;
        }
        for t in self.cache.iter().filter(|t| t.mismatches > 0) {
            write!(f, "; {t}")?;
        }
        Ok(())
    }
}

/// Accumulates `sum (a - b)^2` and `sum b^2` in f64.
#[derive(Default, Clone, Copy)]
struct L2 {
    err: f64,
    norm: f64,
}

impl L2 {
    fn add(&mut self, ours: f64, theirs: f64) {
        let e = ours - theirs;
        self.err += e * e;
        self.norm += theirs * theirs;
    }

    fn rel(self) -> f64 {
        if self.err.is_nan() {
            f64::INFINITY
        } else if self.err == 0.0 {
            0.0
        } else {
            (self.err / self.norm).sqrt()
        }
    }
}

/// Replays a stream case through [`RefCache`] (prefill, then every decode step) and compares the outputs with
/// the file's `step_out` and the final cache with its `final_*` tensors.
///
/// # Errors
/// [`RefError`] if the case's layout is unsupported or its tensors have inconsistent lengths.
pub fn check_stream(case: &StreamCase) -> Result<StreamReport, RefError> {
    let mut cache = RefCache::new(&case.layout(), case.batch)?;
    cache.prefill(&case.prefill_k, &case.prefill_v, case.prefill)?;
    let (b, h, s, d) = (case.batch, case.heads, case.steps, case.head_dim);
    let expected = b * h * s * d;
    if case.step_out.len() != expected {
        return Err(RefError::shape(
            format!("{}: step_out [B, H, S, D]", case.name),
            expected,
            case.step_out.len(),
        ));
    }
    let unq = (case.step_out_unquantized.len() == expected).then_some(&case.step_out_unquantized);
    let (mut total, mut vs_unq, mut ref_unq) = (L2::default(), L2::default(), L2::default());
    let mut per: BTreeMap<(usize, usize, usize), L2> = BTreeMap::new();
    for step in 0..s {
        let (q, k, v) = case.step_inputs(step)?;
        let out = cache.decode_step(&q, &k, &v)?;
        for bi in 0..b {
            for hi in 0..h {
                let mut l = L2::default();
                for di in 0..d {
                    let at = ((bi * h + hi) * s + step) * d + di;
                    let ours = f64::from(out[(bi * h + hi) * d + di]);
                    let theirs = f64::from(case.step_out[at].to_f32());
                    l.add(ours, theirs);
                    total.add(ours, theirs);
                    if let Some(u) = unq {
                        vs_unq.add(ours, f64::from(u[at]));
                        ref_unq.add(theirs, f64::from(u[at]));
                    }
                }
                per.insert((bi, hi, step), l);
            }
        }
    }
    let (worst, max_step) =
        per.iter()
            .map(|(k, l)| (*k, l.rel()))
            .fold(
                ((0, 0, 0), 0.0f64),
                |acc, x| if x.1 > acc.1 { x } else { acc },
            );
    let e = cache.export();
    let cache_diff = vec![
        TensorDiff::i32("final_k_code", &case.final_k_code, &e.k_code),
        TensorDiff::f16_values("final_k_scale", &case.final_k_scale, &e.k_scale),
        TensorDiff::f16_values("final_k_mn", &case.final_k_mn, &e.k_mn),
        TensorDiff::f16_values("final_k_residual", &case.final_k_residual, &e.k_residual),
        TensorDiff::i32("final_v_code", &case.final_v_code, &e.v_code),
        TensorDiff::f16_values("final_v_scale", &case.final_v_scale, &e.v_scale),
        TensorDiff::f16_values("final_v_mn", &case.final_v_mn, &e.v_mn),
        TensorDiff::f16_values("final_v_residual", &case.final_v_residual, &e.v_residual),
    ];
    Ok(StreamReport {
        name: case.name.clone(),
        steps: s,
        cache: cache_diff,
        out_rel_l2: total.rel(),
        max_step_rel_l2: max_step,
        worst,
        ours_vs_unquantized: unq.map(|_| vs_unq.rel()),
        reference_vs_unquantized: unq.map(|_| ref_unq.rel()),
    })
}
