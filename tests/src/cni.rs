//! Running CNI plugins the way a container runtime does.
//!
//! [`exec_plugin`] is one invocation: a clean environment with the `CNI_*` variables, the config on
//! stdin, the process in the host namespace. [`Runtime`] chains a conflist like libcni: each
//! plugin gets the list's name and version, the `runtimeConfig` entries for the capabilities it
//! declares and, after the first, the previous plugin's result; DEL runs the list in reverse.
use std::{
    io::Write,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{REFERENCE_PLUGIN_DIR, cni_bin_dir, netns::Netns};

/// What a plugin invocation printed and how it exited.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout as JSON (`null` when empty).
    pub fn json(&self) -> Value {
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
        }
    }

    /// The CNI error code, for a failed invocation.
    pub fn code(&self) -> Option<u64> {
        self.json().get("code").and_then(Value::as_u64)
    }

    /// Panics with everything the plugin said unless it succeeded.
    #[track_caller]
    pub fn expect_ok(&self, what: &str) -> Value {
        assert!(
            self.ok(),
            "{what} failed ({}): {}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.json()
    }
}

/// One CNI invocation's environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn new(command: &str) -> Self {
        Self {
            command: command.into(),
            path: Some(default_cni_path()),
            ..Default::default()
        }
    }

    pub fn container(mut self, container_id: &str, netns: Option<&Path>, ifname: &str) -> Self {
        self.container_id = Some(container_id.into());
        self.netns = Some(netns.map(|p| p.display().to_string()).unwrap_or_default());
        self.ifname = Some(ifname.into());
        self
    }

    pub fn args(mut self, args: &str) -> Self {
        self.args = Some(args.into());
        self
    }
}

/// `CNI_PATH` for tests: ferrynet's CNI binaries, then Debian's reference plugins.
pub fn default_cni_path() -> String {
    format!("{}:{REFERENCE_PLUGIN_DIR}", cni_bin_dir().display())
}

