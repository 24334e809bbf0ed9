//! Criterion benches of kivi live in `benches/benches`.
