//! RowBinary encoding of single values, and the conversions from the textual
//! and numeric forms records carry to ClickHouse's binary forms. Shared by every
//! decoder so that a value converts the same way whatever format it came in.

use super::ColumnType;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime};

/// Why a value cannot be converted to its column's type. The decoder adds the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

pub type ConvertResult<T = ()> = Result<T, ConvertError>;

fn err<T>(msg: impl Into<String>) -> ConvertResult<T> {
    Err(ConvertError(msg.into()))
}

/// Days from 0000-12-31 (chrono's `num_days_from_ce` origin) to 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i64 = 719_163;
/// Last day of `Date` (UInt16 days): 2149-06-06.
const DATE_MAX_DAYS: i64 = u16::MAX as i64;
/// `Date32` covers 1900-01-01 ..= 2299-12-31.
const DATE32_MIN_DAYS: i64 = -25_567;
const DATE32_MAX_DAYS: i64 = 120_529;
/// `DateTime64` covers 1900-01-01 00:00:00 ..= 2299-12-31 23:59:59.
const DATETIME64_MIN_SECS: i128 = -2_208_988_800;
const DATETIME64_MAX_SECS: i128 = 10_413_791_999;

pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Inserts the element count of a collection whose elements were already
/// written from `pos` on (JSON arrays do not announce their length).
pub fn insert_len_prefix(out: &mut Vec<u8>, pos: usize, count: u64) {
    let mut prefix = Vec::with_capacity(10);
    write_varint(&mut prefix, count);
    out.splice(pos..pos, prefix);
}

/// Writes an integer of an integer column type after a range check.
pub fn write_int(ty: &ColumnType, v: i128, out: &mut Vec<u8>) -> ConvertResult {
    macro_rules! put {
        ($t:ty) => {
            match <$t>::try_from(v) {
                Ok(x) => {
                    out.extend_from_slice(&x.to_le_bytes());
                    Ok(())
                }
                Err(_) => err(format!("{v} is out of range for {ty}")),
            }
        };
    }
    match ty {
        ColumnType::Int8 => put!(i8),
        ColumnType::Int16 => put!(i16),
        ColumnType::Int32 => put!(i32),
        ColumnType::Int64 => put!(i64),
        ColumnType::UInt8 => put!(u8),
        ColumnType::UInt16 => put!(u16),
        ColumnType::UInt32 => put!(u32),
        ColumnType::UInt64 => put!(u64),
        ColumnType::Interval(_) => put!(i64),
        ColumnType::Int128 => put!(i128),
        ColumnType::UInt128 => put!(u128),
        ColumnType::Int256 => {
            write_wide(out, v < 0, v.unsigned_abs(), 32);
            Ok(())
        }
        ColumnType::UInt256 if v >= 0 => {
            write_wide(out, false, v as u128, 32);
            Ok(())
        }
        ColumnType::UInt256 => err(format!("{v} is out of range for {ty}")),
        ColumnType::Float32 => {
            out.extend_from_slice(&(v as f32).to_le_bytes());
            Ok(())
        }
        ColumnType::BFloat16 => {
            write_bfloat16(v as f32, out);
            Ok(())
        }
        ColumnType::Float64 => {
            out.extend_from_slice(&(v as f64).to_le_bytes());
            Ok(())
        }
        ColumnType::Bool => match v {
            0 | 1 => {
                out.push(v as u8);
                Ok(())
            }
            _ => err(format!("{v} is not a Bool (expected true, false, 0 or 1)")),
        },
        _ => err(format!("internal: {ty} is not numeric")),
    }
}

/// A scalar from an integer: numbers, epoch seconds for date-times, days for
/// dates, an Enum's number, seconds for Time.
pub fn write_integer(ty: &ColumnType, v: i128, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::DateTime { .. } | ColumnType::DateTime64 { .. } => {
            write_datetime_int(ty, v, out)
        }
        ColumnType::Date | ColumnType::Date32 => match i64::try_from(v) {
            Ok(d) => write_date_days(ty, d, out),
            Err(_) => err(format!("{v} is out of range for {ty}")),
        },
        ColumnType::Enum { .. } => write_enum_number(ty, v, out),
        ColumnType::Time | ColumnType::Time64 { .. } => match v.checked_mul(1_000_000_000) {
            Some(n) => write_time_nanos(ty, n, out),
            None => err(format!("{v} is out of range for {ty}")),
        },
        ColumnType::Decimal { .. } => write_decimal_str(ty, &v.to_string(), out),
        ColumnType::String => {
            write_bytes(out, v.to_string().as_bytes());
            Ok(())
        }
        t if t.is_numeric() => write_int(ty, v, out),
        _ => err(format!("a number cannot be {ty}")),
    }
}

