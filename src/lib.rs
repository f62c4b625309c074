//! binplz
pub mod cache;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod error;
pub mod extract;
pub mod hash;
pub mod index;
pub mod nar;
pub mod narinfo;
pub mod pipeline;
pub mod resolve;
pub mod server;
pub mod upstream;
pub mod verdict;
