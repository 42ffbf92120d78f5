//! The line format: one JSON object per line, with a fixed key order.
//!
//! Every line starts `{"seq":N,"prev":"<hex>","time":"<RFC 3339>","kind":"…"`:
//! `seq` counts every record of the trail from 0, `prev` is the SHA-256 of
//! the previous record's line exactly as written (its bytes without the
//! newline; 64 zeros for the first record of the trail), and `kind` is one of
//! `file` (the first line of every file), `decision` (one per
//! `CreateCertificate` decision) or `lost` (records that could not be written,
//! counted by reason). What follows depends on the kind.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Decision, Outcome};
use crate::auth::AuthSource;

/// Written into every file header.
pub const FORMAT_VERSION: u32 = 1;

/// `prev` of the first record of a trail.
pub const GENESIS: [u8; 32] = [0; 32];

/// Longest `reason` kept in a record (characters).
const MAX_REASON_CHARS: usize = 512;

/// `audit-00000001.jsonl`, …
pub fn file_name(index: u64) -> String {
    format!("audit-{index:08}.jsonl")
}

/// The index in an audit file name, `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The SHA-256 a record is chained by: over its line without the newline.
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// 64 hex digits → 32 bytes.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// RFC 3339, UTC, microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// RFC 3339 (seconds) for a Unix time, e.g. a certificate's notAfter.
fn rfc3339_unix(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .to_string(),
        Err(_) => secs.to_string(),
    }
}

/// What a record is, after the common prefix.
pub(crate) enum Body<'a> {
    Header(&'a Header),
    Decision(&'a Decision),
    Lost(&'a Lost),
}

/// The first record of a file.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Header {
    /// The file's index (the number in its name).
    pub file: u64,
    /// `start` (the first file of a process) or `rotate`.
    pub reason: &'static str,
    /// How long the previous file was when it was closed: bytes after that
    /// in it are not part of the chain (a write that failed).
    pub prev_bytes: u64,
    pub version: u32,
}

/// Records that never made it into the trail, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lost {
    pub queue_full: u64,
    pub write_error: u64,
    pub over_budget: u64,
    pub writer_stopped: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.queue_full + self.write_error + self.over_budget + self.writer_stopped
    }

    pub fn add(&mut self, other: &Lost) {
        self.queue_full += other.queue_full;
        self.write_error += other.write_error;
        self.over_budget += other.over_budget;
        self.writer_stopped += other.writer_stopped;
    }
}

#[derive(Serialize)]
struct LostJson {
    count: u64,
    reasons: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct DecisionJson<'a> {
    outcome: &'static str,
    code: &'static str,
    reason: Option<&'a str>,
    caller: Option<&'a str>,
    auth: Option<AuthJson<'a>>,
    pod: Option<PodJson<'a>>,
    remote: Option<String>,
    requested: Option<&'a str>,
    impersonated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<CertificateJson>,
}

#[derive(Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
enum AuthJson<'a> {
    ClientCertificate,
    Jwt { issuer: &'a str },
    TokenReview { cluster: &'a str },
}

#[derive(Serialize)]
struct PodJson<'a> {
    name: &'a str,
    uid: &'a str,
}

#[derive(Serialize)]
struct CertificateJson {
    serial: String,
    sha256: String,
    not_before: Option<String>,
    not_after: Option<String>,
}

fn certificate_json(der: &[u8]) -> CertificateJson {
    let sha256 = hex(&line_hash(der));
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => CertificateJson {
            serial: hex(cert.tbs_certificate.raw_serial()),
            sha256,
            not_before: Some(rfc3339_unix(cert.validity().not_before.timestamp())),
            not_after: Some(rfc3339_unix(cert.validity().not_after.timestamp())),
        },
        // We signed it, so it parses; if not, the digest still identifies it.
        Err(_) => CertificateJson {
            serial: String::new(),
            sha256,
            not_before: None,
            not_after: None,
        },
    }
}

