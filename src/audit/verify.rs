//! `meshsign audit verify`: checks a trail offline and names each break.
//!
//! Files are taken in the order of the index in their names. Within the
//! trail every record must carry the next sequence number and the SHA-256 of
//! the record before it; every file must begin with its header, which names
//! its own index and the length the previous file had when it was closed.
//!
//! What is detected, and how it is named:
//! - a record edited in place: the next record carries another hash
//!   ("line L (seq S) was altered");
//! - a record removed: its sequence number is missing ("seq S missing
//!   between line A and line B");
//! - records reordered: a sequence number lower than one before it;
//! - a record inserted, even with a correct hash of its predecessor: two
//!   records claim one sequence number and the chain continues from the
//!   other one;
//! - a file removed from the middle, or renamed: a gap in the indices, or a
//!   header naming another index; the oldest files removed: the first file
//!   does not begin the trail (allowed with `allow_missing_start`, for
//!   `audit.max_files`);
//! - a file shortened after it was closed: its length is below the one the
//!   next header recorded; a last record cut short: an incomplete line.
//!
//! What is not: removing the newest records of the newest file at a line
//! boundary, or appending forged records at the end, or rewriting every
//! record from some point on with fresh hashes, leaves a chain that is
//! consistent in itself. Only a copy of a later hash kept elsewhere catches
//! that: the writer logs one (the "audit anchor" line, every
//! `audit.anchor_interval` and at shutdown), and `--anchor SEQ:SHA256`
//! checks the files against it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::record::{self, Parsed, GENESIS};

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The first file need not begin the trail (older files were removed by
    /// `audit.max_files` or archived).
    pub allow_missing_start: bool,
    /// Hashes of records known from elsewhere (the "audit anchor" log line).
    pub anchors: Vec<Anchor>,
}

/// A record's hash kept outside the files: `SEQ:SHA256`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl FromStr for Anchor {
    type Err = VerifyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VerifyError::BadAnchor(s.to_owned());
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        Ok(Anchor {
            seq: seq.trim().parse().map_err(|_| bad())?,
            hash: record::parse_hash(hash.trim()).ok_or_else(bad)?,
        })
    }
}

/// Why verification could not run at all (a broken trail is a
/// [`VerifyReport`] with problems, not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an audit file name (audit-<index>.jsonl)", path.display())]
    NotAuditFile { path: PathBuf },
    #[error("no audit files (audit-<index>.jsonl) in {}", path.display())]
    NoFiles { path: PathBuf },
    #[error("--anchor {0:?}: expected SEQ:SHA256, as the \"audit anchor\" log line prints it")]
    BadAnchor(String),
}

/// One break (or, in `warnings`, one oddity that breaks nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line in `file`, when the problem has one.
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What was checked and what was found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub files: Vec<PathBuf>,
    /// Records in the chain (headers and lost notes included).
    pub records: u64,
    pub issued: u64,
    pub refused: u64,
    /// Decision records the trail itself says were lost.
    pub lost: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// The newest record's hash: keep it, or compare it with the anchor log.
    pub last_hash: Option<[u8; 32]>,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One parsed line.
struct Rec {
    line: u64,
    /// Where the line starts in its file.
    offset: u64,
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
    p: Parsed,
}

/// The last record of the chain so far, and where it is.
#[derive(Clone)]
struct Link {
    seq: u64,
    hash: [u8; 32],
    file: PathBuf,
    line: u64,
}

