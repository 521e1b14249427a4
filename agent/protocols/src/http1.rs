//! HTTP/1.x parser (placeholder; being written).
