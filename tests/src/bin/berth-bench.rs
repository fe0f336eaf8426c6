//! berth-bench: the benchmark suite of berth (issue 8). See docs/benchmarks.md
//! and `berth-bench --help`. The modules live in the tests crate's `bench`.

fn main() {
    std::process::exit(berth_tests::bench::main());
}
