CREATE TABLE IF NOT EXISTS default.demo_events
(
    id UInt64,
    ts DateTime64(3, 'UTC'),
    user LowCardinality(String),
    event LowCardinality(String),
    amount Float64,
    tags Array(String),
    day Date MATERIALIZED toDate(ts),
    ingested_at DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY (event, ts)
