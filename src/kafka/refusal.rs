//! Connections the brokers refuse for good: a wrong password, a broker
//! certificate that does not verify, a client certificate the broker does not
//! accept.
//!
//! librdkafka retries such a connection forever and only reports each try to
//! the error callback, so a bridge with a wrong password would look alive
//! while it reads nothing. The first refusal is noted here with what to fix;
//! the consumer loop, `status`, `check` and `dlq replay` stop on it (exit 1:
//! the configuration does not fit the brokers).

use std::sync::{Arc, OnceLock};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;

/// How the client talks to the brokers, as the messages name it.
#[derive(Debug, Clone)]
pub struct Security {
    protocol: String,
    mechanism: Option<String>,
}

impl Security {
    pub fn of(cfg: &KafkaConfig) -> Security {
        let get = |k: &str| cfg.properties.get(k).map(|v| v.to_string());
        Security {
            protocol: get("security.protocol").unwrap_or_else(|| "plaintext".into()),
            // librdkafka takes both spellings.
            mechanism: get("sasl.mechanism").or_else(|| get("sasl.mechanisms")),
        }
    }

    fn describe(&self) -> String {
        match &self.mechanism {
            Some(m) => format!(
                "security.protocol = {}, sasl.mechanism = {m}",
                self.protocol
            ),
            None => format!("security.protocol = {}", self.protocol),
        }
    }
}

/// What to tell the user when `error` (with librdkafka's `reason`, which names
/// the broker) is a refusal that retrying cannot cure; None for anything else
/// (a broker down, a timeout: those pass).
pub fn describe(security: &Security, error: &KafkaError, reason: &str) -> Option<String> {
    let code = error.rdkafka_error_code()?;
    let hint = match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => {
            "check `sasl.username`, `sasl.password` (or CHBRIDGE_KAFKA_SASL_PASSWORD) and \
             `sasl.mechanism` in kafka.properties against the user the brokers know"
        }
        RDKafkaErrorCode::SSL => {
            "the brokers' certificate does not verify: set kafka.properties \
             \"ssl.ca.location\" to the CA that signed it (and check that the broker address \
             is one the certificate names)"
        }
        // A TLS alert from the broker: it refused the client's certificate
        // (or got none) on a listener that requires one.
        RDKafkaErrorCode::BrokerTransportFailure
            if reason.contains("alert bad certificate")
                || reason.contains("alert certificate required")
                || reason.contains("alert unknown ca") =>
        {
            "the broker refused the client certificate: set \"ssl.certificate.location\" and \
             \"ssl.key.location\" in kafka.properties to a certificate signed by a CA the \
             broker trusts"
        }
        _ => return None,
    };
    Some(format!(
        "Kafka refused the connection ({}): {reason}; {hint}. Retrying cannot help, so \
         chbridge stops",
        security.describe()
    ))
}

/// The first refusal any client of this process met; shared by the clients
/// of one command.
#[derive(Debug, Clone, Default)]
pub struct Refusal(Arc<OnceLock<String>>);

