//! The span exporter: a bounded queue in front of one thread that sends batches to the
//! collector over OTLP/HTTP (protobuf) with the maintained `opentelemetry-otlp` exporter.
//!
//! The ledger writer offers each span with `try_send`: a full queue drops the span and
//! counts it, so a slow or unreachable collector never holds up the writer, let alone a
//! request. The exporter thread takes whatever is queued (up to `MAX_BATCH`) per export.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;

use crate::config::Telemetry;

/// Spans per export request at most.
const MAX_BATCH: usize = 512;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SpanStats {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl SpanStats {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans dropped because the export queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans lost in exports that failed (collector down, refused, timed out).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

enum Msg {
    Span(Box<SpanData>),
    /// Answer once everything queued before has been sent (or failed).
    Flush(SyncSender<()>),
}

/// The queue and its exporter thread (started once, after Pingora daemonizes).
pub struct SpanQueue {
    tx: SyncSender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    stats: Arc<SpanStats>,
    traces_url: String,
    service_name: String,
    timeout: Duration,
}

/// The ledger writer's end of the queue.
#[derive(Clone)]
pub struct SpanSender {
    tx: SyncSender<Msg>,
    stats: Arc<SpanStats>,
}

impl SpanSender {
    /// Queues one span; never blocks. A full queue drops it (counted).
    pub fn offer(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl SpanQueue {
    /// The queue for `telemetry`, or `None` when it names no collector.
    pub fn new(telemetry: &Telemetry) -> Option<SpanQueue> {
        let traces_url = telemetry.traces_url.clone()?;
        let (tx, rx) = mpsc::sync_channel(telemetry.max_queue_spans);
        Some(SpanQueue {
            tx,
            rx: Mutex::new(Some(rx)),
            stats: Arc::default(),
            traces_url,
            service_name: telemetry.service_name.clone(),
            timeout: telemetry.export_timeout,
        })
    }

    pub fn sender(&self) -> SpanSender {
        SpanSender {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }

    pub fn stats(&self) -> &SpanStats {
        &self.stats
    }

    /// Spawns the exporter thread (once).
    pub fn start(&self) -> std::io::Result<()> {
        let Some(rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let url = self.traces_url.clone();
        let service = self.service_name.clone();
        let timeout = self.timeout;
        let stats = self.stats.clone();
        std::thread::Builder::new()
            .name("spidergate-otlp".into())
            .spawn(move || run(rx, &url, &service, timeout, &stats))?;
        Ok(())
    }

    /// Waits (at most `wait`) until every span queued so far was sent or failed: at shutdown,
    /// after the ledger's last commit. False if the exporter did not answer in time.
    pub fn flush(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let mut msg = Msg::Flush(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

fn build_exporter(
    url: &str,
    service: &str,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service.to_string())
            .build(),
    );
    Ok(exporter)
}

fn run(rx: Receiver<Msg>, url: &str, service: &str, timeout: Duration, stats: &SpanStats) {
    let exporter = match build_exporter(url, service, timeout) {
        Ok(e) => Some(e),
        Err(e) => {
            log::error!(
                "telemetry: cannot build the OTLP exporter for {url}; spans are dropped: {e}"
            );
            None
        }
    };
    let mut failing = false;
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Span(s) => batch.push(*s),
                Msg::Flush(done) => waiters.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
                };
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let result = match &exporter {
                Some(e) => futures_executor::block_on(e.export(batch)).map_err(|e| e.to_string()),
                None => Err("no exporter".into()),
            };
            match result {
                Ok(()) => {
                    stats.exported.fetch_add(n, Ordering::Relaxed);
                    if std::mem::replace(&mut failing, false) {
                        log::warn!("telemetry: the collector at {url} accepts spans again");
                    }
                }
                Err(e) => {
                    stats.failed.fetch_add(n, Ordering::Relaxed);
                    if !std::mem::replace(&mut failing, true) {
                        log::warn!("telemetry: exporting spans to {url} failed ({n} lost): {e}");
                    }
                }
            }
        }
        for w in waiters {
            let _ = w.try_send(());
        }
    }
    if let Some(e) = exporter {
        let _ = e.shutdown();
    }
}
