//! The library behind the `kivi` command: spec resolution and the GPU/CPU verification harness (also used by
//! the GPU tests).

pub mod bench;
pub mod eval;
pub mod spec;
pub mod tune;
pub mod verify;
