//! berth-bench: the benchmark suite of berth (issue 8). See docs/benchmarks.md
//! and `berth-bench --help`. The modules live in `tests/src/bench/`.

#[path = "../bench/mod.rs"]
mod bench;

fn main() {
    std::process::exit(bench::main());
}