/// Verifies the audit files in `paths` (directories or files).
pub fn verify(paths: &[PathBuf], options: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let files = collect(paths)?;
    let mut report = VerifyReport {
        files: files.iter().map(|(_, p)| p.clone()).collect(),
        ..VerifyReport::default()
    };
    // Each file's header says how long the file before it was when closed.
    let headers: Vec<Option<Parsed>> = files.iter().map(|(_, p)| first_record(p)).collect();
    let anchor_seqs: HashSet<u64> = options.anchors.iter().map(|a| a.seq).collect();
    let mut anchored: HashMap<u64, Link> = HashMap::new();
    let mut link: Option<Link> = None;
    let mut previous: Option<(u64, PathBuf, u64)> = None; // index, path, length

    for (k, (index, path)) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?;
        let len = bytes.len() as u64;
        // The next file's header: where this file ended when it was closed.
        let next_header = match (files.get(k + 1), headers.get(k + 1)) {
            (Some((next, _)), Some(Some(h))) if *next == index.saturating_add(1) => Some(h),
            _ => None,
        };
        let closed_at = next_header.and_then(|h| h.prev_bytes);
        let (mut recs, torn) = scan(path, &bytes, &mut report.problems);
        // What a failed write left past that point (undoing it failed too)
        // is not part of the chain: its sequence numbers were used again by
        // the next file.
        let mut uncommitted = 0;
        if let (Some(at), Some(h)) = (closed_at, next_header) {
            recs.retain(|r| {
                let keep = r.offset < at || r.seq < h.seq;
                uncommitted += u64::from(!keep);
                keep
            });
        }
        let torn_uncommitted = match (&torn, closed_at) {
            (Some((offset, _)), Some(at)) => *offset >= at,
            _ => false,
        };
        if uncommitted > 0 || torn_uncommitted {
            let at = closed_at.unwrap_or(len);
            report.warnings.push(Problem {
                file: path.clone(),
                line: None,
                seq: None,
                message: format!(
                    "{} bytes after offset {at} are not part of the chain: the next file's \
                     header says this file ended there (a write that failed, or a crash)",
                    len.saturating_sub(at)
                ),
            });
        } else if let Some((_, p)) = torn {
            report.problems.push(p);
        }

        // The header.
        let header = recs.first().filter(|r| r.line == 1 && r.p.kind == "file");
        match header {
            None => report.problems.push(Problem {
                file: path.clone(),
                line: Some(1),
                seq: None,
                message: "the file does not begin with its header (a `file` record): its first \
                          record was removed or altered"
                    .into(),
            }),
            Some(h) if h.p.file != Some(*index) => report.problems.push(Problem {
                file: path.clone(),
                line: Some(1),
                seq: Some(h.seq),
                message: format!(
                    "the header is that of file {}: files were renamed or reordered",
                    h.p.file.map_or("?".into(), |f| f.to_string())
                ),
            }),
            Some(_) => {}
        }
        for r in recs.iter().skip(1).filter(|r| r.p.kind == "file") {
            report.problems.push(Problem {
                file: path.clone(),
                line: Some(r.line),
                seq: Some(r.seq),
                message: "a file header inside the file: inserted".into(),
            });
        }

        // How this file joins the one before.
        match &previous {
            None => {
                let genesis = header.is_some_and(|h| h.seq == 0 && h.prev == GENESIS);
                if !genesis && !options.allow_missing_start {
                    report.problems.push(Problem {
                        file: path.clone(),
                        line: Some(1),
                        seq: recs.first().map(|r| r.seq),
                        message: "the trail does not begin here: the files before this one are \
                                  missing (deleted, or removed by audit.max_files or archived: \
                                  then pass --allow-missing-start)"
                            .into(),
                    });
                }
                link = None;
            }
            Some((prev_index, prev_path, prev_len)) if prev_index.saturating_add(1) == *index => {
                if let Some(closed) = header.and_then(|h| h.p.prev_bytes) {
                    if *prev_len < closed {
                        report.problems.push(Problem {
                            file: prev_path.clone(),
                            line: None,
                            seq: None,
                            message: format!(
                                "the file is shorter ({prev_len} bytes) than when it was closed \
                                 ({closed} bytes, per the header of {}): records were removed \
                                 from its end",
                                path.display()
                            ),
                        });
                    }
                }
            }
            Some((prev_index, prev_path, _)) => {
                let missing: Vec<String> = (prev_index.saturating_add(1)..*index)
                    .take(5)
                    .map(record::file_name)
                    .collect();
                let seqs = match (&link, recs.first()) {
                    (Some(l), Some(r)) if r.seq > l.seq.saturating_add(1) => {
                        format!(" (records seq {}..={})", l.seq + 1, r.seq - 1)
                    }
                    _ => String::new(),
                };
                report.problems.push(Problem {
                    file: path.clone(),
                    line: None,
                    seq: None,
                    message: format!(
                        "{}{} missing between {} and this file{seqs}: removed",
                        missing.join(", "),
                        if index.saturating_sub(*prev_index) > 6 {
                            ", …"
                        } else {
                            ""
                        },
                        prev_path.display()
                    ),
                });
                link = None;
            }
        }

        // The record after this file's last one: the next file's header.
        let after = match (files.get(k + 1), headers.get(k + 1)) {
            (Some((next, _)), Some(Some(h))) if *next == index.saturating_add(1) => {
                record::parse_hash(&h.prev).map(|prev| (h.seq, prev))
            }
            _ => None,
        };
        link = check_chain(path, &recs, link, after, &mut report.problems);
        check_order(path, &recs, &mut report.problems);
        if let Some(at) = closed_at.filter(|at| *at < len) {
            if uncommitted == 0 && !torn_uncommitted {
                report.problems.push(Problem {
                    file: path.clone(),
                    line: None,
                    seq: None,
                    message: format!(
                        "the file is longer ({len} bytes) than when it was closed ({at} bytes, \
                         per the next file's header): altered"
                    ),
                });
            }
        }

        for r in &recs {
            if anchor_seqs.contains(&r.seq) {
                anchored.entry(r.seq).or_insert(Link {
                    seq: r.seq,
                    hash: r.hash,
                    file: path.clone(),
                    line: r.line,
                });
            }
            report.records += 1;
            match (r.p.kind.as_str(), r.p.outcome.as_deref()) {
                ("decision", Some("issued")) => report.issued += 1,
                ("decision", _) => report.refused += 1,
                ("lost", _) => report.lost += r.p.count.unwrap_or(0),
                _ => {}
            }
            if report.first_time.is_none() {
                report.first_time = Some(r.p.time.clone());
            }
            report.last_time = Some(r.p.time.clone());
            report.first_seq = Some(report.first_seq.map_or(r.seq, |s| s.min(r.seq)));
            report.last_seq = Some(report.last_seq.map_or(r.seq, |s| s.max(r.seq)));
        }
        previous = Some((*index, path.clone(), len));
    }
    report.last_hash = link.as_ref().map(|l| l.hash);

    for a in &options.anchors {
        let (file, line, seq) = match anchored.get(&a.seq) {
            Some(found) if found.hash == a.hash => continue,
            Some(found) => (
                found.file.clone(),
                Some(found.line),
                format!(
                    "does not match the anchor {}: altered (or the trail rewritten from here on)",
                    record::hex(&a.hash)
                ),
            ),
            None => match (&link, report.last_seq) {
                (Some(l), Some(last)) if last < a.seq => (
                    l.file.clone(),
                    Some(l.line),
                    format!(
                        "the trail ends at seq {last}, before the anchor's seq {}: the newest \
                         records were removed",
                        a.seq
                    ),
                ),
                _ => (
                    report.files.last().cloned().unwrap_or_default(),
                    None,
                    "the anchor's record is not in the files given".into(),
                ),
            },
        };
        report.problems.push(Problem {
            file,
            line,
            seq: Some(a.seq),
            message: format!("anchor: {seq}"),
        });
    }
    Ok(report)
}

