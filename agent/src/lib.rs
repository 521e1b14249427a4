//! Waybill: zero-code distributed tracing for Linux.
//!
//! Follow one event through the folders in this order: `loader` (feature probes, attach) →
//! `events` (ring buffer, record decoding) → `conn` (connection table, reassembly, protocol
//! detection) → `agent/protocols` (the `waybill-protocols` crate: pure parsers) → `stitch` (pairing, span building) → `export`
//! (OTLP, terminal view, metrics). `process` selects targets and describes them as resources.

pub mod clock;
pub mod config;
pub mod conn;
pub mod events;
pub mod export;
pub mod ids;
pub mod loader;
pub mod metrics;
pub mod process;
pub mod sched;
pub mod stitch;
