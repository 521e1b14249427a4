//! Sending encoded OTLP trace requests: gRPC (`TraceService/Export` over tonic) or HTTP/protobuf
//! (`POST /v1/traces` over reqwest). Both take a body encoded once by [`super::encode`], so a retry
//! sends the same bytes again without re-encoding.
//!
//! Failures are classified as the OTLP specification says: retryable are an unreachable
//! collector, a timeout, gRPC `CANCELLED`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`,
//! `OUT_OF_RANGE`, `UNAVAILABLE`, `DATA_LOSS`, and HTTP 429, 502, 503, 504; everything else is a
//! permanent rejection. A success may still report rejected spans (`partial_success`).

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;

use super::otlp::{
    Compression, ExportError, OTEL_EXPORTER_OTLP_CERTIFICATE, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE,
    OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TRACES_HEADERS, Protocol, Transport,
};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    /// The same request may succeed later.
    pub retryable: bool,
    pub message: String,
}

/// What the collector said about an accepted request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Spans the collector rejected although the request succeeded (`partial_success`).
    pub rejected: u64,
    pub message: String,
}

pub type SendFuture = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + Send>>;

/// Sends one encoded `ExportTraceServiceRequest`.
pub trait Sender: Send + Sync + 'static {
    fn send(&self, body: Bytes) -> SendFuture;
}

/// The `partial_success` of a response body (empty body: all accepted).
fn accepted(body: &[u8]) -> Accepted {
    match ExportTraceServiceResponse::decode(body) {
        Ok(r) => r
            .partial_success
            .map(|p| Accepted { rejected: p.rejected_spans.max(0) as u64, message: p.error_message })
            .unwrap_or_default(),
        Err(_) => Accepted::default(),
    }
}

/// `k=v,k2=v2` with percent-encoded values (`OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`); the
/// signal's variable wins per key.
pub fn headers_from(get: &dyn Fn(&str) -> Option<String>) -> Result<HeaderMap, ExportError> {
    let mut map = HeaderMap::new();
    for var in [OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TRACES_HEADERS] {
        let Some(v) = get(var) else { continue };
        for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad =
                |what: &str| ExportError::Config { var, message: format!("{what} in '{pair}' (expected key=value)") };
            let (k, v) = pair.split_once('=').ok_or_else(|| bad("no '='"))?;
            let name = HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes()).map_err(|_| bad("bad key"))?;
            let value = HeaderValue::from_bytes(&percent_decode(v.trim())).map_err(|_| bad("bad value"))?;
            map.insert(name, value);
        }
    }
    Ok(map)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn user_agent() -> HeaderValue {
    HeaderValue::from_static(concat!("waybill/", env!("CARGO_PKG_VERSION")))
}

/// The sender for `t`, with `headers` on every request. Must be called inside a Tokio runtime
/// (the gRPC channel connects lazily on it).
pub fn build(t: &Transport, headers: HeaderMap) -> Result<Box<dyn Sender>, ExportError> {
    // One crypto provider for reqwest and tonic (`https://` endpoints). Fails harmlessly when
    // someone installed one already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca, identity) = t.tls.read()?;
    let timeout = t.timeout.unwrap_or(DEFAULT_TIMEOUT);
    match t.protocol {
        Protocol::Grpc => {
            t.require_scheme()?;
            use tonic::transport::Channel;
            let mut ep = Channel::from_shared(t.endpoint.clone())
                .map_err(|e| ExportError::Config { var: "endpoint", message: format!("'{}': {e}", t.endpoint) })?
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .user_agent(user_agent())
                .map_err(|e| ExportError::Build(e.to_string()))?;
            if t.endpoint.starts_with("https://") {
                ep = ep.tls_config(grpc_tls(ca, identity)).map_err(|e| ExportError::Build(e.to_string()))?;
            }
            let mut grpc = tonic::client::Grpc::new(ep.connect_with_connector_lazy(Connector));
            if t.compression == Some(Compression::Gzip) {
                grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            Ok(Box::new(GrpcSender { grpc, metadata: tonic::metadata::MetadataMap::from_headers(headers) }))
        }
        Protocol::HttpProtobuf => {
            let client = http_client(ca, identity, timeout)?;
            Ok(Box::new(HttpSender {
                client,
                url: t.endpoint.clone(),
                headers,
                gzip: t.compression == Some(Compression::Gzip),
            }))
        }
    }
}

/// Opens the gRPC channel's TCP connections (tonic adds TLS and the connect timeout on top):
/// `TCP_NODELAY`, writes coalesced per turn of the HTTP/2 connection ([`super::coalesce`]).
#[derive(Clone, Copy)]
struct Connector;

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<super::coalesce::CoalescingStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            if host.is_empty() {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host in '{uri}'")));
            }
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(super::coalesce::CoalescingStream::new(stream)))
        })
    }
}

