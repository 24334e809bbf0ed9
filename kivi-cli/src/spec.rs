//! Turning a command-line spec argument into a [`Layout`].

use std::path::Path;

use kivi_dsl::{parse_spec_supported, Layout, SpecError};

/// The model preset used when a spec names no model shape (heads and head_dim).
pub const DEFAULT_MODEL: &str = "llama-3-8b";

/// A resolved spec: the layout, the text it came from, and a note if a default was filled in.
#[derive(Clone, Debug)]
pub struct ResolvedSpec {
    /// The validated layout.
    pub layout: Layout,
    /// The spec text (a file's contents, or the argument).
    pub text: String,
    /// Set when the spec named no model shape and [`DEFAULT_MODEL`] was used.
    pub note: Option<String>,
}

/// Reads `arg` as a path to a `.kivi` file if one exists there, else as spec text (e.g. `kivi-2, llama-2-7b`).
/// The layout is validated and checked to be supported by the code generator. A spec that sets no model shape (num_heads, num_kv_heads, head_dim) gets [`DEFAULT_MODEL`]'s, with a note.
///
/// # Errors
/// A message with the file name (if any), line, column and a caret under the offending token.
pub fn resolve(arg: &str) -> Result<ResolvedSpec, String> {
    let path = Path::new(arg);
    let (text, origin) = if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        (text, format!("{}:", path.display()))
    } else if arg.ends_with(".kivi") || (arg.contains('/') && !arg.contains([',', ' ', '\n', ':']))
    {
        return Err(format!("{arg}: no such spec file"));
    } else {
        (arg.to_string(), "spec:".to_string())
    };
    match parse_spec_supported(&text) {
        Ok(layout) => Ok(ResolvedSpec {
            layout,
            text,
            note: None,
        }),
        Err(e) if lacks_model_shape(&e) => {
            let with_model = format!("{DEFAULT_MODEL},\n{text}");
            match parse_spec_supported(&with_model) {
                Ok(layout) => Ok(ResolvedSpec {
                    layout,
                    text,
                    note: Some(format!(
                        "the spec leaves some of num_heads, num_kv_heads and head_dim unset: they come from \
                         {DEFAULT_MODEL} (add a model preset or set them to choose)"
                    )),
                }),
                // The spec is wrong in its own right: report that, in the user's own lines.
                Err(retry) if retry.line() > 1 => Err(format!(
                    "{origin}{}\n(the shape fields the spec leaves unset were taken from {DEFAULT_MODEL})",
                    retry.moved_up(1)
                )),
                Err(_) => Err(format!("{origin}{e}")),
            }
        }
        Err(e) => Err(format!("{origin}{e}")),
    }
}

fn lacks_model_shape(e: &SpecError) -> bool {
    let m = e.message();
    m.starts_with("no value for")
        && ["num_heads", "num_kv_heads", "head_dim"]
            .iter()
            .any(|f| m.contains(f))
}
