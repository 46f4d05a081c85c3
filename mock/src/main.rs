//! The `spidergate-mock` binary: the mock provider on a TCP address, for the quickstart and benchmarks.

use clap::Parser;

/// A fast mock LLM provider: OpenAI chat completions, Responses and embeddings, Anthropic
/// Messages, steered per request by `x-mock-*` headers. Request recording is off.
#[derive(Parser)]
#[command(name = "spidergate-mock", version)]
struct Cli {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match spidergate_mock::run_blocking_with_threads(&cli.listen, cli.threads) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spidergate-mock: {}: {e}", cli.listen);
            std::process::ExitCode::FAILURE
        }
    }
}
