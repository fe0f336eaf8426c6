//! `berth-agent check`: placeholder until the preflight lands.
#![forbid(unsafe_code)]

pub fn main(_args: &crate::config::CheckArgs) -> i32 {
    eprintln!("check: not yet implemented");
    2
}
