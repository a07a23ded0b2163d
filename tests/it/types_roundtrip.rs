//! The round-trip proof for types: random tables drawn from every column type
//! chbridge writes, random JSON rows for them, sent through a real topic and a
//! real bridge into one table, and the same lines inserted by the test with
//! ClickHouse's own `JSONEachRow` parser into a twin table. The two tables must
//! hold the same values, row by row and column by column.
//!
//! The seed is printed; `CHBRIDGE_ROUNDTRIP_SEED=<n>` replays a run, and
//! `CHBRIDGE_ROUNDTRIP_TABLES` sets how many random tables are drawn.

use std::fmt::Write as _;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::*;

/// A column type and how to make JSON values that both parsers read the same way.
#[derive(Clone, Debug)]
enum Ty {
    Int(&'static str, i128, i128),
    /// (U)Int128/256 beyond i128: values as decimal text.
    Wide(&'static str, bool, usize),
    Float32,
    Float64,
    BFloat16,
    Decimal(u32, u32),
    Bool,
    Str,
    Fixed(usize),
    Uuid,
    Date,
    Date32,
    DateTime(Option<&'static str>),
    DateTime64(u32, Option<&'static str>),
    Enum(bool),
    IPv4,
    IPv6,
    Time,
    Time64(u32),
    Nullable(Box<Ty>),
    LowCardinality(Box<Ty>),
    Array(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    Tuple(Vec<Ty>),
    NamedTuple(Vec<(String, Ty)>),
    /// Nested kept whole (flatten_nested = 0): an array of objects.
    Nested(Vec<(String, Ty)>),
    Json,
    Variant,
    Dynamic,
    Point,
    Ring,
    Geometry,
    /// `QBit(Float32, N)`: exactly N floats.
    QBit(usize),
}

impl Ty {
    fn ddl(&self) -> String {
        match self {
            Ty::Int(n, ..) | Ty::Wide(n, ..) => n.to_string(),
            Ty::Float32 => "Float32".into(),
            Ty::Float64 => "Float64".into(),
            Ty::BFloat16 => "BFloat16".into(),
            Ty::Decimal(p, s) => format!("Decimal({p}, {s})"),
            Ty::Bool => "Bool".into(),
            Ty::Str => "String".into(),
            Ty::Fixed(n) => format!("FixedString({n})"),
            Ty::Uuid => "UUID".into(),
            Ty::Date => "Date".into(),
            Ty::Date32 => "Date32".into(),
            Ty::DateTime(None) => "DateTime".into(),
            Ty::DateTime(Some(tz)) => format!("DateTime('{tz}')"),
            Ty::DateTime64(p, None) => format!("DateTime64({p})"),
            Ty::DateTime64(p, Some(tz)) => format!("DateTime64({p}, '{tz}')"),
            Ty::Enum(false) => "Enum8('a' = 1, 'b\\'q' = -2, 'c d' = 127)".into(),
            Ty::Enum(true) => "Enum16('x' = -1000, 'y' = 0, 'zé' = 30000)".into(),
            Ty::IPv4 => "IPv4".into(),
            Ty::IPv6 => "IPv6".into(),
            Ty::Time => "Time".into(),
            Ty::Time64(p) => format!("Time64({p})"),
            Ty::Nullable(t) => format!("Nullable({})", t.ddl()),
            Ty::LowCardinality(t) => format!("LowCardinality({})", t.ddl()),
            Ty::Array(t) => format!("Array({})", t.ddl()),
            Ty::Map(k, v) => format!("Map({}, {})", k.ddl(), v.ddl()),
            Ty::Tuple(ts) => format!(
                "Tuple({})",
                ts.iter().map(Ty::ddl).collect::<Vec<_>>().join(", ")
            ),
            Ty::NamedTuple(ts) => format!(
                "Tuple({})",
                ts.iter()
                    .map(|(n, t)| format!("{n} {}", t.ddl()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ty::Nested(ts) => format!(
                "Nested({})",
                ts.iter()
                    .map(|(n, t)| format!("{n} {}", t.ddl()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ty::Json => "JSON".into(),
            Ty::Variant => "Variant(String, UInt64, Array(Int32), Float64)".into(),
            Ty::Dynamic => "Dynamic".into(),
            Ty::Point => "Point".into(),
            Ty::Ring => "Ring".into(),
            Ty::Geometry => "Geometry".into(),
            Ty::QBit(n) => format!("QBit(Float32, {n})"),
        }
    }

    /// A JSON value of this type. `top` is false inside containers.
    fn value(&self, r: &mut StdRng) -> String {
        match self {
            Ty::Int(_, lo, hi) => {
                let v = if r.random_bool(0.3) {
                    *[*lo, *hi, 0].get(r.random_range(0..3)).unwrap_or(&0)
                } else {
                    r.random_range(*lo..=*hi)
                };
                // 64-bit and wider integers also come quoted, as JavaScript producers send them.
                if (*hi > i64::MAX as i128 || *lo < i64::MIN as i128) && r.random_bool(0.5) {
                    format!("\"{v}\"")
                } else {
                    v.to_string()
                }
            }
            Ty::Wide(_, signed, digits) => {
                let n = r.random_range(1..=*digits);
                let mut s = String::new();
                if *signed && r.random_bool(0.5) {
                    s.push('-');
                }
                s.push(char::from(b'1' + r.random_range(0..9u8)));
                for _ in 1..n {
                    s.push(char::from(b'0' + r.random_range(0..10u8)));
                }
                if r.random_bool(0.5) {
                    format!("\"{s}\"")
                } else {
                    s
                }
            }
            Ty::Float32 => {
                let v = (r.random_range(-1e6..1e6f64) as f32) / 7.0;
                format!("{v}")
            }
            Ty::Float64 => {
                let v: f64 = r.random_range(-1e12..1e12) / 3.0;
                format!("{v}")
            }
            Ty::BFloat16 => {
                // Exactly representable ones and others that ClickHouse truncates.
                let v = r.random_range(-1e4..1e4f32);
                let v = if r.random_bool(0.5) {
                    f32::from_bits(v.to_bits() & 0xffff_0000)
                } else {
                    v
                };
                format!("{v}")
            }
            Ty::Decimal(p, s) => {
                let int_digits = r.random_range(0..=(p - s).min(30));
                let frac_digits = r.random_range(0..=*s);
                let mut t = String::new();
                if r.random_bool(0.4) {
                    t.push('-');
                }
                if int_digits == 0 {
                    t.push('0');
                }
                for i in 0..int_digits {
                    let lo = if i == 0 { 1 } else { 0 };
                    t.push(char::from(b'0' + r.random_range(lo..10u8)));
                }
                if frac_digits > 0 {
                    t.push('.');
                    for _ in 0..frac_digits {
                        t.push(char::from(b'0' + r.random_range(0..10u8)));
                    }
                }
                // Numbers keep their text through chbridge; quoted ones too.
                if r.random_bool(0.5) && t.len() < 16 {
                    t
                } else {
                    format!("\"{t}\"")
                }
            }
            Ty::Bool => r.random_bool(0.5).to_string(),
            Ty::Str => random_string(r, 12),
            Ty::Fixed(n) => {
                let len = r.random_range(0..=*n);
                let s: String = (0..len)
                    .map(|_| char::from(b'a' + r.random_range(0..26u8)))
                    .collect();
                format!("\"{s}\"")
            }
            Ty::Uuid => format!(
                "\"{:08x}-{:04x}-{:04x}-{:04x}-{:012x}\"",
                r.random::<u32>(),
                r.random::<u16>(),
                r.random::<u16>(),
                r.random::<u16>(),
                r.random::<u64>() & 0xffff_ffff_ffff
            ),
            Ty::Date => format!("\"{}\"", date(r, 0, 65_535)),
            Ty::Date32 => format!("\"{}\"", date(r, -25_567, 120_529)),
            Ty::DateTime(_) => {
                let secs = r.random_range(0..4_294_967_295i64);
                if r.random_bool(0.5) {
                    secs.to_string()
                } else {
                    format!("\"{}\"", datetime(secs, 0, 0))
                }
            }
            Ty::DateTime64(p, _) => {
                // Nanosecond ticks in an Int64 end in 2262.
                let hi = if *p == 9 {
                    9_223_372_035
                } else {
                    10_413_791_999i64
                };
                let secs = r.random_range(-2_208_988_800..hi);
                let frac = r.random_range(0..10i64.pow(*p));
                format!("\"{}\"", datetime(secs, frac, *p))
            }
            Ty::Enum(false) => {
                if r.random_bool(0.7) {
                    ["\"a\"", "\"b'q\"", "\"c d\""][r.random_range(0..3)].into()
                } else {
                    ["1", "-2", "127"][r.random_range(0..3)].into()
                }
            }
            Ty::Enum(true) => {
                ["\"x\"", "\"y\"", "\"zé\"", "-1000", "30000"][r.random_range(0..5)].into()
            }
            Ty::IPv4 => format!(
                "\"{}.{}.{}.{}\"",
                r.random::<u8>(),
                r.random::<u8>(),
                r.random::<u8>(),
                r.random::<u8>()
            ),
            Ty::IPv6 => {
                if r.random_bool(0.2) {
                    format!("\"{}.{}.{}.{}\"", r.random::<u8>(), r.random::<u8>(), 0, 1)
                } else {
                    let ip = std::net::Ipv6Addr::from(r.random::<u128>());
                    format!("\"{ip}\"")
                }
            }
            Ty::Time | Ty::Time64(_) => {
                let p = if let Ty::Time64(p) = self { *p } else { 0 };
                let secs = r.random_range(0..=999 * 3600 + 3599i64);
                let sign = if r.random_bool(0.3) { "-" } else { "" };
                let mut s = format!(
                    "{sign}{}:{:02}:{:02}",
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60
                );
                if p > 0 {
                    let _ = write!(
                        s,
                        ".{:0w$}",
                        r.random_range(0..10i64.pow(p)),
                        w = p as usize
                    );
                }
                format!("\"{s}\"")
            }
            Ty::Nullable(t) => {
                if r.random_bool(0.3) {
                    "null".into()
                } else {
                    t.value(r)
                }
            }
            Ty::LowCardinality(t) => t.value(r),
            Ty::Array(t) => {
                let n = r.random_range(0..4);
                let items: Vec<String> = (0..n).map(|_| t.value(r)).collect();
                format!("[{}]", items.join(","))
            }
            Ty::Map(k, v) => {
                let n = r.random_range(0..4);
                let mut seen = std::collections::HashSet::new();
                let mut items = Vec::new();
                for _ in 0..n {
                    let key = k.value(r);
                    let key = if key.starts_with('"') {
                        key
                    } else {
                        format!("\"{key}\"")
                    };
                    if seen.insert(key.clone()) {
                        items.push(format!("{key}:{}", v.value(r)));
                    }
                }
                format!("{{{}}}", items.join(","))
            }
            Ty::Tuple(ts) => {
                let items: Vec<String> = ts.iter().map(|t| t.value(r)).collect();
                format!("[{}]", items.join(","))
            }
            Ty::NamedTuple(ts) => {
                let items: Vec<String> = ts
                    .iter()
                    .map(|(n, t)| format!("\"{n}\":{}", t.value(r)))
                    .collect();
                format!("{{{}}}", items.join(","))
            }
            Ty::Nested(ts) => {
                let n = r.random_range(0..3);
                let rows: Vec<String> = (0..n)
                    .map(|_| Ty::NamedTuple(ts.clone()).value(r))
                    .collect();
                format!("[{}]", rows.join(","))
            }
            Ty::Json => format!(
                "{{\"k\":{},\"n\":{{\"s\":{},\"a\":[{},{}]}}}}",
                r.random_range(-100..100),
                random_string(r, 5),
                r.random_range(0..9),
                r.random_range(0..9)
            ),
            Ty::Variant => match r.random_range(0..5) {
                0 => format!("\"v{}\"", r.random_range(0..1000)),
                1 => r.random_range(0..u64::MAX / 2).to_string(),
                2 => format!("[{},{}]", r.random_range(-5..5), r.random_range(-5..5)),
                3 => format!("{}.5", r.random_range(-1000..1000)),
                _ => "null".into(),
            },
            Ty::Dynamic => match r.random_range(0..7) {
                5 => format!("[{},null,{}]", r.random_range(-9..9), r.random_range(-9..9)),
                6 => format!("[\"a{}\",\"b\"]", r.random_range(0..9)),
                0 => format!("\"s{}x\"", r.random_range(0..1000)),
                1 => r.random_range(-1_000_000i64..1_000_000).to_string(),
                2 => format!("{}.25", r.random_range(-1000..1000)),
                3 => r.random_bool(0.5).to_string(),
                _ => "null".into(),
            },
            Ty::Point => format!(
                "[{}.5,{}]",
                r.random_range(-90..90),
                r.random_range(-180..180)
            ),
            Ty::Ring => {
                let n = r.random_range(0..4);
                let pts: Vec<String> = (0..n).map(|_| Ty::Point.value(r)).collect();
                format!("[{}]", pts.join(","))
            }
            Ty::QBit(n) => {
                let items: Vec<String> = (0..*n)
                    .map(|_| format!("{}", r.random_range(-1000..1000) as f32 / 8.0))
                    .collect();
                format!("[{}]", items.join(","))
            }
            // A point, a line, lines and polygons: ClickHouse and chbridge
            // must pick the same variant for each depth.
            Ty::Geometry => match r.random_range(0..5) {
                0 => Ty::Point.value(r),
                1 => format!("[{},{}]", Ty::Point.value(r), Ty::Point.value(r)),
                2 => format!("[[{},{}]]", Ty::Point.value(r), Ty::Point.value(r)),
                3 => format!("[[[{}]]]", Ty::Point.value(r)),
                _ => "null".into(),
            },
        }
    }
}

fn random_string(r: &mut StdRng, max: usize) -> String {
    let pool = [
        "a", "Z", "é", "日本", "🦀", " ", "\\\"", "\\\\", "\\n", "\\t", "\\u0000", "\\u00e9", "'",
        ",", "{", "[",
    ];
    let n = r.random_range(0..=max);
    let s: String = (0..n)
        .map(|_| pool[r.random_range(0..pool.len())])
        .collect();
    format!("\"{s}\"")
}

fn date(r: &mut StdRng, lo: i64, hi: i64) -> String {
    let days = r.random_range(lo..=hi);
    chrono::DateTime::from_timestamp(days * 86_400, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn datetime(secs: i64, frac: i64, p: u32) -> String {
    let base = chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    if p == 0 {
        base
    } else {
        format!("{base}.{frac:0w$}", w = p as usize)
    }
}

/// Every scalar the test draws from.
fn scalars() -> Vec<Ty> {
    vec![
        Ty::Int("Int8", -128, 127),
        Ty::Int("Int16", -32768, 32767),
        Ty::Int("Int32", i32::MIN as i128, i32::MAX as i128),
        Ty::Int("Int64", i64::MIN as i128, i64::MAX as i128),
        Ty::Int("UInt8", 0, 255),
        Ty::Int("UInt16", 0, 65535),
        Ty::Int("UInt32", 0, u32::MAX as i128),
        Ty::Int("UInt64", 0, u64::MAX as i128),
        Ty::Int("Int128", i128::MIN, i128::MAX),
        Ty::Int("UInt128", 0, i128::MAX),
        Ty::Wide("UInt128", false, 38),
        Ty::Wide("Int256", true, 76),
        Ty::Wide("UInt256", false, 76),
        Ty::Float32,
        Ty::Float64,
        Ty::BFloat16,
        Ty::Decimal(9, 2),
        Ty::Decimal(18, 18),
        Ty::Decimal(38, 10),
        Ty::Decimal(76, 30),
        Ty::Decimal(3, 0),
        Ty::Bool,
        Ty::Str,
        Ty::Fixed(5),
        Ty::Uuid,
        Ty::Date,
        Ty::Date32,
        Ty::DateTime(None),
        Ty::DateTime(Some("UTC")),
        Ty::DateTime64(3, Some("UTC")),
        Ty::DateTime64(6, None),
        Ty::DateTime64(9, Some("UTC")),
        Ty::DateTime64(0, None),
        Ty::Enum(false),
        Ty::Enum(true),
        Ty::IPv4,
        Ty::IPv6,
        Ty::Time,
        Ty::Time64(3),
        Ty::Time64(6),
        Ty::Int("IntervalSecond", i64::MIN as i128, i64::MAX as i128),
        Ty::Int("IntervalMonth", -1000, 1000),
        Ty::Int("IntervalNanosecond", -1_000_000_000, 1_000_000_000),
    ]
}

fn random_type(r: &mut StdRng, depth: u32) -> Ty {
    let s = scalars();
    let pick = |r: &mut StdRng| s[r.random_range(0..s.len())].clone();
    let roll = if depth >= 2 { 0 } else { r.random_range(0..14) };
    match roll {
        0..=5 => pick(r),
        6 => Ty::Nullable(Box::new(pick(r))),
        7 => Ty::LowCardinality(Box::new(if r.random_bool(0.5) {
            Ty::Str
        } else {
            Ty::Nullable(Box::new(Ty::Str))
        })),
        8 => Ty::Array(Box::new(random_type(r, depth + 1))),
        9 => Ty::Map(
            Box::new(if r.random_bool(0.5) {
                Ty::Str
            } else {
                Ty::Int("UInt16", 0, 65535)
            }),
            Box::new(random_type(r, depth + 1)),
        ),
        10 => Ty::Tuple(
            (0..r.random_range(1..4))
                .map(|_| random_type(r, depth + 1))
                .collect(),
        ),
        11 => Ty::NamedTuple(
            (0..r.random_range(1..4))
                .map(|i| (format!("f{i}"), random_type(r, depth + 1)))
                .collect(),
        ),
        12 if depth == 0 && r.random_bool(0.3) => Ty::QBit(r.random_range(1..6)),
        12 if depth == 0 => Ty::Nested(
            (0..r.random_range(1..3))
                .map(|i| (format!("e{i}"), pick(r)))
                .collect(),
        ),
        12 => pick(r),
        _ => [
            Ty::Json,
            Ty::Variant,
            Ty::Dynamic,
            Ty::Point,
            Ty::Ring,
            Ty::Geometry,
        ][r.random_range(0..6)]
        .clone(),
    }
}

struct Table {
    name: String,
    /// Nested columns stored flattened (`c.e0`, `c.e1` arrays), as by default.
    flat: bool,
    columns: Vec<(String, Ty)>,
    /// Column clauses that are not plain typed columns.
    extra: Vec<String>,
    /// Names of every column to compare (computed ones included).
    compared: Vec<String>,
}

/// Every type family in a few tables, so that each run covers them all;
/// random tables follow.
fn covering_types(r: &mut StdRng) -> Vec<Vec<Ty>> {
    let mut all = scalars();
    all.extend([
        Ty::Nullable(Box::new(Ty::Int(
            "Int32",
            i32::MIN as i128,
            i32::MAX as i128,
        ))),
        Ty::LowCardinality(Box::new(Ty::Nullable(Box::new(Ty::Str)))),
        Ty::Array(Box::new(Ty::Nullable(Box::new(Ty::Decimal(18, 6))))),
        Ty::Map(Box::new(Ty::Str), Box::new(Ty::Array(Box::new(Ty::Uuid)))),
        Ty::Tuple(vec![Ty::IPv6, Ty::Enum(true)]),
        Ty::NamedTuple(vec![("a".into(), Ty::Date32), ("b".into(), Ty::Time64(3))]),
        Ty::Nested(vec![
            ("x".into(), Ty::Int("UInt8", 0, 255)),
            ("y".into(), Ty::Str),
        ]),
        Ty::Json,
        Ty::Variant,
        Ty::Dynamic,
        Ty::Point,
        Ty::Ring,
        Ty::Geometry,
        Ty::QBit(r.random_range(1..6)),
    ]);
    all.chunks(8).map(<[Ty]>::to_vec).collect()
}

fn random_table(r: &mut StdRng, i: usize, given: Option<Vec<Ty>>) -> Table {
    let columns: Vec<(String, Ty)> = match given {
        Some(types) => types
            .into_iter()
            .enumerate()
            .map(|(c, t)| (format!("c{c}"), t))
            .collect(),
        None => (0..r.random_range(3..9))
            .map(|c| (format!("c{c}"), random_type(r, 0)))
            .collect(),
    };
    let mut extra = Vec::new();
    let mut compared: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    // Columns whose value ClickHouse computes, as its own inserts do: (how
    // often, the column clauses, the column compared).
    let computed: [(f64, &[&str], &str); 4] = [
        (
            0.5,
            &["d_default String DEFAULT concat('dflt-', toString(id))"],
            "d_default",
        ),
        (0.5, &["d_mat UInt64 MATERIALIZED id * 2"], "d_mat"),
        (0.3, &["d_alias UInt64 ALIAS id + 1"], "d_alias"),
        (
            0.5,
            &[
                "d_eph UInt32 EPHEMERAL",
                "d_from_eph UInt32 DEFAULT d_eph * 3",
            ],
            "d_from_eph",
        ),
    ];
    for (p, clauses, column) in computed {
        if r.random_bool(p) {
            extra.extend(clauses.iter().map(|c| c.to_string()));
            compared.push(column.to_string());
        }
    }
    let flat = r.random_bool(0.3);
    if flat {
        // Flattened Nested columns are compared element array by element array.
        compared = compared
            .into_iter()
            .flat_map(|c| match columns.iter().find(|(n, _)| *n == c) {
                Some((_, Ty::Nested(els))) => els.iter().map(|(e, _)| format!("{c}.{e}")).collect(),
                _ => vec![c],
            })
            .collect();
    }
    Table {
        name: format!("rt{i}"),
        flat,
        columns,
        extra,
        compared,
    }
}

impl Table {
    fn ddl(&self, db: &str, suffix: &str) -> String {
        let mut cols = vec!["id UInt64".to_string()];
        cols.extend(
            self.columns
                .iter()
                .map(|(n, t)| format!("`{n}` {}", t.ddl())),
        );
        cols.extend(self.extra.iter().cloned());
        format!(
            "CREATE TABLE {db}.{}{suffix} ({}) ENGINE = MergeTree ORDER BY id \
             SETTINGS allow_experimental_bfloat16_type = 1, enable_time_time64_type = 1, \
             flatten_nested = {}",
            self.name,
            cols.join(", "),
            u8::from(self.flat)
        )
    }

    fn row(&self, r: &mut StdRng, id: u64) -> String {
        let mut fields = vec![format!("\"id\":{id}")];
        for (n, t) in &self.columns {
            // Sometimes missing: both sides then apply the column's default.
            if r.random_bool(0.1) {
                continue;
            }
            if let (true, Ty::Nested(els)) = (self.flat, t) {
                // Flattened: one array per element, all of one length.
                let len = r.random_range(0..3);
                for (e, et) in els {
                    let items: Vec<String> = (0..len).map(|_| et.value(r)).collect();
                    fields.push(format!("\"{n}.{e}\":[{}]", items.join(",")));
                }
                continue;
            }
            fields.push(format!("\"{n}\":{}", t.value(r)));
        }
        if self.extra.iter().any(|e| e.starts_with("d_default")) && r.random_bool(0.5) {
            fields.push(format!("\"d_default\":\"given {id}\""));
        }
        if self.extra.iter().any(|e| e.starts_with("d_eph")) {
            fields.push(format!("\"d_eph\":{}", r.random_range(0..1000)));
        }
        format!("{{{}}}", fields.join(","))
    }
}

#[test]
fn random_tables_of_every_type_match_clickhouses_own_parse() {
    let seed: u64 = std::env::var("CHBRIDGE_ROUNDTRIP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let tables: usize = std::env::var("CHBRIDGE_ROUNDTRIP_TABLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    const ROWS: u64 = 60;
    eprintln!(
        "round trip: seed {seed} (CHBRIDGE_ROUNDTRIP_SEED={seed} replays it), {tables} tables"
    );
    let mut r = StdRng::seed_from_u64(seed);
    let db = unique("rt");
    ch(&format!("CREATE DATABASE {db}"));
    let group = unique("rt-group");
    let producer = TestProducer::new();
    let mut routes = String::new();
    let mut all = Vec::new();
    let mut covering = covering_types(&mut r).into_iter();
    let tables = tables.max(covering.len());
    for i in 0..tables {
        let t = random_table(&mut r, i, covering.next());
        for suffix in ["", "_expected"] {
            let out = ch(&t.ddl(&db, suffix));
            assert!(!out.contains("Exception"), "{out}\n{}", t.ddl(&db, suffix));
        }
        let topic = unique(&format!("rt{i}"));
        create_topic(&topic, 1);
        let mut lines = String::new();
        for id in 0..ROWS {
            let line = t.row(&mut r, id);
            producer.send(&topic, Some(0), id, line.as_bytes());
            lines.push_str(&line);
            lines.push('\n');
        }
        // ClickHouse's own parse of the same lines, into the columns an
        // insert can name (EPHEMERAL ones included, as chbridge's inserts do).
        let named = ch(&format!(
            "SELECT arrayStringConcat(groupArray(concat('`', name, '`')), ', ') FROM \
             (SELECT name FROM system.columns WHERE database = '{db}' AND table = '{}_expected' \
             AND default_kind NOT IN ('MATERIALIZED', 'ALIAS') ORDER BY position)",
            t.name
        ));
        let out = ch(&format!(
            "INSERT INTO {db}.{}_expected ({}) SETTINGS date_time_input_format = 'basic' FORMAT JSONEachRow\n{lines}",
            t.name,
            named.trim()
        ));
        assert!(
            !out.contains("Exception"),
            "ClickHouse refused {}: {out}\n{}",
            t.name,
            t.ddl(&db, "")
        );
        let _ = writeln!(
            routes,
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"{}\"\n",
            t.name
        );
        all.push(t);
    }
    producer.flush();
    let cfg = BridgeConfig::new(&group, &db, &routes);
    let dir = test_dir(&group);
    let mut bridge = Bridge::start(&cfg, &dir);
    let done = wait_until(Duration::from_secs(90), || {
        all.iter()
            .all(|t| ch_u64(&format!("SELECT count() FROM {db}.{}", t.name)) == ROWS)
    });
    let log = bridge.log_text();
    bridge.signal(libc::SIGTERM);
    bridge.wait(Duration::from_secs(30));
    let mut failures = Vec::new();
    for t in &all {
        let got = ch_u64(&format!("SELECT count() FROM {db}.{}", t.name));
        if got != ROWS {
            failures.push(format!(
                "{}: {got} of {ROWS} rows\n{}",
                t.name,
                t.ddl(&db, "")
            ));
            continue;
        }
        let cols: Vec<String> = t.compared.iter().map(|c| format!("`{c}`")).collect();
        let select = |table: &str| {
            let sql = format!(
                "SELECT id, {} FROM {db}.{table} ORDER BY id FORMAT JSONEachRow",
                cols.join(", ")
            );
            match http(ch_port(), "POST", "/", sql.as_bytes()) {
                Ok((200, body)) => body,
                other => format!("{other:?}"),
            }
        };
        let (ours, theirs) = (select(&t.name), select(&format!("{}_expected", t.name)));
        for (a, b) in ours.lines().zip(theirs.lines()) {
            if a != b {
                failures.push(format!(
                    "{} differs:\n  chbridge:   {a}\n  ClickHouse: {b}\n  {}",
                    t.name,
                    t.ddl(&db, "")
                ));
                break;
            }
        }
    }
    assert!(
        done && failures.is_empty(),
        "seed {seed}:\n{}\n--- bridge log ---\n{log}",
        failures.join("\n")
    );
    let types: std::collections::BTreeSet<String> = all
        .iter()
        .flat_map(|t| t.columns.iter().map(|(_, ty)| ty.ddl()))
        .collect();
    let families = [
        "Int8",
        "Int16",
        "Int32",
        "Int64",
        "Int128",
        "Int256",
        "UInt8",
        "UInt16",
        "UInt32",
        "UInt64",
        "UInt128",
        "UInt256",
        "Float32",
        "Float64",
        "BFloat16",
        "Decimal",
        "Bool",
        "String",
        "FixedString",
        "UUID",
        "Date",
        "Date32",
        "DateTime",
        "DateTime64",
        "Time",
        "Time64",
        "Enum8",
        "Enum16",
        "IPv4",
        "IPv6",
        "Interval",
        "Nullable",
        "LowCardinality",
        "Array",
        "Map",
        "Tuple",
        "Nested",
        "JSON",
        "Variant",
        "Dynamic",
        "Point",
        "Ring",
        "Geometry",
        "QBit",
    ];
    let ddl: Vec<String> = all.iter().map(|t| t.ddl("db", "")).collect();
    // A family is drawn when its name stands alone (`Int8`, not the `Int8` in `UInt8`)
    // or starts an Interval unit name.
    let drawn = |f: &str| {
        ddl.iter().any(|d| {
            d.match_indices(f).any(|(at, _)| {
                let before = d[..at].chars().next_back();
                let after = d[at + f.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric())
                    && (f == "Interval" || !after.is_some_and(|c| c.is_alphanumeric()))
            })
        })
    };
    let missing: Vec<&str> = families.iter().copied().filter(|f| !drawn(f)).collect();
    assert!(missing.is_empty(), "type families not drawn: {missing:?}");
    eprintln!(
        "round trip: {} tables, {} distinct column types, {} rows each: identical; every type family drawn",
        all.len(),
        types.len(),
        ROWS
    );
}
