//! File primitives the store is built from: atomic replacement, private directories and a lock
//! with a bounded wait.
use std::{
    fs::{DirBuilder, File, OpenOptions, TryLockError},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::error::{IpamError, Result};

/// Prefix of in-flight temporary files. Only lock holders write them, so a lock holder may delete
/// any it finds: they are what a killed writer left behind.
pub const TMP_PREFIX: &str = ".tmp-";

/// Creates `path` and its parents, owner-only (0700): allocation state is nobody else's business.
pub fn create_private_dir(path: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| IpamError::io(path, e))
}

/// Replaces `path` with the content `write` produces, atomically: readers see the old file or the
/// new one, never a mix, whenever the writer is killed. There is deliberately no fsync. Page cache
/// is lost only when the machine goes down, and then the boot id changes and the store reclaims
/// every allocation anyway (see `store`).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        write(&mut file)?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        IpamError::io(path, e)
    })
}

/// Removes `path`; a file that is already gone is not an error.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(IpamError::io(path, e)),
    }
}

/// An exclusive `flock` on a lock file, released when dropped or when the process dies.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock file's content. Only lock holders read or write it, so it can carry small state.
    pub fn read_content(&self) -> Result<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 4096];
        let n = self
            .file
            .read_at(&mut buf, 0)
            .map_err(|e| IpamError::io(&self.path, e))?;
        buf.truncate(n);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Replaces the lock file's content with one small write. A kill cannot tear a write this
    /// small; a torn one after a power loss only looks like another boot, which is reclaimed.
    pub fn write_content(&self, content: &str) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(content.as_bytes(), 0)
            .map_err(|e| IpamError::io(&self.path, e))?;
        self.file
            .set_len(content.len() as u64)
            .map_err(|e| IpamError::io(&self.path, e))
    }

    /// Takes the lock, waiting at most `timeout`.
    ///
    /// The uncontended case is one non-blocking `flock`. Under contention a helper thread makes
    /// the blocking call, so the kernel wakes us the moment the holder lets go (no polling
    /// latency), while we can still give up on time. If we give up, the helper drops the lock
    /// as soon as it gets it.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| IpamError::io(path, e))?;
        // `File::try_lock` and `File::lock` are `flock(2)`: held by the open file, released when
        // it is closed, also when the process dies.
        match file.try_lock() {
            Ok(()) => {
                return Ok(Self {
                    file,
                    path: path.into(),
                });
            }
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(IpamError::io(path, e)),
        }
        let (tx, rx) = mpsc::sync_channel::<io::Result<File>>(1);
        std::thread::Builder::new()
            .name("ipam-lock".into())
            .spawn(move || {
                let result = file.lock().map(|()| file);
                // If the receiver timed out, the send fails and the file (and lock) drop here.
                let _ = tx.send(result);
            })
            .map_err(|e| IpamError::io(path, e))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(file)) => Ok(Self {
                file,
                path: path.into(),
            }),
            Ok(Err(e)) => Err(IpamError::io(path, e)),
            Err(_) => Err(IpamError::LockTimeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_times_out_while_held_and_succeeds_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = FileLock::acquire(&path, Duration::from_secs(1)).unwrap();
        let err = FileLock::acquire(&path, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, IpamError::LockTimeout(_)), "{err}");
        drop(held);
        FileLock::acquire(&path, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, |f| io::Write::write_all(f, b"one")).unwrap();
        write_atomic(&path, |f| io::Write::write_all(f, b"two")).unwrap();
        let err = write_atomic(&path, |_| Err(io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}
