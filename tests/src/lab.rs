//! The lab: a whole multi-node cluster on one Linux machine, inside network namespaces it
//! creates, so that everything can run without a cluster.
//!
//! ```text
//!   fl-<lab>-sw      the underlay: one bridge br<s> per L2 segment s (one segment by default,
//!                    with no address); with several segments it is also the router between
//!                    them, at 10.200.s.1 and fd00:200:s::1, and knows nothing of pod CIDRs
//!   fl-<lab>-cp      control plane, on segment 0: the API stand-in on 10.200.0.2:6443
//!   fl-<lab>-client  an external client on segment 0: 10.200.0.250, fd00:200::250
//!   fl-<lab>-n<i>    node i, on segment (i-1) mod segments: eth0 10.200.s.(10+i), fd00:200:s::(10+i);
//!                    PodCIDRs 10.244.i.0/24, fd00:244:i::/64;
//!                    its own ferrynet-agent, CNI dirs, IPAM store, state dir, BPF pin path
//!                    (in the lab's own bpffs) and cgroup (`<cgroup2>/ferrynet-lab/<lab>/<node>`)
//!   fl-<lab>-pod-<p> pod p: set up by its node's real `ferrynet` binary, run exactly as a runtime
//!                    runs it; runs a small server answering with the pod's name and address
//! ```
//!
//! The lab plays the parts of a cluster it has no binaries for: it registers Nodes (with
//! PodCIDRs and addresses), creates Pods through the CNI, and is the EndpointSlice controller.
//! Its state is in `/run/ferrynet-lab/<lab>/`. It never touches the machine's own namespace,
//! routes, firewall or root cgroup, and `down` (also run first by `up`) removes everything: every
//! process in the lab's namespaces and cgroups, the namespaces, the cgroups, the bpffs mount and
//! the state directory, even after a crash.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::DirBuilderExt, fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    binary,
    cni::{Conflist, Runtime},
    cni_bin_dir,
    netns::Netns,
};

pub const STATE_ROOT: &str = "/run/ferrynet-lab";
pub const API_ADDR: &str = "10.200.0.2:6443";
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 250);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x250);
/// The port every pod's server listens on.
pub const POD_PORT: u16 = 8080;
const CONFLIST: &str = "05-ferrynet.conflist";

/// How a daemon the lab stopped ended.
#[derive(Debug)]
enum DaemonExit {
    /// It was not running (any more).
    NotRunning,
    /// It ended on SIGTERM; with its exit status when this process started it.
    Exited(Option<std::process::ExitStatus>),
    /// It ignored SIGTERM and was killed.
    Killed,
}

/// The exit statuses of the daemons this process started, by pid.
type ChildExits = std::collections::HashMap<u32, std::sync::mpsc::Receiver<std::process::ExitStatus>>;

fn lock_children() -> std::sync::MutexGuard<'static, ChildExits> {
    static CHILDREN: std::sync::OnceLock<std::sync::Mutex<ChildExits>> = std::sync::OnceLock::new();
    CHILDREN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOptions {
    pub name: String,
    pub nodes: u8,
    /// The agents' routing mode: native, vxlan or auto.
    pub mode: String,
    /// How many L2 segments the underlay has (routed between each other); nodes are dealt out
    /// over them in turn.
    pub segments: u8,
}

fn one_segment() -> u8 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    pub index: u8,
    /// The underlay L2 segment the node is on.
    #[serde(default)]
    pub segment: u8,
}