/// A scalar from a floating-point number.
pub fn write_f64(ty: &ColumnType, v: f64, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::DateTime { .. } | ColumnType::DateTime64 { .. } => {
            write_datetime_secs(ty, v, out)
        }
        ColumnType::Time | ColumnType::Time64 { .. } if v.is_finite() && v.abs() < 1e7 => {
            write_time_nanos(ty, (v * 1e9).round() as i128, out)
        }
        ColumnType::String => {
            write_bytes(out, v.to_string().as_bytes());
            Ok(())
        }
        t if t.is_numeric() && !matches!(t, ColumnType::Bool)
            || matches!(t, ColumnType::Decimal { .. }) =>
        {
            write_float(ty, v, out)
        }
        _ => err(format!("the number {v} cannot be {ty}")),
    }
}

/// A scalar from text, parsed as ClickHouse parses that type's text.
pub fn write_str(ty: &ColumnType, v: &str, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::String => {
            write_bytes(out, v.as_bytes());
            Ok(())
        }
        ColumnType::FixedString(n) => write_fixed_string(*n, v.as_bytes(), out),
        ColumnType::Date | ColumnType::Date32 => write_date_str(ty, v, out),
        ColumnType::DateTime { .. } | ColumnType::DateTime64 { .. } => {
            write_datetime_str(ty, v, out)
        }
        ColumnType::Uuid => write_uuid(v, out),
        ColumnType::IPv4 => write_ipv4(v, out),
        ColumnType::IPv6 => write_ipv6(v, out),
        ColumnType::Enum { .. } => write_enum_str(ty, v, out),
        ColumnType::Time | ColumnType::Time64 { .. } => write_time_str(ty, v, out),
        ColumnType::Decimal { .. } => write_decimal_str(ty, v, out),
        t if t.is_numeric() => write_numeric_str(ty, v, out),
        _ => err(format!("the string {v:?} cannot be {ty}")),
    }
}

/// BFloat16 is the upper half of a Float32; ClickHouse truncates the lower half.
fn write_bfloat16(v: f32, out: &mut Vec<u8>) {
    out.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
}

/// Writes a magnitude of up to 128 bits with a sign as a little-endian two's
/// complement integer of `width` bytes (16 or 32).
fn write_wide(out: &mut Vec<u8>, negative: bool, magnitude: u128, width: usize) {
    let mut limbs = [0u64; 4];
    limbs[0] = magnitude as u64;
    limbs[1] = (magnitude >> 64) as u64;
    write_limbs(out, negative, limbs, width);
}

fn write_limbs(out: &mut Vec<u8>, negative: bool, mut limbs: [u64; 4], width: usize) {
    if negative {
        // Two's complement: invert and add one.
        let mut carry = true;
        for l in limbs.iter_mut() {
            let (v, c) = (!*l).overflowing_add(u64::from(carry));
            *l = v;
            carry = c;
        }
    }
    let mut bytes = [0u8; 32];
    for (i, l) in limbs.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(&bytes[..width]);
}

/// A decimal digit string as a 256-bit magnitude, or None when it does not fit.
fn digits_to_limbs(digits: &[u8]) -> Option<[u64; 4]> {
    let mut limbs = [0u64; 4];
    for &d in digits {
        let mut carry = u128::from(d - b'0');
        for l in limbs.iter_mut() {
            let v = u128::from(*l) * 10 + carry;
            *l = v as u64;
            carry = v >> 64;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(limbs)
}

/// A number's exact text taken apart: sign, integer digits, fraction digits
/// (after applying any exponent). None when it is not a number.
struct Digits {
    negative: bool,
    int: Vec<u8>,
    frac: Vec<u8>,
}

fn parse_digits(s: &str) -> Option<Digits> {
    let b = s.trim().as_bytes();
    let (negative, b) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        Some(b'+') => (false, &b[1..]),
        _ => (false, b),
    };
    let (mantissa, exp) = match b.iter().position(|&c| c == b'e' || c == b'E') {
        Some(i) => {
            let e: i32 = std::str::from_utf8(&b[i + 1..]).ok()?.parse().ok()?;
            (&b[..i], e)
        }
        None => (b, 0),
    };
    let (int, frac) = match mantissa.iter().position(|&c| c == b'.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, &[][..]),
    };
    if int.is_empty() && frac.is_empty()
        || !int.iter().chain(frac).all(u8::is_ascii_digit)
        || exp.unsigned_abs() > 100
    {
        return None;
    }
    let mut all: Vec<u8> = int.iter().chain(frac).copied().collect();
    // The decimal point sits after `point` digits of `all`.
    let mut point = int.len() as i64 + i64::from(exp);
    if point < 0 {
        let pad = (-point) as usize;
        all.splice(0..0, std::iter::repeat_n(b'0', pad));
        point = 0;
    }
    let point = point as usize;
    if point > all.len() {
        all.resize(point, b'0');
    }
    let frac = all.split_off(point);
    let first = all.iter().position(|&c| c != b'0').unwrap_or(all.len());
    all.drain(..first);
    Some(Digits {
        negative,
        int: all,
        frac,
    })
}

/// (U)Int128/256 from exact text, beyond what i128 holds.
fn write_big_int_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let bad = || err(format!("{s:?} is not an integer, expected {ty}"));
    let Some(d) = parse_digits(s) else {
        return bad();
    };
    if d.frac.iter().any(|&c| c != b'0') {
        return err(format!("{s:?} is not a whole number, expected {ty}"));
    }
    let range = || err(format!("{s} is out of range for {ty}"));
    let Some(limbs) = digits_to_limbs(&d.int) else {
        return range();
    };
    let zero = limbs == [0; 4];
    let (signed, width) = match ty {
        ColumnType::Int128 => (true, 16),
        ColumnType::UInt128 => (false, 16),
        ColumnType::Int256 => (true, 32),
        ColumnType::UInt256 => (false, 32),
        _ => return err(format!("internal: {ty} is not a wide integer")),
    };
    let top = &limbs[width / 8..];
    let high_bit = limbs[width / 8 - 1] >> 63 == 1;
    let fits = top.iter().all(|&l| l == 0)
        && if signed {
            // Up to 2^(bits-1) - 1, or 2^(bits-1) when negative.
            !high_bit
                || (d.negative
                    && limbs[width / 8 - 1] == 1 << 63
                    && limbs[..width / 8 - 1].iter().all(|&l| l == 0))
        } else {
            !d.negative || zero
        };
    if !fits {
        return range();
    }
    write_limbs(out, d.negative && !zero, limbs, width);
    Ok(())
}

