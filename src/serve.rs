//! `spidergate serve`: builds the Pingora server, its proxy service and the maintenance
//! service (hot reload of keys, the ledger writer), runs it, and flushes the ledger on exit.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch, UnixShutdownSignalWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};

use crate::admin::AdminApp;
use crate::catalog::MAX_CHAIN;
use crate::config::Config;
use crate::edge::EdgeApp;
use crate::gate::Gate;
use crate::proxy::GateProxy;

/// Polls the store's `keys_version` and swaps in a new key snapshot when it changes, so keys
/// created, updated or revoked by any door take effect within one poll interval.
struct Maintenance {
    gate: Arc<Gate>,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Started here, after Pingora may have daemonized (a fork keeps no threads).
        if let Err(e) = self.gate.ledger.start() {
            // Serving on without durable spend would break every hard budget: stop, so the
            // supervisor (systemd) restarts us or an operator looks.
            log::error!("cannot start the ledger writer, exiting: {e}");
            std::process::exit(1);
        }
        // Off the request path: its own thread, reading the outbox the ledger writes.
        let location = self.gate.routes().config.store_location();
        if let Err(e) = self.gate.alerts.start(location, self.gate.ledger.alerts()) {
            log::error!("cannot start the alert delivery worker; alerts stay in the outbox: {e}");
        }
        if let Some(shared) = self.gate.limits.shared() {
            tokio::spawn(shared.clone().run(shutdown.clone()));
        }
        // Started with `--upgrade`: takes the old process's state once it handed over.
        tokio::spawn(crate::handover::adopt_when_handed_over(self.gate.clone()));
        tokio::spawn(follow_provider_dns(self.gate.clone(), shutdown.clone()));
        let mut store = None;
        // The key-change position last recorded for CLI changes to wait on (`key_sync`;
        // the first at start-up, by `Gate::new`).
        let mut noted: Option<i64> = Some(self.gate.loaded_change());
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP; config reload is off: {e}");
                None
            }
        };
        loop {
            let interval = self.gate.routes().config.tuning.reload_interval;
            tokio::select! {
                _ = shutdown.changed() => {
                    // Stopping: a CLI change no longer waits for this process.
                    let gate = self.gate.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        let mut s = store.map_or_else(|| gate.open_store(), Ok)?;
                        s.forget_keys_applied(crate::owner::own())
                    })
                    .await;
                    return;
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload_config().await;
                    continue;
                }
                _ = tokio::time::sleep(interval) => {}
            }
            let gate = self.gate.clone();
            let s = store.take();
            // SQLite calls stay off the async threads.
            let joined = tokio::task::spawn_blocking(move || {
                let mut s = match s {
                    Some(s) => s,
                    None => match gate.open_store() {
                        Ok(s) => s,
                        Err(e) => {
                            log::warn!("key reload: cannot open the store: {e}");
                            return None;
                        }
                    },
                };
                let mut noted = noted;
                match gate.reload_if_changed(&s) {
                    Ok(0) => {}
                    Ok(n) => {
                        log::info!("keys: {n} changes applied, {} keys live", gate.keys().len())
                    }
                    Err(e) => log::warn!("key reload failed, keeping the last snapshot: {e}"),
                }
                // A CLI change waits until every running gateway has it (SPEC §1: revocation
                // is immediate): this one says how far it is, when that moved.
                let applied = gate.loaded_change();
                if noted != Some(applied) {
                    match s.note_keys_applied(crate::owner::own(), applied) {
                        Ok(()) => noted = Some(applied),
                        Err(e) => log::warn!("key reload: cannot record the position: {e}"),
                    }
                }
                // After an upgrade: what the old process settled since the last round.
                if let Err(e) = crate::handover::follow(&gate, &mut s) {
                    log::warn!("upgrade: reading the old process's settlements failed: {e}");
                }
                // Keep the change log short; a gateway that falls this far behind (or
                // starts later) reloads in full.
                if prune_due() {
                    if let Err(e) = s.prune_key_changes(KEY_CHANGES_KEPT) {
                        log::warn!("key change log prune failed: {e}");
                    }
                }
                Some((s, noted))
            })
            .await;
            (store, noted) = match joined {
                Ok(Some((s, n))) => (Some(s), n),
                _ => (None, noted),
            };
        }
    }
}

