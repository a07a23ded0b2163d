//! Schema drift: the versions of a table's columns as a running bridge sees
//! them (`History`), and reading encoded rows back (`split_row`,
//! `read_value`).
//!
//! Batches are encoded when records arrive and inserted later; RowBinary
//! carries no types, so a row must be sent for exactly the columns it was
//! encoded for. Every batch carries the version it was encoded for; when the
//! table changes, rows of older versions that are not in ClickHouse yet are
//! decoded again from their Kafka records (`pipeline::rewind`): re-encoding
//! the rows could not bring back what decoding for the old columns dropped.

use std::borrow::Cow;

use super::encode;
use super::{Column, ColumnType, TableSchema};
use crate::decode::value::Value;

/// One version of a table's schema. Versions count up from 0 in each
/// process; a batch carries the version its rows were encoded for.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub version: u64,
    pub schema: std::sync::Arc<TableSchema>,
}

/// Every version of one table's schema seen since start, shared by the
/// table's sink (which checks the table before each insert) and the consumer
/// thread (whose decoders follow it, and which adds columns itself with
/// `auto_add_columns`). One authority, so a version number means the same
/// columns to both.
pub struct History {
    versions: std::sync::Mutex<Vec<Versioned>>,
    announce: tokio::sync::watch::Sender<Versioned>,
}

impl History {
    pub fn new(
        schema: TableSchema,
    ) -> (
        std::sync::Arc<History>,
        tokio::sync::watch::Receiver<Versioned>,
    ) {
        let v = Versioned {
            version: 0,
            schema: std::sync::Arc::new(schema),
        };
        let (announce, feed) = tokio::sync::watch::channel(v.clone());
        (
            std::sync::Arc::new(History {
                versions: std::sync::Mutex::new(vec![v]),
                announce,
            }),
            feed,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Versioned>> {
        self.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn current(&self) -> Versioned {
        let v = self.lock();
        v[v.len() - 1].clone()
    }

    pub fn get(&self, version: u64) -> Option<Versioned> {
        self.lock().iter().find(|v| v.version == version).cloned()
    }

    /// Records the table's columns as read now. A change becomes a new
    /// version, announced to the decoders; returns it when there was one.
    pub fn observe(&self, now: TableSchema) -> Option<Versioned> {
        let mut versions = self.lock();
        let last = &versions[versions.len() - 1];
        if !changed(&last.schema, &now) {
            return None;
        }
        let v = Versioned {
            version: last.version + 1,
            schema: std::sync::Arc::new(now),
        };
        versions.push(v.clone());
        self.announce.send_replace(v.clone());
        Some(v)
    }
}

/// Finds where each column's cell (flag and value) of one encoded row lies,
/// reading every value with its column's type. An error says which column
/// does not read, or what is left over.
pub fn split_row<'c>(
    columns: impl IntoIterator<Item = &'c Column>,
    row: &[u8],
    cells: &mut Vec<(usize, usize)>,
) -> Result<(), String> {
    cells.clear();
    let mut pos = 0;
    for c in columns {
        let start = pos;
        let flag = *row
            .get(pos)
            .ok_or_else(|| format!("row ends before column `{}`", c.name))?;
        pos += 1;
        match flag {
            1 => {}
            0 => {
                let (_, used) = read_value(&c.ty, &row[pos..])
                    .map_err(|e| format!("column `{}`: {e}", c.name))?;
                pos += used;
            }
            f => return Err(format!("flag {f} before column `{}`", c.name)),
        }
        cells.push((start, pos));
    }
    if pos != row.len() {
        return Err(format!(
            "{} bytes left after the last column",
            row.len() - pos
        ));
    }
    Ok(())
}

/// True when inserts would differ: the columns an insert names, their types
/// or how ClickHouse fills them changed.
pub fn changed(a: &TableSchema, b: &TableSchema) -> bool {
    let key = |t: &TableSchema| -> Vec<(String, String, String, String)> {
        t.columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.type_text.clone(),
                    format!("{:?}", c.default_kind),
                    c.default_expression.clone(),
                )
            })
            .collect()
    };
    key(a) != key(b)
}

