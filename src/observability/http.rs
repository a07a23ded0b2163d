//! The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Health, Metrics};

/// Connections served at once; more are closed as they arrive. Prometheus
/// and a kubelet's probes need a handful.
pub const MAX_CONNECTIONS: usize = 64;

/// A client must send a request's headers within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// No connection is kept longer than this, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `addr` (so a port in use fails start-up loudly) and serves until
/// `cancel`. The listener is bounded: at most [`MAX_CONNECTIONS`] at once,
/// headers within [`HEADER_TIMEOUT`], each connection for at most
/// [`CONNECTION_LIFETIME`], so that idle or slow clients on an address open
/// to the network cannot exhaust the process.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = cancel.cancelled() => return,
                c = listener.accept() => c,
            };
            let Ok((stream, peer)) = conn else { continue };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "HTTP connection refused: {MAX_CONNECTIONS} already open");
                drop(stream);
                continue;
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (metrics, health) = (metrics.clone(), health.clone());
                    async move { Ok::<_, Infallible>(route(&req, &metrics, &health)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                drop(slot);
            });
        }
    }))
}

fn route<B>(req: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (status, body, ctype) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            Bytes::from(metrics.render()),
            "text/plain; version=0.0.4",
        ),
        "/healthz" => (
            if health.live() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            Bytes::from(health.describe()),
            "text/plain",
        ),
        "/readyz" => (
            if health.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            Bytes::from(health.describe()),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            "text/plain",
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// GETs `url` (plain `http://host:port/path`) and returns the status code.
/// A dozen lines of HTTP/1.0 instead of a client crate: only the container
/// health check uses it.
pub fn probe(url: &str, timeout: std::time::Duration) -> Result<u16, String> {
    use std::io::{Read as _, Write as _};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {authority}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                line.lines().next().unwrap_or("")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    async fn server() -> (SocketAddr, CancellationToken) {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let cancel = CancellationToken::new();
        serve(
            addr,
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(60))),
            cancel.clone(),
        )
        .await
        .unwrap();
        (addr, cancel)
    }

    /// Sends `request` on `s` and reads until the peer closes (blocking, off
    /// the runtime's threads).
    async fn exchange(mut s: TcpStream, request: &'static [u8]) -> Vec<u8> {
        tokio::task::spawn_blocking(move || {
            let _ = s.write_all(request);
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            out
        })
        .await
        .unwrap()
    }

    /// Item 16 of the delivery review: idle connections cannot pile up
    /// without bound, and the endpoint still answers once they go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let (addr, cancel) = server().await;
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = exchange(
            TcpStream::connect(addr).unwrap(),
            b"GET /healthz HTTP/1.0\r\n\r\n",
        )
        .await;
        assert!(
            got.is_empty(),
            "answered beyond the limit: {:?}",
            String::from_utf8_lossy(&got)
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = exchange(
            TcpStream::connect(addr).unwrap(),
            b"GET /metrics HTTP/1.0\r\n\r\n",
        )
        .await;
        let got = String::from_utf8_lossy(&got).to_string();
        assert!(got.starts_with("HTTP/1.0 200"), "{got}");
        assert!(got.contains("chbridge_build_info"), "{got}");
        cancel.cancel();
    }

    /// A client that never finishes its headers is disconnected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_sends_no_headers_is_disconnected() {
        let (addr, cancel) = server().await;
        let started = std::time::Instant::now();
        let got = exchange(
            TcpStream::connect(addr).unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        )
        .await;
        let took = started.elapsed();
        assert!(
            took >= HEADER_TIMEOUT - Duration::from_millis(500) && took < Duration::from_secs(25),
            "closed after {took:?} with {:?}",
            String::from_utf8_lossy(&got)
        );
        cancel.cancel();
    }
}