/// Change-log entries kept for gateways that poll (minutes of changes at any realistic rate).
const KEY_CHANGES_KEPT: i64 = 100_000;

/// About one poll in a thousand prunes the change log.
fn prune_due() -> bool {
    static TICKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    TICKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1_000 == 999
}

/// Resolves every provider's host again each `server.dns_refresh_ms` and swaps changed
/// addresses into the live routes; a failed lookup keeps the old ones. Requests never wait
/// for it.
async fn follow_provider_dns(gate: Arc<Gate>, mut shutdown: ShutdownWatch) {
    loop {
        let every = gate.routes().config.tuning.dns_refresh;
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let gate = gate.clone();
        // getaddrinfo blocks: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            let routes = gate.routes();
            for (p, link) in routes.provider_links.iter().enumerate() {
                let name = &routes.provider_names[p];
                match link.addrs.refresh() {
                    Ok(None) => {}
                    Ok(Some(change)) => {
                        gate.metrics.dns_refresh(true);
                        log::info!(
                            "provider {name}: {} now resolves to {:?} (was {:?})",
                            link.addrs.host(),
                            change.after,
                            change.before
                        );
                    }
                    Err(e) => {
                        gate.metrics.dns_refresh(false);
                        log::warn!(
                            "provider {name}: cannot resolve {} again, keeping {:?}: {e}",
                            link.addrs.host(),
                            link.addrs.current()
                        );
                    }
                }
            }
        })
        .await;
    }
}

impl Maintenance {
    /// SIGHUP: re-read and validate the config file, swap it in, or keep the running one.
    async fn reload_config(&self) {
        let gate = self.gate.clone();
        let result = tokio::task::spawn_blocking(move || gate.reload_config()).await;
        match result {
            Ok(Ok(())) => {
                self.gate.metrics.config_reload(true);
                log::info!("SIGHUP: configuration reloaded");
            }
            Ok(Err(e)) => {
                self.gate.metrics.config_reload(false);
                log::error!("SIGHUP: configuration rejected, the running one stays: {e}");
            }
            Err(e) => {
                self.gate.metrics.config_reload(false);
                log::error!("SIGHUP: configuration reload failed: {e}");
            }
        }
    }
}

/// SIGTERM drains before Pingora stops: Pingora's runtime shutdown cancels unfinished
/// requests, so the signal is handed on only once in-flight requests are done (or the
/// grace passes), as a fast shutdown: what is still open is cut, and each cut request is
/// charged when its context drops. Meanwhile new requests get 503 `shutting_down`.
///
/// SIGQUIT (a `serve --upgrade` process is waiting for the sockets) starts handing the
/// counters over (`handover`: once the new process listens, this one stops admitting and
/// relays to it, journals what it has open and commits) and is handed on at once, so the
/// sockets move without delay; Pingora then keeps this process serving what it has in
/// flight for its grace period (the same `shutdown_grace_s`) before it stops.
struct DrainOnTerm {
    gate: Arc<Gate>,
    timeout: std::time::Duration,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
        if matches!(signal, ShutdownSignal::GracefulTerminate) {
            self.gate
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let deadline = tokio::time::Instant::now() + self.timeout;
            log::info!(
                "SIGTERM: draining {} in-flight requests",
                self.gate.inflight()
            );
            // A cluster node also waits for its settlements to reach Redis: a hold left
            // there would be charged at its estimate once it expires.
            let settling = || self.gate.limits.shared().map_or(0, |s| s.settling());
            while (self.gate.inflight() > 0 || settling() > 0)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if self.gate.inflight() > 0 {
                log::warn!(
                    "SIGTERM: {} requests still open after the grace; cutting and charging them",
                    self.gate.inflight()
                );
            }
            // Drained already: skip Pingora's own grace period.
            return ShutdownSignal::FastShutdown;
        }
        if matches!(signal, ShutdownSignal::GracefulUpgrade) {
            self.gate
                .handing_over
                .store(true, std::sync::atomic::Ordering::Relaxed);
            // A cluster shares its limits through Redis and its ledger through PostgreSQL.
            if self.gate.node.is_none() {
                crate::handover::hand_over(&self.gate);
            }
            log::info!(
                "SIGQUIT: handing the sockets over; finishing {} in-flight requests",
                self.gate.inflight()
            );
        }
        signal
    }
}

