//! The error type of this crate.

use thiserror::Error;

/// Everything that can go wrong in the reference: unsupported layouts, wrong input lengths, malformed files.
#[derive(Debug, Error)]
pub enum RefError {
    /// The layout or argument asks for something the reference does not implement (e.g. symmetric
    /// quantization, bf16 activations, 3-bit codes). `what` says which feature.
    #[error("unsupported by kivi-reference: {what}")]
    Unsupported {
        /// The unsupported feature, in words.
        what: String,
    },
    /// An input slice has the wrong number of elements.
    #[error("wrong length for {what}: expected {expected} elements, got {got}")]
    Shape {
        /// Which argument (with its logical shape).
        what: String,
        /// Expected number of elements.
        expected: usize,
        /// Actual number of elements.
        got: usize,
    },
    /// An argument is invalid for another reason (e.g. a token count not a multiple of the group size).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A tensor a reference file must hold is not in it.
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor {
        /// The file.
        file: String,
        /// The tensor's name.
        name: String,
    },
    /// A tensor of a reference file has an unexpected shape.
    #[error("{file}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The file.
        file: String,
        /// The tensor's name.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor of a reference file has an unexpected dtype.
    #[error("{file}: tensor `{name}` has dtype {got}, expected {expected}")]
    TensorDtype {
        /// The file.
        file: String,
        /// The tensor's name.
        name: String,
        /// The expected dtype (safetensors spelling, e.g. `F16`).
        expected: String,
        /// The dtype in the file.
        got: String,
    },
    /// The file's metadata (`configs` JSON) is missing or malformed, or the format is not recognized.
    #[error("{file}: bad metadata: {msg}")]
    Metadata {
        /// The file.
        file: String,
        /// What is wrong.
        msg: String,
    },
    /// Reading a file failed.
    #[error("cannot read {file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{file}: not a valid safetensors file: {source}")]
    SafeTensors {
        /// The file.
        file: String,
        /// The parser's error.
        source: safetensors::SafeTensorError,
    },
}

impl RefError {
    /// Shorthand for [`RefError::Shape`].
    pub(crate) fn shape(what: impl Into<String>, expected: usize, got: usize) -> Self {
        RefError::Shape {
            what: what.into(),
            expected,
            got,
        }
    }

    /// Shorthand for [`RefError::Unsupported`].
    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        RefError::Unsupported { what: what.into() }
    }
}
