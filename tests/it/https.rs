//! HTTPS to ClickHouse: the stack's ClickHouse answers HTTPS with a
//! certificate of the stack's own CA (scripts/stack.sh). A bridge that trusts
//! that CA and presents a client certificate delivers every row; one that
//! does not trust it is refused at once with an error that says what to set,
//! and inserts and commits nothing.

use std::time::Duration;

use crate::common::*;

const PARTITIONS: i32 = 2;

#[test]
fn rows_arrive_over_https_with_a_client_certificate() {
    let (db, topic, group, cfg) = simple_setup("https_ok", PARTITIONS, "");
    let dir = test_dir(&db);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, PARTITIONS, 0, 5_000);
    prod.flush();
    let mut cfg = cfg;
    cfg.ch_keys = Some(https_keys(ch_https_port()));
    let mut bridge = Bridge::start(&cfg, &dir);
    let ids = || ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t"));
    assert!(
        wait_until(Duration::from_secs(60), || ids() == 5_000),
        "{} of 5000 ids over HTTPS; log:\n{}",
        ids(),
        bridge.log_text()
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 5_000);
    bridge.signal(libc::SIGTERM);
    assert!(bridge
        .wait(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    assert_eq!(
        committed(&group, &topic, PARTITIONS).iter().sum::<i64>(),
        5_000,
        "every offset committed"
    );
    drop_database(&db);
}

#[test]
fn an_untrusted_server_certificate_is_refused_and_nothing_is_inserted() {
    let (db, topic, group, cfg) = simple_setup("https_untrusted", PARTITIONS, "");
    let dir = test_dir(&db);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, PARTITIONS, 0, 100);
    prod.flush();
    // The system's roots only: the stack's CA is not among them.
    let mut cfg = cfg;
    cfg.ch_keys = Some(format!("url = \"https://127.0.0.1:{}\"", ch_https_port()));
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge.wait(Duration::from_secs(30));
    let log = bridge.log_text();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the bridge must exit with an error, not wait; log:\n{log}"
    );
    assert!(
        log.contains("certificate") && log.contains("clickhouse.ca_file"),
        "the error names the certificate and the key to set; log:\n{log}"
    );
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), 0);
    assert_eq!(
        committed(&group, &topic, PARTITIONS),
        vec![-1; PARTITIONS as usize]
    );

    // `check` says the same, and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chbridge"))
        .args(["check", "--config"])
        .arg(write_config(&cfg, &dir))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check passed:\n{text}");
    assert!(text.contains("clickhouse.ca_file"), "check output:\n{text}");
    drop_database(&db);
}

#[test]
fn a_ca_file_that_is_no_certificate_is_a_configuration_error() {
    let (db, _topic, _group, cfg) = simple_setup("https_badca", PARTITIONS, "");
    let dir = test_dir(&db);
    let bad = dir.join("not-a-ca.pem");
    std::fs::write(&bad, "hello").unwrap();
    let mut cfg = cfg;
    cfg.ch_keys = Some(format!(
        "url = \"https://127.0.0.1:{}\"\nca_file = \"{}\"",
        ch_https_port(),
        bad.display()
    ));
    let mut bridge = Bridge::start(&cfg, &dir);
    let status = bridge.wait(Duration::from_secs(30));
    let log = bridge.log_text();
    assert!(status.is_some_and(|s| !s.success()), "log:\n{log}");
    assert!(
        log.contains("clickhouse.ca_file") && log.contains("not-a-ca.pem"),
        "the error names the key and the file; log:\n{log}"
    );
    drop_database(&db);
}
