//! Integration tests, as one test binary: the extractor against a fake binary cache
//! (`extract`), the `binplz` command line (`cli`), and the test support itself (`harness`,
//! checking `support`).

mod cli;
mod differential;
mod extract;
mod harness;
mod index;
mod serve;
mod support;
