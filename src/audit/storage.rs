//! Where audit bytes go: a seam between the writer thread and the file
//! system, so a test can make writes fail as a full disk does (`ENOSPC`,
//! after part of the bytes) without a real full disk.
//!
//! Only writing goes through it; reading back at start-up, listing and
//! deleting rotated-out files use the file system directly.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Creates audit files.
pub trait AuditStorage: Send + Sync + fmt::Debug {
    /// Creates `path`, which must not exist yet, for appending.
    fn create(&self, path: &Path) -> io::Result<Box<dyn AuditFile>>;
    /// Makes a created (or removed) file's directory entry durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open audit file.
pub trait AuditFile: Send {
    /// Appends all of `bytes` (or fails, possibly after writing part of them).
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// `fdatasync`.
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (undoing a partial write).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileSystem;

struct FsFile(File);

impl AuditStorage for FileSystem {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AuditFile>> {
        let mut options = OpenOptions::new();
        options.append(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o640);
        }
        Ok(Box::new(FsFile(options.open(path)?)))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl AuditFile for FsFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        // O_APPEND writes go to the (new) end after this.
        self.0.set_len(len)
    }
}
