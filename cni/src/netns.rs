//! Network namespaces. Following netavark, a namespace is entered only by a throwaway thread, for
//! exactly as long as it takes to open a socket there: sockets stay bound to the namespace they
//! were created in, so all later work happens from the calling thread without `setns`.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

/// Opens a network namespace handle (a `/run/netns/NAME` bind mount or `/proc/PID/ns/net`).
pub fn open(path: &Path) -> io::Result<OwnedFd> {
    let file = File::open(path)?;
    Ok(OwnedFd::from(file))
}

/// Runs `f` on a new thread that has joined the namespace `ns`, and returns its result. The thread
/// ends right after, so no thread of ours is ever left in a foreign namespace.
pub fn run_in<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let raw = ns.as_fd().as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a descriptor borrowed for the duration of the scope; it only
                // changes this short-lived thread's namespace.
                if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// Whether `fd` refers to a network namespace (as opposed to any other file).
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)) answers CLONE_NEWNET for a network namespace.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: ioctl with no argument on a descriptor we borrow.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

/// Reads a sysctl of the calling thread's namespace, given as a path under `/proc/sys`
/// (`net/ipv4/ip_forward`; slashes, because interface names may contain dots).
pub fn read_sysctl(path: &str) -> io::Result<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path)).map(|s| s.trim().to_string())
}
