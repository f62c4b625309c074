//! Integration tests, as one test binary: one module per part of binplz (the extractor, the
//! command line, the server, the substituter, S3, the builder, the flake, …), each opening
//! with what it covers; `support` holds the fakes and real servers they start, and
//! `harness` checks `support` itself.

mod bench;
mod builder;
mod building;
mod cli;
mod differential;
mod disk;
mod edge_builder;
mod extract;
mod flake;
mod harness;
mod index;
mod s3;
mod serve;
mod substituter;
mod support;
