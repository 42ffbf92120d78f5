//! Server-side resource accounting from Linux /proc: CPU seconds (user +
//! system, all threads), open descriptors and peak resident set size
//! (VmHWM, reset at the start of a measurement through `clear_refs`).

use std::fs;

/// A CPU-time reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading {
    pub seconds: f64,
}

/// User + system CPU seconds consumed so far by `pid`.
pub fn cpu(pid: u32) -> Option<CpuReading> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux configuration we run on.
    Some(CpuReading {
        seconds: (utime + stime) / 100.0,
    })
}

/// Open descriptors of `pid`. Linux 6.2 and later report the count as the
/// size of `/proc/PID/fd`, without the listing (10,000 entries every 200 ms,
/// on the CPU the server shares with the abuse suite's legitimate load, took
/// CPU time from the server during idle-h2); older kernels report 0 there,
/// so list them.
pub fn open_fds(pid: u32) -> Option<u64> {
    let dir = format!("/proc/{pid}/fd");
    match fs::metadata(&dir).ok()?.len() {
        0 => Some(fs::read_dir(&dir).ok()?.count() as u64),
        n => Some(n),
    }
}

/// Resets the peak-RSS watermark of `pid` (needs permission on its clear_refs).
pub fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Peak RSS (VmHWM) of `pid` in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
