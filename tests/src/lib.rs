//! Test harness for Waybill root integration tests.
pub mod otlp_receiver;