/// The byte width of a Decimal(P, _) value.
pub fn decimal_width(precision: u32) -> usize {
    match precision {
        0..=9 => 4,
        10..=18 => 8,
        19..=38 => 16,
        _ => 32,
    }
}

/// A Decimal(P, S) from a number's exact text. Digits beyond the scale are
/// refused unless they are zeros: rounding would change the value silently.
pub fn write_decimal_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let ColumnType::Decimal { precision, scale } = *ty else {
        return err(format!("internal: {ty} is not a Decimal"));
    };
    let Some(mut d) = parse_digits(s) else {
        return err(format!("{s:?} is not a number, expected {ty}"));
    };
    let keep = scale as usize;
    if d.frac.len() > keep {
        if d.frac[keep..].iter().any(|&c| c != b'0') {
            return err(format!(
                "{s} has more than {scale} decimal places and {ty} would round it;                  send at most {scale} decimal places or widen the column's scale"
            ));
        }
        d.frac.truncate(keep);
    }
    d.frac.resize(keep, b'0');
    let mut unscaled = d.int;
    unscaled.extend_from_slice(&d.frac);
    let first = unscaled
        .iter()
        .position(|&c| c != b'0')
        .unwrap_or(unscaled.len());
    unscaled.drain(..first);
    if unscaled.len() > precision as usize {
        return err(format!(
            "{s} is out of range for {ty} (at most {} digits before the decimal point)",
            precision - scale
        ));
    }
    let Some(limbs) = digits_to_limbs(&unscaled) else {
        return err(format!("{s} is out of range for {ty}"));
    };
    write_limbs(
        out,
        d.negative && !unscaled.is_empty(),
        limbs,
        decimal_width(precision),
    );
    Ok(())
}

/// The exact text of a decimal given as an unscaled big-endian two's
/// complement integer and a scale (Avro's decimal), or None beyond 200 digits.
pub fn decimal_text(unscaled_be: &[u8], scale: u32) -> Option<String> {
    let negative = unscaled_be.first().is_some_and(|b| b & 0x80 != 0);
    // Magnitude, big-endian.
    let mut mag: Vec<u8> = unscaled_be.to_vec();
    if negative {
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, c) = b.overflowing_add(1);
            *b = v;
            if !c {
                break;
            }
        }
    }
    // Base 256 -> base 10 by repeated division (values are at most a few dozen bytes).
    let mut digits = Vec::new();
    while mag.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in mag.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
        if digits.len() > 200 {
            return None;
        }
    }
    let scale = scale as usize;
    if digits.len() <= scale {
        digits.resize(scale + 1, b'0');
    }
    digits.reverse();
    let mut text = String::with_capacity(digits.len() + 2);
    if negative {
        text.push('-');
    }
    let point = digits.len() - scale;
    text.push_str(std::str::from_utf8(&digits[..point]).ok()?);
    if scale > 0 {
        text.push('.');
        text.push_str(std::str::from_utf8(&digits[point..]).ok()?);
    }
    Some(text)
}

/// A Decimal from the unscaled big-endian two's complement integer and scale
/// that Avro's decimal carries.
pub fn write_decimal_unscaled(
    ty: &ColumnType,
    unscaled_be: &[u8],
    scale: u32,
    out: &mut Vec<u8>,
) -> ConvertResult {
    match decimal_text(unscaled_be, scale) {
        Some(text) => write_decimal_str(ty, &text, out),
        None => err(format!(
            "a decimal of {} bytes is too large for {ty}",
            unscaled_be.len()
        )),
    }
}