impl LabNode {
    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.segment, 10 + self.index)
    }
    pub fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x200,
            u16::from(self.segment),
            0,
            0,
            0,
            0,
            0x10 + u16::from(self.index),
        )
    }
    pub fn pod_cidrs(&self) -> [String; 2] {
        [
            format!("10.244.{}.0/24", self.index),
            format!("fd00:244:{:x}::/64", self.index),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabPod {
    pub name: String,
    pub node: String,
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The CNI result, cached for DEL as a runtime caches it.
    pub result: Value,
}

impl LabPod {
    pub fn ip(&self, v4: bool) -> IpAddr {
        *self
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == v4)
            .expect("the lab is dual stack")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub mode: String,
    #[serde(default = "one_segment")]
    pub segments: u8,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub next_node: u8,
    pub next_service: u16,
}

/// A lab, opened from its state directory.
pub struct Lab {
    pub state: LabState,
    dir: PathBuf,
}

fn ns_name(lab: &str, part: &str) -> String {
    format!("fl-{lab}-{part}")
}

fn run_ip(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["-n", ns]).args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

impl Lab {
    /// The lab's state directory. Lab names are letters and digits only, so that neither a path
    /// (`/`, `..`) nor another lab's namespaces (`fl-<name>-` is a prefix) can be reached.
    pub fn dir_of(name: &str) -> Result<PathBuf> {
        let ok = (1..=16).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.starts_with(|c: char| c.is_ascii_lowercase());
        if !ok {
            bail!("lab name {name:?}: use 1 to 16 lowercase letters and digits, starting with a letter");
        }
        Ok(Path::new(STATE_ROOT).join(name))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Where `node`'s agent pins its maps: a directory of its own in the lab's bpffs.
    pub fn node_pin_path(&self, node: &str) -> PathBuf {
        lab_bpffs(&self.dir).join(node)
    }

    /// The cgroup `node`'s agent and the commands run on the node live in.
    pub fn node_cgroup(&self, node: &str) -> Result<PathBuf> {
        Ok(lab_cgroup(&self.state.name)?.join(node))
    }

    /// The pid of `node`'s agent, while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_file(&format!("agent-{node}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn ns(&self, part: &str) -> Result<Netns> {
        let name = ns_name(&self.state.name, part);
        Netns::attach(&name).with_context(|| format!("namespace {name}"))
    }

    pub fn node_ns(&self, node: &str) -> Result<Netns> {
        self.ns(node)
    }

    pub fn pod_ns(&self, pod: &str) -> Result<Netns> {
        self.ns(&format!("pod-{pod}"))
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.state)?;
        std::fs::write(self.dir.join("state.json"), text).context("saving lab state")
    }

    /// Opens a running lab.
    pub fn open(name: &str) -> Result<Self> {
        let dir = Self::dir_of(name)?;
        let state: LabState = serde_json::from_slice(
            &std::fs::read(dir.join("state.json")).with_context(|| format!("lab {name} is not up"))?,
        )?;
        Ok(Self { state, dir })
    }

    /// Removes everything of lab `name`, whatever state it was left in.
    pub fn down(name: &str) -> Result<()> {
        let dir = Self::dir_of(name)?;
        let namespaces = lab_namespaces(name);
        // Every process living in one of the lab's namespaces: agents, the API stand-in, pod
        // servers, and anything a user started there.
        let inodes = lab_netns_inodes(name);
        for _ in 0..2 {
            for entry in std::fs::read_dir("/proc")?.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino())) {
                    // SAFETY: kill(2) on a pid found in /proc.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Processes whose namespace was already deleted are no longer found that way (a pod
        // torn down behind the lab's back, say): the lab's pid files name them. A recorded pid is
        // signalled only if it still runs one of the lab's own programs.
        let ours: Vec<PathBuf> = ["ferrynet-lab", "ferrynet-agent"]
            .iter()
            .filter_map(|b| std::fs::canonicalize(crate::target_dir().join(b)).ok())
            .collect();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Some(pid) = std::fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| ours.contains(&exe))
            {
                // SAFETY: kill(2) on a process running one of the lab's programs.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // Teardown keeps going past failures and reports them all at the end.
        let mut errors = Vec::new();
        // The node cgroups: whatever still runs in them goes, then the cgroups (a cgroup can be
        // removed only once its last process has been reaped).
        if let Ok(lab_cgroup) = lab_cgroup(name)
            && lab_cgroup.exists()
        {
            let node_cgroups: Vec<PathBuf> = std::fs::read_dir(&lab_cgroup)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            for cgroup in &node_cgroups {
                let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a process in the lab's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            for cgroup in node_cgroups.iter().chain(std::iter::once(&lab_cgroup)) {
                if let Err(e) = remove_cgroup(cgroup) {
                    errors.push(e.to_string());
                }
            }
            // The parent goes too once no lab is left in it.
            let _ = std::fs::remove_dir(lab_cgroup.parent().expect("has a parent"));
        }
        let bpffs = lab_bpffs(&dir);
        if is_mount_point(&bpffs) {
            let path = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes())?;
            // SAFETY: umount2(2) with a NUL-terminated path.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                errors.push(format!(
                    "unmounting {}: {}",
                    bpffs.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
        // The root goes too once no lab is left in it.
        let _ = std::fs::remove_dir(STATE_ROOT);
        if !errors.is_empty() {
            bail!("lab {name} is not entirely gone: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Brings a lab up (cleaning up whatever an earlier one of the same name left).
    pub fn up(opts: &LabOptions) -> Result<Self> {
        Self::dir_of(&opts.name)?;
        if !(1..=200).contains(&opts.nodes) {
            bail!("a lab has 1 to 200 nodes");
        }
        if !matches!(opts.mode.as_str(), "native" | "vxlan" | "auto") {
            bail!("mode must be native, vxlan or auto");
        }
        if !(1..=8).contains(&opts.segments) {
            bail!("a lab has 1 to 8 underlay segments");
        }
        Self::down(&opts.name)?;
        let dir = Self::dir_of(&opts.name)?;
        // Another lab's `down` may remove the (empty) state root between our steps: retry.
        let create = || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join("logs"))
        };
        let mut created = create();
        for _ in 0..5 {
            if created.is_ok() {
                break;
            }
            created = create();
        }
        created.with_context(|| format!("creating {}", dir.display()))?;
        // A bpffs instance of the lab's own for the agents' pins: nothing the machine has pinned
        // is visible to it, and `down` unmounts it with everything in it.
        let bpffs = lab_bpffs(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&bpffs)?;
        let mounted = Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(&bpffs)
            .output()?;
        if !mounted.status.success() {
            let _ = Self::down(&opts.name);
            bail!(
                "mounting a bpffs at {}: {}",
                bpffs.display(),
                String::from_utf8_lossy(&mounted.stderr).trim()
            );
        }
        let mut lab = Self {
            state: LabState {
                name: opts.name.clone(),
                mode: opts.mode.clone(),
                segments: opts.segments,
                nodes: Vec::new(),
                pods: Vec::new(),
                next_node: 1,
                next_service: 1,
            },
            dir,
        };
        let result = (|| {
            let sw = Netns::create_named(&ns_name(&opts.name, "sw"))?;
            for segment in 0..opts.segments {
                let bridge = format!("br{segment}");
                sw.ip(&["link", "add", &bridge, "type", "bridge"]);
                if opts.segments > 1 {
                    sw.ip(&["addr", "add", &format!("10.200.{segment}.1/24"), "dev", &bridge]);
                    let v6 = format!("fd00:200:{segment:x}::1/64");
                    sw.ip(&["addr", "add", &v6, "dev", &bridge, "nodad"]);
                }
                sw.ip(&["link", "set", &bridge, "up"]);
            }
            if opts.segments > 1 {
                sw.sysctl("net.ipv4.ip_forward", "1");
                sw.sysctl("net.ipv6.conf.all.forwarding", "1");
            }
            lab.attach_to_switch("cp", "cp", 0, &["10.200.0.2/24", "fd00:200::2/64"])?;
            lab.attach_to_switch(
                "client",
                "client",
                0,
                &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
            )?;
            lab.start_apiserver()?;
            std::fs::write(
                lab.kubeconfig(),
                crate::apiserver::kubeconfig(API_ADDR.parse().expect("valid")),
            )?;
            lab.save()?;
            for _ in 0..opts.nodes {
                lab.add_node()?;
            }
            lab.wait_converged(Duration::from_secs(60))
        })();
        if let Err(e) = result {
            let _ = Self::down(&opts.name);
            return Err(e);
        }
        Ok(lab)
    }

    /// A namespace on underlay segment `segment` with `eth0` holding `addrs`, and routes to the
    /// other segments through the router.
    fn attach_to_switch(&self, part: &str, port: &str, segment: u8, addrs: &[&str]) -> Result<Netns> {
        let ns = Netns::create_named(&ns_name(&self.state.name, part))?;
        let sw = ns_name(&self.state.name, "sw");
        run_ip(
            &sw,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        )?;
        run_ip(&sw, &["link", "set", port, "master", &format!("br{segment}")])?;
        run_ip(&sw, &["link", "set", port, "up"])?;
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", "eth0"];
            if addr.contains(':') {
                args.push("nodad");
            }
            run_ip(&ns.name, &args)?;
        }
        run_ip(&ns.name, &["link", "set", "eth0", "up"])?;
        if self.state.segments > 1 {
            run_ip(
                &ns.name,
                &["route", "add", "10.200.0.0/16", "via", &format!("10.200.{segment}.1")],
            )?;
            let router = format!("fd00:200:{segment:x}::1");
            run_ip(&ns.name, &["route", "add", "fd00:200::/48", "via", &router])?;
        }
        Ok(ns)
    }

    fn pid_file(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.pid"))
    }

    /// Starts `program` in `ns` as a background process of its own (its own process group, output
    /// to a log file), and records its pid.
    fn spawn_daemon(
        &self,
        ns: &Netns,
        what: &str,
        program: &Path,
        args: &[String],
        cgroup: Option<&Path>,
    ) -> Result<u32> {
        let log = File::create(self.dir.join("logs").join(format!("{what}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if let Some(cgroup) = cgroup {
            join_cgroup(&mut cmd, cgroup)?;
        }
        let mut child = ns.spawn(&mut cmd);
        let pid = child.id();
        // Reap it whenever it ends, if we are still around then, and keep how it ended for
        // `stop_daemon`.
        let (exit_tx, exit_rx) = std::sync::mpsc::channel();
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
    fn stop_daemon(&self, what: &str) -> Result<DaemonExit> {
        let path = self.pid_file(what);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(DaemonExit::NotRunning);
        };
        let pid: i32 = text.trim().parse().context("pid file")?;
        let _ = std::fs::remove_file(&path);
        let exit = u32::try_from(pid).ok().and_then(|p| lock_children().remove(&p));
        // Only a process still living in one of the lab's namespaces is ours: if the daemon died
        // earlier, its pid may belong to someone else by now.
        let inodes = lab_netns_inodes(&self.state.name);
        if !std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino())) {
            return Ok(DaemonExit::NotRunning);
        }
        // SAFETY: kill(2) on the lab's own process, checked just above.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(exit) = exit {
            // Our own child: its reaper reports the exit status.
            return Ok(match exit.recv_timeout(Duration::from_secs(5)) {
                Ok(status) => DaemonExit::Exited(Some(status)),
                Err(_) => {
                    // SAFETY: as above; the child is not reaped yet, so the pid is still its own.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
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
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Ok(DaemonExit::Killed);
        }
        Ok(DaemonExit::Exited(None))
    }

    pub fn start_apiserver(&self) -> Result<()> {
        let cp = self.ns("cp")?;
        let args = vec![
            "apiserver".into(),
            "--listen".into(),
            API_ADDR.into(),
            "--data".into(),
            self.dir.join("apiserver.json").display().to_string(),
        ];
        self.spawn_daemon(&cp, "apiserver", &binary("ferrynet-lab"), &args, None)?;
        let addr: SocketAddr = API_ADDR.parse().expect("valid");
        crate::wait_for(Duration::from_secs(10), || {
            ferrynet_cni::netns::run_in(cp.fd(), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            })
            .ok()
            .map(|_| ())
        })
        .context("the API stand-in did not come up")
    }

    pub fn stop_apiserver(&self) -> Result<()> {
        self.stop_daemon("apiserver").map(|_| ())
    }

    /// A request to the API stand-in (from the control-plane namespace).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let cp = self.ns("cp")?;
        let addr: SocketAddr = API_ADDR.parse().expect("valid");
        let mut stream =
            ferrynet_cni::netns::run_in(cp.fd(), || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        let content_type = if method == "PATCH" {
            "application/merge-patch+json"
        } else {
            "application/json"
        };
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {API_ADDR}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            payload.len()
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed response from the API stand-in"))?;
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("no status code"))?;
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        let value = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body)?
        };
        Ok((code, value))
    }

    fn api_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (code, value) = self.api(method, path, body)?;
        if !(200..300).contains(&code) {
            bail!("{method} {path}: {code} {}", value["message"].as_str().unwrap_or(""));
        }
        Ok(value)
    }

    /// Adds a node: namespace on the switch, Node object, and its agent.
    pub fn add_node(&mut self) -> Result<String> {
        let node = LabNode {
            name: format!("n{}", self.state.next_node),
            index: self.state.next_node,
            segment: (self.state.next_node - 1) % self.state.segments.max(1),
        };
        self.state.next_node += 1;
        let ns = self.attach_to_switch(
            &node.name,
            &node.name,
            node.segment,
            &[&format!("{}/24", node.v4()), &format!("{}/64", node.v6())],
        )?;
        drop(ns);
        for sub in ["cni-bin", "cni-conf", "ipam", "agent"] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.node_dir(&node.name).join(sub))?;
        }
        let cgroup = self.node_cgroup(&node.name)?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let [v4cidr, v6cidr] = node.pod_cidrs();
        let object = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name, "ferrynet.dev/lab": self.state.name}},
            "spec": {"podCIDR": v4cidr, "podCIDRs": [v4cidr, v6cidr]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": node.v4().to_string()}, {"type": "InternalIP", "address": node.v6().to_string()},
                              {"type": "Hostname", "address": node.name}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        self.api_ok("POST", "/api/v1/nodes", Some(&object))?;
        self.state.nodes.push(node.clone());
        self.save()?;
        self.start_agent(&node.name)?;
        Ok(node.name)
    }

    /// Removes a node: its Node object (so the other agents drop their routes), its pods and its
    /// namespace.
    pub fn delete_node(&mut self, name: &str) -> Result<()> {
        if !self.state.nodes.iter().any(|n| n.name == name) {
            bail!("no node {name}");
        }
        for pod in self
            .state
            .pods
            .iter()
            .filter(|p| p.node == name)
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
        {
            self.delete_pod(&pod)?;
        }
        self.stop_agent(name)?;
        self.api_ok("DELETE", &format!("/api/v1/nodes/{name}"), None)?;
        let _ = Command::new("ip")
            .args(["netns", "del", &ns_name(&self.state.name, name)])
            .output();
        let _ = Command::new("ip")
            .args(["-n", &ns_name(&self.state.name, "sw"), "link", "del", name])
            .output();
        // Its cgroup (empty once its agent is gone) and its pins.
        remove_cgroup(&self.node_cgroup(name)?)?;
        let pins = self.node_pin_path(name);
        if pins.exists() {
            std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        }
        self.state.nodes.retain(|n| n.name != name);
        self.save()
    }

    /// The flags a node's agent runs with (its own dirs, the lab's kubeconfig), before the
    /// subcommand.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        let dir = self.node_dir(node);
        let arg = |p: &str| dir.join(p).display().to_string();
        vec![
            "--node-name".into(),
            node.into(),
            "--kubeconfig".into(),
            self.kubeconfig().display().to_string(),
            "--cni-bin-dir".into(),
            arg("cni-bin"),
            "--cni-conf-dir".into(),
            arg("cni-conf"),
            "--cni-source-dir".into(),
            cni_bin_dir().display().to_string(),
            "--ipam-data-dir".into(),
            arg("ipam"),
            "--state-dir".into(),
            arg("agent"),
            "--routing-mode".into(),
            self.state.mode.clone(),
            "--bpf-pin-path".into(),
            self.node_pin_path(node).display().to_string(),
            "--cgroup-path".into(),
            self.node_cgroup(node)
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            "--resync-seconds".into(),
            "5".into(),
            "--ipam-gc-seconds".into(),
            "2".into(),
            "--ipam-gc-grace-seconds".into(),
            "3".into(),
        ]
    }

    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.start_agent_with(node, &[])
    }

    /// Starts `node`'s agent with `extra` flags after the lab's own (replacing any the lab sets).
    pub fn start_agent_with(&self, node: &str, extra: &[&str]) -> Result<()> {
        let ns = self.node_ns(node)?;
        // The lab's flags come in pairs; a flag in `extra` replaces the lab's.
        let mut args = Vec::new();
        for pair in self.agent_args(node).chunks(2) {
            if !extra.contains(&pair[0].as_str()) {
                args.extend_from_slice(pair);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("run".into());
        let cgroup = self.node_cgroup(node)?;
        self.spawn_daemon(
            &ns,
            &format!("agent-{node}"),
            &binary("ferrynet-agent"),
            &args,
            Some(&cgroup),
        )?;
        Ok(())
    }

    /// Stops `node`'s agent with SIGTERM, as the kubelet does, and fails unless it shut down
    /// cleanly: on its own within 5 s and, where the lab started it, with exit status 0.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        match self.stop_daemon(&format!("agent-{node}"))? {
            DaemonExit::NotRunning | DaemonExit::Exited(None) => Ok(()),
            DaemonExit::Exited(Some(status)) if status.success() => Ok(()),
            DaemonExit::Exited(Some(status)) => bail!("the agent on {node} ended with {status} on SIGTERM"),
            DaemonExit::Killed => bail!("the agent on {node} ignored SIGTERM for 5 s and was killed"),
        }
    }

    /// The agent's last status on `node` (its status file).
    pub fn agent_status(&self, node: &str) -> Result<Value> {
        let path = self.node_dir(node).join("agent").join("agent-status.json");
        Ok(serde_json::from_slice(&std::fs::read(&path).with_context(|| {
            format!("{} (agent not synced yet?)", path.display())
        })?)?)
    }

    /// Waits until every agent has synced: CNI ready, no error, a route set for every peer.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let peers = self.state.nodes.len().saturating_sub(1);
        let mut last = String::new();
        let ok = crate::wait_for(timeout, || {
            for node in &self.state.nodes {
                match self.agent_status(&node.name) {
                    Ok(s)
                        if s["cniReady"] == true
                            && s["lastError"].is_null()
                            && s["peers"].as_object().is_some_and(|p| p.len() == peers) => {}
                    Ok(s) => {
                        last = format!(
                            "{}: cniReady={} peers={} error={}",
                            node.name,
                            s["cniReady"],
                            s["peers"].as_object().map_or(0, |p| p.len()),
                            s["lastError"]
                        );
                        return None;
                    }
                    Err(e) => {
                        last = format!("{e:#}");
                        return None;
                    }
                }
            }
            Some(())
        });
        ok.ok_or_else(|| anyhow!("the agents did not converge within {timeout:?}: {last}"))
    }

    /// Runs a pod on `node`: a namespace, the node's CNI (as a runtime would run it), a server
    /// answering with the pod's name, and the Pod object.
    pub fn run_pod(&mut self, name: &str, node: &str, labels: &BTreeMap<String, String>) -> Result<LabPod> {
        if !valid_name(name) {
            bail!("pod name {name:?}: use up to 20 lowercase letters, digits and dashes");
        }
        if self.state.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} exists");
        }
        let node_ns = self.node_ns(node)?;
        let conflist_path = self.node_dir(node).join("cni-conf").join(CONFLIST);
        let conflist = crate::wait_for(Duration::from_secs(30), || {
            std::fs::read(&conflist_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        })
        .with_context(|| format!("node {node} has no conflist (is its agent running?)"))?;
        let pod_ns = Netns::create_named(&ns_name(&self.state.name, &format!("pod-{name}")))?;
        let container_id = format!("{}-{name}", self.state.name);
        let runtime = Runtime {
            host: &node_ns,
            plugin_dirs: vec![self.node_dir(node).join("cni-bin")],
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        let result = match runtime.add(
            &Conflist(conflist),
            &container_id,
            &pod_ns.path(),
            "eth0",
            &Value::Null,
            Some(&args),
        ) {
            Ok(r) => r,
            Err(out) => {
                let _ = Command::new("ip").args(["netns", "del", &pod_ns.name]).output();
                bail!("CNI ADD for {name} failed: {}{}", out.stdout, out.stderr);
            }
        };
        let ips: Vec<IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let args = vec![
            "pod-server".into(),
            "--name".into(),
            name.into(),
            "--node".into(),
            node.into(),
            "--port".into(),
            POD_PORT.to_string(),
        ];
        self.spawn_daemon(&pod_ns, &format!("pod-{name}"), &binary("ferrynet-lab"), &args, None)?;
        let pod = LabPod {
            name: name.into(),
            node: node.into(),
            container_id,
            ips: ips.clone(),
            labels: labels.clone(),
            result,
        };
        let host_ip = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.v4().to_string())
            .unwrap_or_default();
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "server", "image": "ferrynet-lab/pod-server", "ports": [{"containerPort": POD_PORT}]}]},
            "status": {"phase": "Running", "hostIP": host_ip, "podIP": ips.first().map(ToString::to_string),
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                       "conditions": [{"type": "Ready", "status": "True"}]},
        });
        self.api_ok("POST", "/api/v1/namespaces/default/pods", Some(&object))?;
        self.state.pods.push(pod.clone());
        self.save()?;
        // Wait until the server answers, so that callers can use the pod at once.
        let pod_handle = self.pod_ns(name)?;
        let local: SocketAddr = (pod.ip(true), POD_PORT).into();
        crate::wait_for(Duration::from_secs(10), || {
            crate::tcp::request(&pod_handle, local, "ready?").ok()
        })
        .with_context(|| format!("pod {name}'s server did not start"))?;
        self.sync_endpoint_slices()?;
        Ok(pod)
    }

    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let pod = self
            .state
            .pods
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        self.stop_daemon(&format!("pod-{name}"))?;
        let node_ns = self.node_ns(&pod.node)?;
        let conflist: Value = serde_json::from_slice(&std::fs::read(
            self.node_dir(&pod.node).join("cni-conf").join(CONFLIST),
        )?)?;
        let runtime = Runtime {
            host: &node_ns,
            plugin_dirs: vec![self.node_dir(&pod.node).join("cni-bin")],
        };
        let pod_ns = ns_name(&self.state.name, &format!("pod-{name}"));
        if let Err(out) = runtime.del(
            &Conflist(conflist),
            &pod.container_id,
            Some(Path::new(&format!("/run/netns/{pod_ns}"))),
            "eth0",
            &Value::Null,
            Some(&pod.result),
        ) {
            bail!("CNI DEL for {name} failed: {}{}", out.stdout, out.stderr);
        }
        let _ = Command::new("ip").args(["netns", "del", &pod_ns]).output();
        let _ = self.api("DELETE", &format!("/api/v1/namespaces/default/pods/{name}"), None);
        self.state.pods.retain(|p| p.name != name);
        self.save()?;
        self.sync_endpoint_slices()
    }

    pub fn pod(&self, name: &str) -> Result<&LabPod> {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))
    }

    /// A TCP request from a pod's namespace.
    pub fn request_from_pod(&self, pod: &str, to: SocketAddr) -> Result<String> {
        Ok(crate::tcp::request(&self.pod_ns(pod)?, to, "hello")?)
    }

    /// Creates a Service (ClusterIP, dual stack) selecting pods by labels.
    pub fn create_service(
        &mut self,
        name: &str,
        selector: &BTreeMap<String, String>,
        ports: &[ServicePort],
        kind: &str,
    ) -> Result<Value> {
        let n = self.state.next_service;
        self.state.next_service += 1;
        let (v4, v6) = (
            format!("10.96.{}.{}", n / 250, n % 250 + 1),
            format!("fd00:96::{:x}", n + 1),
        );
        let ports: Vec<Value> = ports
            .iter()
            .map(|p| json!({"name": format!("p{}", p.port), "port": p.port, "targetPort": p.target_port, "protocol": "TCP"}))
            .collect();
        let object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": kind, "selector": selector, "ports": ports, "clusterIP": v4, "clusterIPs": [v4, v6],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"},
        });
        let created = self.api_ok("POST", "/api/v1/namespaces/default/services", Some(&object))?;
        self.save()?;
        self.sync_endpoint_slices()?;
        Ok(created)
    }

    pub fn delete_service(&mut self, name: &str) -> Result<()> {
        self.api_ok("DELETE", &format!("/api/v1/namespaces/default/services/{name}"), None)?;
        self.sync_endpoint_slices()
    }

    /// The EndpointSlice controller: one slice per Service and family, listing the ready pods the
    /// Service selects; slices of Services that are gone are deleted.
    pub fn sync_endpoint_slices(&self) -> Result<()> {
        let services = self.api_ok("GET", "/api/v1/namespaces/default/services", None)?;
        let existing = self.api_ok("GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=endpointslice.kubernetes.io%2Fmanaged-by%3Dferrynet-lab", None)?;
        let mut wanted = Vec::new();
        for svc in services["items"].as_array().into_iter().flatten() {
            let name = svc["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let selector: BTreeMap<String, String> =
                serde_json::from_value(svc["spec"]["selector"].clone()).unwrap_or_default();
            if selector.is_empty() {
                continue;
            }
            let pods: Vec<&LabPod> = self
                .state
                .pods
                .iter()
                .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                .collect();
            let ports: Vec<Value> = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| json!({"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]}))
                .collect();
            for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                let slice_name = format!("{name}-{}", if v4 { "v4" } else { "v6" });
                let endpoints: Vec<Value> = pods
                    .iter()
                    .map(|p| {
                        json!({"addresses": [p.ip(v4).to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                               "nodeName": p.node, "targetRef": {"kind": "Pod", "namespace": "default", "name": p.name}})
                    })
                    .collect();
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": slice_name, "namespace": "default",
                                 "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "ferrynet-lab"}},
                    "addressType": family, "endpoints": endpoints, "ports": ports,
                });
                let path = format!("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/{slice_name}");
                match self.api("GET", &path, None)? {
                    (200, current) => {
                        if current["endpoints"] != slice["endpoints"] || current["ports"] != slice["ports"] {
                            self.api_ok("PUT", &path, Some(&slice))?;
                        }
                    }
                    _ => {
                        self.api_ok(
                            "POST",
                            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                            Some(&slice),
                        )?;
                    }
                }
                wanted.push(slice_name);
            }
        }
        for slice in existing["items"].as_array().into_iter().flatten() {
            let name = slice["metadata"]["name"].as_str().unwrap_or_default();
            if !wanted.iter().any(|w| w == name) {
                self.api_ok(
                    "DELETE",
                    &format!("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/{name}"),
                    None,
                )?;
            }
        }
        Ok(())
    }

    /// Runs a command in one of the lab's namespaces, inheriting stdio.
    pub fn exec(&self, part: &str, argv: &[String]) -> Result<std::process::ExitStatus> {
        let ns = self.ns(part)?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        self.join_node_cgroup(&mut cmd, part)?;
        let mut child = ns.spawn(&mut cmd);
        Ok(child.wait()?)
    }

    /// A command run on a node runs in the node's cgroup, as the node's own processes do.
    fn join_node_cgroup(&self, cmd: &mut Command, part: &str) -> Result<()> {
        if self.state.nodes.iter().any(|n| n.name == part) {
            join_cgroup(cmd, &self.node_cgroup(part)?)?;
        }
        Ok(())
    }

    /// Runs a command in one of the lab's namespaces and returns what it printed.
    pub fn exec_capture(&self, part: &str, argv: &[String]) -> Result<String> {
        let ns = self.ns(part)?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        self.join_node_cgroup(&mut cmd, part)?;
        let out = ns.command_output(&mut cmd);
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// kubectl against the lab's API stand-in (run from the client namespace).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let ns = self.ns("client")?;
        let home = self.dir.join("kubectl-home");
        std::fs::create_dir_all(&home)?;
        let out = ns.command_output(
            Command::new("kubectl")
                .env("HOME", &home)
                .env("KUBECONFIG", self.kubeconfig())
                .args(args),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("kubectl {}: {text}", args.join(" "));
        }
        Ok(text)
    }

    /// A human summary of the lab.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "lab {} (routing {}, {} underlay segment{}), API stand-in at http://{API_ADDR}, kubeconfig {}\n",
            self.state.name,
            self.state.mode,
            self.state.segments,
            if self.state.segments == 1 { "" } else { "s" },
            self.kubeconfig().display()
        );
        for node in &self.state.nodes {
            let st = self.agent_status(&node.name).unwrap_or(Value::Null);
            out += &format!(
                "  node {:<4} segment {} {:<15} podCIDRs {} | agent: cni {} peers {}{}\n",
                node.name,
                node.segment,
                node.v4().to_string(),
                node.pod_cidrs().join(", "),
                if st["cniReady"] == true { "ready" } else { "NOT ready" },
                st["peers"].as_object().map_or(0, |p| p.len()),
                st["lastError"]
                    .as_str()
                    .map(|e| format!(" error: {e}"))
                    .unwrap_or_default()
            );
        }
        for pod in &self.state.pods {
            let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
            let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out += &format!(
                "  pod  {:<12} on {:<4} {} {}\n",
                pod.name,
                pod.node,
                ips.join(", "),
                labels.join(",")
            );
        }
        out
    }
}

