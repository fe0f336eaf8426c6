//! Thin entry point: parse, dispatch, turn errors into one clear line.
use berth_agent::config::{expand_config, Cli, Command};
use clap::Parser;

fn main() {
    let argv = match expand_config(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-agent: {e}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let code = match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("berth-agent: {e}");
                1
            }
        },
        Command::Check(args) => berth_agent::check::main(&args),
        Command::Capacity(args) => berth_agent::capacity::main(&args),
    };
    std::process::exit(code);
}

fn run(args: berth_agent::config::RunArgs) -> anyhow::Result<()> {
    berth_agent::log::init(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    Ok(rt.block_on(berth_agent::run::run(args))?)
}
