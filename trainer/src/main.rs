use clap::Parser;

use trainer::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let result = match (cli.command, cli.train) {
        (Some(Command::Eval(args)), _) => trainer::train::run_eval(args),
        (None, Some(args)) => trainer::train::run(args),
        (None, None) => {
            eprintln!("trainer: nothing to do; see trainer --help");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("trainer: error: {e:#}");
        std::process::exit(1);
    }
}
