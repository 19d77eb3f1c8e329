//! `ferrynet-lab demo`: the four myths about kube-proxy and the CNI, settled by running the
//! commands a Kubernetes user types against a 3-node lab (with its cluster DNS).
//!
//! 1. kube-proxy does not assign pod IPs: with no service proxy at all, pods get their IPs from
//!    the CNI; with a service proxy running and no CNI configuration, a pod gets none.
//! 2. A cluster works without kube-proxy: ferrynet's service translation serves a Service by
//!    name and by ClusterIP, with no kube-proxy anywhere.
//! 3. How Service routing works: the ClusterIP is a translation, not a process (no socket listens
//!    on it, no iptables or nftables rule names it); `ferrynet-agent explain` shows what it maps
//!    to, and follows a scale-up.
//! 4. What breaks without the service proxy: stopping the agents breaks nothing (the pinned
//!    datapath keeps serving); removing service translation breaks ClusterIPs but not pod IPs;
//!    turning it back on restores them, timed.
//!
//! Every step prints the command as a user types it and its real output, then what changed,
//! what did not, and PASS or FAIL per check. A failing myth does not stop the others; each myth
//! removes its objects and puts the agents back as it found them, so that any of them can run
//! alone (`--myth N`). The run ends with a summary table, and its exit code says whether every
//! myth passed.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::{Lab, LabOptions, kubelet::pod_part, topology::lab_namespaces};
use crate::binary;

/// The myths, by number.
pub const MYTHS: [(u8, &str); 4] = [
    (1, "kube-proxy does not assign pod IPs"),
    (2, "A cluster works without kube-proxy"),
    (3, "How Service routing works"),
    (4, "What breaks without the service proxy"),
];

/// How long a pod may take to be scheduled, get its network and run.
const POD_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a change may take to reach every agent's datapath (or the cluster DNS).
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agents may take to converge after a restart.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest output a step prints in full; longer ones (nginx's page) are cut.
const MAX_OUTPUT_LINES: usize = 8;

pub struct DemoOptions {
    pub name: String,
    pub mode: String,
    pub segments: u8,
    pub keep: bool,
    /// Only this myth (1 to 4); all of them otherwise.
    pub myth: Option<u8>,
}

/// How one myth's demo went.
#[derive(Debug, Clone)]
pub struct MythOutcome {
    pub number: u8,
    pub title: String,
    /// The checks that held.
    pub passed: usize,
    /// The checks that did not.
    pub failed: Vec<String>,
    /// What stopped the demo before its end, if anything did.
    pub error: Option<String>,
}

impl MythOutcome {
    /// A myth passes when its demo ran to its end and every one of its (at least one) checks held.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.failed.is_empty() && self.passed > 0
    }
}

/// The summary table of the myths that ran.
pub fn summary_table(outcomes: &[MythOutcome]) -> String {
    let mut out = format!(
        "{:<5} {:<40} {:<6} {}\n",
        "MYTH", "WHAT THE DEMO SHOWS", "RESULT", "CHECKS"
    );
    for outcome in outcomes {
        let result = if outcome.passed() { "PASS" } else { "FAIL" };
        let total = outcome.passed + outcome.failed.len();
        let stopped = if outcome.error.is_some() { ", then stopped" } else { "" };
        out += &format!(
            "{:<5} {:<40} {:<6} {}/{} held{stopped}\n",
            outcome.number, outcome.title, result, outcome.passed, total
        );
        for failed in &outcome.failed {
            out += &format!("      failed: {failed}\n");
        }
        if let Some(error) = &outcome.error {
            out += &format!("      stopped: {error}\n");
        }
    }
    out
}

/// The demo's exit code: 0 only when myths ran and every one passed.
pub fn exit_code(outcomes: &[MythOutcome]) -> u8 {
    if !outcomes.is_empty() && outcomes.iter().all(MythOutcome::passed) {
        0
    } else {
        1
    }
}