/// Runs `binary` as a runtime would: in `host`'s namespace, environment cleared except `PATH`
/// and the CNI variables, `stdin` as the config.
///
/// The child is spawned from a short-lived thread that has joined `host`, so it inherits that
/// namespace without a `pre_exec` hook. A hook would force a full `fork()` of the test process,
/// where runtimes (Go's `os/exec`) use a cheap vfork-style clone, and benchmarks would time it.
pub fn exec_plugin(binary: &Path, host: BorrowedFd<'_>, env: &Env, stdin: &[u8]) -> Outcome {
    let mut cmd = Command::new(binary);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", &env.command);
    for (key, value) in [
        ("CNI_CONTAINERID", &env.container_id),
        ("CNI_NETNS", &env.netns),
        ("CNI_IFNAME", &env.ifname),
        ("CNI_ARGS", &env.args),
        ("CNI_PATH", &env.path),
    ] {
        if let Some(v) = value {
            cmd.env(key, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    ferrynet_kernel::netns::run_in(host, move || {
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        // A plugin may exit without reading stdin (VERSION, early errors): ignore EPIPE.
        let _ = child.stdin.take().expect("stdin").write_all(stdin);
        let out = child.wait_with_output()?;
        Ok(Outcome {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        })
    })
    .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()))
}

/// A conflist, as a runtime reads it from `/etc/cni/net.d`.
#[derive(Debug, Clone)]
pub struct Conflist(pub Value);

impl Conflist {
    pub fn name(&self) -> &str {
        self.0["name"].as_str().expect("conflist name")
    }

    /// The version the list runs at, chosen as libcni 1.2 and later choose it: the newest entry
    /// of `cniVersions` the runtime knows (this one knows every released version), else
    /// `cniVersion`. A runtime on an older libcni knows no `cniVersions`:
    /// see [`Conflist::as_older_runtimes_read_it`].
    pub fn version(&self) -> &str {
        const KNOWN: [&str; 6] = ["0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
        let newest_listed = self.0["cniVersions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|v| KNOWN.iter().position(|k| *k == v))
            .max();
        match newest_listed {
            Some(i) => KNOWN[i],
            None => self.0["cniVersion"].as_str().expect("conflist cniVersion"),
        }
    }

    /// The list as a runtime built on libcni before 1.2 (containerd 1.6 and 1.7, podman 4)
    /// reads it: without `cniVersions`.
    pub fn as_older_runtimes_read_it(&self) -> Self {
        let mut list = self.0.clone();
        if let Some(fields) = list.as_object_mut() {
            fields.remove("cniVersions");
        }
        Self(list)
    }

    pub fn plugins(&self) -> Vec<Value> {
        self.0["plugins"].as_array().expect("plugins").clone()
    }

    /// The config one plugin sees (libcni's `buildOneConfig`).
    pub fn plugin_config(&self, plugin: &Value, runtime_config: &Value, prev_result: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = json!(self.version());
        conf["name"] = json!(self.name());
        let mut rc = serde_json::Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            for (cap, on) in caps {
                if on.as_bool() == Some(true)
                    && let Some(v) = runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        conf
    }
}

/// A minimal container runtime: runs conflists in a host namespace.
pub struct Runtime<'a> {
    pub host: &'a Netns,
    pub plugin_dirs: Vec<PathBuf>,
}

impl<'a> Runtime<'a> {
    pub fn new(host: &'a Netns) -> Self {
        Self {
            host,
            plugin_dirs: vec![cni_bin_dir(), PathBuf::from(REFERENCE_PLUGIN_DIR)],
        }
    }

    fn find(&self, kind: &str) -> PathBuf {
        self.plugin_dirs
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {kind} not found in {:?}", self.plugin_dirs))
    }

    /// Runs one plugin config.
    pub fn exec(&self, conf: &Value, env: &Env) -> Outcome {
        let kind = conf["type"].as_str().expect("plugin type");
        exec_plugin(&self.find(kind), self.host.fd(), env, conf.to_string().as_bytes())
    }

    /// ADD through the whole list; returns the final result, or the failing plugin's outcome.
    pub fn add(
        &self,
        list: &Conflist,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        runtime_config: &Value,
        args: Option<&str>,
    ) -> Result<Value, Outcome> {
        let mut prev: Option<Value> = None;
        for plugin in list.plugins() {
            let conf = list.plugin_config(&plugin, runtime_config, prev.as_ref());
            let mut env = Env::new("ADD").container(container_id, Some(netns), ifname);
            env.args = args.map(str::to_string);
            let out = self.exec(&conf, &env);
            if !out.ok() {
                return Err(out);
            }
            prev = Some(out.json());
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL through the list in reverse, with the cached result as prevResult.
    pub fn del(
        &self,
        list: &Conflist,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        runtime_config: &Value,
        cached: Option<&Value>,
    ) -> Result<(), Outcome> {
        for plugin in list.plugins().iter().rev() {
            let conf = list.plugin_config(plugin, runtime_config, cached);
            let env = Env::new("DEL").container(container_id, netns, ifname);
            let out = self.exec(&conf, &env);
            if !out.ok() {
                return Err(out);
            }
        }
        Ok(())
    }

    /// CHECK through the list with the cached result.
    pub fn check(
        &self,
        list: &Conflist,
        container_id: &str,
        netns: &Path,
        ifname: &str,
        runtime_config: &Value,
        cached: &Value,
    ) -> Result<(), Outcome> {
        for plugin in list.plugins() {
            let conf = list.plugin_config(&plugin, runtime_config, Some(cached));
            let env = Env::new("CHECK").container(container_id, Some(netns), ifname);
            let out = self.exec(&conf, &env);
            if !out.ok() {
                return Err(out);
            }
        }
        Ok(())
    }

    /// GC with the runtime's list of attachments still in use.
    pub fn gc(&self, list: &Conflist, valid: &[(&str, &str)]) -> Result<(), Outcome> {
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for plugin in list.plugins() {
            let mut conf = list.plugin_config(&plugin, &Value::Null, None);
            conf["cni.dev/valid-attachments"] = json!(attachments);
            let out = self.exec(&conf, &Env::new("GC"));
            if !out.ok() {
                return Err(out);
            }
        }
        Ok(())
    }
}

/// The ferrynet conflist used across the tests: dual stack, MTU 1400, state under `data_dir`.
pub fn ferrynet_conflist(name: &str, v4: &str, v6: Option<&str>, data_dir: &Path) -> Conflist {
    let mut ranges = vec![json!([{ "subnet": v4 }])];
    if let Some(v6) = v6 {
        ranges.push(json!([{ "subnet": v6 }]));
    }
    Conflist(json!({
        "cniVersion": "1.1.0",
        "name": name,
        "plugins": [{
            "type": "ferrynet",
            "mtu": 1400,
            "ipam": { "type": "ferrynet-ipam", "ranges": ranges, "dataDir": data_dir },
        }]
    }))
}

/// The IPv4 (or first) address of a result.
pub fn result_ip(result: &Value, v4: bool) -> std::net::IpAddr {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<std::net::IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == v4)
        .unwrap_or_else(|| panic!("no {} address in {result}", if v4 { "IPv4" } else { "IPv6" }))
}

/// The host-side veth ferrynet creates for container `id`'s `eth0`.
pub fn host_veth_of(id: &str) -> String {
    ferrynet_kernel::names::HostVeth::new(id, "eth0").name
}

/// A node for CNI tests: a namespace standing for the host (with `host_v4`/`host_v6`), its IPAM
/// state directory and a ferrynet conflist for `network`.
pub struct TestNode {
    pub host: Netns,
    pub state: tempfile::TempDir,
    pub list: Conflist,
}

impl TestNode {
    pub fn new(network: &str, host_v4: &str, host_v6: &str, v4: &str, v6: Option<&str>) -> Self {
        crate::require_root();
        let host = Netns::host("host", host_v4, host_v6);
        let state = tempfile::tempdir().expect("state dir");
        let list = ferrynet_conflist(network, v4, v6, state.path());
        Self { host, state, list }
    }

    pub fn runtime(&self) -> Runtime<'_> {
        Runtime::new(&self.host)
    }

    /// The config the ferrynet plugin (the list's first) sees.
    pub fn plugin_config(&self) -> Value {
        self.list.plugin_config(&self.list.plugins()[0], &Value::Null, None)
    }

    /// Runs the ferrynet plugin with this node's plugin config (edited by `edit`).
    pub fn exec(&self, env: &Env, edit: impl FnOnce(&mut Value)) -> Outcome {
        let mut conf = self.plugin_config();
        edit(&mut conf);
        exec_plugin(
            &crate::binary("ferrynet"),
            self.host.fd(),
            env,
            conf.to_string().as_bytes(),
        )
    }

    /// Runs the ferrynet plugin with this node's plugin config as it is.
    pub fn run(&self, env: &Env) -> Outcome {
        self.exec(env, |_| {})
    }

    /// ADD through the whole list for a new pod namespace.
    pub fn add_pod(&self, id: &str) -> (Netns, Value) {
        let pod = Netns::new("pod");
        let result = self
            .runtime()
            .add(&self.list, id, &pod.path(), "eth0", &Value::Null, None)
            .unwrap_or_else(|o| panic!("ADD {id}: {} {}", o.stdout, o.stderr));
        (pod, result)
    }

    /// DEL through the whole list.
    pub fn del_pod(&self, id: &str, netns: Option<&Path>) {
        self.runtime()
            .del(&self.list, id, netns, "eth0", &Value::Null, None)
            .unwrap_or_else(|o| panic!("DEL {id}: {} {}", o.stdout, o.stderr));
    }

    pub fn store(&self) -> ferrynet_ipam::Store {
        ferrynet_ipam::Store::open(self.state.path(), self.list.name()).expect("store")
    }

    pub fn allocations(&self) -> Vec<ferrynet_ipam::Attachment> {
        self.store().lock().expect("lock").attachments().expect("records")
    }

    /// The host-side pod veths in the host namespace.
    pub fn host_veths(&self) -> Vec<String> {
        self.host.links().into_iter().filter(|l| l.starts_with("fnv")).collect()
    }

    /// Nothing of `id` is left: no allocation and no host veth.
    #[track_caller]
    pub fn assert_released(&self, id: &str) {
        assert!(
            self.allocations().iter().all(|a| a.container_id != id),
            "{id} still allocated"
        );
        let veth = host_veth_of(id);
        assert!(!self.host_veths().contains(&veth), "{veth} of {id} still exists");
    }
}
