//! The lab's long-running processes (agents, the API stand-in, pod servers): started in a
//! namespace (and cgroup) of the lab's, each in its own process group with its output in a log
//! file, and stopped as the kubelet stops containers: SIGTERM, then SIGKILL after a grace period.
use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError, mpsc},
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    Lab,
    kernel_fs::join_cgroup,
    topology::{in_lab, lab_netns_inodes},
};
use crate::netns::Netns;

/// How a daemon the lab stopped ended.
#[derive(Debug)]
pub enum DaemonExit {
    /// It was not running (any more).
    NotRunning,
    /// It ended on SIGTERM; with its exit status when this process started it.
    Exited(Option<ExitStatus>),
    /// It ignored SIGTERM and was killed.
    Killed,
}

/// The exit statuses of the daemons this process started, by pid.
type ChildExits = std::collections::HashMap<u32, mpsc::Receiver<ExitStatus>>;

fn lock_children() -> MutexGuard<'static, ChildExits> {
    static CHILDREN: OnceLock<Mutex<ChildExits>> = OnceLock::new();
    CHILDREN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// A thread of a lab daemon held in a ptrace stop ([`Lab::pause_daemon_thread`]) while the
/// daemon's other threads run on. It runs again when this is dropped.
///
/// ptrace ties the stop to the test's thread that made it: only that thread can let it go, so
/// this is not `Send`. Should that thread end first, the kernel lets the daemon's thread go.
pub struct PausedThread {
    pid: nix::unistd::Pid,
    tid: nix::unistd::Pid,
    _this_thread_only: std::marker::PhantomData<*const ()>,
}

impl PausedThread {
    /// Kills the whole daemon (SIGKILL) with this thread still stopped, so that it does nothing
    /// more before the end, and reaps the thread: a traced thread that dies stays a zombie until
    /// its tracer waits for it, and the daemon's end waits with it. The daemon itself is reaped
    /// as ever (its pid file then names a dead process: [`Lab::kill_daemon`] tidies it).
    pub fn kill_daemon(self) -> Result<()> {
        nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL).context("killing the daemon")?;
        // SIGKILL wakes a stopped thread to die; the wait returns once it has.
        nix::sys::wait::waitpid(self.tid, Some(nix::sys::wait::WaitPidFlag::__WALL))
            .context("reaping the paused thread")?;
        Ok(())
    }
}

impl Drop for PausedThread {
    fn drop(&mut self) {
        use nix::sys::{ptrace, wait};
        // ESRCH: the thread is not in a stop of ours (yet): a stop still to come is waited for
        // once, then let go; a thread already reaped (`kill_daemon`) answers ECHILD at once.
        if ptrace::detach(self.tid, None).is_err() {
            let signal = match wait::waitpid(self.tid, Some(wait::WaitPidFlag::__WALL)) {
                Ok(wait::WaitStatus::Stopped(_, signal)) => Some(signal),
                _ => None,
            };
            let _ = ptrace::detach(self.tid, signal);
        }
    }
}

impl Lab {
    pub(super) fn pid_file(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.pid"))
    }

