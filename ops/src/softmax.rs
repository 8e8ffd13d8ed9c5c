//! (not yet written: owned by a helper)