fn take(b: &[u8], n: usize) -> Result<&[u8], String> {
    b.get(..n)
        .ok_or_else(|| format!("{n} bytes expected, {} left", b.len()))
}

fn varint(b: &[u8]) -> Result<(u64, usize), String> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err("a malformed length".into())
}

fn le_signed(b: &[u8]) -> i128 {
    let mut v: i128 = 0;
    for (i, &byte) in b.iter().enumerate().take(16) {
        v |= i128::from(byte) << (8 * i);
    }
    let bits = 8 * b.len().min(16) as u32;
    if bits < 128 && b.last().is_some_and(|x| x & 0x80 != 0) {
        v -= 1i128 << bits;
    }
    v
}

fn le_unsigned(b: &[u8]) -> i128 {
    let mut v: i128 = 0;
    for (i, &byte) in b.iter().enumerate().take(15) {
        v |= i128::from(byte) << (8 * i);
    }
    v
}

/// Reads one RowBinary value of `ty` written by chbridge's encoders: the value
/// and the bytes it took.
pub fn read_value<'b>(ty: &ColumnType, b: &'b [u8]) -> Result<(Value<'b>, usize), String> {
    use ColumnType as T;
    let fixed = |n: usize| take(b, n).map(|x| (x, n));
    Ok(match ty {
        T::Interval(_) => {
            let (x, n) = fixed(8)?;
            (Value::Int(le_signed(x)), n)
        }
        T::QBit(t, _) => read_value(&T::Array(t.clone()), b)?,
        T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32 | T::UInt64 => {
            let n = match ty {
                T::Int8 | T::UInt8 => 1,
                T::Int16 | T::UInt16 => 2,
                T::Int32 | T::UInt32 => 4,
                _ => 8,
            };
            let (x, n) = fixed(n)?;
            let signed = matches!(ty, T::Int8 | T::Int16 | T::Int32 | T::Int64);
            (
                Value::Int(if signed { le_signed(x) } else { le_unsigned(x) }),
                n,
            )
        }
        T::Int128 | T::UInt128 | T::Int256 | T::UInt256 => {
            let n = if matches!(ty, T::Int128 | T::UInt128) {
                16
            } else {
                32
            };
            let (x, n) = fixed(n)?;
            // Big-endian two's complement, as a decimal with scale 0.
            let mut be: Vec<u8> = x.iter().rev().copied().collect();
            if matches!(ty, T::UInt128 | T::UInt256) {
                be.insert(0, 0);
            }
            (
                Value::Decimal {
                    unscaled: Cow::Owned(be),
                    scale: 0,
                },
                n,
            )
        }
        T::Float32 => {
            let (x, n) = fixed(4)?;
            (
                Value::Float(f64::from(f32::from_le_bytes([x[0], x[1], x[2], x[3]]))),
                n,
            )
        }
        T::BFloat16 => {
            let (x, n) = fixed(2)?;
            let bits = u32::from(u16::from_le_bytes([x[0], x[1]])) << 16;
            (Value::Float(f64::from(f32::from_bits(bits))), n)
        }
        T::Float64 => {
            let (x, n) = fixed(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(x);
            (Value::Float(f64::from_le_bytes(a)), n)
        }
        T::Decimal { precision, scale } => {
            let (x, n) = fixed(encode::decimal_width(*precision))?;
            (
                Value::Decimal {
                    unscaled: Cow::Owned(x.iter().rev().copied().collect()),
                    scale: *scale,
                },
                n,
            )
        }
        T::Bool => {
            let (x, n) = fixed(1)?;
            (Value::Bool(x[0] != 0), n)
        }
        T::String | T::Json => {
            let (len, used) = varint(b)?;
            let len = usize::try_from(len).map_err(|_| "a length beyond memory".to_string())?;
            let s = take(&b[used..], len)?;
            let v = match (ty, std::str::from_utf8(s)) {
                (T::Json, Ok(text)) => Value::Json(Cow::Borrowed(text)),
                (_, Ok(text)) => Value::Str(Cow::Borrowed(text)),
                (_, Err(_)) => Value::Bytes(Cow::Borrowed(s)),
            };
            (v, used + len)
        }
        T::FixedString(n) => {
            let (x, n) = fixed(*n)?;
            (Value::Bytes(Cow::Borrowed(x)), n)
        }
        T::Uuid => {
            let (x, n) = fixed(16)?;
            let mut hi = [0u8; 8];
            let mut lo = [0u8; 8];
            hi.copy_from_slice(&x[..8]);
            lo.copy_from_slice(&x[8..]);
            let u = uuid::Uuid::from_u64_pair(u64::from_le_bytes(hi), u64::from_le_bytes(lo));
            (Value::Str(Cow::Owned(u.hyphenated().to_string())), n)
        }
        T::Date => {
            let (x, n) = fixed(2)?;
            (Value::Date(i32::from(u16::from_le_bytes([x[0], x[1]]))), n)
        }
        T::Date32 => {
            let (x, n) = fixed(4)?;
            (Value::Date(i32::from_le_bytes([x[0], x[1], x[2], x[3]])), n)
        }
        T::DateTime { .. } => {
            let (x, n) = fixed(4)?;
            let secs = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            (Value::Timestamp(i128::from(secs) * 1_000_000_000), n)
        }
        T::DateTime64 { precision, .. } => {
            let (x, n) = fixed(8)?;
            let ticks = le_signed(x);
            (Value::Timestamp(ticks * 10i128.pow(9 - precision)), n)
        }
        T::Time => {
            let (x, n) = fixed(4)?;
            (
                Value::Time(
                    i64::from(i32::from_le_bytes([x[0], x[1], x[2], x[3]])) * 1_000_000_000,
                ),
                n,
            )
        }
        T::Time64 { precision } => {
            let (x, n) = fixed(8)?;
            let ticks = le_signed(x) as i64;
            (
                Value::Time(ticks.saturating_mul(10i64.pow(9 - precision))),
                n,
            )
        }
        T::Enum { wide, values } => {
            let (x, n) = fixed(if *wide { 2 } else { 1 })?;
            let number = if *wide {
                i64::from(i16::from_le_bytes([x[0], x[1]]))
            } else {
                i64::from(x[0] as i8)
            };
            let name = values
                .iter()
                .find(|(_, v)| i64::from(*v) == number)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| number.to_string());
            (
                Value::Enum {
                    name: Cow::Owned(name),
                    number: Some(number),
                },
                n,
            )
        }
        T::IPv4 => {
            let (x, n) = fixed(4)?;
            let ip = std::net::Ipv4Addr::from(u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
            (Value::Str(Cow::Owned(ip.to_string())), n)
        }
        T::IPv6 => {
            let (x, n) = fixed(16)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(x);
            (
                Value::Str(Cow::Owned(std::net::Ipv6Addr::from(a).to_string())),
                n,
            )
        }
        T::Nullable(t) => {
            let (x, _) = fixed(1)?;
            if x[0] == 1 {
                (Value::Null, 1)
            } else {
                let (v, n) = read_value(t, &b[1..])?;
                (v, n + 1)
            }
        }
        T::LowCardinality(t) => read_value(t, b)?,
        T::Array(t) => {
            let (count, mut pos) = varint(b)?;
            let mut items = Vec::new();
            for _ in 0..count {
                let (v, n) = read_value(t, &b[pos..])?;
                items.push(v);
                pos += n;
            }
            (Value::Array(items), pos)
        }
        T::Map(k, v) => {
            let (count, mut pos) = varint(b)?;
            let mut pairs = Vec::new();
            for _ in 0..count {
                let (key, n) = read_value(k, &b[pos..])?;
                pos += n;
                let (val, n) = read_value(v, &b[pos..])?;
                pos += n;
                pairs.push((key, val));
            }
            (Value::Map(pairs), pos)
        }
        T::Tuple(els) => {
            let mut pos = 0;
            let mut named = Vec::new();
            let mut items = Vec::new();
            for (name, t) in els {
                let (v, n) = read_value(t, &b[pos..])?;
                pos += n;
                match name {
                    Some(name) => named.push((Cow::Owned(name.clone()), v)),
                    None => items.push(v),
                }
            }
            if named.is_empty() {
                (Value::Array(items), pos)
            } else {
                (Value::Record(named), pos)
            }
        }
        T::Variant(types) => {
            let (x, _) = fixed(1)?;
            if x[0] == encode::VARIANT_NULL {
                (Value::Null, 1)
            } else {
                let t = types
                    .get(usize::from(x[0]))
                    .ok_or_else(|| format!("Variant discriminator {} out of range", x[0]))?;
                let (v, n) = read_value(t, &b[1..])?;
                (v, n + 1)
            }
        }
        T::Dynamic => {
            use encode::dynamic_type as d;
            let (x, _) = fixed(1)?;
            let scalar = |code: u8| -> Option<ColumnType> {
                Some(match code {
                    d::UINT64 => T::UInt64,
                    d::INT64 => T::Int64,
                    d::FLOAT64 => T::Float64,
                    d::STRING => T::String,
                    d::BOOL => T::Bool,
                    _ => return None,
                })
            };
            match x[0] {
                d::NOTHING => (Value::Null, 1),
                d::ARRAY => {
                    let y = take(&b[1..], 2)?;
                    let (elem, header) = match (y[0], scalar(y[0])) {
                        (d::NULLABLE, _) => {
                            let inner = scalar(y[1]).ok_or("an unknown Dynamic type")?;
                            (T::Nullable(Box::new(inner)), 3)
                        }
                        (_, Some(t)) => (t, 2),
                        _ => return Err("an unknown Dynamic type".into()),
                    };
                    let (v, n) = read_value(&T::Array(Box::new(elem)), &b[header..])?;
                    (v, n + header)
                }
                code => {
                    let t = scalar(code).ok_or("an unknown Dynamic type")?;
                    let (v, n) = read_value(&t, &b[1..])?;
                    (v, n + 1)
                }
            }
        }
        T::Unsupported(text) => return Err(format!("cannot read values of {text}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::json::JsonDecoder;
    use crate::decode::value::write_value;
    use crate::decode::{DecodeLimits, Decoder, UnknownFields};
    use crate::kafka::Record;

    fn encode(t: &TableSchema, lines: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let mut d = JsonDecoder::new(t, UnknownFields::Ignore, DecodeLimits::default());
        let mut body = Vec::new();
        let mut ends = Vec::new();
        for l in lines {
            d.decode(&Record::value_only(Some(l.as_bytes())), &mut body)
                .unwrap();
            ends.push(body.len());
        }
        (body, ends)
    }

    #[test]
    fn every_type_reads_back_what_was_written() {
        let cols = [
            ("i", "Int256"),
            ("u", "UInt128"),
            ("dec", "Decimal(38, 4)"),
            ("dt", "DateTime64(3, 'UTC')"),
            ("e", "Enum8('a' = 1, 'b' = -2)"),
            ("ip", "IPv6"),
            ("v", "Variant(String, UInt64)"),
            ("dy", "Dynamic"),
            ("j", "JSON"),
            ("m", "Map(String, Nullable(Int32))"),
            ("t", "Time64(3)"),
            ("u2", "UUID"),
        ];
        let t = TableSchema::from_columns("db", "t", &cols);
        let line = r#"{"i":"-123456789012345678901234567890123","u":"340282366920938463463374607431768211455","dec":"-12.5","dt":"2024-01-31 12:00:00.123","e":"b","ip":"::ffff:1.2.3.4","v":42,"dy":[1,null],"j":{"k":[1]},"m":{"x":null,"y":3},"t":"-1:02:03.5","u2":"61f0c404-5cb3-11e7-907b-a6006ad3dba0"}"#;
        let (body, ends) = encode(&t, &[line]);
        let mut cells = Vec::new();
        split_row(t.insert_columns(), &body[..ends[0]], &mut cells).unwrap();
        assert_eq!(cells.len(), cols.len());
        // Every value read back and written again gives the same bytes.
        let mut pos = 0;
        let mut out = Vec::new();
        for c in t.insert_columns() {
            assert_eq!(body[pos], 0, "{}", c.name);
            pos += 1;
            let (v, n) = read_value(&c.ty, &body[pos..]).unwrap();
            out.clear();
            write_value(&c.ty, &v, &mut out).unwrap();
            assert_eq!(out, &body[pos..pos + n], "column {} read as {v:?}", c.name);
            pos += n;
        }
        assert_eq!(pos, body.len());
    }
}
