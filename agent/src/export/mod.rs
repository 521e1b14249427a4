//! Exporters: where finished [`SpanRecord`](crate::stitch::span::SpanRecord)s go.
//!
//! - [`otlp`]: one task owning one OpenTelemetry OTLP exporter (gRPC or HTTP/protobuf), batching
//!   spans and exporting each traced process under its own resource.
//! - [`terminal`]: a waterfall per trace, printed when the trace has settled.
//!
//! Both are fed through a bounded `tokio::sync::mpsc` channel; the stitcher uses `try_send`, so an
//! exporter never blocks span building.

pub mod otlp;
pub mod red;
pub mod terminal;

pub use otlp::{Compression, ExportError, ExportStats, OtlpConfig, Protocol, spawn_otlp};
pub use terminal::{render_trace, spawn_terminal};
