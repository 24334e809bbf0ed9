//! Error types: [`LayoutError`] (a layout breaks a rule) and [`SpecError`] (a text spec could not be turned into
//! a valid layout, with the position of the offending token).

use std::fmt;

/// A rule a [`crate::Layout`] breaks, from [`crate::Layout::validate`] (impossible layouts) or
/// [`crate::Layout::check_supported`] (valid layouts the code generator does not emit yet, always
/// [`LayoutError::NotYetSupported`]).
///
/// Every variant names the value and the rule; [`LayoutError::field`] says which spec field it is about
/// (`"residual_length"`, `"values.group_size"`, ...), so a parser can point at the place that set it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `keys.bits` or `values.bits` outside 1..=8.
    #[error("{field} {value} is out of range; bits must be in 1..=8")]
    BitsOutOfRange {
        /// `"keys.bits"` or `"values.bits"`.
        field: &'static str,
        /// The offending bit width.
        value: u32,
    },
    /// Symmetric quantization with 1 bit: codes -q..=q need q = 2^(bits-1) - 1 >= 1.
    #[error(
        "{field} is 1, but symmetric quantization needs at least 2 bits (codes -q..=q with q = 2^(bits-1) - 1); \
         use 2 or more bits, or `quant: asymmetric`"
    )]
    SymmetricOneBit {
        /// `"keys.bits"` or `"values.bits"`.
        field: &'static str,
    },
    /// `num_heads` or `num_kv_heads` is 0.
    #[error("{field} is 0; a layout needs at least one head")]
    ZeroHeads {
        /// `"num_heads"` or `"num_kv_heads"`.
        field: &'static str,
    },
    /// `num_heads` is not a multiple of `num_kv_heads` (each KV head serves a whole number of query heads).
    #[error("num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")]
    HeadsNotMultiple {
        /// Query heads.
        num_heads: u32,
        /// Key/value heads.
        num_kv_heads: u32,
    },
    /// A head_dim not a multiple of 16 or outside 16..=256.
    #[error("{field} {value} is invalid; head_dim must be a multiple of 16 in 16..=256")]
    BadHeadDim {
        /// `"keys.head_dim"` or `"values.head_dim"`.
        field: &'static str,
        /// The offending head_dim (channels per head).
        value: u32,
    },
    /// A group size of 0 or one that is not a power of two.
    #[error(
        "{field} {value} is invalid; a group size must be a power of two (1, 2, 4, ..., 2^31)"
    )]
    BadGroupSize {
        /// `"keys.group_size"` or `"values.group_size"`.
        field: &'static str,
        /// The offending group size (elements).
        value: u32,
    },
    /// A per-channel group size (tokens) that does not divide `residual_length` (keys flush R tokens at a time).
    #[error("residual_length {residual_length} is not a multiple of the {tensor} group_size {group_size}")]
    ResidualNotMultipleOfGroup {
        /// `"key"` or `"value"`: which tensor's per-channel group.
        tensor: &'static str,
        /// R, tokens.
        residual_length: u32,
        /// The per-channel group size, tokens.
        group_size: u32,
    },
    /// A per-token group size (head-dim entries) that does not divide that tensor's head_dim.
    #[error(
        "{tensor}.head_dim {head_dim} is not divisible by {tensor}.group_size {group_size}; group sizes that \
         divide it: {}",
        join_u32(.working)
    )]
    HeadDimNotMultipleOfGroup {
        /// `"keys"` or `"values"`.
        tensor: &'static str,
        /// The tensor's head_dim.
        head_dim: u32,
        /// The offending group size.
        group_size: u32,
        /// The group sizes that would work, ascending: the powers of two dividing `head_dim` that are at least
        /// `32 / bits` (the codes of one 32-bit word stay in one group), or every power of two dividing it if
        /// none is that large.
        working: Vec<u32>,
    },
    /// `residual_length` of 0 or more than 4096 tokens.
    #[error("residual_length {value} is out of range; it must be in 1..=4096 tokens")]
    ResidualOutOfRange {
        /// The offending residual length, tokens.
        value: u32,
    },
    /// More than 65536 sink tokens.
    #[error("sink_tokens {value} is out of range; it must be at most 65536")]
    SinkTokensOutOfRange {
        /// The offending number of sink tokens.
        value: u32,
    },
    /// A valid layout the code generator does not emit yet. `what` starts with the field path (e.g.
    /// `"keys.bits 3 (...)"`), which [`LayoutError::field`] returns.
    #[error("not yet supported: {what}")]
    NotYetSupported {
        /// What is unsupported: the field path, its value, and the supported choices.
        what: String,
    },
}

