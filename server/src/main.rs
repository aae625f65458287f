use clap::Parser;
use server::config::{Cli, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.print_openapi {
        println!("{}", server::http::openapi::spec_json());
        return Ok(());
    }
    server::app::init_tracing();
    let settings = match Settings::from_cli(cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    server::app::run_until_signal(settings).await
}