/// The TLS settings of a gRPC channel: `ca` (PEM) trusted, else the system roots; `identity`
/// (certificate and key PEM) presented for mutual TLS. Shared with the metric exporter.
pub(crate) fn grpc_tls(ca: Option<Vec<u8>>, identity: Option<(Vec<u8>, Vec<u8>)>) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}

/// An HTTP client with `timeout`, trusting `ca` (PEM) besides the defaults and presenting
/// `identity` (certificate and key PEM). Shared with the metric exporter.
pub(crate) fn http_client(
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    timeout: Duration,
) -> Result<reqwest::Client, ExportError> {
    let tls_err = |var: &'static str| move |e: reqwest::Error| ExportError::Config { var, message: e.to_string() };
    let mut b = reqwest::Client::builder().timeout(timeout).user_agent(user_agent());
    if let Some(pem) = ca {
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(tls_err(OTEL_EXPORTER_OTLP_CERTIFICATE))? {
            b = b.add_root_certificate(cert);
        }
    }
    if let Some((mut cert, key)) = identity {
        cert.push(b'\n');
        cert.extend_from_slice(&key);
        b = b.identity(reqwest::Identity::from_pem(&cert).map_err(tls_err(OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE))?);
    }
    b.build().map_err(|e| ExportError::Build(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// gRPC

/// Pre-encoded request bodies in, raw response bodies out.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

struct GrpcSender {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    metadata: tonic::metadata::MetadataMap,
}

fn grpc_retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Cancelled | DeadlineExceeded | ResourceExhausted | Aborted | OutOfRange | Unavailable | DataLoss)
}

impl Sender for GrpcSender {
    fn send(&self, body: Bytes) -> SendFuture {
        let mut grpc = self.grpc.clone();
        let mut req = tonic::Request::new(body);
        *req.metadata_mut() = self.metadata.clone();
        Box::pin(async move {
            let unavailable = |e: &dyn std::fmt::Display| SendError { retryable: true, message: e.to_string() };
            grpc.ready().await.map_err(|e| unavailable(&e))?;
            let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
            match grpc.unary(req, path, RawCodec).await {
                Ok(resp) => Ok(accepted(resp.get_ref())),
                Err(status) => Err(SendError {
                    retryable: grpc_retryable(status.code()),
                    message: format!("gRPC {:?}: {}", status.code(), status.message()),
                }),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/protobuf

struct HttpSender {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    gzip: bool,
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

impl Sender for HttpSender {
    fn send(&self, body: Bytes) -> SendFuture {
        let mut req = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf");
        let body = if self.gzip {
            match gzip(&body) {
                Ok(z) => {
                    req = req.header(http::header::CONTENT_ENCODING, "gzip");
                    Bytes::from(z)
                }
                Err(_) => body,
            }
        } else {
            body
        };
        let req = req.body(body);
        Box::pin(async move {
            let resp = req.send().await.map_err(|e| SendError { retryable: true, message: error_chain(&e) })?;
            let status = resp.status();
            let bytes = resp.bytes().await.unwrap_or_default();
            if status.is_success() {
                return Ok(accepted(&bytes));
            }
            Err(SendError {
                retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                message: format!("HTTP status {status}"),
            })
        })
    }
}

/// An error and its sources, e.g. "error sending request: connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_decode_and_override() {
        let vars = |k: &str| match k {
            OTEL_EXPORTER_OTLP_HEADERS => Some("api-key=a%20b, X-Tenant=one".to_string()),
            OTEL_EXPORTER_OTLP_TRACES_HEADERS => Some("x-tenant=two".to_string()),
            _ => None,
        };
        let h = headers_from(&vars).unwrap();
        assert_eq!(h.get("api-key").unwrap(), "a b");
        assert_eq!(h.get("x-tenant").unwrap(), "two");
        let bad = |k: &str| (k == OTEL_EXPORTER_OTLP_HEADERS).then(|| "novalue".to_string());
        let err = headers_from(&bad).unwrap_err().to_string();
        assert!(err.starts_with("OTEL_EXPORTER_OTLP_HEADERS: no '='"), "{err}");
    }

    #[test]
    fn grpc_codes_are_classified() {
        use tonic::Code;
        for c in [Code::Unavailable, Code::ResourceExhausted, Code::DeadlineExceeded, Code::Aborted, Code::DataLoss] {
            assert!(grpc_retryable(c), "{c:?}");
        }
        for c in [Code::InvalidArgument, Code::Unauthenticated, Code::PermissionDenied, Code::Unimplemented] {
            assert!(!grpc_retryable(c), "{c:?}");
        }
    }

    #[test]
    fn partial_success_is_read() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let body = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess { rejected_spans: 3, error_message: "too old".into() }),
        }
        .encode_to_vec();
        assert_eq!(accepted(&body), Accepted { rejected: 3, message: "too old".into() });
        assert_eq!(accepted(&[]), Accepted::default());
    }
}