impl Refusal {
    /// Notes `error` if it is a refusal; true if it is (the first or a repeat).
    pub fn note(&self, security: &Security, error: &KafkaError, reason: &str) -> bool {
        match describe(security, error, reason) {
            Some(message) => {
                if self.0.set(message).is_ok() {
                    if let Some(m) = self.0.get() {
                        tracing::error!("{m}");
                    }
                }
                true
            }
            None => false,
        }
    }

    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// The context of the short-lived clients (`status`, `check`, `dlq replay`):
/// notes refusals, and logs other errors at debug (the command reports its
/// own failure, with the refusal if there was one).
pub struct Watch {
    pub refusal: Refusal,
    security: Security,
}

impl Watch {
    pub fn new(cfg: &KafkaConfig) -> Watch {
        Watch {
            refusal: Refusal::default(),
            security: Security::of(cfg),
        }
    }
}

impl ClientContext for Watch {
    fn error(&self, error: KafkaError, reason: &str) {
        if !self.refusal.note(&self.security, &error, reason) {
            tracing::debug!(target: "librdkafka", error = %error, "{reason}");
        }
    }
}

impl ConsumerContext for Watch {}

/// A short-lived consumer whose refusals are noted.
pub type WatchedConsumer = rdkafka::consumer::BaseConsumer<Watch>;

/// Creates a [`WatchedConsumer`] from `cc` (built from `cfg`).
pub fn watched(
    cc: &rdkafka::config::ClientConfig,
    cfg: &KafkaConfig,
) -> Result<WatchedConsumer, String> {
    cc.create_with_context(Watch::new(cfg))
        .map_err(|e| super::describe_client_error(&e))
}

/// The refusal `consumer` met, if any. Its errors reach the context only
/// while it is polled: a blocking call (metadata, offsets) does not serve
/// them, so they are served here first.
pub fn refused(consumer: &WatchedConsumer) -> Option<String> {
    for _ in 0..20 {
        if consumer.context().refusal.get().is_some() {
            break;
        }
        let _ = consumer.poll(std::time::Duration::from_millis(10));
    }
    consumer.context().refusal.get().map(str::to_string)
}

/// `result`, its error replaced by the refusal that explains it, if any.
pub fn explain<T>(consumer: &WatchedConsumer, result: Result<T, String>) -> Result<T, String> {
    result.map_err(|e| refused(consumer).unwrap_or(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OffsetReset, Properties};

    fn security(props: &[(&str, &str)]) -> Security {
        Security::of(&KafkaConfig {
            brokers: "b:9092".into(),
            group_id: "g".into(),
            instance_id: None,
            auto_offset_reset: OffsetReset::Earliest,
            group_protocol: Default::default(),
            properties: Properties(
                props
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    // The reasons are librdkafka 2.12's own, as met against Apache Kafka 4.4.
    #[test]
    fn refusals_name_the_broker_the_mechanism_and_the_fix() {
        let sasl = security(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.password", "hunter2"),
        ]);
        let auth = describe(
            &sasl,
            &KafkaError::Global(RDKafkaErrorCode::Authentication),
            "sasl_ssl://127.0.0.1:9095/bootstrap: SASL authentication error: Authentication \
             failed during authentication due to invalid credentials with SASL mechanism \
             SCRAM-SHA-512 (after 313ms in state AUTH_REQ)",
        )
        .expect("a refusal");
        for part in [
            "127.0.0.1:9095",
            "sasl.mechanism = SCRAM-SHA-512",
            "security.protocol = SASL_SSL",
            "sasl.password",
        ] {
            assert!(auth.contains(part), "{part} missing from: {auth}");
        }
        assert!(!auth.contains("hunter2"), "{auth}");

        let tls = security(&[("security.protocol", "SSL")]);
        let ca = describe(
            &tls,
            &KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://127.0.0.1:9097/bootstrap: SSL handshake failed: certificate verify failed",
        )
        .expect("a refusal");
        assert!(
            ca.contains("ssl.ca.location") && ca.contains("127.0.0.1:9097"),
            "{ca}"
        );
        let cert = describe(
            &tls,
            &KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "ssl://127.0.0.1:9097/bootstrap: Receive failed: error:0A000412:SSL \
             routines::ssl/tls alert bad certificate: SSL alert number 42",
        )
        .expect("a refusal");
        assert!(cert.contains("ssl.certificate.location"), "{cert}");
    }

    #[test]
    fn a_broker_that_is_down_is_no_refusal() {
        let plain = security(&[]);
        for (code, reason) in [
            (
                RDKafkaErrorCode::BrokerTransportFailure,
                "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused",
            ),
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
        ] {
            assert_eq!(
                describe(&plain, &KafkaError::Global(code), reason),
                None,
                "{reason}"
            );
        }
        let refusal = Refusal::default();
        assert!(!refusal.note(
            &plain,
            &KafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down"
        ));
        assert_eq!(refusal.get(), None);
    }
}
