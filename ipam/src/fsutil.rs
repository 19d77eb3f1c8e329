//! File primitives the store is built from: atomic replacement, private directories and a lock
//! with a bounded wait.
use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions, TryLockError},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
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

/// Creates `path` if it is missing (owner-only), then checks it as [`verify_private_dir`] does.
pub fn ensure_private_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_private_dir(path)?,
        Err(e) => return Err(IpamError::io(path, e)),
        Ok(_) => {}
    }
    verify_private_dir(path)
}

/// Checks that `path` is a real directory (not a symlink), owned by this process's user and
/// writable by nobody else. Whoever can write a store directory can swap its entries for
/// symlinks and redirect the store's writes, so such a store is refused. Read access for others
/// is taken away instead: the store's own directories are 0700.
pub fn verify_private_dir(path: &Path) -> Result<()> {
    let unsafe_store = |reason: String| IpamError::UnsafeStore {
        path: path.into(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| IpamError::io(path, e))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_store("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_store("is not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_store(format!(
            "is owned by uid {}, not by this process's uid {me}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_store(format!(
            "is writable by group or others (mode {mode:04o}); make it 0700"
        )));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(0o700)).map_err(|e| IpamError::io(path, e))?;
    }
    Ok(())
}

/// Checks the directory the stores live in: an existing one that group or others may write
/// without the sticky bit would let them replace a store directory. (Being a symlink is fine
/// here: the data dir is the operator's choice.)
pub fn verify_data_dir(path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(|e| IpamError::io(path, e))?,
    };
    if !meta.is_dir() {
        return Err(IpamError::UnsafeStore {
            path: path.into(),
            reason: "is not a directory".into(),
        });
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(IpamError::UnsafeStore {
            path: path.into(),
            reason: format!(
                "is writable by group or others without the sticky bit (mode {:04o})",
                mode & 0o7777
            ),
        });
    }
    Ok(())
}

/// Reads a file without following a symlink at `path` itself: a store file that is a symlink
/// was not written by the store, and reading through it would read whatever it points at.
pub fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes)?;
    Ok(bytes)
}

/// Whether an open with `O_NOFOLLOW` failed because the path is a symlink.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
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
        let file = open_lock_file(path)?;
        Self::lock_open_file(file, path, timeout)
    }

    /// Like [`FileLock::acquire`], but gives up at once when another process holds the lock.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self {
                file,
                path: path.into(),
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(IpamError::io(path, e)),
        }
    }

    /// Whether the locked file is still the one at its path: a lock file that its last holder
    /// removed (see [`FileLock::remove`]) locks nothing any more.
    pub fn is_current(&self) -> Result<bool> {
        let held = self.file.metadata().map_err(|e| IpamError::io(&self.path, e))?;
        match std::fs::symlink_metadata(&self.path) {
            Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(IpamError::io(&self.path, e)),
        }
    }

    /// Removes the lock file while holding the lock, then lets go. Waiters see (with
    /// [`FileLock::is_current`]) that they locked a removed file and start over.
    pub fn remove(self) -> Result<()> {
        remove_if_exists(&self.path).map(|_| ())
    }

    fn lock_open_file(file: File, path: &Path, timeout: Duration) -> Result<Self> {
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

/// Opens (creating) a lock file, refusing a symlink or anything but a regular file: the lock's
/// content is written, and must not land in a file the link points at.
fn open_lock_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if is_symlink_refusal(&e) {
                IpamError::UnsafeStore {
                    path: path.into(),
                    reason: "is a symbolic link".into(),
                }
            } else {
                IpamError::io(path, e)
            }
        })?;
    let meta = file.metadata().map_err(|e| IpamError::io(path, e))?;
    if !meta.is_file() {
        return Err(IpamError::UnsafeStore {
            path: path.into(),
            reason: "is not a regular file".into(),
        });
    }
    Ok(file)
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
    fn a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = FileLock::acquire(&link, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, IpamError::UnsafeStore { .. }), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn a_removed_lock_file_is_no_longer_current() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = FileLock::acquire(&path, Duration::from_secs(1)).unwrap();
        assert!(held.is_current().unwrap());
        let waiter = std::thread::spawn({
            let path = path.clone();
            move || {
                let lock = FileLock::acquire(&path, Duration::from_secs(5)).unwrap();
                lock.is_current().unwrap()
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        held.remove().unwrap();
        assert!(
            !waiter.join().unwrap(),
            "the waiter locked the removed file and must see it"
        );
        assert!(FileLock::try_acquire(&path).unwrap().unwrap().is_current().unwrap());
    }

    #[test]
    fn private_dirs_are_checked_and_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("net");
        ensure_private_dir(&store).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&store), 0o700);
        std::fs::set_permissions(&store, Permissions::from_mode(0o755)).unwrap();
        verify_private_dir(&store).unwrap();
        assert_eq!(mode(&store), 0o700, "read access for others is taken away");
        for writable in [0o777, 0o770, 0o702] {
            std::fs::set_permissions(&store, Permissions::from_mode(writable)).unwrap();
            let err = verify_private_dir(&store).unwrap_err();
            assert!(
                err.to_string().contains("writable by group or others"),
                "{writable:o}: {err}"
            );
        }
        std::fs::set_permissions(&store, Permissions::from_mode(0o700)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&store, &link).unwrap();
        assert!(
            verify_private_dir(&link)
                .unwrap_err()
                .to_string()
                .contains("symbolic link")
        );
        let world = dir.path().join("world");
        std::fs::create_dir(&world).unwrap();
        for loose in [0o777, 0o775] {
            std::fs::set_permissions(&world, Permissions::from_mode(loose)).unwrap();
            assert!(verify_data_dir(&world).is_err(), "{loose:o}");
        }
        std::fs::set_permissions(&world, Permissions::from_mode(0o1777)).unwrap();
        verify_data_dir(&world).unwrap();
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
