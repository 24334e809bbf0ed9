//! `kivi eval`: the attention-output error of layouts on a user's captured q/k/v (the reference-file format),
//! against exact attention, per layer and overall; an FP8 (e4m3, per-head scale) cache as a comparison row.

use std::collections::BTreeMap;
use std::path::Path;

use kivi_reference::eval::{eval_fp8, eval_layout, EvalError};
use kivi_reference::{ReferenceFile, StreamCase};

/// One row of the table: a label and, per stream (layer), its error.
#[derive(Clone, Debug)]
pub struct EvalRow {
    /// The layout spec, or `fp8 e4m3 (per-head scale)`.
    pub label: String,
    /// Per stream name (the file's config, e.g. `smollm2-135m_l5`): the error.
    pub streams: BTreeMap<String, EvalError>,
}

/// The streams of `file` that hold exact outputs, once per distinct input (real-model files store each layer's
/// inputs once per reference variant, as `{config}.{variant}`). A stream is labelled by its name without a
/// trailing `.kivi*` variant (so `qwen2.5-0.5b_l0.kivi2` is `qwen2.5-0.5b_l0`).
fn distinct_streams(file: &ReferenceFile) -> Vec<(String, &StreamCase)> {
    let mut out: Vec<(String, &StreamCase)> = Vec::new();
    for c in &file.stream_cases {
        if c.step_out_unquantized.is_empty() {
            continue;
        }
        let same_inputs = |o: &StreamCase| {
            o.prefill_k == c.prefill_k
                && o.prefill_v == c.prefill_v
                && o.step_q == c.step_q
                && o.step_k == c.step_k
                && o.step_v == c.step_v
        };
        if out.iter().any(|(_, o)| same_inputs(o)) {
            continue;
        }
        let label = match c.name.rsplit_once('.') {
            Some((base, variant)) if variant.starts_with("kivi") => base.to_string(),
            _ => c.name.clone(),
        };
        out.push((label, c));
    }
    out
}