/// Writes a float into a Float column, or into an integer column when it has no fraction.
pub fn write_float(ty: &ColumnType, v: f64, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::Float32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        ColumnType::Float64 => out.extend_from_slice(&v.to_le_bytes()),
        ColumnType::BFloat16 => write_bfloat16(v as f32, out),
        // The shortest text that reads back as this f64: the value the producer wrote.
        ColumnType::Decimal { .. } if v.is_finite() => {
            return write_decimal_str(ty, &v.to_string(), out)
        }
        _ if v.fract() == 0.0 && v.is_finite() && v.abs() < 1.8e19 => {
            return write_int(ty, v as i128, out)
        }
        _ => return err(format!("{v} is not a whole number, expected {ty}")),
    }
    Ok(())
}

/// Parses a number given as a string (e.g. a 64-bit id quoted by a JavaScript producer).
pub fn write_numeric_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let t = s.trim();
    match ty {
        ColumnType::Float32 | ColumnType::Float64 | ColumnType::BFloat16 => {
            match t.parse::<f64>() {
                Ok(v) => write_float(ty, v, out),
                Err(_) => err(format!("{s:?} is not a number, expected {ty}")),
            }
        }
        ColumnType::Bool => match t {
            "true" | "1" => write_int(ty, 1, out),
            "false" | "0" => write_int(ty, 0, out),
            _ => err(format!("{s:?} is not a Bool")),
        },
        _ => match t.parse::<i128>() {
            Ok(v) => write_int(ty, v, out),
            Err(_) if ty.needs_exact_number() => write_big_int_str(ty, t, out),
            Err(_) => err(format!("{s:?} is not an integer, expected {ty}")),
        },
    }
}

/// An Enum from one of its names.
pub fn write_enum_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let ColumnType::Enum { values, .. } = ty else {
        return err(format!("internal: {ty} is not an Enum"));
    };
    match values.iter().find(|(n, _)| n == s) {
        Some((_, v)) => write_enum_number(ty, i128::from(*v), out),
        None => {
            // A number in a string names the value by its number, as in ClickHouse.
            if let Ok(n) = s.trim().parse::<i128>() {
                return write_enum_number(ty, n, out);
            }
            let names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
            err(format!("{s:?} is not a value of {ty} (one of {names:?})"))
        }
    }
}

/// An Enum from its number, which must be one of the declared ones.
pub fn write_enum_number(ty: &ColumnType, n: i128, out: &mut Vec<u8>) -> ConvertResult {
    let ColumnType::Enum { wide, values } = ty else {
        return err(format!("internal: {ty} is not an Enum"));
    };
    match values.iter().find(|(_, v)| i128::from(*v) == n) {
        Some((_, v)) if *wide => out.extend_from_slice(&v.to_le_bytes()),
        Some((_, v)) => out.push(*v as i8 as u8),
        None => return err(format!("{n} is not a value of {ty}")),
    }
    Ok(())
}

/// IPv6 from its text; an IPv4 address becomes the IPv4-mapped IPv6 address.
pub fn write_ipv6(s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let t = s.trim();
    let ip = match t.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => ip,
        Err(_) => match t.parse::<std::net::Ipv4Addr>() {
            Ok(v4) => v4.to_ipv6_mapped(),
            Err(_) => return err(format!("{s:?} is not an IPv6 address")),
        },
    };
    out.extend_from_slice(&ip.octets());
    Ok(())
}

/// UUID or IPv6 from 16 raw bytes (Avro fixed, Protobuf bytes), big-endian as written.
pub fn write_16_bytes(ty: &ColumnType, b: &[u8], out: &mut Vec<u8>) -> ConvertResult {
    let Ok(b16) = <[u8; 16]>::try_from(b) else {
        return err(format!(
            "{} bytes cannot be {ty} (16 bytes needed)",
            b.len()
        ));
    };
    match ty {
        ColumnType::Uuid => {
            let u = uuid::Uuid::from_bytes(b16);
            let (hi, lo) = u.as_u64_pair();
            out.extend_from_slice(&hi.to_le_bytes());
            out.extend_from_slice(&lo.to_le_bytes());
        }
        ColumnType::IPv6 => out.extend_from_slice(&b16),
        _ => return err(format!("internal: {ty} is not 16 bytes")),
    }
    Ok(())
}

/// Time and Time64 hold a signed duration of at most 999:59:59.
const TIME_MAX_SECS: i128 = 999 * 3600 + 59 * 60 + 59;

/// Time or Time64 from nanoseconds, truncated to the column's precision.
pub fn write_time_nanos(ty: &ColumnType, nanos: i128, out: &mut Vec<u8>) -> ConvertResult {
    let secs = nanos / 1_000_000_000;
    if secs.abs() > TIME_MAX_SECS {
        return err(format!(
            "{secs} seconds is out of range for {ty} (-999:59:59 to 999:59:59)"
        ));
    }
    match ty {
        ColumnType::Time => out.extend_from_slice(&(secs as i32).to_le_bytes()),
        ColumnType::Time64 { precision } => {
            let ticks = nanos / scale(9 - precision);
            out.extend_from_slice(&(ticks as i64).to_le_bytes());
        }
        _ => return err(format!("internal: {ty} is not a time")),
    }
    Ok(())
}

