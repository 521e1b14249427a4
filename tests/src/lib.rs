//! Test harness for Waybill root integration tests.
