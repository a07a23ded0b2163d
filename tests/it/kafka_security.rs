//! The broker's secured listeners (scripts/stack.sh): SASL_SSL with
//! SCRAM-SHA-512, SASL_PLAINTEXT with PLAIN, and SSL requiring a client
//! certificate, all with the stack's own CA. The bridge, its dead-letter
//! producer, `status`, `check` and `dlq replay` work over them; a refused
//! connection stops each with exit 1 and what to fix; and no secret shows in
//! any output.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// The test users of the local broker (scripts/stack.sh).
const SCRAM_PASSWORD: &str = "chbridge-scram-secret";
const PLAIN_PASSWORD: &str = "chbridge-plain-secret";

/// (brokers, `[kafka.properties]` lines) of one way in.
type Listener = (String, String);

fn on(port_var: &str, default: u16) -> String {
    format!("127.0.0.1:{}", env_port(port_var, default))
}

fn ca() -> String {
    tls_dir().join("ca.pem").display().to_string()
}

/// SASL_SSL with SCRAM-SHA-512; `ca`: trust the stack's CA (else the system's roots).
fn sasl_ssl(password: &str, ca_file: Option<&str>) -> Listener {
    let mut props = format!(
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"chbridge\"\n\"sasl.password\" = \"{password}\"\n"
    );
    if let Some(ca) = ca_file {
        props.push_str(&format!("\"ssl.ca.location\" = \"{ca}\"\n"));
    }
    (on("KAFKA_SASL_SSL_PORT", 9095), props)
}

fn sasl_plain(password: &str) -> Listener {
    (
        on("KAFKA_SASL_PLAIN_PORT", 9096),
        format!(
            "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
             \"sasl.username\" = \"chbridge\"\n\"sasl.password\" = \"{password}\"\n"
        ),
    )
}

/// The SSL listener, which requires a client certificate; `cert`: present one.
fn mtls(cert: bool) -> Listener {
    let mut props = format!(
        "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
        ca()
    );
    if cert {
        let tls = tls_dir();
        props.push_str(&format!(
            "\"ssl.certificate.location\" = \"{}\"\n\"ssl.key.location\" = \"{}\"\n",
            tls.join("client.pem").display(),
            tls.join("client.key").display()
        ));
    }
    (on("KAFKA_SSL_PORT", 9097), props)
}

fn through(cfg: &mut BridgeConfig, (brokers, props): Listener) {
    cfg.brokers = Some(brokers);
    cfg.kafka_properties = props;
}

