//! Baseline for the benchmarks: a bare Pingora pass-through proxy on the same Pingora crates
//! as the gateway. Its only hook is `upstream_peer`, which returns one fixed plain-HTTP peer.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- --listen 127.0.0.1:7001 \
//!     --upstream 127.0.0.1:9000 --threads 1
//! ```

use async_trait::async_trait;
use clap::Parser;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};

/// Same allocator as the gateway, so the benchmark compares proxy work, not allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Bare Pingora pass-through proxy (benchmark baseline)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: String,
    /// Upstream `IP:port` every request is forwarded to (plain HTTP).
    #[arg(long)]
    upstream: String,
    /// Pingora worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    // Same crypto provider set-up as the gateway (the fork's rustls has none by default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        // Same shutdown settings as the gateway (Pingora's default SIGTERM grace is minutes).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
        "bare_proxy",
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