/// Creates the directory of `server.upgrade_sock` (the default, `data/...`, is relative to
/// the working directory). A process started with `--upgrade` binds that socket to receive
/// the old one's listeners, and Pingora panics where the directory is missing; so there it
/// is an error, elsewhere a warning (a gateway that is never upgraded does not need it).
fn ensure_upgrade_dir(upgrade_sock: &str, upgrading: bool) -> Result<(), String> {
    let Some(dir) = std::path::Path::new(upgrade_sock)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    else {
        return Ok(());
    };
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if upgrading => Err(format!(
            "server.upgrade_sock: cannot create {}: {e}",
            dir.display()
        )),
        Err(e) => {
            log::warn!(
                "server.upgrade_sock: cannot create {} ({e}); `serve --upgrade` will need it",
                dir.display()
            );
            Ok(())
        }
    }
}

/// Runs the gateway until SIGTERM/SIGINT; returns once every recorded request is committed.
pub fn run(mut config: Config, opt: Opt) -> Result<(), String> {
    config.load_provider_keys();
    crate::providers::mask::know_provider_keys_of(&config);
    // The fork's rustls has no crypto provider enabled by default; Pingora needs one for TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listen = config.listen.clone();
    let tuning = config.tuning.clone();
    let gate = Arc::new(Gate::new(config)?);

    let conf = ServerConf {
        threads: tuning.threads,
        // Fallbacks are retries in Pingora's terms: allow one per model plus stale connections.
        max_retries: MAX_CHAIN + 2,
        // SIGTERM drains in `DrainOnTerm` and then shuts down fast; this grace applies to an
        // upgrade (SIGQUIT), after the sockets were handed over.
        grace_period_seconds: Some(tuning.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: tuning.upgrade_sock.clone(),
        // Pingora's timeouts of a second or more (upstream reads, the pooled connections' idle
        // wait, the kept-alive wait for the next head) leave the fork's "fast" timers: those
        // cost more per request here (a lock and a BTreeMap per registration, ~2.3k
        // instructions a request more by `benches/instr.py`) and start a clock thread that
        // wakes every 10 ms on the proxy's core. They go to the coarse timer below.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    // Those timeouts are armed about 3.3 times a request and nearly always cancelled within
    // microseconds: on the coarse timer (vendor/README.md) that costs a slot in a table, ~240
    // instructions each, against ~550 on Tokio's timer wheel. They fire up to ~100 ms late.
    pingora_timeout::fast_timeout::set_coarse_timer(true);
    // Every later head of a kept-alive connection whole within the keep-alive wait (the
    // proxy sets it to `header_timeout_ms`), not only each of its bytes: the first head's
    // deadline is the listener's stream's (`edge`), later ones are the session's.
    pingora_core::protocols::http::v1::server::WHOLE_HEAD_WITHIN_TIMEOUT
        .store(true, std::sync::atomic::Ordering::Relaxed);
    ensure_upgrade_dir(&tuning.upgrade_sock, opt.upgrade)?;
    // Started with `--upgrade` on one node: a relay socket for what the old process receives
    // once it handed over, announced before the old one is told to (see `handover`).
    let relay = (opt.upgrade && gate.node.is_none())
        .then(|| crate::handover::relay_path_for(&tuning.upgrade_sock, std::process::id()));
    if let Some(path) = &relay {
        if let Err(e) = gate.handover.announce_relay(path.clone()) {
            log::error!("cannot announce the relay socket {}: {e}", path.display());
        }
    }
    let upgrading = opt.upgrade;
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    if upgrading && relay.is_some() {
        // The old process sent its sockets; it stops deciding once this one listens, and
        // until then this one decides nothing (see `handover`).
        gate.handover.expect_predecessor();
    }
    // The proxy behind the edge: connection cap and first-head deadline (`edge.rs`).
    let proxy = pingora_proxy::http_proxy(&server.configuration, GateProxy::new(gate.clone()));
    let mut proxy = pingora_core::services::listening::Service::new(
        "spidergate".to_string(),
        EdgeApp::new(proxy, gate.clone()),
    );
    for warning in crate::listen_tls::plain_http_warnings(&gate.routes().config) {
        log::warn!("{warning}");
    }
    match &gate.listener_certs.agent {
        Some(cert) => proxy.add_tls_with_settings(&listen, None, cert.settings()?),
        None => proxy.add_tcp(&listen),
    }
    if let Some(path) = gate.handover.relay_path() {
        // Only this user (the old process) may reach it.
        use std::os::unix::fs::PermissionsExt;
        let owner_only = std::fs::Permissions::from_mode(0o600);
        proxy.add_uds(&path.to_string_lossy(), Some(owner_only));
    }
    server.add_service(proxy);
    if let Some(admin) = &gate.routes().config.admin {
        let mut service = pingora_core::services::listening::Service::new(
            "spidergate admin".to_string(),
            crate::edge::HeadDeadlineApp::new(
                AdminApp::new(gate.clone(), &admin.token_env),
                gate.clone(),
            ),
        );
        let scheme = match &gate.listener_certs.admin {
            Some(cert) => {
                service.add_tls_with_settings(&admin.listen, None, cert.settings()?);
                "https"
            }
            None => {
                service.add_tcp(&admin.listen);
                "http"
            }
        };
        server.add_service(service);
        log::info!("admin API listening on {scheme}://{}", admin.listen);
    }
    server.add_service(background_service(
        "spidergate maintenance",
        Maintenance { gate: gate.clone() },
    ));
    let scheme = if gate.listener_certs.agent.is_some() {
        "https (HTTP/2 and HTTP/1.1)"
    } else {
        "http"
    };
    log::info!("spidergate listening on {listen} ({scheme})");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnTerm {
            gate: gate.clone(),
            timeout: tuning.shutdown_grace,
        }),
    });
    // After the grace, Pingora stops its runtimes without waiting for them (a zero timeout
    // on the fast shutdown): their worker threads drop the requests that were cut a moment
    // later, and each drop records that request's charge. Wait for those (bounded) before
    // the last commit, or a cut stream's charge could miss it (tests/hostile.rs SIGTERM).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gate.inflight() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if gate.inflight() > 0 {
        log::error!(
            "{} cut requests were still not recorded 5 s after the runtimes stopped",
            gate.inflight()
        );
    }
    if let Some(path) = gate.handover.relay_path() {
        let _ = std::fs::remove_file(path);
    }
    if gate.node.is_none() {
        crate::handover::finish(&gate);
        crate::handover::save_minutes_at_exit(&gate);
    }
    // Pending deliveries stay in the outbox for the next start (or another node).
    gate.alerts.stop();
    if !gate.ledger.close() {
        return Err("the ledger could not commit every entry before exit".into());
    }
    log::info!("spidergate stopped; ledger flushed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ensure_upgrade_dir;

    #[test]
    fn the_upgrade_socket_directory_is_made_and_a_blocked_one_fails_only_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("data/nested/spidergate-upgrade.sock");
        ensure_upgrade_dir(sock.to_str().unwrap(), true).unwrap();
        assert!(sock.parent().unwrap().is_dir());
        // A file where the directory should be: an upgrade cannot bind there.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        let sock = blocked.join("spidergate-upgrade.sock");
        let err = ensure_upgrade_dir(sock.to_str().unwrap(), true).unwrap_err();
        assert!(
            err.starts_with("server.upgrade_sock: cannot create"),
            "{err}"
        );
        ensure_upgrade_dir(sock.to_str().unwrap(), false).unwrap();
        // A bare file name: the working directory, nothing to make.
        ensure_upgrade_dir("upgrade.sock", true).unwrap();
    }
}