/// Evaluates every layout spec (a quantization spec such as `kivi-2` or `kivi-4, keys: { group_size: 64 }`; the
/// file sets the heads and head_dim) and, if `fp8`, the FP8 cache, on every stream of the file.
///
/// # Errors
/// The file cannot be read or has no stream with exact outputs; a spec that does not parse or that the reference
/// does not run.
pub fn eval_file(path: &Path, specs: &[String], fp8: bool) -> Result<Vec<EvalRow>, String> {
    let file = ReferenceFile::open(path).map_err(|e| e.to_string())?;
    let streams = distinct_streams(&file);
    if streams.is_empty() {
        return Err(format!(
            "{}: no decode stream with exact attention outputs (step_out_fp32_unquantized) to compare with",
            path.display()
        ));
    }
    let mut rows = Vec::new();
    for spec in specs {
        // The file sets the heads and head_dim: say so where the user's text set them too.
        let sets_shape = ["num_heads", "num_kv_heads", "head_dim"]
            .iter()
            .any(|f| spec.contains(f))
            || kivi_dsl::MODEL_PRESETS
                .iter()
                .any(|m| spec.contains(m.name));
        if sets_shape {
            if let Some((_, case)) = streams.first() {
                eprintln!(
                    "note: {spec}: the file's shape (num_heads {}, num_kv_heads {}, head_dim {}) replaces the \
                     layout's heads and the head_dim of its keys and values",
                    case.heads, case.kv_heads, case.head_dim
                );
            }
        }
        let mut row = EvalRow {
            label: spec.clone(),
            streams: BTreeMap::new(),
        };
        for (name, case) in &streams {
            let text = format!(
                "{spec}, num_heads: {}, num_kv_heads: {}, head_dim: {}",
                case.heads, case.kv_heads, case.head_dim
            );
            let layout = kivi_dsl::parse_spec(&text).map_err(|e| {
                // An error inside the user's own text is reported against that text alone (the file's shape is
                // appended after it).
                if let Err(own) = kivi_dsl::parse_spec(spec) {
                    if (own.line(), own.column()) == (e.line(), e.column()) {
                        return format!("layout `{spec}`: {own}");
                    }
                }
                format!(
                    "{spec} with the file's num_heads {}, num_kv_heads {}, head_dim {} (stream {name}): {e}",
                    case.heads, case.kv_heads, case.head_dim
                )
            })?;
            if name == &streams[0].0 {
                if let Err(e) = layout.check_supported() {
                    eprintln!(
                        "note: {spec}: the GPU generator does not emit this layout yet ({e}); its rows are the CPU \
                         reference's"
                    );
                }
            }
            let e = eval_layout(case, &layout).map_err(|e| format!("{spec} on {name}: {e}"))?;
            row.streams.insert(name.clone(), e);
        }
        rows.push(row);
    }
    if fp8 {
        let mut row = EvalRow {
            label: "fp8 e4m3 (per-head scale)".into(),
            streams: BTreeMap::new(),
        };
        for (name, case) in &streams {
            let e = eval_fp8(case).map_err(|e| format!("fp8 on {name}: {e}"))?;
            row.streams.insert(name.clone(), e);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The table (markdown): a row per layout, a column per stream (relative L2 over the stream), the pooled
/// overall error and the worst single (batch, head, step).
pub fn table(rows: &[EvalRow]) -> String {
    let mut names: Vec<&String> = rows
        .first()
        .map(|r| r.streams.keys().collect())
        .unwrap_or_default();
    // Layers in numeric order (`_l5` before `_l11`), other names as they sort.
    names.sort_by_key(|n| {
        let digits: String = n.chars().rev().take_while(char::is_ascii_digit).collect();
        let number: u64 = digits
            .chars()
            .rev()
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        (n[..n.len() - digits.len()].to_string(), number)
    });
    let mut s = String::from("| layout |");
    for n in &names {
        s.push_str(&format!(" {n} |"));
    }
    s.push_str(" overall | worst step |\n|---|");
    for _ in &names {
        s.push_str("---|");
    }
    s.push_str("---|---|\n");
    for r in rows {
        s.push_str(&format!("| {} |", r.label));
        for n in &names {
            match r.streams.get(*n) {
                Some(e) => s.push_str(&format!(" {:.2e} |", e.stream)),
                None => s.push_str(" - |"),
            }
        }
        let all: Vec<EvalError> = r.streams.values().copied().collect();
        let worst = all.iter().map(|e| e.worst_step).fold(0.0, f64::max);
        s.push_str(&format!(
            " {:.2e} | {:.2e} |\n",
            EvalError::pooled(&all),
            worst
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kivi_on_the_real_captures_is_between_exact_and_fp8_like_errors() {
        let path = kivi_reference::data_dir().join("real_kv_smollm2_135m.safetensors");
        if !path.exists() {
            eprintln!("SKIPPED: {} not found", path.display());
            return;
        }
        let rows = eval_file(&path, &["kivi-2".into(), "kivi-4".into()], true).unwrap();
        assert_eq!(rows.len(), 3);
        let pooled =
            |r: &EvalRow| EvalError::pooled(&r.streams.values().copied().collect::<Vec<_>>());
        let (k2, k4, f8) = (pooled(&rows[0]), pooled(&rows[1]), pooled(&rows[2]));
        assert_eq!(rows[0].streams.len(), 6, "six layers");
        // More bits, less error; every error is a real, non-zero quantization error.
        assert!(k4 < k2, "kivi-4 {k4} vs kivi-2 {k2}");
        for e in [k2, k4, f8] {
            assert!(e > 1e-4 && e < 0.5, "{e}");
        }
        let t = table(&rows);
        assert!(t.contains("| kivi-2 |") && t.contains("fp8 e4m3"), "{t}");
    }
}
