//! HTTPS to ClickHouse: the `clickhouse` crate's HTTP client over native-tls,
//! that is the OpenSSL rdkafka already builds (`ssl-vendored`), so the bridge
//! has one TLS stack for Kafka, ClickHouse and the schema registry. The
//! system's roots are trusted (native-tls probes the usual certificate paths),
//! plus `clickhouse.ca_file`; `client_cert` and `client_key` give a client
//! certificate for servers that ask for one. A server whose certificate does
//! not verify is refused: there is no switch to accept it anyway.

use std::path::Path;
use std::time::Duration;

use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ClickHouseConfig;

/// As the crate's own client: ClickHouse closes idle connections after 3 s,
/// so ours are dropped after 2 s instead of being reused half-closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|e| format!("`clickhouse.{key}`: cannot read {}: {e}", path.display()))
}

/// The TLS settings of `cfg`, checked: files readable, PEM valid, the key
/// matching the certificate.
pub fn connector(cfg: &ClickHouseConfig) -> Result<native_tls::TlsConnector, String> {
    let mut b = native_tls::TlsConnector::builder();
    if let Some(path) = &cfg.ca_file {
        let pem = read("ca_file", path)?;
        let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            format!(
                "`clickhouse.ca_file`: {} is not a PEM certificate: {e}",
                path.display()
            )
        })?;
        b.add_root_certificate(cert);
    }
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let identity = native_tls::Identity::from_pkcs8(
                &read("client_cert", cert)?,
                &read("client_key", key)?,
            )
            .map_err(|e| {
                format!(
                    "`clickhouse.client_cert` / `client_key`: {} and {} are not a PEM certificate \
                     and its unencrypted PKCS#8 key: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
            b.identity(identity);
        }
        (None, None) => {}
        _ => return Err(
            "`clickhouse.client_cert` and `clickhouse.client_key` go together: set both or neither"
                .into(),
        ),
    }
    b.build()
        .map_err(|e| format!("clickhouse: cannot set up TLS: {e}"))
}

/// An HTTP client speaking both `http://` and `https://`, for
/// `clickhouse::Client::with_http_client` (which fixes the body type).
pub fn http_client<B>(
    cfg: &ClickHouseConfig,
) -> Result<Client<HttpsConnector<HttpConnector>, B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let tls = connector(cfg)?;
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(tls)));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https))
}

/// Whether a connection failed because the server's certificate did not
/// verify (untrusted, expired, another host's) or the server speaks no TLS:
/// waiting cannot fix that, the configuration must change.
pub fn is_verification_failure(chain: &str) -> bool {
    const SIGNS: [&str; 6] = [
        "certificate verify failed",
        "self-signed certificate",
        "self signed certificate",
        "unable to get local issuer certificate",
        "Hostname mismatch",
        "wrong version number",
    ];
    SIGNS.iter().any(|s| chain.contains(s))
}
