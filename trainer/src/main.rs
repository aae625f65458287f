use trainer::cli::Command;

fn main() {
    trainer::alloc::keep_freed_memory();
    let result = match Command::parse() {
        Command::Train(args) => trainer::train::run(args),
        Command::Eval(args) => trainer::train::run_eval(args),
    };
    if let Err(e) = result {
        eprintln!("trainer: error: {e:#}");
        std::process::exit(1);
    }
}
