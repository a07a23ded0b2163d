//! SIGHUP reloads batching and the routes' error policy in a running bridge,
//! and refuses, changing nothing, a configuration that needs a restart.

use std::time::Duration;

use crate::common::*;

#[test]
fn sighup_reloads_batching_and_error_policy_and_refuses_the_rest() {
    let (db, topic, group, mut cfg) = simple_setup("reload", 1, "on_error = \"skip\"");
    let dir = test_dir(&db);
    let mut bridge = Bridge::start(&cfg, &dir);
    let prod = TestProducer::new();
    let rows = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    let reload = |bridge: &Bridge, cfg: &BridgeConfig, expect: &str, times: usize| {
        write_config(cfg, &dir);
        bridge.signal(libc::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || bridge
                .log_text()
                .matches(expect)
                .count()
                >= times),
            "no {expect:?} in the log:\n{}",
            bridge.log_text()
        );
    };

    produce_simple(&prod, &topic, 1, 0, 1000);
    prod.flush();
    assert!(
        wait_until(Duration::from_secs(60), || rows() == 1000),
        "{}",
        bridge.log_text()
    );

    // A new group needs a restart: refused, the bridge goes on as it was.
    let mut other = BridgeConfig { ..cfg.clone() };
    other.group = unique("other");
    reload(&bridge, &other, "reload refused", 1);
    assert!(bridge
        .log_text()
        .contains("kafka changed, which needs a restart"));
    produce_simple(&prod, &topic, 1, 1000, 1000);
    prod.flush();
    assert!(
        wait_until(Duration::from_secs(30), || rows() == 2000),
        "{}",
        bridge.log_text()
    );
    assert!(wait_until(Duration::from_secs(10), || committed(
        &group, &topic, 1
    ) == vec![2000]));

    // Smaller batches and on_error = "stop": both apply without a restart.
    let batches_before = bridge.metric("chbridge_batches_inserted_total", "");
    cfg.batch_extra = "max_rows = 100".into();
    cfg.routes = cfg
        .routes
        .replace("on_error = \"skip\"", "on_error = \"stop\"");
    // [batch] max_rows appears twice otherwise: the test config sets 5000.
    let toml = cfg.toml().replace("max_rows = 5000\n", "").replace(
        "level = \"info,librdkafka=warn\"",
        "level = \"debug,librdkafka=warn\"",
    );
    assert!(!bridge.log_text().contains(" DEBUG "));
    std::fs::write(dir.join("chbridge.toml"), &toml).expect("write config");
    bridge.signal(libc::SIGHUP);
    // The consumer thread applies it at its next turn, and says so.
    assert!(
        wait_until(Duration::from_secs(10), || bridge
            .log_text()
            .contains("batching and route error policies reloaded")),
        "{}",
        bridge.log_text()
    );
    let log = bridge.log_text();
    assert!(
        log.contains("batch.max_rows, log.level, routes[0].on_error"),
        "the reload names what changed:\n{log}"
    );
    produce_simple(&prod, &topic, 1, 2000, 1000);
    prod.flush();
    assert!(
        wait_until(Duration::from_secs(30), || rows() == 3000),
        "{}",
        bridge.log_text()
    );
    let batches = bridge.metric("chbridge_batches_inserted_total", "") - batches_before;
    assert!(
        bridge.log_text().contains(" DEBUG "),
        "log.level reloaded to debug"
    );
    assert!(
        batches >= 10.0,
        "1000 rows in batches of at most 100 took {batches} inserts"
    );

    // The route now stops at a bad record instead of skipping it.
    prod.send(&topic, Some(0), 99_999, b"not json");
    produce_simple(&prod, &topic, 1, 3000, 10);
    prod.flush();
    let status = bridge.wait(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{}",
        bridge.log_text()
    );
    assert_eq!(rows(), 3000);
    assert_eq!(
        committed(&group, &topic, 1),
        vec![3000],
        "commit stops at the bad record"
    );
    drop_database(&db);
}
