//! The kernel filesystems the lab's nodes hang off: a cgroup per node under a cgroup of the
//! lab's own (never the machine's root cgroup), and a bpffs instance of the lab's own for the
//! agents' pins.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Where the machine's cgroup v2 hierarchy is mounted (`/sys/fs/cgroup/unified` on hybrid
/// systems, `/sys/fs/cgroup` on unified ones).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mount_point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// The cgroup a lab's node processes live in: under a `ferrynet-lab` cgroup of the lab's own,
/// never the machine's root cgroup.
pub fn lab_cgroup(name: &str) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join("ferrynet-lab").join(name))
}

/// Removes an (emptied) cgroup and the cgroups inside it; a cgroup goes once its last process
/// has exited, so wait a little.
pub fn remove_cgroup(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let children: Vec<PathBuf> = std::fs::read_dir(cgroup)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    for child in children {
        remove_cgroup(&child)?;
    }
    let removed = crate::wait_for(Duration::from_secs(5), || std::fs::remove_dir(cgroup).ok());
    if removed.is_none() && cgroup.exists() {
        bail!("removing cgroup {}: processes are still in it", cgroup.display());
    }
    Ok(())
}

/// Every process in `cgroup` and the cgroups inside it.
pub fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    for child in std::fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_pids(&child.path()));
        }
    }
    pids
}

/// The lab's own bpffs mount point, in its state directory `dir`.
pub fn lab_bpffs(dir: &Path) -> PathBuf {
    dir.join("bpf")
}

/// Makes `cmd`'s process join `cgroup` before it executes, so that it never runs outside it.
pub fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (open,
    // write, close) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written == 1 { Ok(()) } else { Err(error) }
        });
    }
    Ok(())
}

/// Whether something is mounted at `path`.
pub fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|line| line.split_whitespace().nth(4).is_some_and(|m| Path::new(m) == path))
    })
}

/// Mounts a bpffs instance of the lab's own at `path` (root only): nothing the machine has pinned
/// is visible in it, and unmounting it removes everything pinned there.
pub fn mount_bpffs(path: &Path) -> Result<()> {
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
        .arg(path)
        .output()?;
    if !mounted.status.success() {
        bail!(
            "mounting a bpffs at {}: {}",
            path.display(),
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
    }
    Ok(())
}

/// Unmounts `path` (lazily, so that open pins do not hold it up).
pub fn unmount(path: &Path) -> Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", path.display()))
}

/// Makes `cmd`'s process see `resolv_conf` as `/etc/resolv.conf`, in a mount namespace of its
/// own (as a container runtime gives a pod the resolver configuration kubelet wrote), so that the
/// machine's own file is never touched.
pub fn with_resolv_conf(cmd: &mut Command, resolv_conf: &Path) -> Result<()> {
    let source = std::ffi::CString::new(resolv_conf.as_os_str().as_encoded_bytes())?;
    // SAFETY: between fork and exec the closure makes only system calls (unshare, mount) on
    // strings prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Mounts made here must not propagate back to the machine's namespace.
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let target = c"/etc/resolv.conf";
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Read-only, as a runtime mounts it: the file is shared by the namespace's pods.
            if libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}
