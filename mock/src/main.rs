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
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => match spidergate_mock::TlsIdentity::from_files(cert, key) {
            Ok(identity) => Some(identity),
            Err(e) => {
                eprintln!("spidergate-mock: --tls-cert/--tls-key: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    match spidergate_mock::run_blocking_with_threads(&cli.listen, cli.threads, tls) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spidergate-mock: {}: {e}", cli.listen);
            std::process::ExitCode::FAILURE
        }
    }
}
