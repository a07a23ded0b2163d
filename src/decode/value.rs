//! A decoded value of a binary format (Avro, Protobuf) or of Kafka metadata,
//! before it is converted to a column's type.
//!
//! JSON does not come through here: it converts while parsing (json.rs). The
//! formats that hand over a whole decoded record build this tree instead, and
//! [`write_value`] converts it with the same scalar conversions JSON uses
//! (schema/encode.rs), so a value converts the same way whatever format it came in.

use std::borrow::Cow;

use crate::schema::encode::{self, ConvertError, ConvertResult};
use crate::schema::ColumnType;

/// One decoded value. Variants carry the meaning the format gave the value
/// (a decimal's scale, a timestamp's unit), never a lossy approximation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    /// Any integer the format carries (Avro int/long, Protobuf (s|u)int32/64, fixed*).
    Int(i128),
    Float(f64),
    /// Text: converts to strings as is, to other types as ClickHouse parses text.
    Str(Cow<'a, str>),
    /// Binary: String and FixedString take the bytes; UUID and IPv6 take 16 bytes.
    Bytes(Cow<'a, [u8]>),
    /// An exact decimal: `unscaled * 10^-scale`. Big-endian two's complement
    /// bytes of any length (Avro's decimal), so Decimal256 keeps every digit.
    Decimal {
        unscaled: Cow<'a, [u8]>,
        scale: u32,
    },
    /// A point in time as nanoseconds since 1970-01-01 UTC (Avro timestamp-*,
    /// Protobuf Timestamp, the Kafka timestamp).
    Timestamp(i128),
    /// Days since 1970-01-01 (Avro date).
    Date(i32),
    /// Time of day (or a duration) in nanoseconds (Avro time-millis/micros).
    Time(i64),
    /// An enum symbol with its number when the format has one.
    Enum {
        name: Cow<'a, str>,
        number: Option<i64>,
    },
    /// Avro array, Protobuf repeated field.
    Array(Vec<Value<'a>>),
    /// Avro map, Protobuf map field: keys in the order decoded.
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// A nested record (Avro record, Protobuf message): fields by name, in order.
    Record(Vec<(Cow<'a, str>, Value<'a>)>),
    /// A JSON value's text (JSON input with a mapping): converted exactly as
    /// the JSON decoder converts it.
    Json(Cow<'a, str>),
}

/// Writes `v` as a value of `ty` (RowBinary, without the column's default flag).
pub fn write_value(ty: &ColumnType, v: &Value<'_>, out: &mut Vec<u8>) -> ConvertResult {
    let wrong = || Err(ConvertError(format!("{} cannot be {ty}", describe(v))));
    if matches!(v, Value::Json(t) if t.trim() == "null") {
        return write_value(ty, &Value::Null, out);
    }
    match (ty, v) {
        (ColumnType::LowCardinality(t), _) => write_value(t, v, out),
        (ColumnType::Nullable(_), Value::Null) => {
            out.push(1);
            Ok(())
        }
        (ColumnType::Nullable(t), _) => {
            out.push(0);
            write_value(t, v, out)
        }
        (_, Value::Json(text)) => super::json::convert_json(ty, text, out),
        // Inside arrays, maps and tuples a null becomes the type's default, as in ClickHouse.
        (_, Value::Null) => {
            encode::write_zero(ty, out);
            Ok(())
        }
        // Containers and the self-describing types given as text (a CSV cell) read it as JSON.
        (
            ColumnType::Array(_)
            | ColumnType::Map(..)
            | ColumnType::Tuple(_)
            | ColumnType::Json
            | ColumnType::QBit(..),
            Value::Str(s),
        ) => super::json::convert_json(ty, s, out),
        // Text that is a JSON array or object (a CSV cell holding a point or
        // a list) is read as one; other text is a string.
        (ColumnType::Variant(_) | ColumnType::Dynamic, Value::Str(s))
            if s.trim_start().starts_with(['[', '{']) =>
        {
            super::json::convert_json(ty, s, out)
        }
        (ColumnType::Json | ColumnType::Variant(_) | ColumnType::Dynamic, _) => {
            super::json::convert_json(ty, &to_json(v).to_string(), out)
        }
        (ColumnType::Array(elem), Value::Array(items)) => {
            encode::write_varint(out, items.len() as u64);
            items.iter().try_for_each(|i| write_value(elem, i, out))
        }
        (ColumnType::QBit(elem, n), Value::Array(items)) if items.len() == *n => {
            encode::write_varint(out, items.len() as u64);
            items.iter().try_for_each(|i| write_value(elem, i, out))
        }
        (ColumnType::Tuple(els), Value::Array(items)) if els.len() == items.len() => els
            .iter()
            .zip(items)
            .try_for_each(|((_, t), i)| write_value(t, i, out)),
        (ColumnType::Tuple(els), Value::Record(fields)) if els.iter().all(|(n, _)| n.is_some()) => {
            for (name, t) in els {
                match fields.iter().find(|(n, _)| Some(&**n) == name.as_deref()) {
                    Some((_, v)) => write_value(t, v, out)?,
                    None => encode::write_zero(t, out),
                }
            }
            Ok(())
        }
        (ColumnType::Map(k, val), Value::Map(pairs)) => {
            encode::write_varint(out, pairs.len() as u64);
            for (key, value) in pairs {
                write_value(k, key, out)?;
                write_value(val, value, out)?;
            }
            Ok(())
        }
        (ColumnType::Map(k, val), Value::Record(fields)) => {
            encode::write_varint(out, fields.len() as u64);
            for (key, value) in fields {
                write_value(k, &Value::Str(Cow::Borrowed(key)), out)?;
                write_value(val, value, out)?;
            }
            Ok(())
        }
        (_, Value::Array(_) | Value::Map(_) | Value::Record(_)) => wrong(),
        (t, Value::Bool(b)) if t.is_integer() || matches!(t, ColumnType::Bool) => {
            encode::write_int(t, i128::from(*b), out)
        }
        (ColumnType::String, Value::Bool(b)) => {
            encode::write_bytes(out, if *b { b"true" } else { b"false" });
            Ok(())
        }
        (_, Value::Bool(_)) => wrong(),
        (t, Value::Int(i)) => encode::write_integer(t, *i, out),
        (t, Value::Float(f)) => encode::write_f64(t, *f, out),
        (t, Value::Str(s)) => encode::write_str(t, s, out),
        (ColumnType::String, Value::Bytes(b)) => {
            encode::write_bytes(out, b);
            Ok(())
        }
        (ColumnType::FixedString(n), Value::Bytes(b)) => encode::write_fixed_string(*n, b, out),
        (ColumnType::Uuid | ColumnType::IPv6, Value::Bytes(b)) if b.len() == 16 => {
            encode::write_16_bytes(ty, b, out)
        }
        (t, Value::Bytes(b)) => match std::str::from_utf8(b) {
            Ok(s) => encode::write_str(t, s, out),
            Err(_) => wrong(),
        },
        (ColumnType::Decimal { .. }, Value::Decimal { unscaled, scale }) => {
            encode::write_decimal_unscaled(ty, unscaled, *scale, out)
        }
        (t, Value::Decimal { .. }) => match decimal_text(v) {
            Some(text) => encode::write_str(t, &text, out),
            None => wrong(),
        },
        (ColumnType::DateTime { .. } | ColumnType::DateTime64 { .. }, Value::Timestamp(n)) => {
            encode::write_nanos(ty, *n, out)
        }
        (ColumnType::Date | ColumnType::Date32, Value::Timestamp(n)) => {
            let days = n.div_euclid(86_400_000_000_000);
            encode::write_date_days(ty, days as i64, out)
        }
        (t, Value::Timestamp(n)) if t.is_integer() => encode::write_int(t, *n / 1_000_000, out),
        (ColumnType::Date | ColumnType::Date32, Value::Date(d)) => {
            encode::write_date_days(ty, i64::from(*d), out)
        }
        (ColumnType::DateTime { .. } | ColumnType::DateTime64 { .. }, Value::Date(d)) => {
            encode::write_nanos(ty, i128::from(*d) * 86_400_000_000_000, out)
        }
        (t, Value::Date(d)) if t.is_integer() => encode::write_int(t, i128::from(*d), out),
        (ColumnType::Time | ColumnType::Time64 { .. }, Value::Time(n)) => {
            encode::write_time_nanos(ty, i128::from(*n), out)
        }
        (ColumnType::Enum { values, .. }, Value::Enum { name, number }) => {
            if values.iter().any(|(n, _)| n == name) {
                encode::write_enum_str(ty, name, out)
            } else if let Some(n) = number {
                encode::write_enum_number(ty, i128::from(*n), out)
            } else {
                encode::write_enum_str(ty, name, out)
            }
        }
        (t, Value::Enum { name, number }) => match (t, number) {
            (t, Some(n)) if t.is_integer() => encode::write_int(t, i128::from(*n), out),
            _ => encode::write_str(t, name, out),
        },
        (t, Value::Timestamp(n)) => {
            let text = chrono::DateTime::from_timestamp_nanos(*n as i64).to_rfc3339();
            encode::write_str(t, &text, out)
        }
        (_, Value::Date(_) | Value::Time(_)) => wrong(),
    }
}

/// What a value is, for messages.
fn describe(v: &Value<'_>) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Int(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Str(s) => format!("the string {s:?}"),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        Value::Decimal { .. } => format!("the decimal {}", decimal_text(v).unwrap_or_default()),
        Value::Timestamp(n) => format!("the timestamp {n} ns"),
        Value::Date(d) => format!("the date {d} (days since 1970)"),
        Value::Time(n) => format!("the time {n} ns"),
        Value::Enum { name, .. } => format!("the enum symbol {name}"),
        Value::Array(_) => "an array".into(),
        Value::Map(_) => "a map".into(),
        Value::Record(_) => "a record".into(),
        Value::Json(t) => format!("the JSON value {t}"),
    }
}

/// A Decimal's exact text.
fn decimal_text(v: &Value<'_>) -> Option<String> {
    let Value::Decimal { unscaled, scale } = v else {
        return None;
    };
    encode::decimal_text(unscaled, *scale)
}

/// A value as JSON, for the JSON, Variant and Dynamic types. Decimals and
/// timestamps become exact strings; bytes become text when they are UTF-8.
fn to_json(v: &Value<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => match (i64::try_from(*i), u64::try_from(*i)) {
            (Ok(x), _) => J::from(x),
            (_, Ok(x)) => J::from(x),
            _ => J::String(i.to_string()),
        },
        Value::Float(f) => J::from(*f),
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        Value::Decimal { .. } => J::String(decimal_text(v).unwrap_or_default()),
        Value::Timestamp(n) => {
            J::String(chrono::DateTime::from_timestamp_nanos(*n as i64).to_rfc3339())
        }
        Value::Date(d) => J::from(*d),
        Value::Time(n) => J::from(*n),
        Value::Enum { name, .. } => J::String(name.to_string()),
        Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Map(pairs) => J::Object(
            pairs
                .iter()
                .map(|(k, v)| {
                    let key = match to_json(k) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Record(fields) => J::Object(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect(),
        ),
        Value::Json(t) => serde_json::from_str(t).unwrap_or(J::Null),
    }
}
