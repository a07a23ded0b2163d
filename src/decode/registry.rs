//! A blocking client of a Confluent Schema Registry: schemas by id (the
//! Confluent wire format's header) and by subject and version (references).
//!
//! It is called from the consumer thread, only for ids it has not seen, so it
//! is a plain blocking client (`ureq` over native-tls, which reuses the OpenSSL
//! that librdkafka already builds) with a cache in front. Ids and
//! subject versions are immutable in a registry, so cached schemas never expire.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig, TlsProvider};

use crate::config::Secret;

/// `[schema_registry]`: where the schemas of Confluent-framed records come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, "http://host:8081" or "https://host/path". Credentials go in
    /// `username`/`password`, never in the URL.
    pub url: String,
    /// HTTP basic auth user (the API key for Confluent Cloud). Default: none.
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic auth password (the API secret). Default: none (empty with a `username`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// PEM file of the CA certificates that sign the registry's certificate.
    /// When set, only these are trusted; otherwise the system's trust store.
    /// Default: none.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time one request may take, connection and TLS handshake included.
    /// Default: "10s".
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The registry's `schemaType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaType {
    Avro,
    Protobuf,
    Json,
}

impl SchemaType {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaType::Avro => "AVRO",
            SchemaType::Protobuf => "PROTOBUF",
            SchemaType::Json => "JSON",
        }
    }
}

/// A schema this one imports: `name` as it appears in the schema (a Protobuf
/// import path, an Avro type name), found under `subject` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Reference {
    pub name: String,
    pub subject: String,
    pub version: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredSchema {
    pub schema_type: SchemaType,
    /// The schema text as registered (Avro JSON, a .proto file, JSON Schema).
    pub schema: String,
    pub references: Vec<Reference>,
}

/// Why a schema could not be had. Only [`RegistryError::Unavailable`] may go
/// away by itself; the others need a change of configuration or of the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error(
        "schema registry unreachable: {request}: {reason} (tried {attempts} times; \
         check that the registry is up and `schema_registry.url`, `ca_file` and `timeout` are right)"
    )]
    Unavailable {
        request: String,
        reason: String,
        attempts: u32,
    },
    #[error(
        "schema registry: {request}: not found ({message}); the record names a schema \
         that this registry does not have: check `schema_registry.url` (the producers' registry?)"
    )]
    NotFound { request: String, message: String },
    #[error(
        "schema registry refused access: {request}: HTTP {status}; \
         check `schema_registry.username` and `schema_registry.password`"
    )]
    Denied { request: String, status: u16 },
    #[error("schema registry: {request}: {message}")]
    Invalid { request: String, message: String },
}

impl RegistryError {
    /// True when retrying later may succeed (the registry is down, slow or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }

    /// What the failure makes of the record that named the schema: an
    /// unreachable registry is nobody's fault (the bridge waits for it), a
    /// schema the registry does not have is the record's (its route's
    /// `on_error` applies), a registry that refuses chbridge is a
    /// configuration problem.
    pub fn record_kind(&self) -> super::RecordErrorKind {
        use super::RecordErrorKind as K;
        match self {
            RegistryError::Unavailable { .. } => K::Unavailable,
            RegistryError::NotFound { .. } => K::UnknownSchema,
            RegistryError::Denied { .. } | RegistryError::Invalid { .. } => K::Schema,
        }
    }
}

/// Pauses before the second and third attempt of a request.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

