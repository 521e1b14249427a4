//! Test harness for Waybill root integration tests: guards for the agent, real servers and a real
//! OTLP receiver.
pub mod harness;
pub mod otlp_receiver;