/// Time from `[-]h:mm:ss[.fff]` (hours may exceed 24) or from seconds as text.
pub fn write_time_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let t = s.trim();
    let bad = || {
        err(format!(
            "{s:?} is not a time (expected [-]h:mm:ss[.fff] or seconds), expected {ty}"
        ))
    };
    let (negative, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    // Digits only, at most `max` of them.
    let num = |x: &str, max: usize| -> Option<i128> {
        if x.is_empty() || x.len() > max || !x.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        x.parse().ok()
    };
    // A fraction of a second as nanoseconds.
    let frac_nanos = |f: &str| -> Option<i128> {
        if f.is_empty() {
            return Some(0);
        }
        let mut padded = num(f, 9)?.to_string();
        padded.insert_str(0, &"0".repeat(f.len() - padded.len()));
        padded.push_str(&"0".repeat(9 - f.len()));
        padded.parse().ok()
    };
    let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
    let parts: Vec<&str> = whole.split(':').collect();
    let secs = match parts.as_slice() {
        [secs] => num(secs, 12),
        [h, m, sec] => match (num(h, 4), num(m, 2), num(sec, 2)) {
            (Some(h), Some(m), Some(sec)) if m < 60 && sec < 60 => Some(h * 3600 + m * 60 + sec),
            _ => None,
        },
        _ => None,
    };
    let (Some(secs), Some(frac)) = (secs, frac_nanos(frac)) else {
        return bad();
    };
    let nanos = secs * 1_000_000_000 + frac;
    write_time_nanos(ty, if negative { -nanos } else { nanos }, out)
}

/// The discriminator of a NULL Variant.
pub const VARIANT_NULL: u8 = 255;

