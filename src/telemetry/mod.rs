//! OpenTelemetry for model calls: the W3C trace context a request carries (`context`), the
//! span built from its finished record (`span`), and the bounded exporter behind the ledger
//! (`export`).
//!
//! The request path only reads or starts a trace context (no allocation when `telemetry` is
//! unset); spans are built on the ledger writer's side of its channel and sent by their own
//! thread, so a slow or absent collector touches neither latency nor the hooks.

pub mod context;
pub mod export;
pub mod span;

pub use context::TraceContext;
pub use export::{SpanQueue, SpanSender, SpanStats};
pub use span::SpanSeed;