/// The audit files named by `paths`, ordered by index.
fn collect(paths: &[PathBuf]) -> Result<Vec<(u64, PathBuf)>, VerifyError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| VerifyError::Read {
                path: path.clone(),
                source,
            })?;
            let before = files.len();
            for e in entries.filter_map(|e| e.ok()) {
                if let Some(i) = record::parse_file_name(&e.file_name().to_string_lossy()) {
                    files.push((i, e.path()));
                }
            }
            if files.len() == before {
                return Err(VerifyError::NoFiles { path: path.clone() });
            }
        } else {
            let index = path
                .file_name()
                .and_then(|n| record::parse_file_name(&n.to_string_lossy()))
                .ok_or_else(|| VerifyError::NotAuditFile { path: path.clone() })?;
            files.push((index, path.clone()));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The first line of `path`, parsed, if it is a record.
fn first_record(path: &Path) -> Option<Parsed> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(f)
        .take(1 << 20)
        .read_until(b'\n', &mut line)
        .ok()?;
    serde_json::from_slice(line.strip_suffix(b"\n")?).ok()
}

/// Parses every complete line; a line that is not a record is a problem.
/// Returns the records and, if the bytes end without a newline, where that
/// incomplete line starts and the problem it is.
fn scan(
    path: &Path,
    bytes: &[u8],
    problems: &mut Vec<Problem>,
) -> (Vec<Rec>, Option<(u64, Problem)>) {
    let mut recs = Vec::new();
    let mut rest = bytes;
    let mut line = 0u64;
    let mut offset = 0u64;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        line += 1;
        let text = &rest[..end];
        rest = &rest[end + 1..];
        let start = offset;
        offset += end as u64 + 1;
        let parsed = serde_json::from_slice::<Parsed>(text)
            .map_err(|e| e.to_string())
            .and_then(|p| match record::parse_hash(&p.prev) {
                Some(prev) => Ok((p, prev)),
                None => Err("`prev` is not a SHA-256".into()),
            });
        match parsed {
            Ok((p, prev)) => recs.push(Rec {
                line,
                offset: start,
                seq: p.seq,
                prev,
                hash: record::line_hash(text),
                p,
            }),
            Err(e) => problems.push(Problem {
                file: path.to_owned(),
                line: Some(line),
                seq: None,
                message: format!("not an audit record (altered or damaged): {e}"),
            }),
        }
    }
    let torn = (!rest.is_empty()).then(|| {
        (
            offset,
            Problem {
                file: path.to_owned(),
                line: Some(line + 1),
                seq: None,
                message: format!(
                    "ends with an incomplete record ({} bytes without a newline): cut short, a \
                 crash during a write, or a write in progress",
                    rest.len()
                ),
            },
        )
    });
    (recs, torn)
}

