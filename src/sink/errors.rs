//! Which insert failures are worth retrying. docs/errors.md is this table in prose.

use std::fmt;

/// What an insert failure means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The server is down, overloaded or slow: send the same bytes again later.
    Transient,
    /// ClickHouse refused the data itself: sending it again cannot help,
    /// splitting it finds the rows it refuses.
    Data,
    /// The batch as a whole is over a server limit (partitions per insert
    /// block, memory or time per query): smaller parts of it may pass, so it
    /// is split; no row is refused for it.
    Split,
    /// The configuration or the table is wrong (no table, no permission,
    /// bad password): stop and tell the operator.
    Fatal,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 4] = [
        ErrorClass::Transient,
        ErrorClass::Data,
        ErrorClass::Split,
        ErrorClass::Fatal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Data => "data",
            ErrorClass::Split => "split",
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

/// How many times the same bytes may fail with a transient-looking error
/// that can also be the batch's own doing before it is taken as the
/// batch's: a query timeout or memory limit that a smaller insert would not
/// hit, or a code chbridge does not know. A retry loop never spins silently
/// on the same bytes.
pub const TIMEOUT_REPEATS: u32 = 3;
pub const UNKNOWN_CODE_REPEATS: u32 = 5;

impl InsertError {
    /// For a transient error that may be the batch's own doing: after how
    /// many failures of the same bytes with this code it is taken as such,
    /// and what it becomes then.
    pub fn repeats(&self) -> Option<(u32, ErrorClass)> {
        if self.class != ErrorClass::Transient {
            return None;
        }
        match self.code? {
            159 | 241 => Some((TIMEOUT_REPEATS, ErrorClass::Split)),
            code if code_name(code).is_none() => Some((UNKNOWN_CODE_REPEATS, ErrorClass::Fatal)),
            _ => None,
        }
    }

    /// Whether the same rows are always refused the same way (partitions per
    /// insert block), so that a replay splits exactly as the first attempt.
    pub fn splits_alike(&self) -> bool {
        self.class == ErrorClass::Split && self.code == Some(252)
    }

    /// The code as a metric label ("none" without an answer from the server).
    pub fn code_label(&self) -> String {
        self.code
            .map_or_else(|| "none".to_string(), |c| c.to_string())
    }
}

/// ClickHouse exception codes whose cause passes by itself.
const TRANSIENT_CODES: &[(u32, &str)] = &[
    (3, "UNEXPECTED_END_OF_FILE"),
    (159, "TIMEOUT_EXCEEDED"),
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
    (115, "UNKNOWN_SETTING"),
    (164, "READONLY"),
    (192, "UNKNOWN_USER"),
    (193, "WRONG_PASSWORD"),
    (194, "REQUIRED_PASSWORD"),
    (195, "IP_ADDRESS_NOT_ALLOWED"),
    (497, "ACCESS_DENIED"),
    (452, "SETTING_CONSTRAINT_VIOLATION"),
    (516, "AUTHENTICATION_FAILED"),
];

/// Classifies a ClickHouse exception code. Unknown codes are retried, a
/// few times (`InsertError::repeats`): a wrong retry shows in
/// `chbridge_insert_retries_total` and its alert, while a wrong stop would
/// halt ingestion for something that may pass.
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

/// Classifies a ClickHouse error by its code and, where one code means
/// several things, its message.
fn classify_answer(code: u32, body: &str) -> ErrorClass {
    // ClickHouse writes the table before pushing to its views: when a view
    // fails, the rows may be in the table already. Splitting the batch would
    // insert them again; only an operator can fix the view.
    if body.contains("while pushing to view") {
        return ErrorClass::Fatal;
    }
    match code {
        // TOO_MANY_PARTS is also "too many partitions for a single INSERT
        // block": the same bytes always fail, fewer rows at a time pass.
        252 if body.contains("partitions for single INSERT block") => ErrorClass::Split,
        // A query's own memory limit: the batch's size, not the server's load.
        241 if body.contains("(for query)") => ErrorClass::Split,
        _ => classify_code(code),
    }
}

/// Classifies an error of the `clickhouse` crate.
pub fn classify(err: &clickhouse::error::Error) -> InsertError {
    use clickhouse::error::Error as E;
    let mut message = err.to_string();
    let (class, code) = match err {
        E::BadResponse(body) => match parse_code(body) {
            Some(code) if code_name(code).is_none() => {
                // Retried a few times rather than stopped or dead-lettered: a
                // wrong retry shows in the retry metric, a wrong stop halts
                // ingestion (InsertError::repeats bounds the retries).
                message.push_str(&format!(
                    " (an error code chbridge does not classify: retried up to \
                     {UNKNOWN_CODE_REPEATS} times, then chbridge stops)"
                ));
                (classify_answer(code, body), Some(code))
            }
            Some(code) => {
                let class = classify_answer(code, body);
                if class == ErrorClass::Fatal && body.contains("while pushing to view") {
                    message.push_str(
                        " (a materialized view failed: ClickHouse wrote the rows to the table \
                         before the view, so they may be there already; fix the view)",
                    );
                }
                (class, Some(code))
            }
            // An error page without a ClickHouse code: a proxy or load balancer.
            None if body.contains("401") || body.contains("403") => (ErrorClass::Fatal, None),
            None => (ErrorClass::Transient, None),
        },
        E::Network(e) => {
            // The crate's message stops at "client error (Connect)": the
            // causes (refused, TLS, DNS) are in the source chain.
            let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
            while let Some(cause) = source {
                // Some layers print their cause already.
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(&format!(": {text}"));
                }
                source = cause.source();
            }
            if super::tls::is_verification_failure(&message) {
                message.push_str(
                    " (the ClickHouse server's TLS certificate does not verify: set \
                     `clickhouse.ca_file` to the CA that signed it, or check the host name \
                     in `clickhouse.url`; chbridge never skips verification)",
                );
                (ErrorClass::Fatal, None)
            } else {
                (ErrorClass::Transient, None)
            }
        }
        E::TimedOut => (ErrorClass::Transient, None),
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
    fn a_certificate_that_does_not_verify_is_told_from_a_server_that_is_down() {
        use super::super::tls::is_verification_failure;
        assert!(is_verification_failure(
            "client error (Connect): error:0A000086:SSL routines:tls_post_process_server_certificate:\
             certificate verify failed: (self-signed certificate in certificate chain)"
        ));
        assert!(is_verification_failure(
            "ssl3_get_record:wrong version number"
        ));
        assert!(!is_verification_failure(
            "client error (Connect): tcp connect error: Connection refused (os error 111)"
        ));
    }

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
        for c in [241, 202, 252, 209, 210, 159, 242, 12345] {
            assert_eq!(classify_code(c), ErrorClass::Transient, "code {c}");
        }
        for c in [27, 53, 117, 6, 33] {
            assert_eq!(classify_code(c), ErrorClass::Data, "code {c}");
        }
        for c in [60, 81, 516, 497, 16, 164, 452, 115] {
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
        assert!(c.message.contains("retried up to 5 times"), "{}", c.message);
        assert_eq!(c.repeats(), Some((UNKNOWN_CODE_REPEATS, ErrorClass::Fatal)));
        let c = classify(&clickhouse::error::Error::TimedOut);
        assert_eq!(c.class, ErrorClass::Transient);
        assert_eq!(
            c.repeats(),
            None,
            "no answer at all: retried for as long as it takes"
        );
        let c = classify(&clickhouse::error::Error::BadResponse(
            "502 Bad Gateway".into(),
        ));
        assert_eq!(c.class, ErrorClass::Transient);
    }

    /// One code, several meanings: the message decides (item 7 of the
    /// delivery review: these were retried forever with the same bytes).
    #[test]
    fn errors_that_repeat_with_the_same_bytes_are_told_apart_by_their_message() {
        let answer = |body: &str| classify(&clickhouse::error::Error::BadResponse(body.into()));
        let too_many_parts = answer(
            "Code: 252. DB::Exception: Too many parts (300 with average size of 1.00 KiB) in table \
             'db.t'. Merges are processing significantly slower than inserts. (TOO_MANY_PARTS)",
        );
        assert_eq!(too_many_parts.class, ErrorClass::Transient);
        let partitions = answer(
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than \
             100). The limit is controlled by 'max_partitions_per_insert_block' setting. (TOO_MANY_PARTS)",
        );
        assert_eq!(partitions.class, ErrorClass::Split);
        let query_memory = answer(
            "Code: 241. DB::Exception: Memory limit (for query) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED)",
        );
        assert_eq!(query_memory.class, ErrorClass::Split);
        let total_memory = answer(
            "Code: 241. DB::Exception: Memory limit (total) exceeded: would use 30.1 GiB. (MEMORY_LIMIT_EXCEEDED)",
        );
        assert_eq!(total_memory.class, ErrorClass::Transient);
        assert_eq!(
            total_memory.repeats(),
            Some((TIMEOUT_REPEATS, ErrorClass::Split))
        );
        let timeout = answer(
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 5.1 seconds. (TIMEOUT_EXCEEDED)",
        );
        assert_eq!(
            timeout.repeats(),
            Some((TIMEOUT_REPEATS, ErrorClass::Split))
        );
        let view = answer(
            "Code: 395. DB::Exception: broken view: while executing 'FUNCTION throwIf()': while \
             pushing to view db.mv. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)",
        );
        assert_eq!(
            view.class,
            ErrorClass::Fatal,
            "not bisected: the rows are in the table"
        );
        assert!(view.message.contains("fix the view"), "{}", view.message);
        for (code, name) in [
            (164, "READONLY"),
            (452, "SETTING_CONSTRAINT_VIOLATION"),
            (115, "UNKNOWN_SETTING"),
        ] {
            let e = answer(&format!("Code: {code}. DB::Exception: x. ({name})"));
            assert_eq!(e.class, ErrorClass::Fatal, "{code}");
        }
    }
}
