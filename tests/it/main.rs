//! Integration tests, as one test binary: the extractor against a fake binary cache
//! (`extract`), the `binplz` command line (`cli`), the server with a disk cache that cannot
//! write (`disk`), the operator's cache on a real S3 server (`s3`), and the test support
//! itself (`harness`, checking `support`).

mod cli;
mod differential;
mod disk;
mod extract;
mod harness;
mod index;
mod s3;
mod serve;
mod support;
