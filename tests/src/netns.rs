//! Throwaway network namespaces, removed when dropped (also when a test fails).
use std::{
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::Command,
};

use crate::{run, unique};

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
    fd: Option<OwnedFd>,
    /// Deleted on drop (test namespaces); the lab's namespaces outlive one command.
    owned: bool,
}

impl Netns {
    /// A fresh namespace with loopback up.
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self {
            fd: Some(ferrynet_kernel::netns::open(&PathBuf::from(format!("/run/netns/{name}"))).expect("open netns")),
            name,
            owned: true,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace that stands for a node: loopback carries the node's addresses (so traffic from
    /// the node has a source) and forwarding is on, as the agent prepares a real node.
    pub fn host(tag: &str, v4: &str, v6: &str) -> Self {
        let ns = Self::new(tag);
        ns.ip(&["addr", "add", &format!("{v4}/32"), "dev", "lo"]);
        ns.ip(&["-6", "addr", "add", &format!("{v6}/128"), "dev", "lo"]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        ns
    }

    /// Creates a namespace with an exact name that is not deleted on drop.
    pub fn create_named(name: &str) -> std::io::Result<Self> {
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let ns = Self::attach(name)?;
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// A handle on an existing named namespace, not deleted on drop.
    pub fn attach(name: &str) -> std::io::Result<Self> {
        let fd = ferrynet_kernel::netns::open(&PathBuf::from(format!("/run/netns/{name}")))?;
        Ok(Self {
            name: name.to_string(),
            fd: Some(fd),
            owned: false,
        })
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_ref().expect("namespace is open").as_fd()
    }

    /// `ip -n NAME ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n NAME -j ARGS...` as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        crate::ip_json(&self.name, args)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
        assert!(
            out.status.success(),
            "sysctl {key}={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deletes the namespace now (for "the netns is gone" cases); drop then does nothing.
    pub fn delete(&mut self) {
        self.fd = None;
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .expect("link list")
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned && self.fd.is_some() {
            self.delete();
        }
    }
}

/// A veth pair between two namespaces with an address at each end, for underlay-style links
/// (an external client in front of a node, for example).
pub fn link_pair(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) {
    let (a_if, b_if) = (format!("l{}", &unique("a")[3..]), format!("l{}", &unique("b")[3..]));
    let (a_if, b_if) = (
        a_if.chars().take(15).collect::<String>(),
        b_if.chars().take(15).collect::<String>(),
    );
    a.ip(&[
        "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", &a_if]);
    b.ip(&["addr", "add", b_addr, "dev", &b_if]);
    a.ip(&["link", "set", &a_if, "up"]);
    b.ip(&["link", "set", &b_if, "up"]);
}

impl Netns {
    /// A tokio runtime whose threads all live in this namespace, so every socket its tasks open is
    /// there. Run work with `rt.block_on(rt.spawn(...))`: `block_on` alone polls on the calling
    /// thread, which is not in the namespace.
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        use std::os::fd::AsRawFd;
        let fd = self.fd().as_raw_fd();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // SAFETY: setns on the new runtime thread, with a descriptor the Netns keeps open
                // for as long as it lives (callers drop the runtime first).
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns for a runtime thread");
            })
            .build()
            .expect("tokio runtime")
    }

    /// Spawns `program` inside the namespace (from a thread that joined it, so no hook runs
    /// between fork and exec) and waits for it.
    pub fn command_output(&self, cmd: &mut std::process::Command) -> std::process::Output {
        ferrynet_kernel::netns::run_in(self.fd(), || cmd.output()).expect("run command in netns")
    }

    /// Spawns a long-running child inside the namespace.
    pub fn spawn(&self, cmd: &mut std::process::Command) -> std::process::Child {
        ferrynet_kernel::netns::run_in(self.fd(), || cmd.spawn()).expect("spawn in netns")
    }
}