/// The Dynamic type's binary type codes of the types chbridge writes into it.
pub mod dynamic_type {
    pub const NOTHING: u8 = 0x00;
    pub const UINT64: u8 = 0x04;
    pub const INT64: u8 = 0x0a;
    pub const FLOAT64: u8 = 0x0e;
    pub const STRING: u8 = 0x15;
    pub const ARRAY: u8 = 0x1e;
    pub const NULLABLE: u8 = 0x23;
    pub const BOOL: u8 = 0x2d;
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` string.
fn parse_days(s: &str) -> ConvertResult<i64> {
    let date_part = s.get(..10).unwrap_or(s);
    match NaiveDate::parse_from_str(date_part, "%Y-%m-%d") {
        Ok(d) if s.len() == 10 => Ok(i64::from(d.num_days_from_ce()) - UNIX_EPOCH_DAYS_FROM_CE),
        _ => err(format!("{s:?} is not a date (expected YYYY-MM-DD)")),
    }
}

pub fn write_date_days(ty: &ColumnType, days: i64, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::Date if (0..=DATE_MAX_DAYS).contains(&days) => {
            out.extend_from_slice(&(days as u16).to_le_bytes())
        }
        ColumnType::Date32 if (DATE32_MIN_DAYS..=DATE32_MAX_DAYS).contains(&days) => {
            out.extend_from_slice(&(days as i32).to_le_bytes())
        }
        _ => {
            return err(format!(
                "day {days} after 1970-01-01 is out of range for {ty}"
            ))
        }
    }
    Ok(())
}

pub fn write_date_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    write_date_days(ty, parse_days(s)?, out)
}

/// Nanoseconds since the epoch of an RFC 3339 string, or of a naive
/// `YYYY-MM-DD[ T]hh:mm:ss[.fff]` string taken as UTC. A naive string for a
/// column with a non-UTC time zone is refused: guessing would shift the value.
fn parse_datetime_nanos(s: &str, tz: Option<&str>) -> ConvertResult<i128> {
    // The common forms without chrono's general parser (about ten times the work).
    match fast_datetime(s.as_bytes()) {
        Some((nanos, true)) => return Ok(nanos),
        Some((nanos, false)) if matches!(tz, None | Some("UTC") | Some("Etc/UTC")) => {
            return Ok(nanos)
        }
        _ => {}
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(
            i128::from(dt.timestamp()) * 1_000_000_000 + i128::from(dt.timestamp_subsec_nanos())
        );
    }
    let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"));
    match naive {
        Ok(dt) if matches!(tz, None | Some("UTC") | Some("Etc/UTC")) => {
            let utc = dt.and_utc();
            Ok(i128::from(utc.timestamp()) * 1_000_000_000
                + i128::from(utc.timestamp_subsec_nanos()))
        }
        Ok(_) => err(format!(
            "{s:?} has no UTC offset and the column's time zone is {}; send RFC 3339 \
             with an offset (e.g. 2024-01-31T12:00:00Z) or epoch seconds",
            tz.unwrap_or_default()
        )),
        Err(_) => err(format!(
            "{s:?} is not a date-time (expected RFC 3339 such as 2024-01-31T12:00:00Z, \
             or epoch seconds)"
        )),
    }
}

/// `YYYY-MM-DD[T ]hh:mm:ss[.f{1,9}][Z|±hh:mm]` as nanoseconds since the
/// epoch (UTC when there is no offset), and whether an offset was given.
/// None for anything else, which the general parser then judges.
fn fast_datetime(b: &[u8]) -> Option<(i128, bool)> {
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (h, mi, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut frac: i128 = 0;
    if let Some((&b'.', digits)) = rest.split_first() {
        let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        frac = i128::from(num(&digits[..n])?) * 10i128.pow(9 - n as u32);
        rest = &digits[n..];
    }
    let (offset_secs, has_offset) = match rest {
        [] => (0, false),
        [b'Z' | b'z'] => (0, true),
        [sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2] => {
            let (oh, om) = (num(&[*oh1, *oh2])?, num(&[*om1, *om2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            (if *sign == b'-' { -o } else { o }, true)
        }
        _ => return None,
    };
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    Some((i128::from(secs) * 1_000_000_000 + frac, has_offset))
}

fn datetime64_out_of_range(ty: &ColumnType, secs: i128) -> ConvertResult {
    err(format!(
        "{secs} seconds since 1970 is out of range for {ty} (1900-01-01 to 2299-12-31); \
         numbers are epoch seconds: milliseconds must be sent as a fraction \
         (1700000000.123) or an RFC 3339 string"
    ))
}

fn scale(precision: u32) -> i128 {
    10i128.pow(precision)
}

/// Writes a DateTime or DateTime64 value given as nanoseconds since the epoch,
/// truncating below the column's precision as ClickHouse does.
pub fn write_nanos(ty: &ColumnType, nanos: i128, out: &mut Vec<u8>) -> ConvertResult {
    match ty {
        ColumnType::DateTime { .. } => {
            let secs = nanos.div_euclid(1_000_000_000);
            match u32::try_from(secs) {
                Ok(v) => out.extend_from_slice(&v.to_le_bytes()),
                Err(_) => {
                    return err(format!(
                        "{secs} seconds since 1970 is out of range for DateTime \
                         (1970-01-01 to 2106-02-07)"
                    ))
                }
            }
        }
        // The usual case, in i64: i128 division is a library call.
        ColumnType::DateTime64 { precision, .. } if i64::try_from(nanos).is_ok() => {
            let n = nanos as i64;
            let secs = n.div_euclid(1_000_000_000);
            if !(DATETIME64_MIN_SECS as i64..=DATETIME64_MAX_SECS as i64).contains(&secs) {
                return datetime64_out_of_range(ty, i128::from(secs));
            }
            let ticks = n.div_euclid(10i64.pow(9 - precision));
            out.extend_from_slice(&ticks.to_le_bytes());
        }
        ColumnType::DateTime64 { precision, .. } => {
            let secs = nanos.div_euclid(1_000_000_000);
            if !(DATETIME64_MIN_SECS..=DATETIME64_MAX_SECS).contains(&secs) {
                return datetime64_out_of_range(ty, secs);
            }
            let ticks = nanos.div_euclid(scale(9 - precision));
            match i64::try_from(ticks) {
                Ok(v) => out.extend_from_slice(&v.to_le_bytes()),
                Err(_) => return err(format!("{ticks} ticks are out of range for {ty}")),
            }
        }
        _ => return err(format!("internal: {ty} is not a date-time")),
    }
    Ok(())
}

/// A DateTime from epoch seconds (a JSON number).
pub fn write_datetime_secs(ty: &ColumnType, secs: f64, out: &mut Vec<u8>) -> ConvertResult {
    if !secs.is_finite() || secs.abs() > 1e13 {
        return err(format!(
            "{secs} is not a valid epoch time in seconds for {ty}"
        ));
    }
    // Round to the nearest microsecond first: f64 seconds carry about 16 digits,
    // so finer digits are noise from the binary representation.
    let micros = (secs * 1e6).round() as i128;
    write_nanos(ty, micros * 1000, out)
}

pub fn write_datetime_int(ty: &ColumnType, secs: i128, out: &mut Vec<u8>) -> ConvertResult {
    match secs.checked_mul(1_000_000_000) {
        Some(n) => write_nanos(ty, n, out),
        None => err(format!("{secs} is out of range for {ty}")),
    }
}

pub fn write_datetime_str(ty: &ColumnType, s: &str, out: &mut Vec<u8>) -> ConvertResult {
    let tz = match ty {
        ColumnType::DateTime { tz } | ColumnType::DateTime64 { tz, .. } => tz.as_deref(),
        _ => None,
    };
    let t = s.trim();
    // Numbers in strings are epoch seconds, as for JSON numbers.
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        if let Ok(v) = t.parse::<i128>() {
            return write_datetime_int(ty, v, out);
        }
    }
    write_nanos(ty, parse_datetime_nanos(t, tz)?, out)
}

pub fn write_uuid(s: &str, out: &mut Vec<u8>) -> ConvertResult {
    match uuid::Uuid::try_parse(s.trim()) {
        Ok(u) => {
            // RowBinary stores a UUID as two little-endian UInt64: high half first.
            let (hi, lo) = u.as_u64_pair();
            out.extend_from_slice(&hi.to_le_bytes());
            out.extend_from_slice(&lo.to_le_bytes());
            Ok(())
        }
        Err(_) => err(format!("{s:?} is not a UUID")),
    }
}

pub fn write_ipv4(s: &str, out: &mut Vec<u8>) -> ConvertResult {
    match s.trim().parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            out.extend_from_slice(&u32::from(ip).to_le_bytes());
            Ok(())
        }
        Err(_) => err(format!("{s:?} is not an IPv4 address")),
    }
}

pub fn write_fixed_string(n: usize, b: &[u8], out: &mut Vec<u8>) -> ConvertResult {
    if b.len() > n {
        return err(format!(
            "value of {} bytes is too long for FixedString({n})",
            b.len()
        ));
    }
    out.extend_from_slice(b);
    out.resize(out.len() + (n - b.len()), 0);
    Ok(())
}

/// Writes the type's zero value: what ClickHouse stores for a NULL that lands
/// in a non-Nullable element of an array or map.
pub fn write_zero(ty: &ColumnType, out: &mut Vec<u8>) {
    let width = match ty {
        ColumnType::Tuple(els) => {
            for (_, t) in els {
                write_zero(t, out);
            }
            return;
        }
        ColumnType::Int8 | ColumnType::UInt8 | ColumnType::Bool => 1,
        ColumnType::Int16 | ColumnType::UInt16 | ColumnType::Date | ColumnType::BFloat16 => 2,
        ColumnType::Int32
        | ColumnType::UInt32
        | ColumnType::Float32
        | ColumnType::Date32
        | ColumnType::DateTime { .. }
        | ColumnType::IPv4
        | ColumnType::Time => 4,
        ColumnType::Int64
        | ColumnType::UInt64
        | ColumnType::Float64
        | ColumnType::DateTime64 { .. }
        | ColumnType::Time64 { .. }
        | ColumnType::Interval(_) => 8,
        // A zero vector of its N elements.
        ColumnType::QBit(t, n) => {
            write_varint(out, *n as u64);
            for _ in 0..*n {
                write_zero(t, out);
            }
            return;
        }
        ColumnType::Uuid | ColumnType::IPv6 | ColumnType::Int128 | ColumnType::UInt128 => 16,
        ColumnType::Int256 | ColumnType::UInt256 => 32,
        ColumnType::Decimal { precision, .. } => decimal_width(*precision),
        ColumnType::FixedString(n) => *n,
        // ClickHouse's default of an Enum is its first (smallest) value.
        ColumnType::Enum { wide, values } => {
            let v = values.first().map_or(0, |(_, v)| *v);
            if *wide {
                out.extend_from_slice(&v.to_le_bytes());
            } else {
                out.push(v as i8 as u8);
            }
            return;
        }
        ColumnType::Variant(_) => {
            out.push(VARIANT_NULL);
            return;
        }
        ColumnType::Dynamic => {
            out.push(dynamic_type::NOTHING);
            return;
        }
        ColumnType::Json => {
            write_bytes(out, b"{}");
            return;
        }
        // Strings, arrays and maps: an empty one is a zero length.
        ColumnType::String | ColumnType::Array(_) | ColumnType::Map(..) => 1,
        ColumnType::Nullable(_) => {
            out.push(1);
            return;
        }
        ColumnType::LowCardinality(t) => return write_zero(t, out),
        ColumnType::Unsupported(_) => 0,
    };
    out.resize(out.len() + width, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>) -> ConvertResult) -> ConvertResult<Vec<u8>> {
        let mut out = Vec::new();
        f(&mut out).map(|_| out)
    }

    #[test]
    fn varint_matches_leb128() {
        let mut out = Vec::new();
        write_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = vec![9, 9];
        insert_len_prefix(&mut out, 1, 200);
        assert_eq!(out, [9, 0xc8, 0x01, 9]);
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(
            enc(|o| write_int(&ColumnType::UInt8, 255, o)),
            Ok(vec![255])
        );
        let e = enc(|o| write_int(&ColumnType::UInt8, 256, o)).unwrap_err();
        assert!(e.0.contains("out of range for UInt8"), "{e}");
        assert!(enc(|o| write_int(&ColumnType::Int64, -1, o)).is_ok());
        assert!(enc(|o| write_int(&ColumnType::UInt64, -1, o)).is_err());
        assert_eq!(
            enc(|o| write_numeric_str(&ColumnType::UInt64, "18446744073709551615", o)),
            Ok(vec![255; 8])
        );
        assert!(enc(|o| write_float(&ColumnType::Int32, 1.5, o)).is_err());
        assert_eq!(
            enc(|o| write_float(&ColumnType::Int16, 2.0, o)),
            Ok(vec![2, 0])
        );
    }

    #[test]
    fn the_fast_date_time_path_agrees_with_chrono() {
        let mut checked = 0;
        for y in [1900, 1969, 1970, 2000, 2024, 2100, 2299] {
            for (mo, d) in [(1, 1), (2, 28), (2, 29), (3, 1), (12, 31), (6, 15)] {
                for time in [
                    "00:00:00",
                    "23:59:59.5",
                    "12:34:56.123456789",
                    "07:08:09.07",
                ] {
                    for off in ["", "Z", "+05:30", "-11:00"] {
                        let s = format!("{y:04}-{mo:02}-{d:02}T{time}{off}");
                        let chrono = if off.is_empty() {
                            NaiveDateTime::parse_from_str(&s, "%Y-%m-%dT%H:%M:%S%.f")
                                .ok()
                                .map(|t| t.and_utc().fixed_offset())
                        } else {
                            DateTime::parse_from_rfc3339(&s).ok()
                        };
                        let fast = fast_datetime(s.as_bytes());
                        match chrono {
                            Some(t) => {
                                let want = i128::from(t.timestamp()) * 1_000_000_000
                                    + i128::from(t.timestamp_subsec_nanos());
                                assert_eq!(fast, Some((want, !off.is_empty())), "{s}");
                                checked += 1;
                            }
                            None => assert_eq!(fast, None, "{s} (not a date)"),
                        }
                    }
                }
            }
        }
        assert!(checked > 500);
        for bad in [
            "2024-13-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567891Z",
            "2024-01-01T00:00:00+5:30",
            "2024-01-01",
            "2024-01-01T00:00",
        ] {
            assert_eq!(fast_datetime(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn dates_and_datetimes() {
        assert_eq!(
            enc(|o| write_date_str(&ColumnType::Date, "1970-01-02", o)),
            Ok(vec![1, 0])
        );
        assert!(enc(|o| write_date_str(&ColumnType::Date, "1969-12-31", o)).is_err());
        assert_eq!(
            enc(|o| write_date_str(&ColumnType::Date32, "1969-12-31", o)),
            Ok((-1i32).to_le_bytes().to_vec())
        );
        let dt = ColumnType::DateTime { tz: None };
        assert_eq!(
            enc(|o| write_datetime_str(&dt, "2024-01-31T12:00:00+01:00", o)),
            Ok(1_706_698_800u32.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc(|o| write_datetime_str(&dt, "2024-01-31 11:00:00", o)),
            Ok(1_706_698_800u32.to_le_bytes().to_vec())
        );
        assert!(enc(|o| write_datetime_int(&dt, -1, o)).is_err());
        let paris = ColumnType::DateTime {
            tz: Some("Europe/Paris".into()),
        };
        let e = enc(|o| write_datetime_str(&paris, "2024-01-31 11:00:00", o)).unwrap_err();
        assert!(e.0.contains("Europe/Paris"), "{e}");
        let dt64 = ColumnType::DateTime64 {
            precision: 3,
            tz: None,
        };
        assert_eq!(
            enc(|o| write_datetime_str(&dt64, "2024-01-31T11:00:00.123456Z", o)),
            Ok(1_706_698_800_123i64.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc(|o| write_datetime_secs(&dt64, 1_706_698_800.123, o)),
            Ok(1_706_698_800_123i64.to_le_bytes().to_vec())
        );
        // Epoch milliseconds mistaken for seconds land in year 55000: refused.
        let e = enc(|o| write_datetime_int(&dt64, 1_706_698_800_123, o)).unwrap_err();
        assert!(e.0.contains("out of range"), "{e}");
    }

    #[test]
    fn decimal_text_of_unscaled_twos_complement() {
        assert_eq!(decimal_text(&[0xff, 0x85], 2).as_deref(), Some("-1.23"));
        assert_eq!(decimal_text(&[0x00], 3).as_deref(), Some("0.000"));
        assert_eq!(
            decimal_text(&[0x01, 0xe2, 0x40], 4).as_deref(),
            Some("12.3456")
        );
        assert_eq!(decimal_text(&[0x80], 0).as_deref(), Some("-128"));
        let d = ColumnType::Decimal {
            precision: 9,
            scale: 2,
        };
        assert_eq!(
            enc(|o| write_decimal_unscaled(&d, &[0xff, 0x85], 2, o)),
            Ok((-123i32).to_le_bytes().to_vec())
        );
        assert!(enc(|o| write_decimal_unscaled(&d, &[0x01], 3, o)).is_err());
    }

    #[test]
    fn uuid_is_two_little_endian_halves() {
        let out = enc(|o| write_uuid("61f0c404-5cb3-11e7-907b-a6006ad3dba0", o)).unwrap();
        assert_eq!(&out[..8], &0x61f0c4045cb311e7u64.to_le_bytes());
        assert_eq!(&out[8..], &0x907ba6006ad3dba0u64.to_le_bytes());
        assert!(enc(|o| write_uuid("nope", o)).is_err());
    }
}