/// Runs the demo: brings a lab up, runs the myths, prints the summary, and takes the lab down
/// unless asked to keep it (also when a myth failed). Returns the exit code.
pub fn run(opts: &DemoOptions) -> Result<u8> {
    let myths: Vec<(u8, &str)> = match opts.myth {
        None => MYTHS.to_vec(),
        Some(n) => vec![
            *MYTHS
                .iter()
                .find(|(number, _)| *number == n)
                .ok_or_else(|| anyhow!("there are myths 1 to {}, not {n}", MYTHS.len()))?,
        ],
    };
    println!(
        "==> a 3-node cluster in network namespaces (routing mode {}), one ferrynet-agent per node, \
         an API stand-in that kubectl talks to, a cluster DNS; no kube-proxy",
        opts.mode
    );
    let started = Instant::now();
    let lab = Lab::up(&LabOptions {
        name: opts.name.clone(),
        nodes: 3,
        mode: opts.mode.clone(),
        segments: opts.segments,
        dns: true,
    })?;
    // Taken down on every way out, unless kept.
    let down = DownUnlessKept {
        name: opts.name.clone(),
        keep: opts.keep,
        done: false,
    };
    print!("{}", indent(&lab.summary()));
    let demo = Demo { lab: &lab };
    let mut outcomes = Vec::new();
    for (number, title) in myths {
        println!("\n==> Myth {number}: {title}");
        let mut checks = Checks::default();
        let mut error = demo.myth(number, &mut checks).err().map(|e| format!("{e:#}"));
        if let Some(e) = &error {
            println!("  FAIL  the demo stopped: {e}");
        }
        // Whatever happened, the next myth starts from a clean cluster.
        if let Err(e) = demo.clean_up(number) {
            println!("  FAIL  cleaning up after myth {number}: {e:#}");
            error.get_or_insert_with(|| format!("cleaning up: {e:#}"));
        }
        outcomes.push(MythOutcome {
            number,
            title: title.to_string(),
            passed: checks.passed,
            failed: checks.failed,
            error,
        });
    }
    // The lab goes first, so that the summary is the last word.
    let taken_down = down.take_down();
    println!("\n==> Summary ({:.0} s)", started.elapsed().as_secs_f64());
    print!("{}", summary_table(&outcomes));
    if opts.keep {
        let name = &opts.name;
        println!(
            "\nThe lab is still up. Explore it:\n  \
             ferrynet-lab --name {name} kubectl -- get pods -o wide\n  \
             ferrynet-lab --name {name} kubectl -- run nginx --image=nginx --port=80 --expose\n  \
             ferrynet-lab --name {name} kubectl -- run client --image=curlimages/curl --restart=Never -- sleep 3600\n  \
             ferrynet-lab --name {name} kubectl -- exec client -- curl -s http://nginx\n  \
             ferrynet-lab --name {name} exec-node n1 -- {} {} services\n\
             Take it down with:\n  ferrynet-lab --name {name} down",
            binary("ferrynet-agent").display(),
            agent_cli_flags(&lab, "n1").join(" "),
        );
    }
    taken_down?;
    Ok(exit_code(&outcomes))
}

/// Takes the lab down, unless it is to be kept: when told to, or when dropped (an early return
/// or a panic).
struct DownUnlessKept {
    name: String,
    keep: bool,
    done: bool,
}

impl DownUnlessKept {
    fn take_down(mut self) -> Result<()> {
        self.done = true;
        if self.keep {
            return Ok(());
        }
        println!("\n==> taking the lab down");
        Lab::down(&self.name)?;
        println!("  done: no namespaces, processes, cgroups, pins or state left");
        Ok(())
    }
}

impl Drop for DownUnlessKept {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            let _ = Lab::down(&self.name);
        }
    }
}

/// The checks of one myth.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    /// Records and prints a check; returns whether it held.
    fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        let what = what.into();
        if ok {
            println!("  PASS  {what}");
            self.passed += 1;
        } else {
            println!("  FAIL  {what}");
            self.failed.push(what);
        }
        ok
    }
}

/// The flags a CLI subcommand of `node`'s agent needs to find that node's state and pins (on a
/// real node, the defaults).
fn agent_cli_flags(lab: &Lab, node: &str) -> Vec<String> {
    vec![
        "--state-dir".into(),
        lab.dir().join("nodes").join(node).join("agent").display().to_string(),
        "--bpf-pin-path".into(),
        lab.node_pin_path(node).display().to_string(),
    ]
}

/// `text` indented, for output under the command that printed it.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `text` indented and cut to [`MAX_OUTPUT_LINES`] lines.
fn shown(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "  (no output)\n".into();
    }
    let mut out = indent(&lines[..lines.len().min(MAX_OUTPUT_LINES)].join("\n"));
    if lines.len() > MAX_OUTPUT_LINES {
        out += &format!("  [... {} more lines]\n", lines.len() - MAX_OUTPUT_LINES);
    }
    out
}