/// Checks sequence numbers and hashes in sequence order; returns the last
/// link. Records that claim a sequence number another record holds and the
/// chain does not continue from are reported as inserted.
fn check_chain(
    path: &Path,
    recs: &[Rec],
    mut link: Option<Link>,
    after: Option<(u64, [u8; 32])>,
    problems: &mut Vec<Problem>,
) -> Option<Link> {
    let mut by_seq: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, r) in recs.iter().enumerate() {
        by_seq.entry(r.seq).or_default().push(i);
    }
    let problem = |line: u64, seq: u64, message: String| Problem {
        file: path.to_owned(),
        line: Some(line),
        seq: Some(seq),
        message,
    };
    let mut genuine: BTreeMap<u64, usize> = BTreeMap::new();
    for (&seq, positions) in &by_seq {
        if let [only] = positions[..] {
            genuine.insert(seq, only);
            continue;
        }
        // The chain continues from the one whose hash the next record carries.
        let next: Vec<[u8; 32]> = match by_seq.get(&seq.saturating_add(1)) {
            Some(n) => n.iter().map(|&i| recs[i].prev).collect(),
            None => after
                .filter(|(s, _)| Some(*s) == seq.checked_add(1))
                .map(|(_, prev)| vec![prev])
                .unwrap_or_default(),
        };
        let followed: Vec<usize> = positions
            .iter()
            .copied()
            .filter(|&i| next.contains(&recs[i].hash))
            .collect();
        if let [kept] = followed[..] {
            genuine.insert(seq, kept);
            for &i in positions.iter().filter(|&&i| i != kept) {
                problems.push(problem(
                    recs[i].line,
                    seq,
                    format!(
                        "inserted: line {} has the same sequence number and the chain \
                         continues from that one",
                        recs[kept].line
                    ),
                ));
            }
        } else {
            let lines: Vec<String> = positions
                .iter()
                .map(|&i| recs[i].line.to_string())
                .collect();
            genuine.insert(seq, positions[0]);
            problems.push(problem(
                recs[positions[0]].line,
                seq,
                format!(
                    "lines {} claim the same sequence number: all but one were inserted",
                    lines.join(", ")
                ),
            ));
        }
    }
    for (&seq, &i) in &genuine {
        let r = &recs[i];
        if let Some(l) = &link {
            let at = |l: &Link| {
                if l.file == path {
                    format!("line {}", l.line)
                } else {
                    format!("{}:{}", l.file.display(), l.line)
                }
            };
            if seq <= l.seq {
                problems.push(problem(
                    r.line,
                    seq,
                    format!(
                        "does not follow seq {} ({}): records replaced or out of order",
                        l.seq,
                        at(l)
                    ),
                ));
            } else if seq > l.seq.saturating_add(1) {
                let missing = if seq == l.seq + 2 {
                    format!("record seq {} is missing", l.seq + 1)
                } else {
                    format!("records seq {}..={} are missing", l.seq + 1, seq - 1)
                };
                problems.push(problem(
                    r.line,
                    seq,
                    format!("{missing} between {} and this line: removed", at(l)),
                ));
            } else if r.prev != l.hash {
                problems.push(Problem {
                    file: l.file.clone(),
                    line: Some(l.line),
                    seq: Some(l.seq),
                    message: format!(
                        "altered: the next record ({}:{}, seq {seq}) carries a different hash \
                         of it",
                        path.display(),
                        r.line
                    ),
                });
            }
        }
        link = Some(Link {
            seq,
            hash: r.hash,
            file: path.to_owned(),
            line: r.line,
        });
    }
    link
}