/// Runs a chbridge command; (exit code, stdout and stderr).
fn chbridge(args: &[&str], config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chbridge"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run chbridge");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The bridge consumes and commits, refused rows go to the dead-letter topic
/// (through the producer, over the same listener), `status` reads the group,
/// and `dlq replay` reads the dead letters back: all over SASL_SSL with SCRAM.
#[test]
fn the_bridge_its_dead_letters_status_and_replay_work_over_sasl_ssl_with_scram() {
    let db = unique("it_sasl");
    let group = unique("g_sasl");
    let topic = unique("sasl");
    let dlq = unique("sasl_dead");
    create_database(&db);
    ch(&format!(
        "CREATE TABLE {db}.t (id UInt64, p UInt8, payload String, \
         CONSTRAINT no_rejects CHECK payload != 'reject me') ENGINE = MergeTree ORDER BY id"
    ));
    create_topic(&topic, 2);
    create_topic(&dlq, 1);
    const N: u64 = 600;
    let prod = TestProducer::new();
    for i in 0..N {
        let payload = if i % 20 == 7 { "reject me" } else { "fine" };
        let p = (i % 2) as i32;
        let value = format!(r#"{{"id":{i},"p":{p},"payload":"{payload}"}}"#);
        prod.send(&topic, Some(p), i, value.as_bytes());
    }
    prod.flush();
    let refused = N / 20;
    let mut cfg = BridgeConfig::new(
        &group,
        &db,
        &format!(
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\non_error = \"dead-letter\"\n\
             dead_letter_topic = \"{dlq}\"\n"
        ),
    );
    through(&mut cfg, sasl_ssl(SCRAM_PASSWORD, Some(&ca())));
    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    let landed = wait_until(Duration::from_secs(60), || {
        ch_u64(&format!("SELECT count() FROM {db}.t")) == N - refused
            && committed(&group, &topic, 2).iter().sum::<i64>() == N as i64
    });
    assert!(
        landed,
        "rows or commits missing; log:\n{}",
        bridge.log_text()
    );
    let dead = read_topic(&dlq, refused as usize, Duration::from_secs(30));
    assert_eq!(dead.len() as u64, refused);

    let config = write_config(&cfg, &dir);
    let (code, out) = chbridge(&["status", "--json"], &config);
    assert_eq!(code, Some(0), "status over SASL_SSL: {out}");
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("status JSON ({e}): {out}"));
    let parts = json["partitions"].as_array().expect("partitions");
    assert_eq!(parts.len(), 2, "{out}");
    let committed_sum: i64 = parts.iter().filter_map(|p| p["committed"].as_i64()).sum();
    assert_eq!(committed_sum, N as i64, "{out}");
    assert!(parts.iter().all(|p| p["lag"].as_i64() == Some(0)), "{out}");
    bridge.signal(libc::SIGTERM);
    assert_eq!(
        bridge.wait(Duration::from_secs(30)).and_then(|s| s.code()),
        Some(0)
    );

    ch(&format!("ALTER TABLE {db}.t DROP CONSTRAINT no_rejects"));
    let (code, out) = chbridge(&["dlq", "replay", "--route", "0"], &config);
    assert_eq!(code, Some(0), "dlq replay over SASL_SSL: {out}");
    assert!(
        out.contains(&format!(
            "read {refused} dead letters, inserted {refused} rows"
        )),
        "{out}"
    );
    assert_eq!(ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")), N);
    drop_database(&db);
}

#[test]
fn rows_arrive_over_sasl_plaintext_and_over_tls_with_a_client_certificate() {
    for (name, listener) in [("plain", sasl_plain(PLAIN_PASSWORD)), ("mtls", mtls(true))] {
        let (db, topic, group, mut cfg) = simple_setup(&format!("sec_{name}"), 2, "");
        let prod = TestProducer::new();
        produce_simple(&prod, &topic, 2, 0, 500);
        prod.flush();
        through(&mut cfg, listener);
        let bridge = Bridge::start(&cfg, &test_dir(&db));
        let landed = wait_until(Duration::from_secs(60), || {
            ch_u64(&format!("SELECT count() FROM {db}.t")) == 500
                && committed(&group, &topic, 2).iter().sum::<i64>() == 500
        });
        assert!(landed, "{name}: log:\n{}", bridge.log_text());
        assert_eq!(
            ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")),
            500,
            "{name}"
        );
        drop(bridge);
        drop_database(&db);
    }
}

/// librdkafka retries a refused connection forever; chbridge must not look
/// alive meanwhile. Each command stops with exit 1, naming the broker, the
/// mechanism and what to fix, and never the password.
#[test]
fn a_refused_connection_stops_each_command_with_exit_1_naming_the_broker_and_the_fix() {
    let wrong = "not-the-password-4471";
    let sasl_port = env_port("KAFKA_SASL_SSL_PORT", 9095).to_string();
    let plain_port = env_port("KAFKA_SASL_PLAIN_PORT", 9096).to_string();
    let ssl_port = env_port("KAFKA_SSL_PORT", 9097).to_string();
    let cases: [(&str, Listener, Vec<&str>); 4] = [
        (
            "wrong SCRAM password",
            sasl_ssl(wrong, Some(&ca())),
            vec![
                &sasl_port,
                "SCRAM-SHA-512",
                "invalid credentials",
                "sasl.password",
            ],
        ),
        (
            "wrong PLAIN password",
            sasl_plain(wrong),
            vec![&plain_port, "sasl.mechanism = PLAIN", "sasl.password"],
        ),
        (
            "untrusted CA",
            sasl_ssl(SCRAM_PASSWORD, None),
            vec![&sasl_port, "certificate verify failed", "ssl.ca.location"],
        ),
        (
            "no client certificate",
            mtls(false),
            vec![
                &ssl_port,
                "security.protocol = SSL",
                "ssl.certificate.location",
            ],
        ),
    ];
    for (i, (what, listener, parts)) in cases.into_iter().enumerate() {
        let (db, topic, _, mut cfg) = simple_setup(
            &format!("refused{i}"),
            1,
            &format!(
                "on_error = \"dead-letter\"\ndead_letter_topic = \"{}_dead\"",
                unique("r")
            ),
        );
        let prod = TestProducer::new();
        produce_simple(&prod, &topic, 1, 0, 10);
        prod.flush();
        through(&mut cfg, listener);
        let dir = test_dir(&db);
        let mut bridge = Bridge::start(&cfg, &dir);
        let code = bridge.wait(Duration::from_secs(30)).and_then(|s| s.code());
        let log = bridge.log_text();
        assert_eq!(
            code,
            Some(1),
            "{what}: the bridge did not stop with 1:\n{log}"
        );
        let mut outputs = vec![("run", log)];
        // The other commands once: they share the code.
        if i == 0 {
            let config = write_config(&cfg, &dir);
            for args in [
                &["status", "--timeout", "8s"][..],
                &["check"][..],
                &["dlq", "replay", "--route", "0"][..],
            ] {
                let (code, out) = chbridge(args, &config);
                assert_eq!(code, Some(1), "{what}: {args:?}: {out}");
                outputs.push((args[0], out));
            }
        }
        for (command, out) in outputs {
            for part in &parts {
                assert!(
                    out.contains(part),
                    "{what}: {command}: no {part:?} in:\n{out}"
                );
            }
            assert!(
                !out.contains(wrong),
                "{what}: {command} shows the password:\n{out}"
            );
        }
        assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 0, "{what}");
        drop_database(&db);
    }
}

