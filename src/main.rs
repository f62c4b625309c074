//! The `binplz` command: everything lives in the library; see `binplz::cli`.

fn main() -> std::process::ExitCode {
    binplz::cli::main()
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
