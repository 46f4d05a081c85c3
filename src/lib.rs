//! SpiderGate: an OpenAI-compatible LLM gateway for fleets of AI agents, on Pingora.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod admission;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod edge;
pub mod egress;
pub mod error;
pub mod gate;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod manage;
pub mod metrics;
pub mod money;
pub mod providers;
pub mod proxy;
pub mod report;
pub mod serve;
pub mod shared;
pub mod shield;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod usage;
