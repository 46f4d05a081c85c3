//! Baseline for the benchmarks: a bare Pingora pass-through proxy on the same Pingora crates
//! as the gateway. Its only hook is `upstream_peer`, which returns one fixed peer: plain
//! HTTP, or TLS verified against a CA file exactly as the gateway verifies a provider with
//! `tls_ca_file` (`--tls-sni`, `--ca-file`).
//!
//! ```sh
//! cargo run --release --example bare_proxy -- --listen 127.0.0.1:7001 \
//!     --upstream 127.0.0.1:9000 --threads 1 [--tls-sni localhost --ca-file ca.pem] \
//!     [--listen-tls-cert cert.pem --listen-tls-key key.pem]
//! ```

use async_trait::async_trait;
use clap::Parser;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::Result;
use pingora_proxy::{ProxyHttp, Session};
use spidergate::egress::CaBundle;

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
    /// Reach the upstream over TLS, checking its certificate for this name.
    #[arg(long, requires = "ca_file")]
    tls_sni: Option<String>,
    /// The CA (PEM) the upstream's certificate must chain to.
    #[arg(long, requires = "tls_sni")]
    ca_file: Option<std::path::PathBuf>,
    /// Terminate TLS on the listener with this certificate chain (PEM); HTTP/2 by ALPN.
    #[arg(long, requires = "listen_tls_key")]
    listen_tls_cert: Option<String>,
    /// The private key (PEM) of --listen-tls-cert.
    #[arg(long, requires = "listen_tls_cert")]
    listen_tls_key: Option<String>,
}

struct Bare {
    upstream: String,
    tls: Option<(String, CaBundle)>,
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
        let Some((sni, ca)) = &self.tls else {
            return Ok(Box::new(HttpPeer::new(
                self.upstream.as_str(),
                false,
                String::new(),
            )));
        };
        let mut peer = HttpPeer::new(self.upstream.as_str(), true, sni.clone());
        peer.options.ca = Some(ca.certs.clone());
        Ok(Box::new(peer))
    }
}

fn main() {
    // Same memory policy as the gateway (no transparent huge pages), so the benchmarks
    // compare proxy work, not page sizes.
    spidergate::memory::no_huge_pages();
    // Same crypto provider set-up as the gateway (the fork's rustls has none by default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let tls = match (args.tls_sni, args.ca_file) {
        (Some(sni), Some(ca)) => match CaBundle::load(&ca) {
            Ok(bundle) => Some((sni, bundle)),
            Err(e) => {
                eprintln!("bare_proxy: --ca-file: {e}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
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
            tls,
        },
        "bare_proxy",
    );
    match (&args.listen_tls_cert, &args.listen_tls_key) {
        (Some(cert), Some(key)) => {
            let mut settings =
                match pingora_core::listeners::tls::TlsSettings::intermediate(cert, key) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("bare_proxy: --listen-tls-cert/--listen-tls-key: {e}");
                        std::process::exit(2);
                    }
                };
            settings.enable_h2();
            proxy.add_tls_with_settings(&args.listen, None, settings);
        }
        _ => proxy.add_tcp(&args.listen),
    }
    server.add_service(proxy);
    server.run_forever();
}
