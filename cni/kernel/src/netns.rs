//! Network namespaces. Following netavark, a namespace is entered only by a throwaway thread, for
//! exactly as long as it takes to open a socket there: sockets stay bound to the namespace they
//! were created in, so all later work happens from the calling thread without `setns`.
use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{BorrowedFd, OwnedFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::statfs::{FsType, fstatfs},
};

/// Opens a network namespace handle (a `/run/netns/NAME` bind mount or `/proc/PID/ns/net`).
///
/// Opened non-blocking: a FIFO (or any other special file) at `path` must not hang the caller in
/// `open`; the caller then finds it is no namespace ([`is_netns`]).
pub fn open(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

/// Whether `fd` is the network namespace the calling thread is in (same nsfs inode).
pub fn is_current_netns(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let current = std::fs::metadata("/proc/thread-self/ns/net")?;
    let other = File::from(fd.try_clone_to_owned()?).metadata()?;
    Ok((current.dev(), current.ino()) == (other.dev(), other.ino()))
}

/// Runs `f` on a new thread that has joined the namespace `ns`, and returns its result. The thread
/// ends right after, so no thread of ours is ever left in a foreign namespace.
pub fn run_in<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // Only this short-lived thread changes namespace.
                setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// `statfs(2)` `f_type` of the namespace filesystem.
const NSFS_MAGIC: FsType = FsType(0x6e73_6673);

/// Whether `fd` refers to a network namespace (as opposed to any other file, or a namespace of
/// another type): it is on nsfs, and a thread can join it as a network namespace (`setns`
/// checks the type).
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    fstatfs(fd).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC) && run_in(fd, || Ok(())).is_ok()
}

/// Reads a sysctl of the calling thread's namespace, given as a path under `/proc/sys`
/// (`net/ipv4/ip_forward`; slashes, because interface names may contain dots).
pub fn read_sysctl(path: &str) -> io::Result<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path)).map(|s| s.trim().to_string())
}