    /// The pid of a daemon the lab started, while its pid file is there.
    pub fn daemon_pid(&self, what: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_file(what)).ok()?.trim().parse().ok()
    }

    /// Holds the thread named `thread` of daemon `what` stopped, leaving the daemon's other
    /// threads running: how a test holds back one part of a daemon (the agent's purge worker)
    /// to show that the rest does not wait for it. Pause a thread while it is idle, so that it
    /// holds nothing the others need. To kill the daemon meanwhile, use
    /// [`PausedThread::kill_daemon`].
    pub fn pause_daemon_thread(&self, what: &str, thread: &str) -> Result<PausedThread> {
        use nix::sys::{ptrace, wait};
        let pid = self
            .daemon_pid(what)
            .with_context(|| format!("{what} is not running"))?;
        let tid: i32 = std::fs::read_dir(format!("/proc/{pid}/task"))?
            .flatten()
            .find(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == thread))
            .and_then(|task| task.file_name().to_str()?.parse().ok())
            .with_context(|| format!("{what} has no thread named {thread}"))?;
        // The main thread's stops would reach the reaper that waits for the daemon's pid, and
        // read as its end.
        anyhow::ensure!(
            u32::try_from(tid) != Ok(pid),
            "{what}'s {thread} thread is its main thread: not pausable"
        );
        let tid = nix::unistd::Pid::from_raw(tid);
        // Seized, not attached: the thread stops only when interrupted.
        ptrace::seize(tid, ptrace::Options::empty()).with_context(|| format!("seizing {what}'s {thread} thread"))?;
        let paused = PausedThread {
            pid: nix::unistd::Pid::from_raw(pid as i32),
            tid,
            _this_thread_only: std::marker::PhantomData,
        };
        ptrace::interrupt(tid).with_context(|| format!("stopping {what}'s {thread} thread"))?;
        // The interrupt ends in a stop the tracer waits for (a thread of another process:
        // __WALL). A signal that reaches the thread first stops it too: it is delivered, and the
        // wait goes on.
        for _ in 0..16 {
            match wait::waitpid(tid, Some(wait::WaitPidFlag::__WALL))? {
                wait::WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_STOP) => return Ok(paused),
                wait::WaitStatus::Stopped(_, signal) => ptrace::cont(tid, signal)?,
                other => anyhow::bail!("{what}'s {thread} thread did not stop: {other:?}"),
            }
        }
        anyhow::bail!("{what}'s {thread} thread did not stop: signal after signal")
    }

    /// Starts `program` in `ns` as a background process of its own (its own process group, output
    /// to a log file), and records its pid.
    pub(super) fn spawn_daemon(
        &self,
        ns: &Netns,
        what: &str,
        program: &Path,
        args: &[String],
        cgroup: Option<&Path>,
    ) -> Result<u32> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        if let Some(cgroup) = cgroup {
            join_cgroup(&mut cmd, cgroup)?;
        }
        self.spawn_command(ns, what, cmd)
    }

    /// Starts a prepared command in `ns` as daemon `what` (its own process group, output to a
    /// log file), and records its pid.
    pub(super) fn spawn_command(&self, ns: &Netns, what: &str, mut cmd: Command) -> Result<u32> {
        let log = File::create(self.dir.join("logs").join(format!("{what}.log")))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // A program that cannot be started (missing, or its setup before exec failed) is an
        // error for the caller to report, never a panic of the lab or its controllers.
        let mut child = ferrynet_kernel::netns::run_in(ns.fd(), || cmd.spawn())
            .with_context(|| format!("starting {what} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        // Reap it whenever it ends, if we are still around then, and keep how it ended for
        // `stop_daemon`.
        let (exit_tx, exit_rx) = mpsc::channel();
        lock_children().insert(pid, exit_rx);
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(status);
            }
        });
        std::fs::write(self.pid_file(what), pid.to_string())?;
        Ok(pid)
    }

    /// Stops a daemon started by `spawn_daemon`: SIGTERM, then SIGKILL if it is still there
    /// after 5 s. Says how it ended.
    pub(super) fn stop_daemon(&self, what: &str) -> Result<DaemonExit> {
        let path = self.pid_file(what);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(DaemonExit::NotRunning);
        };
        let pid: i32 = text.trim().parse().context("pid file")?;
        let _ = std::fs::remove_file(&path);
        let exit = u32::try_from(pid).ok().and_then(|p| lock_children().remove(&p));
        // Only a process still living in one of the lab's namespaces is ours: if the daemon died
        // earlier, its pid may belong to someone else by now.
        if !in_lab(pid, &lab_netns_inodes(&self.state.name)) {
            return Ok(DaemonExit::NotRunning);
        }
        signal(pid, nix::sys::signal::Signal::SIGTERM);
        if let Some(exit) = exit {
            // Our own child: its reaper reports the exit status.
            return Ok(match exit.recv_timeout(Duration::from_secs(5)) {
                Ok(status) => DaemonExit::Exited(Some(status)),
                Err(_) => {
                    // The child is not reaped yet, so the pid is still its own.
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                    DaemonExit::Killed
                }
            });
        }
        let gone = crate::wait_for(Duration::from_secs(5), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting to be reaped.
            (stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))).then_some(())
        });
        if gone.is_none() {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
            return Ok(DaemonExit::Killed);
        }
        Ok(DaemonExit::Exited(None))
    }

    /// How a daemon this process started and that is no longer running ended: its exit status
    /// (`None` when this process did not start it). A process that just ended may not be reaped
    /// yet, so this waits a moment for its reaper. The status is reported once; the pid file
    /// goes with it.
    pub(super) fn daemon_ended(&self, what: &str) -> Option<ExitStatus> {
        let pid = self.daemon_pid(what)?;
        let mut children = lock_children();
        let status = children.get(&pid)?.recv_timeout(Duration::from_secs(2)).ok()?;
        children.remove(&pid);
        let _ = std::fs::remove_file(self.pid_file(what));
        Some(status)
    }

    /// Kills a daemon at once (SIGKILL), as a crash or an OOM kill would, and waits until it is
    /// gone.
    pub fn kill_daemon(&self, what: &str) -> Result<()> {
        let path = self.pid_file(what);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let pid: i32 = text.trim().parse().context("pid file")?;
        let _ = std::fs::remove_file(&path);
        let exit = u32::try_from(pid).ok().and_then(|p| lock_children().remove(&p));
        if !in_lab(pid, &lab_netns_inodes(&self.state.name)) {
            return Ok(());
        }
        signal(pid, nix::sys::signal::Signal::SIGKILL);
        if let Some(exit) = exit {
            exit.recv_timeout(Duration::from_secs(5))
                .context("the killed daemon was not reaped")?;
        }
        Ok(())
    }
}