/// Larger responses are refused: a schema is kilobytes, rarely a megabyte.
const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// A Schema Registry client with a cache. `Send + Sync`: share one as `Arc<Registry>`.
pub struct Registry {
    agent: ureq::Agent,
    /// The URL without a trailing slash. It never holds credentials.
    base: String,
    /// The `Authorization` header value: never logged, never shown.
    auth: Option<String>,
    retry_delays: Vec<Duration>,
    by_id: Mutex<HashMap<u32, Arc<RegisteredSchema>>>,
    by_subject: Mutex<HashMap<(String, i32), Arc<RegisteredSchema>>>,
    /// Tests only: answer from the caches, a miss is NotFound.
    #[cfg(test)]
    offline: bool,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("url", &self.base)
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Checks the URL and loads `ca_file`; connects to nothing yet.
    pub fn new(cfg: &RegistryConfig) -> Result<Registry, RegistryError> {
        let base = check_url(&cfg.url)?;
        let invalid = |message: String| RegistryError::Invalid {
            request: "configuration".into(),
            message,
        };
        let auth = match (&cfg.username, &cfg.password) {
            (Some(user), password) => {
                if user.contains(':') {
                    return Err(invalid(
                        "`schema_registry.username` must not contain `:` (HTTP basic auth)".into(),
                    ));
                }
                let pass = password.as_ref().map(Secret::expose).unwrap_or("");
                Some(format!(
                    "Basic {}",
                    base64(format!("{user}:{pass}").as_bytes())
                ))
            }
            (None, Some(p)) if !p.is_empty() => {
                return Err(invalid(
                    "`schema_registry.password` is set without `schema_registry.username`".into(),
                ))
            }
            (None, _) => None,
        };
        let root_certs = match &cfg.ca_file {
            None => RootCerts::PlatformVerifier,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    invalid(format!(
                        "`schema_registry.ca_file`: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let mut certs = Vec::new();
                for item in parse_pem(&pem) {
                    match item {
                        Ok(PemItem::Certificate(c)) => certs.push(c),
                        Ok(_) => {}
                        Err(e) => {
                            return Err(invalid(format!(
                                "`schema_registry.ca_file`: {} is not valid PEM: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                if certs.is_empty() {
                    return Err(invalid(format!(
                        "`schema_registry.ca_file`: {} holds no PEM certificate",
                        path.display()
                    )));
                }
                RootCerts::Specific(Arc::new(certs))
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::NativeTls)
            .root_certs(root_certs)
            .build();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            // Statuses are classified below, with the registry's own message.
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(concat!("chbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Registry {
            agent,
            base,
            auth,
            retry_delays: RETRY_DELAYS.to_vec(),
            by_id: Mutex::new(HashMap::new()),
            by_subject: Mutex::new(HashMap::new()),
            #[cfg(test)]
            offline: false,
        })
    }

    /// A registry that knows only these schemas (other decoders' tests).
    #[cfg(test)]
    pub fn fake(
        by_id: HashMap<u32, RegisteredSchema>,
        by_subject: HashMap<(String, i32), RegisteredSchema>,
    ) -> Registry {
        let Ok(mut r) = Registry::new(&fake::config("http://127.0.0.1:9")) else {
            panic!("the fake registry's configuration is valid");
        };
        r.offline = true;
        r.by_id = Mutex::new(by_id.into_iter().map(|(k, v)| (k, Arc::new(v))).collect());
        r.by_subject = Mutex::new(
            by_subject
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
        );
        r
    }

    /// The schema with this global id (`GET /schemas/ids/{id}`), from the cache
    /// after the first success.
    pub fn by_id(&self, id: u32) -> Result<Arc<RegisteredSchema>, RegistryError> {
        if let Some(s) = self
            .by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
        {
            return Ok(s.clone());
        }
        let schema = Arc::new(self.fetch(&format!("/schemas/ids/{id}"))?);
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// A version of a subject (`GET /subjects/{subject}/versions/{version}`),
    /// cached after the first success. Version -1 means the latest and is not cached.
    pub fn by_subject_version(
        &self,
        subject: &str,
        version: i32,
    ) -> Result<Arc<RegisteredSchema>, RegistryError> {
        let key = (subject.to_owned(), version);
        if let Some(s) = self
            .by_subject
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(s.clone());
        }
        let version_part = if version == -1 {
            "latest".to_owned()
        } else {
            version.to_string()
        };
        let path = format!(
            "/subjects/{}/versions/{version_part}",
            encode_segment(subject)
        );
        let schema = Arc::new(self.fetch(&path)?);
        if version >= 0 {
            self.by_subject
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, schema.clone());
        }
        Ok(schema)
    }

    /// One GET, retried while the registry is unavailable.
    fn fetch(&self, path: &str) -> Result<RegisteredSchema, RegistryError> {
        let url = format!("{}{path}", self.base);
        #[cfg(test)]
        if self.offline {
            return Err(RegistryError::NotFound {
                request: url,
                message: "not in the fake registry".into(),
            });
        }
        let mut attempt = 0;
        loop {
            match self.get_once(&url) {
                Err(RegistryError::Unavailable {
                    request, reason, ..
                }) if attempt < self.retry_delays.len() => {
                    tracing::warn!(%request, %reason, "schema registry unavailable, retrying");
                    std::thread::sleep(self.retry_delays[attempt]);
                    attempt += 1;
                }
                Err(RegistryError::Unavailable {
                    request, reason, ..
                }) => {
                    return Err(RegistryError::Unavailable {
                        request,
                        reason,
                        attempts: attempt as u32 + 1,
                    })
                }
                other => return other,
            }
        }
    }

    fn get_once(&self, url: &str) -> Result<RegisteredSchema, RegistryError> {
        let request = format!("GET {url}");
        let mut req = self.agent.get(url).header(
            "Accept",
            "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json; qs=0.9, application/json; qs=0.5",
        );
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        let mut resp = req.call().map_err(|e| transport_error(&request, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string();
        let body = match body {
            Ok(b) => b,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return Err(RegistryError::Invalid {
                    request,
                    message: format!(
                        "HTTP {status} with a response over {MAX_RESPONSE_BYTES} bytes"
                    ),
                })
            }
            Err(e) if status == 200 => return Err(transport_error(&request, e)),
            // The status says it all; the body only adds detail.
            Err(_) => String::new(),
        };
        match status {
            200 => parse_schema(&body).map_err(|message| RegistryError::Invalid {
                request,
                message: format!(
                    "unexpected response ({message}); is `schema_registry.url` a schema registry?"
                ),
            }),
            401 | 403 => Err(RegistryError::Denied { request, status }),
            404 => Err(RegistryError::NotFound {
                request,
                message: registry_message(status, &body),
            }),
            408 | 429 | 500..=599 => Err(RegistryError::Unavailable {
                request,
                reason: registry_message(status, &body),
                attempts: 1,
            }),
            _ => Err(RegistryError::Invalid {
                request,
                message: registry_message(status, &body),
            }),
        }
    }
}

/// The URL without its trailing slash, if it is a plain http(s) URL.
fn check_url(url: &str) -> Result<String, RegistryError> {
    let invalid = |message: String| RegistryError::Invalid {
        request: "configuration".into(),
        message: format!("`schema_registry.url`: {message}"),
    };
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| invalid(format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid("expected an http:// or https:// URL".into())),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("the URL has no host".into()));
    };
    // Said without echoing the URL: it holds a password.
    if authority.as_str().contains('@') {
        return Err(invalid(
            "credentials in the URL are not accepted; set `schema_registry.username` and `password`"
                .into(),
        ));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(invalid(format!(
            "{url}: a base URL has no query or fragment"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

fn transport_error(request: &str, e: ureq::Error) -> RegistryError {
    let reason = match &e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::NativeTls(_) | ureq::Error::Tls(_) => format!("TLS: {e}"),
        _ => e.to_string(),
    };
    RegistryError::Unavailable {
        request: request.to_owned(),
        reason,
        attempts: 1,
    }
}

/// "HTTP 404, error code 40403: Schema 7 not found", from the registry's error body.
fn registry_message(status: u16, body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error_code: Option<i64>,
        message: Option<String>,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            error_code,
            message,
        }) => {
            let mut s = format!("HTTP {status}");
            if let Some(code) = error_code {
                s.push_str(&format!(", error code {code}"));
            }
            if let Some(m) = message {
                s.push_str(": ");
                s.push_str(&truncate(&m, 300));
            }
            s
        }
        Err(_) if body.trim().is_empty() => format!("HTTP {status}"),
        Err(_) => format!("HTTP {status}: {}", truncate(body.trim(), 300)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn parse_schema(body: &str) -> Result<RegisteredSchema, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        schema: String,
        #[serde(default)]
        schema_type: Option<String>,
        #[serde(default)]
        references: Option<Vec<Reference>>,
    }
    let b: Body = serde_json::from_str(body).map_err(|e| format!("not a schema: {e}"))?;
    let schema_type = match b.schema_type.as_deref() {
        None | Some("AVRO") => SchemaType::Avro,
        Some("PROTOBUF") => SchemaType::Protobuf,
        Some("JSON") => SchemaType::Json,
        Some(other) => return Err(format!("unknown schemaType {other:?}")),
    };
    Ok(RegisteredSchema {
        schema_type,
        schema: b.schema,
        references: b.references.unwrap_or_default(),
    })
}

/// Percent-encodes one path segment (a subject may hold `/`, `:` or spaces).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Splits a Confluent-framed value: magic byte 0, a 4-byte big-endian schema
/// id, then the payload (Avro binary; for Protobuf, message indexes first).
pub fn split_confluent(value: &[u8]) -> Result<(u32, &[u8]), String> {
    match value {
        [0, a, b, c, d, payload @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), payload)),
        [magic, _, _, _, _, ..] => Err(format!(
            "the first byte is 0x{magic:02x}, not the magic byte 0 of the Confluent wire format: \
             the value was not written by a Confluent serializer with a schema registry"
        )),
        _ => Err(format!(
            "the value is {} bytes long, shorter than the Confluent wire format's \
             5-byte header (magic byte 0, 4-byte schema id)",
            value.len()
        )),
    }
}

/// A registry stand-in for tests: an HTTP/1.1 server on 127.0.0.1 that answers
/// each request with what a closure says and records the requests it saw.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{BufRead, BufReader, Write};

    /// A registry at `url` without credentials or a CA file.
    pub fn config(url: &str) -> super::RegistryConfig {
        super::RegistryConfig {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            timeout: std::time::Duration::from_secs(5),
        }
    }

    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    pub struct Request {
        pub path: String,
        /// Header lines, names lowercased: `name: value`.
        pub headers: Vec<String>,
    }

    impl Request {
        pub fn header(&self, name: &str) -> Option<&str> {
            let prefix = format!("{name}: ");
            self.headers
                .iter()
                .find_map(|h| h.strip_prefix(prefix.as_str()))
        }
    }

    pub struct Server {
        pub url: String,
        pub requests: Arc<Mutex<Vec<Request>>>,
    }

    impl Server {
        pub fn count(&self) -> usize {
            self.requests.lock().unwrap().len()
        }
    }

    /// `answer(request, n)` (n counts from 0) gives the status and body.
    pub fn serve(answer: impl Fn(&Request, usize) -> (u16, String) + Send + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        // The thread ends with the test process; it only ever waits in accept.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split(' ').nth(1).unwrap_or("").to_owned();
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    let h = h.trim_end();
                    let (name, value) = h.split_once(": ").unwrap_or((h, ""));
                    headers.push(format!("{}: {value}", name.to_ascii_lowercase()));
                }
                let req = Request { path, headers };
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(req.clone());
                    seen.len() - 1
                };
                let (status, body) = answer(&req, n);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Server { url, requests }
    }

    /// The registry's answer to `GET /schemas/ids/{id}` for an Avro schema.
    pub fn schema_body(schema: &str) -> String {
        serde_json::json!({ "schema": schema }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{config, schema_body, serve};
    use super::*;

    fn registry(cfg: &RegistryConfig) -> Registry {
        let mut r = Registry::new(cfg).unwrap();
        r.retry_delays = vec![Duration::from_millis(1), Duration::from_millis(1)];
        r
    }

    #[test]
    fn the_client_is_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Registry>();
        send_sync::<RegistryError>();
    }

    #[test]
    fn config_defaults_and_debug_hides_the_password() {
        let cfg: RegistryConfig =
            toml::from_str("url = \"http://r:8081\"\nusername = \"u\"\npassword = \"hunter2\"")
                .unwrap();
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let r = Registry::new(&cfg).unwrap();
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(!format!("{r:?}").contains(&base64(b"u:hunter2")));
        assert!(toml::from_str::<RegistryConfig>("url = \"http://r\"\nuser = \"u\"").is_err());
    }

    #[test]
    fn a_schema_is_fetched_once_and_then_cached() {
        let server = serve(|req, _| {
            assert_eq!(req.path, "/schemas/ids/7");
            (
                200,
                r#"{"schema":"\"string\"","references":[{"name":"a.proto","subject":"a","version":2}]}"#
                    .into(),
            )
        });
        let r = registry(&config(&format!("{}/", server.url)));
        let s = r.by_id(7).unwrap();
        assert_eq!(
            *s,
            RegisteredSchema {
                schema_type: SchemaType::Avro,
                schema: "\"string\"".into(),
                references: vec![Reference {
                    name: "a.proto".into(),
                    subject: "a".into(),
                    version: 2
                }],
            }
        );
        assert_eq!(server.count(), 1);
        assert_eq!(r.by_id(7).unwrap(), s);
        assert_eq!(server.count(), 1);
    }

    #[test]
    fn subject_versions_are_encoded_cached_and_typed() {
        let server = serve(|req, _| {
            assert_eq!(req.path, "/subjects/a%2Fb%20c/versions/3");
            (
                200,
                r#"{"subject":"a/b c","version":3,"id":9,"schemaType":"PROTOBUF","schema":"syntax = \"proto3\";"}"#
                    .into(),
            )
        });
        let r = registry(&config(&server.url));
        let s = r.by_subject_version("a/b c", 3).unwrap();
        assert_eq!(s.schema_type, SchemaType::Protobuf);
        assert_eq!(s.schema, "syntax = \"proto3\";");
        assert!(s.references.is_empty());
        r.by_subject_version("a/b c", 3).unwrap();
        assert_eq!(server.count(), 1);
    }

    #[test]
    fn basic_auth_is_sent_and_a_refusal_is_denied_without_the_password() {
        let server = serve(|_, _| (401, r#"{"error_code":401,"message":"Unauthorized"}"#.into()));
        let mut cfg = config(&server.url);
        cfg.username = Some("key".into());
        cfg.password = Some(Secret::new("s3cret-pw"));
        let r = registry(&cfg);
        let e = r.by_id(1).unwrap_err();
        assert!(
            matches!(e, RegistryError::Denied { status: 401, .. }),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let auth = server.requests.lock().unwrap()[0]
            .header("authorization")
            .map(str::to_owned);
        assert_eq!(auth.as_deref(), Some("Basic a2V5OnMzY3JldC1wdw=="));
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains("s3cret-pw"), "{text}");
            assert!(!text.contains("a2V5OnMzY3JldC1wdw"), "{text}");
        }
        assert!(e.to_string().contains("schema_registry.username"), "{e}");
        assert_eq!(server.count(), 1, "a refusal is not retried");
    }

    #[test]
    fn unavailable_twice_then_ok_is_retried() {
        let server = serve(|_, n| {
            if n < 2 {
                (503, "overloaded".into())
            } else {
                (200, schema_body("\"long\""))
            }
        });
        let r = registry(&config(&server.url));
        assert_eq!(r.by_id(3).unwrap().schema, "\"long\"");
        assert_eq!(server.count(), 3);
    }

    #[test]
    fn always_unavailable_gives_up_after_three_attempts() {
        let server = serve(|_, _| {
            (
                503,
                r#"{"error_code":50302,"message":"backend down"}"#.into(),
            )
        });
        let r = registry(&config(&server.url));
        let e = r.by_id(3).unwrap_err();
        assert!(e.is_transient());
        assert_eq!(server.count(), 3);
        let text = e.to_string();
        assert!(
            text.contains("50302") && text.contains("backend down"),
            "{text}"
        );
        assert!(
            text.contains(&format!("GET {}/schemas/ids/3", server.url)),
            "{text}"
        );
        assert!(text.contains("tried 3 times"), "{text}");
    }

    #[test]
    fn a_refused_connection_is_unavailable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let r = registry(&config(&format!("http://127.0.0.1:{port}")));
        let e = r.by_id(1).unwrap_err();
        assert!(
            matches!(e, RegistryError::Unavailable { attempts: 3, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn not_found_and_garbage_and_other_statuses() {
        let server = serve(|req, _| match req.path.as_str() {
            "/schemas/ids/1" => (
                404,
                r#"{"error_code":40403,"message":"Schema 1 not found"}"#.into(),
            ),
            "/schemas/ids/2" => (200, "<html>hello</html>".into()),
            "/schemas/ids/3" => (200, r#"{"schema":"{}","schemaType":"XML"}"#.into()),
            _ => (400, "bad".into()),
        });
        let r = registry(&config(&server.url));
        let e = r.by_id(1).unwrap_err();
        assert!(matches!(e, RegistryError::NotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("40403"), "{e}");
        for id in [2, 3, 4] {
            let e = r.by_id(id).unwrap_err();
            assert!(matches!(e, RegistryError::Invalid { .. }), "{e:?}");
        }
        assert_eq!(server.count(), 4, "none of these is retried");
    }

    #[test]
    fn urls_and_files_are_checked() {
        for (url, says) in [
            ("ftp://r", "http"),
            ("r:8081", "http"),
            ("http://u:pw@r:8081", "credentials"),
            ("http://r?x=1", "query"),
        ] {
            let e = Registry::new(&config(url)).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains("schema_registry.url"),
                "{url}: {e}"
            );
            assert!(!e.contains("pw@"), "{e}");
        }
        let mut cfg = config("https://r");
        cfg.ca_file = Some("/nonexistent/ca.pem".into());
        let e = Registry::new(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("chbridge-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        cfg.ca_file = Some(empty);
        let e = Registry::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let mut cfg = config("http://r");
        cfg.password = Some(Secret::new("x"));
        assert!(Registry::new(&cfg).is_err());
    }

    #[test]
    fn confluent_framing() {
        assert_eq!(
            split_confluent(&[0, 0, 0, 1, 2, 9, 8]),
            Ok((258, &[9u8, 8][..]))
        );
        assert_eq!(
            split_confluent(&[0, 255, 255, 255, 255]),
            Ok((u32::MAX, &[][..]))
        );
        let e = split_confluent(&[0, 0, 1]).unwrap_err();
        assert!(e.contains("3 bytes"), "{e}");
        let e = split_confluent(b"{\"a\":1}").unwrap_err();
        assert!(e.contains("0x7b"), "{e}");
        assert!(split_confluent(&[]).is_err());
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
