//! `berth-shim`: see the library's `cli` module for the command line.
#![forbid(unsafe_code)]

fn main() {
    std::process::exit(berth_shim::cli::main(std::env::args_os()));
}
