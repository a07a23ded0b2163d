//! A real Prometheus (Debian's 2.42, unpacked by scripts/deploy_tools.sh)
//! scrapes a running chbridge: the rows inserted and the lag per partition
//! are visible through its query API, the lag grows while ClickHouse is
//! down and falls back to 0 after, and the shipped alert rules load.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &std::path::Path, target_port: u16) -> Prometheus {
        let bin = std::env::var("PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo().join(".stack/tools/prometheus/usr/bin/prometheus"));
        assert!(
            bin.exists(),
            "{} is missing: run scripts/deploy_tools.sh install (make test does)",
            bin.display()
        );
        let rules = repo().join("deploy/prometheus/alerts.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: chbridge\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
                rules = rules.display()
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, port };
        assert!(
            wait_until(Duration::from_secs(30), || matches!(
                http(port, "GET", "/-/ready", b""),
                Ok((200, _))
            )),
            "prometheus did not start; see {}",
            dir.join("prometheus.log").display()
        );
        p
    }

    fn get(&self, path: &str) -> Value {
        match http(self.port, "GET", path, b"") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// Instant query: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let v = self.get(&format!("/api/v1/query?query={q}"));
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        let value = r["value"][1].as_str().and_then(|s| s.parse().ok());
                        (r["metric"].clone(), value.unwrap_or(f64::NAN))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Lag per partition of `topic`, sorted by partition.
    fn lag(&self, topic: &str) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .query(&format!("chbridge_consumer_lag{{topic=\"{topic}\"}}"))
            .into_iter()
            .map(|(m, v)| (m["partition"].as_str().unwrap_or("").to_string(), v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[test]
fn prometheus_scrapes_rows_and_lag_per_partition() {
    let dir = test_dir(&unique("prometheus"));
    let mut server = PrivateClickHouse::start(&dir);
    server.sql("CREATE DATABASE it");
    server.sql(&format!("CREATE TABLE it.t {SIMPLE_TABLE}"));
    let topic = unique("prom");
    create_topic(&topic, 2);
    let mut cfg = BridgeConfig::new(
        &unique("g_prom"),
        "it",
        &format!("[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\n"),
    );
    cfg.ch_port = server.http_port;
    cfg.ch_https_port = server.https_port;
    let _bridge = Bridge::start(&cfg, &dir);
    let prom = Prometheus::start(&dir, cfg.http_port);
    let prod = TestProducer::new();
    produce_simple(&prod, &topic, 2, 0, 2000);
    prod.flush();

    let rows = |prom: &Prometheus| {
        prom.query("sum(chbridge_rows_inserted_total{table=\"it.t\"})")
            .first()
            .map_or(-1.0, |s| s.1)
    };
    assert!(
        wait_until(Duration::from_secs(60), || rows(&prom) == 2000.0),
        "Prometheus saw {} rows inserted",
        rows(&prom)
    );
    assert_eq!(server.sql("SELECT count() FROM it.t"), "2000\n");
    assert!(
        wait_until(Duration::from_secs(30), || prom.lag(&topic)
            == vec![("0".into(), 0.0), ("1".into(), 0.0)]),
        "lag per partition: {:?}",
        prom.lag(&topic)
    );

    // ClickHouse down: nothing is committed, so each partition's lag is
    // exactly what was produced since.
    server.kill9();
    produce_simple(&prod, &topic, 2, 2000, 600);
    prod.flush();
    assert!(
        wait_until(Duration::from_secs(30), || prom.lag(&topic)
            == vec![("0".into(), 300.0), ("1".into(), 300.0)]),
        "lag per partition while ClickHouse is down: {:?}",
        prom.lag(&topic)
    );

    server.restart();
    assert!(
        wait_until(Duration::from_secs(60), || prom.lag(&topic)
            == vec![("0".into(), 0.0), ("1".into(), 0.0)]),
        "lag after ClickHouse came back: {:?}",
        prom.lag(&topic)
    );
    assert!(wait_until(Duration::from_secs(30), || rows(&prom) == 2600.0));
    assert_eq!(server.sql("SELECT count() FROM it.t"), "2600\n");

    // The shipped alert rules load into a real Prometheus, and every alert
    // of the running bridge is healthy (its expression evaluates).
    let rules = prom.get("/api/v1/rules");
    let groups = rules["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let alerts: Vec<&Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["type"] == "alerting")
        .collect();
    assert!(alerts.len() >= 10, "alert rules loaded: {rules}");
    for a in &alerts {
        assert_eq!(a["health"], "ok", "rule {}: {}", a["name"], a["lastError"]);
    }
    let firing: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["state"] == "firing")
        .copied()
        .collect();
    assert!(
        firing.is_empty(),
        "no alert fires for a healthy bridge: {firing:?}"
    );
}
