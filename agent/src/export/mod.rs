//! Exporters: where finished [`SpanRecord`](crate::stitch::span::SpanRecord)s go.
//!
//! - [`otlp`]: the OTLP export task (batching, backlog, retries); [`encode`] turns a batch into
//!   one OTLP protobuf request (each traced process under its own resource), [`transport`] sends
//!   it over gRPC or HTTP/protobuf; [`coalesce`] is the gRPC channel's TCP stream (one write per
//!   turn of the HTTP/2 connection, not one per frame).
//! - [`terminal`]: a waterfall per trace, printed when the trace has settled.
//!
//! Both are fed batches of spans through a bounded `tokio::sync::mpsc` channel; the pipeline uses
//! `try_send`, so an exporter never blocks span building.

pub mod coalesce;
pub mod encode;
pub mod otlp;
pub mod red;
pub mod terminal;
pub mod transport;

pub use otlp::{Compression, ExportError, ExportStats, OtlpConfig, Protocol, spawn_otlp};
pub use terminal::{render_trace, spawn_terminal};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::stitch::span::SpanRecord;

/// The queue between the pipeline and an exporter: batches of spans, bounded in spans (not in
/// batches), never blocking the sender.
pub fn span_queue(cap: usize) -> (SpanSender, SpanReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (SpanSender { tx, queued: Arc::clone(&queued), cap: cap.max(1) }, SpanReceiver { rx, queued })
}

/// The pipeline's end of [`span_queue`].
#[derive(Clone, Debug)]
pub struct SpanSender {
    tx: mpsc::UnboundedSender<Vec<SpanRecord>>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

impl SpanSender {
    /// A quarter of the queue's room is taken: the exporter is falling behind. Early on purpose:
    /// a yielding agent can be starved between two drains, and one drain can then add thousands
    /// of spans (measured under `pgbench -S`: at half full, the next drain overflowed it).
    pub fn filling(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= self.cap / 4
    }

    /// Queues as many of `spans` (oldest first) as fit; returns how many did not (dropped). All
    /// are dropped when the receiver is gone.
    pub fn try_send(&self, mut spans: Vec<SpanRecord>) -> usize {
        let n = spans.len();
        if n == 0 {
            return 0;
        }
        let room = self.cap.saturating_sub(self.queued.load(Ordering::Relaxed));
        let dropped = n.saturating_sub(room);
        spans.truncate(n - dropped);
        if spans.is_empty() {
            return dropped;
        }
        let kept = spans.len();
        self.queued.fetch_add(kept, Ordering::Relaxed);
        if self.tx.send(spans).is_err() {
            self.queued.fetch_sub(kept, Ordering::Relaxed);
            return n;
        }
        dropped
    }
}

/// The exporter's end of [`span_queue`].
#[derive(Debug)]
pub struct SpanReceiver {
    rx: mpsc::UnboundedReceiver<Vec<SpanRecord>>,
    queued: Arc<AtomicUsize>,
}

impl SpanReceiver {
    /// The next batch; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Vec<SpanRecord>> {
        let b = self.rx.recv().await?;
        self.queued.fetch_sub(b.len(), Ordering::Relaxed);
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stitch::span::ProcessResource;

    fn span() -> SpanRecord {
        SpanRecord::for_test(1, &ProcessResource::for_test(1, "a"))
    }

    #[tokio::test]
    async fn bounded_in_spans() {
        let (tx, mut rx) = span_queue(5);
        assert_eq!(tx.try_send(vec![span(), span(), span()]), 0);
        assert_eq!(tx.try_send(vec![span(), span(), span()]), 1);
        assert_eq!(tx.try_send(vec![span()]), 1);
        assert_eq!(rx.recv().await.unwrap().len(), 3);
        assert_eq!(tx.try_send(vec![span(), span(), span(), span()]), 1);
        assert_eq!(rx.recv().await.unwrap().len(), 2);
        assert_eq!(rx.recv().await.unwrap().len(), 3);
        drop(tx);
        assert!(rx.recv().await.is_none());
    }
}