/// A command line as a user types it in a shell: arguments with characters the shell would
/// interpret are quoted (an option's value after its `=`).
pub fn shell_line(argv: &[&str]) -> String {
    let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    argv.iter()
        .map(|arg| {
            if plain(arg) {
                arg.to_string()
            } else if let Some((option, value)) = arg.split_once('=')
                && option.starts_with("--")
                && plain(option)
            {
                format!("{option}={}", quote(value))
            } else {
                quote(arg)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a pod (as `kubectl get pod -o json` shows it) is Ready.
pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Why a pod's (first) container waits (`ContainerCreating`, `ErrImagePull`, ...), as
/// `kubectl get pod -o json` shows it.
pub fn waiting_reason(pod: &Value) -> Option<&str> {
    pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str()
}

/// A pod's IPv4 address, if it has one.
fn pod_ip(pod: &Value) -> Option<String> {
    pod["status"]["podIP"].as_str().map(str::to_string)
}

fn pod_node(pod: &Value) -> Option<String> {
    pod["spec"]["nodeName"].as_str().map(str::to_string)
}

/// The demo, against a running lab.
struct Demo<'a> {
    lab: &'a Lab,
}

impl Demo<'_> {
    fn myth(&self, number: u8, checks: &mut Checks) -> Result<()> {
        match number {
            1 => self.myth_1(checks),
            2 => self.myth_2(checks),
            3 => self.myth_3(checks),
            4 => self.myth_4(checks),
            n => bail!("no myth {n}"),
        }
    }

    // ---- printing and running what a user runs ----

    fn step(&self, what: &str) {
        println!("\n--- {what}");
    }

    /// A comment in the transcript: something the lab does that a user would do another way.
    fn lab_action(&self, what: &str) {
        println!("# {what}");
    }

    fn changed(&self, what: &str) {
        println!("  changed:   {what}");
    }

    fn unchanged(&self, what: &str) {
        println!("  unchanged: {what}");
    }

    /// `kubectl ARGS`, printed with its output.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        println!("$ kubectl {}", shell_line(args));
        match self.lab.kubectl(args) {
            Ok(out) => {
                print!("{}", shown(&out));
                Ok(out)
            }
            Err(e) => {
                print!("{}", indent(&format!("{e:#}")));
                Err(e)
            }
        }
    }

    /// A pod as `kubectl get pod NAME -o json` shows it (not printed: polled).
    fn pod(&self, name: &str) -> Option<Value> {
        let out = self.lab.kubectl(&["get", "pod", name, "-o", "json"]).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// The pods labelled `selector`, as `kubectl get pods -l` shows them (not printed).
    fn pods_labelled(&self, selector: &str) -> Result<Vec<Value>> {
        let out = self.lab.kubectl(&["get", "pods", "-l", selector, "-o", "json"])?;
        let list: Value = serde_json::from_str(&out)?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// `kubectl run client`: a bare curl pod that sleeps, for `kubectl exec` to fetch from.
    fn run_client(&self) -> Result<()> {
        self.kubectl(&[
            "run",
            "client",
            "--image=curlimages/curl",
            "--restart=Never",
            "--",
            "sleep",
            "3600",
        ])?;
        Ok(())
    }

    /// Waits (bounded) until pod `name` satisfies `ready`, and returns it.
    fn wait_pod(&self, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = Value::Null;
        crate::wait_for(POD_TIMEOUT, || {
            last = self.pod(name).unwrap_or(Value::Null);
            ready(&last).then_some(())
        })
        .ok_or_else(|| anyhow!("pod {name} is not {what} within {POD_TIMEOUT:?}: {}", last["status"]))?;
        Ok(last)
    }

    /// How a user runs `argv` in pod `pod`, with the lab's exec verb.
    fn exec_line(&self, pod: &str, argv: &[&str]) -> String {
        let name = &self.lab.state.name;
        let lab = if name == "lab" {
            "ferrynet-lab".to_string()
        } else {
            format!("ferrynet-lab --name {name}")
        };
        format!("$ {lab} kubectl -- exec {pod} -- {}", shell_line(argv))
    }

    /// Runs `argv` in pod `pod` (not printed): whether it succeeded, and what it printed.
    fn exec_quiet(&self, pod: &str, argv: &[&str]) -> Result<(bool, String)> {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let out = self.lab.exec_output(&pod_part("default", pod), &argv)?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// `kubectl exec POD -- ARGV`, printed with its output: whether it succeeded, and what it
    /// printed.
    fn exec(&self, pod: &str, argv: &[&str]) -> Result<(bool, String)> {
        println!("{}", self.exec_line(pod, argv));
        let (ok, out) = self.exec_quiet(pod, argv)?;
        print!("{}", shown(&out));
        if !ok {
            println!("  (exit status: failure)");
        }
        Ok((ok, out))
    }

    /// Runs `argv` in `pod` until its output satisfies `ok` (bounded: a change takes a moment to
    /// reach the datapath and the DNS), then prints it as one command with its last output.
    fn exec_until(&self, pod: &str, argv: &[&str], ok: impl Fn(bool, &str) -> bool) -> Result<(bool, String)> {
        let started = Instant::now();
        let mut tries = 0;
        let mut last = (false, String::new());
        crate::wait_for(PROPAGATION_TIMEOUT, || {
            tries += 1;
            last = self.exec_quiet(pod, argv).ok()?;
            ok(last.0, &last.1).then_some(())
        });
        println!("{}", self.exec_line(pod, argv));
        print!("{}", shown(&last.1));
        if tries > 1 {
            println!(
                "  (the answer above came on try {tries}, after {:.1} s)",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(last)
    }

    /// `ferrynet-agent ARGS` on `node` (its state dir and pins), printed as typed on the node.
    fn agent(&self, node: &str, args: &[&str]) -> Result<String> {
        println!("{node}$ ferrynet-agent {}", shell_line(args));
        let out = self.agent_quiet(node, args)?;
        print!("{}", shown(&out));
        Ok(out)
    }

    fn agent_quiet(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec![binary("ferrynet-agent").display().to_string()];
        argv.extend(agent_cli_flags(self.lab, node));
        argv.extend(args.iter().map(|a| a.to_string()));
        self.lab.exec_capture(node, &argv)
    }

    /// `ferrynet-agent cleanup` on `node`: with all the node's agent flags, since it finds what
    /// to remove (programs attached to the node's cgroup and links) through them.
    fn agent_cleanup(&self, node: &str) -> Result<()> {
        println!("{node}$ ferrynet-agent cleanup");
        let mut argv = vec![binary("ferrynet-agent").display().to_string()];
        argv.extend(self.lab.agent_args(node));
        argv.push("cleanup".into());
        let out = self.lab.exec_output(node, &argv)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", shown(&text));
        if !out.status.success() {
            bail!("ferrynet-agent cleanup on {node} failed: {text}");
        }
        Ok(())
    }

    fn nodes(&self) -> Vec<String> {
        self.lab.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Restarts every node's agent with `extra` flags (none: as the lab runs it), and waits until
    /// every one has converged.
    fn restart_agents(&self, extra: &[&str]) -> Result<()> {
        for node in self.nodes() {
            self.lab.stop_agent(&node)?;
            self.lab.start_agent_with(&node, extra)?;
        }
        self.lab.wait_converged(CONVERGE_TIMEOUT)
    }

    /// Whether every node's agent translates Services (its status says so, from this process).
    fn translation_on_everywhere(&self) -> bool {
        self.nodes().iter().all(|node| {
            self.lab.agent_status(node).is_ok_and(|s| {
                s["services"]["details"]["enabled"] == true
                    && s["services"]["running"] == true
                    && s["services"]["ready"] == true
            })
        })
    }

    /// Whether `ip` is in `node`'s IPv4 PodCIDR, and that CIDR.
    fn in_pod_cidr(&self, node: &str, ip: &str) -> (bool, String) {
        let Some(node) = self.lab.state.nodes.iter().find(|n| n.name == node) else {
            return (false, format!("no node {node}"));
        };
        let cidr = node.pod_cidrs()[0].clone();
        let inside = match (cidr.parse::<ipnet::IpNet>(), ip.parse::<IpAddr>()) {
            (Ok(net), Ok(ip)) => net.contains(&ip),
            _ => false,
        };
        (inside, cidr)
    }

    /// Whether a process named kube-proxy runs anywhere on the machine (the lab's namespaces
    /// included: they are all on this machine).
    /// Where kube-proxy was found (see [`Lab::kube_proxy_traces`]): nowhere, or a description of
    /// each trace, or of why the search failed.
    fn kube_proxy_found(&self) -> Option<String> {
        match self.lab.kube_proxy_traces() {
            Ok(traces) if traces.is_empty() => None,
            Ok(traces) => Some(traces.join("; ")),
            Err(e) => Some(format!("could not look: {e:#}")),
        }
    }

    /// A Service's ClusterIPs, as `kubectl get service` shows them (not printed).
    fn cluster_ips(&self, service: &str) -> Result<Vec<String>> {
        let out = self.lab.kubectl(&["get", "service", service, "-o", "json"])?;
        let svc: Value = serde_json::from_str(&out)?;
        let ips: Vec<String> = svc["spec"]["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.as_str().map(str::to_string))
            .collect();
        if ips.is_empty() {
            bail!("service {service} has no ClusterIP");
        }
        Ok(ips)
    }

    /// The pod addresses `kubectl get endpoints NAME` lists (not printed).
    fn endpoint_ips(&self, service: &str) -> Result<BTreeSet<String>> {
        let out = self.lab.kubectl(&["get", "endpoints", service, "-o", "json"])?;
        let endpoints: Value = serde_json::from_str(&out)?;
        Ok(endpoints["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["ip"].as_str().map(str::to_string))
            .collect())
    }

    /// The pod addresses (`IP:port` backends) `explain` names.
    fn explained_backends(explained: &str, candidates: &BTreeSet<String>) -> BTreeSet<String> {
        candidates
            .iter()
            .filter(|ip| explained.contains(&format!("{ip}:")))
            .cloned()
            .collect()
    }

    /// Deletes what a myth created, whether it got that far or not, and puts every agent back
    /// as the lab runs it (service translation on, CNI configuration in place); waits until the
    /// pods are gone, so that the next myth starts from a clean cluster.
    fn clean_up(&self, number: u8) -> Result<()> {
        let objects: &[&str] = match number {
            1 => &["pod/test-pod", "pod/no-cni"],
            2 => &["pod/nginx", "service/nginx", "pod/client"],
            3 => &["deployment/demo", "service/demo", "pod/client"],
            4 => &["pod/web", "service/web", "pod/client"],
            _ => &[],
        };
        let mut args = vec!["delete", "--ignore-not-found", "--wait=false"];
        args.extend_from_slice(objects);
        self.lab.kubectl(&args)?;
        let needs_restart = self.nodes().iter().any(|node| {
            self.lab.agent_pid(node).is_none()
                || self
                    .lab
                    .agent_status(node)
                    .map_or(true, |s| s["services"]["details"]["enabled"] != true)
        }) || !self
            .lab
            .dir()
            .join("nodes")
            .join("n3")
            .join("cni-conf")
            .join(super::CONFLIST)
            .exists();
        if needs_restart {
            self.restart_agents(&[])?;
        }
        let mut left = Vec::new();
        crate::wait_for(POD_TIMEOUT, || {
            let out = self.lab.kubectl(&["get", "pods", "-o", "name"]).ok()?;
            left = out.lines().map(str::to_string).collect();
            left.is_empty().then_some(())
        })
        .ok_or_else(|| anyhow!("pods still there after {POD_TIMEOUT:?}: {left:?}"))?;
        Ok(())
    }

    // ---- the myths ----

    fn myth_1(&self, checks: &mut Checks) -> Result<()> {
        self.step("No service proxy of any kind: no kube-proxy, and ferrynet's service translation off");
        self.kubectl(&["get", "pods", "--all-namespaces", "-o", "wide"])?;
        let kube_proxy = self.kube_proxy_found();
        checks.check(
            kube_proxy.is_none(),
            format!(
                "no kube-proxy anywhere: no kube-proxy process on this machine, and none of its rules (nftables or iptables, either backend) on any node{}",
                kube_proxy.map(|found| format!(" (found: {found})")).unwrap_or_default()
            ),
        );
        self.lab_action(
            "every node's agent restarted with --service-proxy=false (on a cluster: the DaemonSet's \
             FERRYNET_SERVICE_PROXY=false); it removes the service datapath it had",
        );
        self.restart_agents(&["--service-proxy", "false"])?;
        println!("n1$ ferrynet-agent status");
        print!("{}", indent(&self.agent_quiet("n1", &["status"])?));
        self.agent("n1", &["services"])?;
        let mut translating = Vec::new();
        for node in self.nodes() {
            let status = self.agent_quiet(&node, &["status"])?;
            let listed = self.agent_quiet(&node, &["services"])?;
            // A listing has a FRONTEND header; with translation off there are no maps to list.
            if !status.contains("services:   off") || listed.contains("FRONTEND") {
                translating.push(node);
            }
        }
        checks.check(
            translating.is_empty(),
            format!(
                "service translation is off on n1, n2 and n3: no node translates any Service{}",
                if translating.is_empty() {
                    String::new()
                } else {
                    format!(" (still on: {})", translating.join(", "))
                }
            ),
        );

        self.step("A pod gets its IP from the CNI (ferrynet's IPAM), with no service proxy anywhere");
        self.kubectl(&["run", "test-pod", "--image=nginx", "--restart=Never"])?;
        let pod = self.wait_pod("test-pod", "ready", is_ready)?;
        self.kubectl(&["get", "pods", "-o", "wide"])?;
        let ip = pod_ip(&pod).context("test-pod has no IP")?;
        let node = pod_node(&pod).context("test-pod has no node")?;
        let (inside, cidr) = self.in_pod_cidr(&node, &ip);
        self.changed(&format!(
            "test-pod runs on {node} with IP {ip} (IPv6: {})",
            pod["status"]["podIPs"][1]["ip"].as_str().unwrap_or("none")
        ));
        self.unchanged("no service proxy was started: service translation stays off on every node");
        checks.check(
            inside,
            format!("test-pod's IP {ip} is in {node}'s PodCIDR {cidr}, given by the CNI"),
        );
        let (_, addresses) = self.exec("test-pod", &["ip", "-4", "-brief", "addr", "show", "eth0"])?;
        checks.check(
            addresses.contains(&format!("{ip}/")),
            format!("{ip} is on test-pod's eth0, where the CNI put it"),
        );
        self.kubectl(&["delete", "pod", "test-pod", "--timeout=60s"])?;

        self.step("The reverse: a service proxy runs, but the node has no CNI configuration");
        self.lab_action("every node's agent restarted as usual: service translation on");
        self.restart_agents(&[])?;
        self.lab_action(
            "n3's CNI configuration taken away from its runtime (rm /etc/cni/net.d/05-ferrynet.conflist \
             on a node); n3's agent keeps running and translating Services",
        );
        self.lab.hide_cni_config("n3")?;
        let conf_dir = self.lab.dir().join("nodes/n3/cni-conf");
        println!("n3$ ls {}", conf_dir.display());
        let listing: Vec<String> = std::fs::read_dir(&conf_dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        print!("{}", shown(&listing.join("\n")));
        let on_n3 = r#"{"apiVersion":"v1","spec":{"nodeName":"n3"}}"#;
        self.kubectl(&["run", "no-cni", "--image=nginx", &format!("--overrides={on_n3}")])?;
        let stuck = self.wait_pod("no-cni", "waiting for its network", |p| {
            waiting_reason(p) == Some("ContainerCreating") && pod_node(p).is_some()
        })?;
        self.kubectl(&["get", "pods", "-o", "wide"])?;
        let message = stuck["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap_or_default();
        println!("  why (the pod's status): {message}");
        let translating = self.agent("n3", &["services"])?;
        checks.check(
            pod_node(&stuck).as_deref() == Some("n3")
                && pod_ip(&stuck).is_none()
                && message.contains("no CNI configuration"),
            "no-cni is on n3 and stays ContainerCreating with no IP: the runtime finds no CNI configuration",
        );
        checks.check(
            self.lab.agent_pid("n3").is_some()
                && self
                    .lab
                    .agent_status("n3")
                    .is_ok_and(|s| s["services"]["running"] == true && s["services"]["ready"] == true)
                && translating.contains(super::kubelet::DNS_V4),
            "meanwhile n3's agent runs and translates Services (the cluster DNS's 10.96.0.10:53 among them)",
        );
        self.lab_action("n3's CNI configuration put back (its agent installs it again)");
        self.lab.restore_cni_config("n3")?;
        let running = self.wait_pod("no-cni", "ready", is_ready)?;
        self.kubectl(&["get", "pod", "no-cni", "-o", "wide"])?;
        let ip = pod_ip(&running).unwrap_or_default();
        let (inside, cidr) = self.in_pod_cidr("n3", &ip);
        self.changed(&format!("with the CNI configuration back, no-cni got {ip} and runs"));
        self.unchanged("the service proxy on n3 did the same before and after: it never gives out addresses");
        checks.check(inside, format!("no-cni's IP {ip} is in n3's PodCIDR {cidr}"));
        self.kubectl(&["delete", "pod", "no-cni", "--timeout=60s"])?;
        Ok(())
    }

    fn myth_2(&self, checks: &mut Checks) -> Result<()> {
        self.step("No kube-proxy anywhere; ferrynet's service translation on");
        let kube_proxy = self.kube_proxy_found();
        checks.check(
            kube_proxy.is_none() && self.translation_on_everywhere(),
            format!(
                "no kube-proxy process or rules anywhere; every node's agent translates Services{}",
                kube_proxy
                    .map(|found| format!(" (kube-proxy found: {found})"))
                    .unwrap_or_default()
            ),
        );
        self.kubectl(&["run", "nginx", "--image=nginx", "--port=80", "--expose"])?;
        self.run_client()?;
        self.wait_pod("nginx", "ready", is_ready)?;
        self.wait_pod("client", "ready", is_ready)?;
        self.kubectl(&["get", "pods,services", "-o", "wide"])?;

        self.step("The client fetches nginx's page by the Service's name, then by its ClusterIP");
        let welcome = |ok: bool, page: &str| ok && page.contains("Welcome to nginx!");
        let (ok, page) = self.exec_until("client", &["curl", "-s", "-m", "2", "http://nginx"], welcome)?;
        checks.check(
            welcome(ok, &page),
            "`curl http://nginx` from the client returns nginx's welcome page (the name resolved by the cluster DNS, itself a Service)",
        );
        let cluster_ip = self.cluster_ips("nginx")?.remove(0);
        self.kubectl(&["get", "service", "nginx", "-o", "jsonpath={.spec.clusterIP}"])?;
        let url = format!("http://{cluster_ip}");
        let (ok, page) = self.exec_until("client", &["curl", "-s", "-m", "2", &url], welcome)?;
        checks.check(welcome(ok, &page), format!("`curl {url}` returns nginx's welcome page"));
        self.unchanged("no kube-proxy was ever installed; nothing but ferrynet's agents translated the Service");
        Ok(())
    }

    fn myth_3(&self, checks: &mut Checks) -> Result<()> {
        self.step("A Deployment and its Service");
        self.kubectl(&["create", "deployment", "demo", "--image=nginx"])?;
        self.kubectl(&["expose", "deployment", "demo", "--port=80"])?;
        self.run_client()?;
        let client = self.wait_pod("client", "ready", is_ready)?;
        let client_node = pod_node(&client).context("the client has no node")?;
        let mut ready_pods = Vec::new();
        crate::wait_for(POD_TIMEOUT, || {
            ready_pods = self.pods_labelled("app=demo").ok()?;
            (ready_pods.len() == 1 && ready_pods.iter().all(is_ready)).then_some(())
        })
        .ok_or_else(|| anyhow!("the deployment's pod is not ready within {POD_TIMEOUT:?}"))?;
        self.kubectl(&["get", "pods", "-l", "app=demo", "-o", "wide"])?;
        let pod = &ready_pods[0];
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let before = pod_ip(pod).context("the deployment's pod has no IP")?;
        let welcome = |ok: bool, page: &str| ok && page.contains("Welcome to nginx!");

        self.step("The client reaches the pod by its IP, then by the Service's IP");
        let (ok, page) = self.exec_until(
            "client",
            &["curl", "-s", "-m", "2", &format!("http://{before}")],
            welcome,
        )?;
        checks.check(welcome(ok, &page), format!("the pod answers on its own IP {before}"));
        self.kubectl(&["get", "service", "demo"])?;
        let cluster_ips = self.cluster_ips("demo")?;
        let cluster_ip = cluster_ips[0].clone();
        let (ok, page) = self.exec_until(
            "client",
            &["curl", "-s", "-m", "2", &format!("http://{cluster_ip}")],
            welcome,
        )?;
        checks.check(
            welcome(ok, &page),
            format!("the Service answers on its ClusterIP {cluster_ip}"),
        );
        self.kubectl(&["get", "pods", "-l", "app=demo", "-o", "wide"])?;
        let after = self.pod(&pod_name).and_then(|p| pod_ip(&p)).unwrap_or_default();
        self.unchanged(&format!("{pod_name}'s IP: {before} before, {after} after"));
        self.changed(&format!(
            "nothing on the pod: the client's connections to {cluster_ip} reached {before}"
        ));
        checks.check(
            before == after,
            "the pod's IP did not change: the Service got an address of its own",
        );

        self.step("The ClusterIP is a translation, not a process");
        println!("$ ss -ltnH; ss -lunH    # in every namespace of the lab: each node, each pod, the client");
        let mut listeners = Vec::new();
        let mut namespaces = lab_namespaces(&self.lab.state.name);
        namespaces.sort();
        for ns in &namespaces {
            let handle = crate::netns::Netns::attach(ns).with_context(|| format!("namespace {ns}"))?;
            for flags in ["-ltnH", "-lunH"] {
                let out = handle.exec("ss", &[flags]);
                if !out.status.success() {
                    bail!("ss {flags} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
                }
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    // The local address is the fourth column.
                    let local = line.split_whitespace().nth(3).unwrap_or_default().to_string();
                    listeners.push((ns.clone(), flags, local));
                }
            }
        }
        let demo_part = format!("-{}", pod_part("default", &pod_name));
        for (ns, flags, local) in listeners.iter().filter(|(ns, ..)| ns.ends_with(&demo_part)) {
            println!("  {ns} ({}): {local}", if *flags == "-ltnH" { "tcp" } else { "udp" });
        }
        println!(
            "  [{} listening sockets in {} namespaces in all]",
            listeners.len(),
            namespaces.len()
        );
        let on_cluster_ip: Vec<&(String, &str, String)> = listeners
            .iter()
            .filter(|(_, _, local)| cluster_ips.iter().any(|ip| local.contains(ip.as_str())))
            .collect();
        checks.check(
            on_cluster_ip.is_empty() && !listeners.is_empty(),
            format!(
                "no socket listens on {} in any of the lab's {} namespaces (nginx listens on the pod's *:80)",
                cluster_ips.join(" or "),
                namespaces.len()
            ),
        );
        println!("$ iptables-save; ip6tables-save; nft list ruleset    # on every node");
        let mut rule_mentions = Vec::new();
        for node in self.nodes() {
            let handle = self.lab.node_ns(&node)?;
            let mut summary = Vec::new();
            for (program, args) in [
                ("iptables-save", &[][..]),
                ("ip6tables-save", &[][..]),
                ("nft", &["list", "ruleset"][..]),
            ] {
                let out = handle.exec(program, args);
                if !out.status.success() {
                    bail!("{program} on {node}: {}", String::from_utf8_lossy(&out.stderr));
                }
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let mentions = text
                    .lines()
                    .filter(|l| cluster_ips.iter().any(|ip| l.contains(ip.as_str())))
                    .count();
                if mentions > 0 {
                    rule_mentions.push(format!("{node} {program}: {mentions} lines"));
                }
                summary.push(format!("{program} {} lines", text.lines().count()));
            }
            println!("  {node}: {} ; none mention {cluster_ip}", summary.join(", "));
        }
        checks.check(
            rule_mentions.is_empty(),
            format!(
                "no iptables, ip6tables or nftables rule on any node mentions {}{}",
                cluster_ips.join(" or "),
                if rule_mentions.is_empty() {
                    String::new()
                } else {
                    format!(" (found: {})", rule_mentions.join(", "))
                }
            ),
        );

        self.step(&format!(
            "What the client's node ({client_node}) translates {cluster_ip}:80 to"
        ));
        let target = format!("{cluster_ip}:80");
        let explained = self.agent(&client_node, &["explain", &target])?;
        checks.check(
            explained.contains(&format!("{before}:80")),
            format!("`ferrynet-agent explain {target}` on {client_node} names the backend {before}:80, the pod"),
        );

        self.step("Scaling the Deployment: the explanation follows");
        self.kubectl(&["scale", "deployment", "demo", "--replicas=3"])?;
        crate::wait_for(POD_TIMEOUT, || {
            ready_pods = self.pods_labelled("app=demo").ok()?;
            (ready_pods.len() == 3 && ready_pods.iter().all(is_ready)).then_some(())
        })
        .ok_or_else(|| anyhow!("the deployment has not 3 ready pods within {POD_TIMEOUT:?}"))?;
        self.kubectl(&["get", "pods", "-l", "app=demo", "-o", "wide"])?;
        let pod_ips: BTreeSet<String> = ready_pods.iter().filter_map(pod_ip).collect();
        let mut endpoints = BTreeSet::new();
        crate::wait_for(PROPAGATION_TIMEOUT, || {
            endpoints = self.endpoint_ips("demo").ok()?;
            (endpoints == pod_ips).then_some(())
        });
        self.kubectl(&["get", "endpoints", "demo"])?;
        // The agent's datapath takes a moment to follow the EndpointSlices.
        let mut explained_ips = BTreeSet::new();
        crate::wait_for(PROPAGATION_TIMEOUT, || {
            let explained = self.agent_quiet(&client_node, &["explain", &target]).ok()?;
            explained_ips = Self::explained_backends(&explained, &pod_ips);
            (explained_ips == pod_ips).then_some(())
        });
        let explained = self.agent(&client_node, &["explain", &target])?;
        let explained_ips_now = Self::explained_backends(&explained, &pod_ips);
        self.changed(&format!(
            "3 backends now: {}",
            pod_ips.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
        self.unchanged(&format!("the ClusterIP {cluster_ip}, and {pod_name}'s IP {before}"));
        checks.check(
            pod_ips.len() == 3 && endpoints == pod_ips && explained_ips_now == pod_ips,
            "explain names the 3 pods' IPs, the same as `kubectl get endpoints demo`",
        );
        checks.check(
            self.pod(&pod_name).and_then(|p| pod_ip(&p)).as_deref() == Some(before.as_str()),
            format!("{pod_name} kept its IP {before} through the scale-up"),
        );
        Ok(())
    }

    fn myth_4(&self, checks: &mut Checks) -> Result<()> {
        self.step("A Service and a client");
        self.kubectl(&["run", "web", "--image=nginx", "--port=80", "--expose"])?;
        self.run_client()?;
        let web = self.wait_pod("web", "ready", is_ready)?;
        self.wait_pod("client", "ready", is_ready)?;
        self.kubectl(&["get", "pods,services", "-o", "wide"])?;
        let pod_url = format!("http://{}", pod_ip(&web).context("web has no IP")?);
        let cluster_ip = self.cluster_ips("web")?.remove(0);
        let service_url = format!("http://{cluster_ip}");
        let welcome = |ok: bool, page: &str| ok && page.contains("Welcome to nginx!");
        let (ok, page) = self.exec_until("client", &["curl", "-s", "-m", "2", &service_url], welcome)?;
        checks.check(welcome(ok, &page), format!("the Service answers on {cluster_ip}"));

        self.step("Stopping the agent processes on every node: the pinned datapath keeps serving");
        self.lab_action("ferrynet-agent stopped on n1, n2 and n3 (SIGTERM, as when its pod is deleted or upgraded)");
        for node in self.nodes() {
            self.lab.stop_agent(&node)?;
        }
        let stopped = self.nodes().iter().all(|node| self.lab.agent_pid(node).is_none());
        self.agent("n1", &["services"])?;
        let (ok, page) = self.exec("client", &["curl", "-s", "-m", "3", &service_url])?;
        self.unchanged("the Service's translation: programs and maps stay pinned while no agent runs");
        checks.check(
            stopped && welcome(ok, &page),
            format!("with no agent running anywhere, a new connection to {cluster_ip} still gets nginx's page"),
        );
        self.lab_action("the agents started again");
        self.restart_agents(&[])?;

        self.step("Removing service translation (`ferrynet-agent cleanup`): ClusterIPs stop, pod IPs keep working");
        self.lab_action("the agents stopped, so that none puts the datapath back");
        for node in self.nodes() {
            self.lab.stop_agent(&node)?;
        }
        for node in self.nodes() {
            self.agent_cleanup(&node)?;
        }
        self.removed_then_restored(checks, &cluster_ip, &service_url, &pod_url, "cleanup", |demo| {
            demo.lab_action("the agents started again, as usual");
            for node in demo.nodes() {
                demo.lab.start_agent(&node)?;
            }
            Ok(())
        })?;
        self.lab.wait_converged(CONVERGE_TIMEOUT)?;

        self.step("Removing service translation (agents restarted with --service-proxy=false)");
        self.lab_action("every node's agent restarted with --service-proxy=false");
        self.restart_agents(&["--service-proxy", "false"])?;
        self.removed_then_restored(
            checks,
            &cluster_ip,
            &service_url,
            &pod_url,
            "--service-proxy=false",
            |demo| {
                demo.lab_action("every node's agent restarted as usual: --service-proxy=true");
                for node in demo.nodes() {
                    demo.lab.stop_agent(&node)?;
                    demo.lab.start_agent(&node)?;
                }
                Ok(())
            },
        )?;
        self.lab.wait_converged(CONVERGE_TIMEOUT)?;
        Ok(())
    }

    /// With service translation removed (by `how`): the ClusterIP does not answer and the pod IP
    /// does. Then `restore` turns it on again, and the time until the Service answers again is
    /// measured from the restore command to the first successful request.
    fn removed_then_restored(
        &self,
        checks: &mut Checks,
        cluster_ip: &str,
        service_url: &str,
        pod_url: &str,
        how: &str,
        restore: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        let welcome = |ok: bool, page: &str| ok && page.contains("Welcome to nginx!");
        let refused = |ok: bool, page: &str| !welcome(ok, page);
        // Each try is bounded by curl's own timeout.
        let (ok, page) = self.exec_until("client", &["curl", "-sS", "-m", "2", service_url], refused)?;
        checks.check(
            !welcome(ok, &page),
            format!("after {how}, `curl {service_url}` fails: the ClusterIP is nobody's address"),
        );
        let (ok, page) = self.exec("client", &["curl", "-s", "-m", "2", pod_url])?;
        checks.check(
            welcome(ok, &page),
            format!("after {how}, the pod still answers on its own IP ({pod_url})"),
        );
        self.changed(&format!("{cluster_ip} no longer answers"));
        self.unchanged("the pods, their IPs and routes: the CNI's work");
        let started = Instant::now();
        restore(self)?;
        // Polled back to back, each try bounded by curl's own timeout.
        let poll = ["curl", "-s", "-m", "1", service_url];
        let mut tries = 0;
        let mut last = String::new();
        let restored = crate::wait_for(PROPAGATION_TIMEOUT, || {
            tries += 1;
            let (ok, page) = self.exec_quiet("client", &poll).ok()?;
            last = page;
            welcome(ok, &last).then(|| started.elapsed())
        });
        println!("{}    # polled until it answers", self.exec_line("client", &poll));
        print!("{}", shown(&last));
        match restored {
            Some(took) => {
                println!(
                    "  service restored {:.2} s after the restart command (its first successful request, try {tries})",
                    took.as_secs_f64()
                );
                checks.check(true, format!("with translation back on, {cluster_ip} answers again"));
            }
            None => {
                checks.check(
                    false,
                    format!("{cluster_ip} did not answer within {PROPAGATION_TIMEOUT:?} of the agents' start"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_shown_as_typed_in_a_shell() {
        assert_eq!(
            shell_line(&["run", "test-pod", "--image=nginx", "--restart=Never"]),
            "run test-pod --image=nginx --restart=Never"
        );
        assert_eq!(
            shell_line(&["run", "x", r#"--overrides={"a":"b"}"#]),
            r#"run x --overrides='{"a":"b"}'"#
        );
        assert_eq!(shell_line(&["get", "pods,services"]), "get pods,services");
        assert_eq!(shell_line(&["echo", "it's"]), r"echo 'it'\''s'");
    }
}
