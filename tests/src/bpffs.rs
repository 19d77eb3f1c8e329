//! A bpffs instance of a test's own, for pins that must not touch anything else: nothing the
//! machine has pinned is visible in it, and unmounting it (on drop) removes everything pinned.
use std::path::{Path, PathBuf};

/// A private bpffs, unmounted when dropped.
pub struct TestBpfFs {
    dir: tempfile::TempDir,
}

impl TestBpfFs {
    pub fn mount() -> Self {
        crate::require_root();
        let dir = tempfile::tempdir().expect("temp dir");
        crate::run(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
                .arg(dir.path()),
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A directory in it (for an agent's `--bpf-pin-path`).
    pub fn pin_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestBpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The interface index of the TCX link pinned at `pin` (0 once its interface is gone or it was
/// detached), from the kernel's own link info: Debian's bpftool (7.1) does not decode TCX links.
pub fn tcx_link_ifindex(pin: &Path) -> std::io::Result<u32> {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    // SAFETY: a bpf(2) call with an attr of the size passed, pointing at a live C string.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 16) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor bpf(2) just returned, owned here.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) tcx's ifindex and attach_type.
    let mut info = [0u32; 16];
    // union bpf_attr, BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&link) as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: as above; the kernel writes at most info_len bytes into `info`.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), 16) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if info[0] != BPF_LINK_TYPE_TCX {
        return Err(std::io::Error::other(format!(
            "{} is a link of type {}, not TCX",
            pin.display(),
            info[0]
        )));
    }
    Ok(info[4])
}