/// The lab's namespaces (`fl-<name>-*`; lab names have no dash, so no other lab's match).
fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("fl-{name}-");
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn lab_netns_inodes(name: &str) -> Vec<u64> {
    lab_namespaces(name)
        .iter()
        .filter_map(|n| std::fs::metadata(format!("/run/netns/{n}")).ok())
        .map(|m| m.ino())
        .collect()
}

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
fn lab_cgroup(name: &str) -> Result<PathBuf> {
    Ok(cgroup2_root()?.join("ferrynet-lab").join(name))
}

/// Removes an (emptied) cgroup; it goes once its last process has exited, so wait a little.
fn remove_cgroup(cgroup: &Path) -> Result<()> {
    let removed = crate::wait_for(Duration::from_secs(5), || std::fs::remove_dir(cgroup).ok());
    if removed.is_none() && cgroup.exists() {
        bail!("removing cgroup {}: processes are still in it", cgroup.display());
    }
    Ok(())
}

/// The lab's own bpffs mount point, in its state directory `dir`.
fn lab_bpffs(dir: &Path) -> PathBuf {
    dir.join("bpf")
}

/// Makes `cmd`'s process join `cgroup` before it executes, so that it never runs outside it.
fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<()> {
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
fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|line| line.split_whitespace().nth(4).is_some_and(|m| Path::new(m) == path))
    })
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The server each lab pod runs: every line (or HTTP GET) gets
/// `pod=<name> node=<node> ip=<address the connection came in on> client=<peer>`.
pub fn pod_server(name: &str, node: &str, port: u16) -> Result<()> {
    let listener = TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
    for stream in listener.incoming().flatten() {
        let (name, node) = (name.to_string(), node.to_string());
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let peer = stream
                .peer_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default();
            // The pod's own address as the kernel delivered the connection to it: after a
            // translation, this is the backend, not the address the client dialled.
            let ip = stream
                .local_addr()
                .map(|a| a.ip().to_canonical().to_string())
                .unwrap_or_default();
            let Ok(mut writer) = stream.try_clone() else { return };
            let mut reader = BufReader::new(stream);
            let answer = format!("pod={name} node={node} ip={ip} client={peer}");
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("GET ") {
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                        header.clear();
                    }
                    let _ = write!(
                        writer,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}\n",
                        answer.len() + 1
                    );
                    return;
                }
                if writeln!(writer, "{answer}").is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
    Ok(())
}

/// A lab that is taken down when dropped, also when a test fails.
pub struct LabGuard(pub Lab);

impl LabGuard {
    /// A lab with a name no other test uses, on one underlay segment.
    pub fn up(nodes: u8, mode: &str) -> Self {
        Self::up_segmented(nodes, mode, 1)
    }

    /// A lab with a name no other test uses, its nodes dealt out over `segments` routed L2
    /// segments.
    pub fn up_segmented(nodes: u8, mode: &str, segments: u8) -> Self {
        crate::require_root();
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        Self(
            Lab::up(&LabOptions {
                name,
                nodes,
                mode: mode.into(),
                segments,
            })
            .expect("lab up"),
        )
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.0
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.0.state.name) {
            eprintln!("lab down: {e:#}");
        }
    }
}

/// Waits until `f` returns true (bounded), for the CLI's and tests' convenience.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
