//! Integration tests, as one test binary: the extractor against a fake binary cache
//! (`extract`), the `binplz` command line (`cli`), the server with a disk cache that cannot
//! write (`disk`), and the test support itself (`harness`, checking `support`).

mod builder;
mod building;
mod cli;
mod differential;
mod disk;
mod edge_builder;
mod extract;
mod harness;
mod index;
mod serve;
mod support;