/// Item 9 of the real-Kafka issue: every secret set (the Kafka SASL password,
/// the passphrase of the client key, the schema registry's password, the
/// ClickHouse password), a run that works through TLS on both sides and a run
/// with an error of each kind; no secret shows in the logs, `/metrics`,
/// `check` or `status`.
#[test]
fn no_secret_shows_in_logs_metrics_check_or_status() {
    use crate::formats::{produce, Registry, COLUMNS, ROWS};
    const KEY_PASSPHRASE: &str = "key-passphrase-6620";
    const REGISTRY_PASSWORD: &str = "s3cret-pw"; // formats::Registry's user
    const CH_PASSWORD: &str = "ch-password-8830";
    const WRONG: [&str; 3] = [
        "wrong-scram-pw-5521",
        "wrong-registry-pw-3302",
        "wrong-key-pass-7710",
    ];
    let db = unique("it_secrets");
    let dir = test_dir(&db);
    create_database(&db);
    ch(&format!(
        "CREATE TABLE {db}.avro ({COLUMNS}) ENGINE = MergeTree ORDER BY id"
    ));
    let registry = Registry::start(&dir, false);
    let topic = unique("secrets");
    create_topic(&topic, 1);
    produce(&dir, &topic, "avro", Some(&registry), None);
    // The client key, encrypted under the passphrase.
    let key = dir.join("client.enc.key");
    let made = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in"])
        .arg(tls_dir().join("client.key"))
        .arg("-out")
        .arg(&key)
        .arg("-passout")
        .arg(format!("pass:{KEY_PASSPHRASE}"))
        .status()
        .expect("openssl");
    assert!(made.success());

    // Kafka over SASL_SSL with the client certificate, ClickHouse over HTTPS
    // with its own, the registry with basic auth.
    let config = |group: &str, scram: &str, passphrase: &str, registry_pw: &str, ch_pw: &str| {
        let mut cfg = BridgeConfig::new(
            group,
            &db,
            &format!(
                "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"avro\"\nformat = \"avro\"\n\
                 flatten = \"_\"\non_error = \"skip\"\n"
            ),
        );
        let (brokers, mut props) = sasl_ssl(scram, Some(&ca()));
        props.push_str(&format!(
            "\"ssl.certificate.location\" = \"{}\"\n\"ssl.key.location\" = \"{}\"\n\
             \"ssl.key.password\" = \"{passphrase}\"\n",
            tls_dir().join("client.pem").display(),
            key.display()
        ));
        through(&mut cfg, (brokers, props));
        let mut ch_keys = https_keys(ch_https_port());
        if !ch_pw.is_empty() {
            ch_keys.push_str(&format!("\npassword = \"{ch_pw}\""));
        }
        cfg.ch_keys = Some(ch_keys);
        cfg.extra = format!(
            "[schema_registry]\nurl = \"{}\"\nusername = \"bridge\"\npassword = \"{registry_pw}\"\n\
             timeout = \"2s\"\n",
            registry.url
        );
        cfg
    };
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut run_and_commands = |what: &str, cfg: &BridgeConfig, wait_rows: bool| {
        let run_dir = dir.join(what.replace(' ', "_"));
        std::fs::create_dir_all(&run_dir).expect("dir");
        let mut bridge = Bridge::start(cfg, &run_dir);
        if wait_rows {
            let landed = wait_until(Duration::from_secs(60), || {
                ch_u64(&format!("SELECT count() FROM {db}.avro")) == ROWS
            });
            assert!(landed, "{what}: rows missing; log:\n{}", bridge.log_text());
            let (_, metrics) = http(bridge.http_port, "GET", "/metrics", b"").expect("/metrics");
            assert!(metrics.contains("chbridge_"), "{metrics}");
            seen.push((format!("{what}: /metrics"), metrics));
        }
        let config = write_config(cfg, &run_dir);
        for args in [&["check"][..], &["status", "--timeout", "8s"][..]] {
            let (_, out) = chbridge(args, &config);
            seen.push((format!("{what}: {}", args[0]), out));
        }
        if bridge.wait(Duration::from_secs(20)).is_none() {
            bridge.signal(libc::SIGTERM);
            bridge.wait(Duration::from_secs(30));
        }
        seen.push((format!("{what}: log"), bridge.log_text()));
    };
    let ok = unique("g_secrets");
    run_and_commands(
        "working",
        &config(&ok, SCRAM_PASSWORD, KEY_PASSPHRASE, REGISTRY_PASSWORD, ""),
        true,
    );
    // One error of each kind, each on a group of its own (so it reads again).
    let errors = [
        (
            "wrong kafka password",
            config(
                &unique("g_s1"),
                WRONG[0],
                KEY_PASSPHRASE,
                REGISTRY_PASSWORD,
                "",
            ),
        ),
        (
            "wrong registry password",
            config(
                &unique("g_s2"),
                SCRAM_PASSWORD,
                KEY_PASSPHRASE,
                WRONG[1],
                "",
            ),
        ),
        (
            "wrong key passphrase",
            config(
                &unique("g_s3"),
                SCRAM_PASSWORD,
                WRONG[2],
                REGISTRY_PASSWORD,
                "",
            ),
        ),
        (
            "clickhouse refuses the password",
            config(
                &unique("g_s4"),
                SCRAM_PASSWORD,
                KEY_PASSPHRASE,
                REGISTRY_PASSWORD,
                CH_PASSWORD,
            ),
        ),
    ];
    for (what, cfg) in &errors {
        run_and_commands(what, cfg, false);
    }
    // Each error was met and told (so the outputs searched are the real ones).
    let told = |what: &str, needle: &str| {
        assert!(
            seen.iter()
                .any(|(w, out)| w.starts_with(what) && out.contains(needle)),
            "{what}: no {needle:?} in any output:\n{seen:#?}"
        );
    };
    told("wrong kafka password", "invalid credentials");
    told("wrong registry password", "401");
    told("wrong key passphrase", "ssl.key");
    told("clickhouse refuses the password", "password is incorrect");
    for secret in [
        SCRAM_PASSWORD,
        KEY_PASSPHRASE,
        REGISTRY_PASSWORD,
        CH_PASSWORD,
    ]
    .into_iter()
    .chain(WRONG)
    {
        for (what, out) in &seen {
            assert!(!out.contains(secret), "{what} shows a secret:\n{out}");
        }
    }
    drop_database(&db);
}
