//! kivi-dsl: the layout language of kivi.
//!
//! One grammar, parsed with `syn`, serves the `kivi_layout!` proc-macro (crate `kivi-dsl-macros`) and text
//! specs read at run time (`.kivi` files, command-line strings). See the README's "Spec format".

mod layout;

pub use layout::*;