fn join_u32(v: &[u32]) -> String {
    if v.is_empty() {
        return "none".to_string();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

impl LayoutError {
    /// The spec field this error is about, as a path: `"keys.bits"`, `"values.group_size"`, `"residual_length"`,
    /// `"num_kv_heads"`, ...
    pub fn field(&self) -> &str {
        match self {
            LayoutError::BitsOutOfRange { field, .. }
            | LayoutError::SymmetricOneBit { field }
            | LayoutError::ZeroHeads { field }
            | LayoutError::BadHeadDim { field, .. }
            | LayoutError::BadGroupSize { field, .. } => field,
            LayoutError::HeadsNotMultiple { .. } => "num_kv_heads",
            LayoutError::ResidualNotMultipleOfGroup { .. }
            | LayoutError::ResidualOutOfRange { .. } => "residual_length",
            LayoutError::HeadDimNotMultipleOfGroup { tensor, .. } => match *tensor {
                "keys" => "keys.group_size",
                _ => "values.group_size",
            },
            LayoutError::SinkTokensOutOfRange { .. } => "sink_tokens",
            LayoutError::NotYetSupported { what } => {
                what.split([' ', ':', ',']).next().unwrap_or("")
            }
        }
    }

    /// Every spec field the broken rule involves, [`LayoutError::field`] first: e.g. `["residual_length",
    /// "keys.group_size"]` for a key group size that does not divide `residual_length`. A parser points at the
    /// one of these set last.
    pub fn fields(&self) -> Vec<&str> {
        let mut fields = vec![self.field()];
        match self {
            LayoutError::HeadsNotMultiple { .. } => fields.push("num_heads"),
            LayoutError::ResidualNotMultipleOfGroup { tensor, .. } => {
                fields.push(if *tensor == "key" {
                    "keys.group_size"
                } else {
                    "values.group_size"
                })
            }
            LayoutError::HeadDimNotMultipleOfGroup { tensor, .. } => {
                fields.push(if *tensor == "keys" {
                    "keys.head_dim"
                } else {
                    "values.head_dim"
                })
            }
            _ => {}
        }
        fields
    }

    /// Whether this is [`LayoutError::NotYetSupported`] (a valid layout the generator does not emit yet).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, LayoutError::NotYetSupported { .. })
    }
}

/// Why a text spec ([`crate::parse_spec`]) gave no layout: a syntax error, an unknown name, a missing
/// mandatory field, or a [`LayoutError`], at a 1-based line and column of the text.
///
/// `Display` renders `line:col: message`, then the source line and a caret line under the offending span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) width: usize,
    pub(crate) message: String,
    pub(crate) source_line: String,
    pub(crate) layout_error: Option<LayoutError>,
}

impl SpecError {
    /// The same error for a text that had `lines` lines prepended before parsing (e.g. a default preset): the
    /// line number is moved up by that much (not below 1).
    pub fn moved_up(mut self, lines: usize) -> Self {
        self.line = self.line.saturating_sub(lines).max(1);
        self
    }

    /// 1-based line of the offending token.
    pub fn line(&self) -> usize {
        self.line
    }

    /// 1-based column (in characters) of the offending token's first character.
    pub fn column(&self) -> usize {
        self.column
    }

    /// The message alone, without position or source excerpt.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The text of the offending line (without its line break).
    pub fn source_line(&self) -> &str {
        &self.source_line
    }

    /// The [`LayoutError`] behind this error when the spec parsed but the layout broke a rule; `None` for
    /// syntax errors, unknown names and missing fields.
    pub fn layout_error(&self) -> Option<&LayoutError> {
        self.layout_error.as_ref()
    }

    /// Builds the error from a `syn::Error` whose span lies in `text` (a `proc_macro2` fallback span).
    pub(crate) fn from_syn(
        text: &str,
        err: &syn::Error,
        layout_error: Option<LayoutError>,
    ) -> SpecError {
        let span = err.span();
        let (start, end) = (span.start(), span.end());
        let line = start.line.max(1);
        let source_line = text
            .lines()
            .nth(line - 1)
            .unwrap_or("")
            .trim_end_matches('\r')
            .to_string();
        let column = start.column.min(source_line.chars().count());
        let width = if end.line == start.line && end.column > start.column {
            end.column - start.column
        } else {
            1
        };
        SpecError {
            line,
            column: column + 1,
            width,
            message: err.to_string(),
            source_line,
            layout_error,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}:{}: {}", self.line, self.column, self.message)?;
        writeln!(f, "{}", self.source_line)?;
        let pad: String = self
            .source_line
            .chars()
            .take(self.column - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        write!(f, "{pad}{}", "^".repeat(self.width.max(1)))
    }
}

impl std::error::Error for SpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.layout_error.as_ref().map(|e| e as _)
    }
}
