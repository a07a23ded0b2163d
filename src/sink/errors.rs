//! Which insert failures are worth retrying. docs/errors.md is this table in prose.

use std::fmt;

/// What an insert failure means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server is down, overloaded or slow: send the same bytes again later.
    Transient,
    /// ClickHouse refused the data itself: sending it again cannot help.
    Data,
    /// The configuration or the table is wrong (no table, no permission,
    /// bad password): stop and tell the operator.
    Fatal,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 3] = [ErrorClass::Transient, ErrorClass::Data, ErrorClass::Fatal];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Data => "data",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// A failed insert attempt.
#[derive(Debug, Clone)]
pub struct InsertError {
    pub class: ErrorClass,
    /// ClickHouse's exception code, when the server sent one.
    pub code: Option<u32>,
    pub message: String,
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.class.as_str(), self.message)
    }
}

impl std::error::Error for InsertError {}

/// ClickHouse exception codes whose cause passes by itself.
const TRANSIENT_CODES: &[(u32, &str)] = &[
    (3, "UNEXPECTED_END_OF_FILE"),
    (159, "TIMEOUT_EXCEEDED"),
    (164, "READONLY"),
    (202, "TOO_MANY_SIMULTANEOUS_QUERIES"),
    (209, "SOCKET_TIMEOUT"),
    (210, "NETWORK_ERROR"),
    (236, "ABORTED"),
    (241, "MEMORY_LIMIT_EXCEEDED"),
    (242, "TABLE_IS_READ_ONLY"),
    (252, "TOO_MANY_PARTS"),
    (285, "TOO_FEW_LIVE_REPLICAS"),
    (319, "UNKNOWN_STATUS_OF_INSERT"),
    (394, "QUERY_WAS_CANCELLED"),
    (425, "SYSTEM_ERROR"),
    (439, "CANNOT_SCHEDULE_TASK"),
    (999, "KEEPER_EXCEPTION"),
];

/// ClickHouse exception codes that say the rows themselves are bad.
const DATA_CODES: &[(u32, &str)] = &[
    (6, "CANNOT_PARSE_TEXT"),
    (26, "CANNOT_PARSE_QUOTED_STRING"),
    (27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED"),
    (32, "ATTEMPT_TO_READ_AFTER_EOF"),
    (33, "CANNOT_READ_ALL_DATA"),
    (38, "CANNOT_PARSE_DATE"),
    (41, "CANNOT_PARSE_DATETIME"),
    (53, "TYPE_MISMATCH"),
    (69, "ARGUMENT_OUT_OF_BOUND"),
    (70, "CANNOT_CONVERT_TYPE"),
    (72, "CANNOT_PARSE_NUMBER"),
    (117, "INCORRECT_DATA"),
    (128, "TOO_LARGE_ARRAY_SIZE"),
    (131, "TOO_LARGE_STRING_SIZE"),
    (407, "DECIMAL_OVERFLOW"),
    (691, "UNKNOWN_ELEMENT_OF_ENUM"),
    (349, "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN"),
    (395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"),
    (469, "VIOLATED_CONSTRAINT"),
];

/// ClickHouse exception codes that need an operator.
const FATAL_CODES: &[(u32, &str)] = &[
    (16, "NO_SUCH_COLUMN_IN_TABLE"),
    (47, "UNKNOWN_IDENTIFIER"),
    (60, "UNKNOWN_TABLE"),
    (62, "SYNTAX_ERROR"),
    (81, "UNKNOWN_DATABASE"),
    (192, "UNKNOWN_USER"),
    (193, "WRONG_PASSWORD"),
    (194, "REQUIRED_PASSWORD"),
    (195, "IP_ADDRESS_NOT_ALLOWED"),
    (497, "ACCESS_DENIED"),
    (516, "AUTHENTICATION_FAILED"),
];

/// Classifies a ClickHouse exception code. Unknown codes are retried: a wrong
/// retry shows in `chbridge_insert_retries_total` and its alert, while a wrong
/// stop would halt ingestion for something that may pass.
pub fn classify_code(code: u32) -> ErrorClass {
    if DATA_CODES.iter().any(|(c, _)| *c == code) {
        ErrorClass::Data
    } else if FATAL_CODES.iter().any(|(c, _)| *c == code) {
        ErrorClass::Fatal
    } else {
        ErrorClass::Transient
    }
}

/// The symbolic name of a known code, for messages.
pub fn code_name(code: u32) -> Option<&'static str> {
    TRANSIENT_CODES
        .iter()
        .chain(DATA_CODES)
        .chain(FATAL_CODES)
        .find(|(c, _)| *c == code)
        .map(|(_, n)| *n)
}

/// Finds `Code: N.` in a ClickHouse error body.
pub fn parse_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Classifies an error of the `clickhouse` crate.
pub fn classify(err: &clickhouse::error::Error) -> InsertError {
    use clickhouse::error::Error as E;
    let mut message = err.to_string();
    let (class, code) = match err {
        E::BadResponse(body) => match parse_code(body) {
            Some(code) if code_name(code).is_none() => {
                // Retried rather than stopped or dead-lettered: a wrong retry
                // shows in the retry metric, a wrong stop halts ingestion.
                message
                    .push_str(" (an error code chbridge does not classify: retried as transient)");
                (ErrorClass::Transient, Some(code))
            }
            Some(code) => (classify_code(code), Some(code)),
            // An error page without a ClickHouse code: a proxy or load balancer.
            None if body.contains("401") || body.contains("403") => (ErrorClass::Fatal, None),
            None => (ErrorClass::Transient, None),
        },
        E::Network(_) | E::TimedOut => (ErrorClass::Transient, None),
        E::InvalidParams(_) | E::Unsupported(_) => (ErrorClass::Fatal, None),
        _ => (ErrorClass::Transient, None),
    };
    InsertError {
        class,
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_from_clickhouse_bodies() {
        assert_eq!(
            parse_code("Code: 241. DB::Exception: Memory limit (total) exceeded"),
            Some(241)
        );
        assert_eq!(parse_code("no code here"), None);
    }

    #[test]
    fn overload_is_transient_bad_data_is_data_and_auth_is_fatal() {
        for c in [241, 202, 252, 209, 210, 159, 12345] {
            assert_eq!(classify_code(c), ErrorClass::Transient, "code {c}");
        }
        for c in [27, 53, 117, 6, 33] {
            assert_eq!(classify_code(c), ErrorClass::Data, "code {c}");
        }
        for c in [60, 81, 516, 497, 16] {
            assert_eq!(classify_code(c), ErrorClass::Fatal, "code {c}");
        }
        assert_eq!(code_name(241), Some("MEMORY_LIMIT_EXCEEDED"));
    }

    #[test]
    fn crate_errors_are_classified() {
        let e = clickhouse::error::Error::BadResponse(
            "Code: 60. DB::Exception: Table db.t does not exist. (UNKNOWN_TABLE)".into(),
        );
        let c = classify(&e);
        assert_eq!((c.class, c.code), (ErrorClass::Fatal, Some(60)));
        let c = classify(&clickhouse::error::Error::BadResponse(
            "Code: 12345. DB::Exception: something new".into(),
        ));
        assert_eq!((c.class, c.code), (ErrorClass::Transient, Some(12345)));
        assert!(c.message.contains("retried as transient"), "{}", c.message);
        let c = classify(&clickhouse::error::Error::TimedOut);
        assert_eq!(c.class, ErrorClass::Transient);
        let c = classify(&clickhouse::error::Error::BadResponse(
            "502 Bad Gateway".into(),
        ));
        assert_eq!(c.class, ErrorClass::Transient);
    }
}