/// Renders one record (without the newline) into `out`.
pub(crate) fn render(
    out: &mut Vec<u8>,
    seq: u64,
    prev: &[u8; 32],
    time: SystemTime,
    body: Body<'_>,
) {
    use std::io::Write;
    let kind = match body {
        Body::Header(_) => "file",
        Body::Decision(_) => "decision",
        Body::Lost(_) => "lost",
    };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{{\"seq\":{seq},\"prev\":\"{}\",\"time\":\"{}\",\"kind\":\"{kind}\"",
        hex(prev),
        rfc3339(time)
    );
    let rest = match body {
        Body::Header(h) => serde_json::to_vec(h),
        Body::Decision(d) => serde_json::to_vec(&decision_json(d)),
        Body::Lost(l) => {
            let mut reasons = BTreeMap::new();
            for (name, n) in [
                ("queue_full", l.queue_full),
                ("write_error", l.write_error),
                ("over_budget", l.over_budget),
                ("writer_stopped", l.writer_stopped),
            ] {
                if n > 0 {
                    reasons.insert(name, n);
                }
            }
            serde_json::to_vec(&LostJson {
                count: l.total(),
                reasons,
            })
        }
    };
    match rest {
        // `{"a":…}` → `,"a":…}`
        Ok(rest) if rest.len() > 2 => {
            out.push(b',');
            out.extend_from_slice(&rest[1..]);
        }
        _ => out.push(b'}'),
    }
}

fn decision_json(d: &Decision) -> DecisionJson<'_> {
    let (outcome, certificate) = match &d.outcome {
        Outcome::Issued { leaf } => ("issued", Some(certificate_json(leaf))),
        Outcome::Refused => ("refused", None),
    };
    DecisionJson {
        outcome,
        code: code_name(d.code),
        reason: d.reason.as_deref(),
        caller: d.caller.as_deref(),
        auth: d.auth.as_ref().map(|a| match a {
            AuthSource::ClientCertificate => AuthJson::ClientCertificate,
            AuthSource::Jwt { issuer } => AuthJson::Jwt { issuer },
            AuthSource::TokenReview { cluster } => AuthJson::TokenReview { cluster },
        }),
        pod: d.pod.as_ref().map(|p| PodJson {
            name: &p.name,
            uid: &p.uid,
        }),
        remote: d.remote.map(|r| r.to_string()),
        requested: d.requested.as_deref(),
        impersonated: d.impersonated,
        certificate,
    }
}

/// The canonical gRPC status code name (`OK`, `UNAUTHENTICATED`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A refusal reason as recorded: cut to a bounded length, and with anything
/// shaped like a JWT (`eyJ…`) replaced, so no token reaches the trail even if
/// an error message ever quoted one.
pub fn scrub_reason(reason: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=');
    let mut out = String::with_capacity(reason.len().min(MAX_REASON_CHARS));
    let mut rest = reason;
    while let Some(at) = rest.find("eyJ") {
        let run = rest[at..]
            .find(|c: char| !is_token_char(c))
            .map_or(rest.len() - at, |n| n);
        out.push_str(&rest[..at]);
        if run >= 16 {
            out.push_str("<redacted token>");
        } else {
            out.push_str(&rest[at..at + run]);
        }
        rest = &rest[at + run..];
    }
    out.push_str(rest);
    if out.chars().count() > MAX_REASON_CHARS {
        out = out.chars().take(MAX_REASON_CHARS).collect::<String>() + "…";
    }
    out
}

/// The fields `verify` and the writer's resume read; others are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct Parsed {
    pub seq: u64,
    pub prev: String,
    #[serde(default)]
    pub time: String,
    pub kind: String,
    #[serde(default)]
    pub file: Option<u64>,
    #[serde(default)]
    pub prev_bytes: Option<u64>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub count: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hashes_and_hex_round_trip() {
        assert_eq!(file_name(7), "audit-00000007.jsonl");
        assert_eq!(parse_file_name("audit-00000007.jsonl"), Some(7));
        assert_eq!(parse_file_name("audit-123456789.jsonl"), Some(123_456_789));
        for bad in [
            "audit-.jsonl",
            "audit-1.json",
            "x-1.jsonl",
            "audit-+1.jsonl",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
        let h = line_hash(b"abc");
        assert_eq!(
            hex(&h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_hash(&hex(&h)), Some(h));
        assert_eq!(parse_hash("00"), None);
    }

    #[test]
    fn tokens_never_reach_a_reason() {
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        let r = scrub_reason(&format!("malformed token: \"{token}\" (x)"));
        assert!(!r.contains("eyJhbGci"), "{r}");
        assert!(r.contains("<redacted token>") && r.ends_with("(x)"), "{r}");
        assert_eq!(scrub_reason("eyJ short"), "eyJ short");
        assert!(scrub_reason(&"é".repeat(2000)).chars().count() <= MAX_REASON_CHARS + 1);
    }

    #[test]
    fn a_record_is_one_json_object_with_the_common_prefix_first() {
        let mut out = Vec::new();
        let lost = Lost {
            queue_full: 2,
            ..Lost::default()
        };
        render(
            &mut out,
            5,
            &GENESIS,
            SystemTime::UNIX_EPOCH,
            Body::Lost(&lost),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(&format!(
                "{{\"seq\":5,\"prev\":\"{}\",\"time\":\"1970-01-01T00:00:00.000000Z\",\"kind\":\"lost\",\"count\":2,",
                "0".repeat(64)
            )),
            "{text}"
        );
        let parsed: Parsed = serde_json::from_str(&text).unwrap();
        assert_eq!((parsed.seq, parsed.count), (5, Some(2)));
    }
}