/// Records must appear in increasing sequence order.
fn check_order(path: &Path, recs: &[Rec], problems: &mut Vec<Problem>) {
    let mut highest: Option<&Rec> = None;
    for r in recs {
        match highest {
            Some(h) if r.seq < h.seq => problems.push(Problem {
                file: path.to_owned(),
                line: Some(r.line),
                seq: Some(r.seq),
                message: format!("reordered: it comes after line {} (seq {})", h.line, h.seq),
            }),
            Some(h) if r.seq == h.seq => {} // a duplicate: reported as inserted
            _ => highest = Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_files_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let zeros = "0".repeat(64);
        let max = u64::MAX;
        let text = format!(
            "{{\"seq\":{max},\"prev\":\"{zeros}\",\"kind\":\"file\",\"file\":{max}}}\n\
             {{\"seq\":{max},\"prev\":\"{zeros}\",\"kind\":\"decision\"}}\n\
             {{\"seq\":0,\"prev\":\"{zeros}\",\"kind\":\"decision\"}}\n\
             not json\n\
             {{\"seq\":-1}}\n\
             {{\"seq\":5,\"prev\":\"zz\",\"kind\":\"lost\"}}\n\
             {{\"seq\":7"
        );
        std::fs::write(dir.path().join(format!("audit-{max}.jsonl")), &text).unwrap();
        std::fs::write(dir.path().join("audit-00000001.jsonl"), &text).unwrap();
        std::fs::write(dir.path().join("audit-00000002.jsonl"), "").unwrap();
        let report = verify(&[dir.path().to_owned()], &VerifyOptions::default()).unwrap();
        assert!(!report.is_intact());
        let bad = VerifyOptions {
            anchors: vec![format!("3:{}", "a".repeat(64)).parse().unwrap()],
            ..VerifyOptions::default()
        };
        assert!(!verify(&[dir.path().to_owned()], &bad).unwrap().is_intact());
        assert!("3:xyz".parse::<Anchor>().is_err());
        assert!(matches!(
            verify(&[dir.path().join("nope.txt")], &bad),
            Err(VerifyError::NotAuditFile { .. })
        ));
    }
}
