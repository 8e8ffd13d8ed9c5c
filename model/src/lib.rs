//! kf-model: everything that knows about language models — the data pipeline
//! and tokenizer now; the DDiT teacher, the PFLM student, training,
//! distillation and generation as their issues land.

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod ddit;
pub mod distill;
pub mod distill_chain;
pub mod eval;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod pflm;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::DditConfig;
pub use ddit::Ddit;
pub use kv_cache::KvCache;
