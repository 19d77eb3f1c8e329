//! ferrynet's benchmarks. Every figure is measured side by side, in one run, against the anchor
//! its issue names, and written as Markdown.
//!
//! - `cni`: ADD and DEL latency of `ferrynet` against Debian's reference `bridge` + `host-local`,
//!   sequentially and with 32 invocations at a time.
//! - `ipam`: one ADD plus DEL of `ferrynet-ipam` against `host-local`, in an empty, a half-full
//!   and a nearly full /16.
//! - `net`: pod-to-pod throughput and latency on the lab's three paths.
//! - `services`: new connections to a Service through ferrynet's socket LB and per-packet path
//!   against kube-proxy's iptables and nftables modes and direct pod-IP traffic, at several
//!   numbers of Services; NodePorts from the external client, to a backend on another node and
//!   on the entry node; and the control plane at the largest ([`services`]).
mod chart;
mod kube_proxy;
mod services;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ferrynet_ipam::{AllocationRequest, AttachmentKey, IpamConfig, Store};
use ferrynet_tests::{
    bench::{Summary, ms, ratio},
    binary,
    cni::{Env, Outcome, exec_plugin},
    netns::Netns,
    require_root,
};
use serde_json::{Value, json};

const USAGE: &str = "usage: ferrynet-bench cni [--ops N] [--concurrency C] [--out FILE]
       ferrynet-bench ipam [--samples N] [--prefix LEN] [--out FILE]
       ferrynet-bench net [--seconds S] [--rounds R] [--requests N] [--out FILE]
       ferrynet-bench services [--scales N,N,..] [--connections N] [--rounds R] [--changes N] [--modes M,M,..] [--pin-cpus BOOL] [--out FILE] [--chart FILE] [--nodeport-chart FILE]";

/// The flags each command takes (each with a value).
fn known_flags(command: &str) -> Option<&'static [&'static str]> {
    Some(match command {
        "cni" => &["--ops", "--concurrency", "--out"],
        "ipam" => &["--samples", "--prefix", "--out"],
        "net" => &["--seconds", "--rounds", "--requests", "--out"],
        "services" => &[
            "--scales",
            "--connections",
            "--rounds",
            "--changes",
            "--modes",
            "--out",
            "--chart",
            "--nodeport-chart",
            "--pin-cpus",
        ],
        "crr-server" => &["--port", "--cpu"],
        "crr-client" => &["--to", "--connections", "--warmup", "--cpu"],
        _ => return None,
    })
}

/// Refuses anything but `--flag value` pairs of `command`'s flags: a mistyped flag must not
/// start a benchmark that runs for minutes with the defaults.
fn check_flags(command: &str, flags: &[String]) -> Result<()> {
    let known = known_flags(command).with_context(|| format!("unknown command {command:?}\n{USAGE}"))?;
    for pair in flags.chunks(2) {
        let name = pair[0].as_str();
        if !known.contains(&name) {
            bail!("{command}: unknown flag {name:?}\n{USAGE}");
        }
        if pair.len() < 2 {
            bail!("{command}: {name} needs a value");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    check_flags(&args[0], &args[1..])?;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = flag("--out").map(PathBuf::from);
    let report = match args.first().map(String::as_str) {
        Some("cni") => {
            let ops = flag("--ops").map(|v| v.parse()).transpose()?.unwrap_or(200);
            let concurrency = flag("--concurrency").map(|v| v.parse()).transpose()?.unwrap_or(32);
            cni(ops, concurrency)?
        }
        Some("ipam") => {
            let samples = flag("--samples").map(|v| v.parse()).transpose()?.unwrap_or(100);
            let prefix = flag("--prefix").map(|v| v.parse()).transpose()?.unwrap_or(16);
            ipam(samples, prefix)?
        }
        Some("net") => {
            let seconds = flag("--seconds").map(|v| v.parse()).transpose()?.unwrap_or(5);
            let rounds = flag("--rounds").map(|v| v.parse()).transpose()?.unwrap_or(3);
            let requests = flag("--requests").map(|v| v.parse()).transpose()?.unwrap_or(10_000);
            net::run(seconds, rounds, requests)?
        }
        Some("services") => {
            let scales = flag("--scales")
                .unwrap_or_else(|| "100,1000,10000".into())
                .split(',')
                .map(|v| v.trim().parse().with_context(|| format!("--scales: {v:?}")))
                .collect::<Result<Vec<usize>>>()?;
            let chart = flag("--chart")
                .map(PathBuf::from)
                .or_else(|| out.as_ref().map(|o| o.with_extension("svg")));
            // The NodePort section's chart: beside the main one, as the report links it.
            let nodeport_chart = flag("--nodeport-chart").map(PathBuf::from).or_else(|| {
                chart
                    .as_ref()
                    .map(|c| c.parent().unwrap_or(std::path::Path::new(".")).join("nodeport.svg"))
            });
            let modes = flag("--modes")
                .map(|v| v.split(',').map(services::Mode::named).collect::<Result<Vec<_>>>())
                .transpose()?;
            services::run(&services::Options {
                scales,
                modes,
                connections: flag("--connections").map(|v| v.parse()).transpose()?.unwrap_or(400),
                rounds: flag("--rounds").map(|v| v.parse()).transpose()?.unwrap_or(12),
                changes: flag("--changes").map(|v| v.parse()).transpose()?.unwrap_or(100),
                pin_cpus: flag("--pin-cpus")
                    .map(|v| v.parse().with_context(|| format!("--pin-cpus: {v:?}")))
                    .transpose()?
                    .unwrap_or(false),
                chart,
                nodeport_chart,
            })?
        }
        // The services benchmark's server and client, run inside the lab's pods.
        Some("crr-server") => {
            let port = flag("--port").context("--port")?.parse()?;
            services::pin_to_cpu(flag("--cpu").map(|v| v.parse()).transpose()?)?;
            services::crr_server(port)?;
            return Ok(());
        }
        Some("crr-client") => {
            let to = flag("--to")
                .context("--to")?
                .split(',')
                .map(|t| t.parse().with_context(|| format!("--to: {t:?}")))
                .collect::<Result<Vec<std::net::SocketAddr>>>()?;
            let connections = flag("--connections").context("--connections")?.parse()?;
            let warmup = flag("--warmup").map(|v| v.parse()).transpose()?.unwrap_or(0);
            services::pin_to_cpu(flag("--cpu").map(|v| v.parse()).transpose()?)?;
            services::crr_client(&to, connections, warmup)?;
            return Ok(());
        }
        _ => bail!("{USAGE}"),
    };
    print!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("kernel {}, {cpus} CPUs ({cpu})", kernel.trim())
}

/// One plugin chain under test: its config and the binary the runtime would execute.
struct Contender {
    name: &'static str,
    binary: PathBuf,
    config: Value,
    host: Netns,
    _state: tempfile::TempDir,
}

impl Contender {
    fn run(&self, command: &str, id: &str, netns: &Path) -> Outcome {
        let env = Env::new(command).container(id, Some(netns), "eth0");
        exec_plugin(&self.binary, self.host.fd(), &env, self.config.to_string().as_bytes())
    }
}

fn contenders() -> Result<Vec<Contender>> {
    let ferrynet_state = tempfile::tempdir()?;
    let reference_state = tempfile::tempdir()?;
    Ok(vec![
        Contender {
            name: "ferrynet",
            binary: binary("ferrynet"),
            config: json!({"cniVersion": "1.0.0", "name": "bench", "type": "ferrynet", "mtu": 1400,
                "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.100.0.0/16"}]], "dataDir": ferrynet_state.path()}}),
            host: Netns::host("bhost", "192.168.90.1", "fd90::1"),
            _state: ferrynet_state,
        },
        Contender {
            name: "bridge+host-local",
            binary: PathBuf::from(ferrynet_tests::REFERENCE_PLUGIN_DIR).join("bridge"),
            config: json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cni0", "isGateway": true,
                "ipMasq": false, "mtu": 1400,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.101.0.0/16"}]], "dataDir": reference_state.path()}}),
            host: Netns::host("bhost", "192.168.91.1", "fd91::1"),
            _state: reference_state,
        },
    ])
}

/// Runs `command` for every pod of `batch` at once (one thread each); returns the latencies.
fn run_batch(c: &Contender, command: &str, batch: &[(usize, &Netns)], prefix: &str) -> Result<Vec<Duration>> {
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = batch
            .iter()
            .map(|(i, pod)| s.spawn(move || c.run(command, &format!("{prefix}{i}"), &pod.path())))
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker")).collect()
    });
    results
        .into_iter()
        .map(|out| {
            if out.ok() {
                Ok(out.elapsed)
            } else {
                bail!("{} {command}: {}{}", c.name, out.stdout, out.stderr)
            }
        })
        .collect()
}

fn cni(ops: usize, concurrency: usize) -> Result<String> {
    require_root();
    let contenders = contenders()?;
    // Namespaces are made up front, a set per contender: their creation is not part of any timing.
    let pods: Vec<Vec<Netns>> = contenders
        .iter()
        .map(|_| (0..ops).map(|_| Netns::new("bpod")).collect())
        .collect();
    // Warm up caches and the page cache for every binary.
    for (c, pods) in contenders.iter().zip(&pods) {
        let warm: Vec<(usize, &Netns)> = pods.iter().take(4).enumerate().collect();
        for command in ["ADD", "DEL"] {
            for one in &warm {
                run_batch(c, command, std::slice::from_ref(one), "warm")?;
            }
        }
    }
    // Creating and deleting namespaces leaves the kernel busy for a while after the calls return
    // (namespace cleanup runs on a workqueue): let that settle before timing anything.
    std::thread::sleep(Duration::from_secs(5));
    // The contenders alternate over the whole run, so that whatever else the machine does affects
    // both alike: sequential ops in blocks of 25 (each plugin leaves asynchronous kernel work
    // behind, which should land on its own next op rather than the other's), concurrent ones
    // batch by batch (a batch is `concurrency` invocations started together).
    let mut rows = Vec::new();
    for (label, width, block) in [("sequential", 1, 25), ("concurrent", concurrency, concurrency)] {
        let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = contenders.iter().map(|_| Default::default()).collect();
        for (phase, command) in ["ADD", "DEL"].into_iter().enumerate() {
            for start in (0..ops).step_by(block) {
                for (k, c) in contenders.iter().enumerate() {
                    for batch_start in (start..(start + block).min(ops)).step_by(width) {
                        let batch: Vec<(usize, &Netns)> = (batch_start..(batch_start + width).min(ops))
                            .map(|i| (i, &pods[k][i]))
                            .collect();
                        let latencies = run_batch(c, command, &batch, &format!("{label}-"))?;
                        let target = if phase == 0 {
                            &mut samples[k].0
                        } else {
                            &mut samples[k].1
                        };
                        target.extend(latencies);
                    }
                }
            }
        }
        let results: Vec<_> = contenders
            .iter()
            .zip(&samples)
            .map(|(c, (add, del))| (c.name, Summary::of(add), Summary::of(del)))
            .collect();
        rows.push((label, width, results));
    }

    let mut md = String::new();
    writeln!(md, "# CNI ADD/DEL latency: ferrynet vs bridge+host-local\n")?;
    writeln!(
        md,
        "Measured by `ferrynet-bench cni --ops {ops} --concurrency {concurrency}` on {}.\n",
        machine()
    )?;
    writeln!(
        md,
        "Each invocation is timed from process spawn to exit, exactly as a runtime runs the plugin (config on stdin, `CNI_*` environment, in a network namespace standing for the host). Pod namespaces are created before timing starts, and the machine is left 5 s to settle after that. Both plugins run IPv4-only with MTU 1400 in their own host namespace. The reference is Debian's `bridge` (`isGateway`, no `ipMasq`) with `host-local`: the anchor the issue names. Both contenders run in the same process and alternate over the whole run, so that background noise hits both alike: sequential ops alternate in blocks of 25, concurrent ones batch by batch (a batch is that many invocations started together).\n"
    )?;
    writeln!(
        md,
        "| mode | plugin | ops | ADD p50 (ms) | ADD p99 (ms) | DEL p50 (ms) | DEL p99 (ms) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for (label, width, results) in &rows {
        for (name, add, del) in results {
            writeln!(
                md,
                "| {label} ({width} at a time) | {name} | {} | {} | {} | {} | {} |",
                add.n,
                ms(add.p50),
                ms(add.p99),
                ms(del.p50),
                ms(del.p99)
            )?;
        }
    }
    writeln!(
        md,
        "\n| mode | ADD p50: reference / ferrynet | ADD p99 | DEL p50 | DEL p99 |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for (label, _, results) in &rows {
        let (f, r) = (&results[0], &results[1]);
        writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            ratio(r.1.p50, f.1.p50),
            ratio(r.1.p99, f.1.p99),
            ratio(r.2.p50, f.2.p50),
            ratio(r.2.p99, f.2.p99)
        )?;
    }
    let seq = &rows[0].2;
    let target_met = seq[0].1.p50 * 5 <= seq[1].1.p50 && seq[0].1.p50 <= Duration::from_millis(5);
    writeln!(
        md,
        "\nTarget (ADD p50 at most a fifth of the reference's, and at most 5 ms): **{}** (sequential ADD p50 {} ms vs {} ms).",
        if target_met { "met" } else { "NOT met" },
        ms(seq[0].1.p50),
        ms(seq[1].1.p50)
    )?;
    Ok(md)
}

/// The benchmark's subnet: addresses 10.x.0.2 onwards are allocatable (all but network, broadcast
/// and the gateway .1), numbered from 0.
#[derive(Clone, Copy)]
struct Subnet {
    prefix: u8,
}

impl Subnet {
    fn usable(self) -> u32 {
        (1u32 << (32 - self.prefix)) - 3
    }

    fn cidr(self, second_octet: u8) -> String {
        format!("10.{second_octet}.0.0/{}", self.prefix)
    }

    /// The numbers of the addresses left free when `used` are in use: spread evenly over the
    /// range, as churn leaves them, so a next-fit allocator has to find them, not walk onto them.
    fn holes(self, used: u32) -> std::collections::BTreeSet<u32> {
        let free = self.usable() - used;
        (0..free)
            .map(|k| (u64::from(k) * u64::from(self.usable()) / u64::from(free.max(1))) as u32)
            .collect()
    }
}

/// Fills ferrynet's store through the library: everything, then releases the holes.
fn fill_ferrynet(subnet: Subnet, dir: &Path, used: u32) -> Result<()> {
    let config = IpamConfig::from_value(&json!({"ranges": [[{"subnet": subnet.cidr(102)}]], "dataDir": dir}))?;
    let store = Store::open(dir, "bench")?;
    let mut locked = store.lock()?;
    if used == 0 {
        return Ok(());
    }
    for j in 0..subnet.usable() {
        let key = AttachmentKey::new(&format!("fill{j}"), "eth0")?;
        locked.allocate(&key, &config.range_sets, &AllocationRequest::default())?;
    }
    for j in subnet.holes(used) {
        locked.release(&AttachmentKey::new(&format!("fill{j}"), "eth0")?)?;
    }
    Ok(())
}

/// Fills host-local's store in its own on-disk format (one file per address holding
/// "containerID\r\nifname"), with the same holes and its cursor at the end of the range.
fn fill_host_local(subnet: Subnet, dir: &Path, used: u32) -> Result<()> {
    let net = dir.join("bench");
    std::fs::create_dir_all(&net)?;
    if used == 0 {
        return Ok(());
    }
    let holes = subnet.holes(used);
    let ip = |j: u32| std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 103, 0, 2)) + j);
    for j in (0..subnet.usable()).filter(|j| !holes.contains(j)) {
        std::fs::write(net.join(ip(j).to_string()), format!("fill{j}\r\neth0"))?;
    }
    std::fs::write(net.join("last_reserved_ip.0"), ip(subnet.usable() - 1).to_string())?;
    Ok(())
}

fn ipam(samples: usize, prefix: u8) -> Result<String> {
    require_root();
    if !(8..=24).contains(&prefix) {
        bail!("--prefix must be between 8 and 24");
    }
    let subnet = Subnet { prefix };
    let host = Netns::new("bhost");
    let mut md = String::new();
    writeln!(md, "# IPAM ADD latency by fill level: ferrynet-ipam vs host-local\n")?;
    writeln!(
        md,
        "Measured by `ferrynet-bench ipam --samples {samples} --prefix {prefix}` on {}.\n",
        machine()
    )?;
    writeln!(
        md,
        "Each sample is one ADD (timed) and one DEL of the IPAM plugin, executed as a main plugin delegates to it, in a /{prefix} that already holds the given number of allocations. The free addresses are spread evenly over the range, as churn leaves them, and both stores hold exactly the same ones. Filling happens before timing; host-local's store is filled in its own on-disk format.\n"
    )?;
    writeln!(
        md,
        "| addresses in use | ferrynet-ipam ADD p50 (ms) | ADD p99 | host-local ADD p50 (ms) | ADD p99 | host-local / ferrynet (p50) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for used in [
        0,
        subnet.usable() / 2,
        subnet.usable().saturating_sub(samples as u32 + 10),
    ] {
        let mut rows = Vec::new();
        for (kind, second_octet, fill) in [
            (
                "ferrynet-ipam",
                102,
                fill_ferrynet as fn(Subnet, &Path, u32) -> Result<()>,
            ),
            ("host-local", 103, fill_host_local),
        ] {
            let dir = tempfile::tempdir()?;
            fill(subnet, dir.path(), used)?;
            let bin = if kind == "host-local" {
                PathBuf::from(ferrynet_tests::REFERENCE_PLUGIN_DIR).join(kind)
            } else {
                binary(kind)
            };
            let conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
                "ipam": {"type": kind, "ranges": [[{"subnet": subnet.cidr(second_octet)}]], "dataDir": dir.path()}})
            .to_string();
            let mut adds = Vec::new();
            for i in 0..samples {
                let env = Env::new("ADD").container(&format!("s{i}"), Some(Path::new("/run/netns/unused")), "eth0");
                let start = Instant::now();
                let out = exec_plugin(&bin, host.fd(), &env, conf.as_bytes());
                adds.push(start.elapsed());
                if !out.ok() {
                    bail!("{kind} ADD at {used} used: {}", out.stdout);
                }
                let env = Env::new("DEL").container(&format!("s{i}"), None, "eth0");
                exec_plugin(&bin, host.fd(), &env, conf.as_bytes()).expect_ok("DEL");
            }
            rows.push(Summary::of(&adds));
        }
        writeln!(
            md,
            "| {used} | {} | {} | {} | {} | {} |",
            ms(rows[0].p50),
            ms(rows[0].p99),
            ms(rows[1].p50),
            ms(rows[1].p99),
            ratio(rows[1].p50, rows[0].p50)
        )?;
    }
    Ok(md)
}

/// Pod-to-pod throughput and request latency on the three paths a lab has.
mod net {
    use std::{
        fmt::Write as _,
        io::{Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
        process::{Command, Stdio},
        time::{Duration, Instant},
    };

    use anyhow::{Context, Result, bail};
    use ferrynet_tests::{
        bench::{Summary, ratio},
        lab::{Lab, LabGuard},
        netns::Netns,
    };

    const MESSAGE: usize = 64;

    struct Path {
        label: &'static str,
        from: Netns,
        to: Netns,
        to_ip: std::net::IpAddr,
    }

    /// A server in `ns` answering each 64-byte message with 64 bytes, until `connections` have
    /// come and gone.
    fn echo_server(ns: &Netns, port: u16, connections: usize) -> Result<std::thread::JoinHandle<()>> {
        let listener = ferrynet_kernel::netns::run_in(ns.fd(), || TcpListener::bind(("::", port)))?;
        Ok(std::thread::spawn(move || {
            for stream in listener.incoming().take(connections).flatten() {
                let mut stream = stream;
                let _ = stream.set_nodelay(true);
                let mut buf = [0u8; MESSAGE];
                while stream.read_exact(&mut buf).is_ok() {
                    if stream.write_all(&buf).is_err() {
                        break;
                    }
                }
            }
        }))
    }

    fn connect(ns: &Netns, to: SocketAddr) -> Result<TcpStream> {
        let stream =
            ferrynet_kernel::netns::run_in(ns.fd(), || TcpStream::connect_timeout(&to, Duration::from_secs(3)))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    }

    /// Request/response on one connection (netperf's TCP_RR): every round trip timed.
    fn rr(path: &Path, port: u16, requests: usize) -> Result<Vec<Duration>> {
        let server = echo_server(&path.to, port, 1)?;
        let mut stream = connect(&path.from, SocketAddr::new(path.to_ip, port))?;
        let mut buf = [7u8; MESSAGE];
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            let start = Instant::now();
            stream.write_all(&buf)?;
            stream.read_exact(&mut buf)?;
            samples.push(start.elapsed());
        }
        drop(stream);
        let _ = server.join();
        Ok(samples)
    }

    /// A new connection per request (netperf's TCP_CRR): connect, request, response, close.
    fn crr(path: &Path, port: u16, requests: usize) -> Result<Vec<Duration>> {
        let server = echo_server(&path.to, port, requests)?;
        let to = SocketAddr::new(path.to_ip, port);
        let mut samples = Vec::with_capacity(requests);
        let mut buf = [7u8; MESSAGE];
        for _ in 0..requests {
            let start = Instant::now();
            let mut stream = connect(&path.from, to)?;
            stream.write_all(&buf)?;
            stream.read_exact(&mut buf)?;
            drop(stream);
            samples.push(start.elapsed());
        }
        let _ = server.join();
        Ok(samples)
    }

    /// iperf3 for `seconds`; returns bits per second received.
    fn throughput(path: &Path, port: u16, seconds: u64) -> Result<f64> {
        let mut server = path.to.spawn(
            Command::new("iperf3")
                .args(["-s", "-1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let target = SocketAddr::new(path.to_ip, port);
        let up = ferrynet_tests::wait_for(Duration::from_secs(5), || {
            ferrynet_kernel::netns::run_in(path.from.fd(), || {
                TcpStream::connect_timeout(&target, Duration::from_millis(100))
            })
            .ok()
            .map(|_| ())
        });
        // That probe connection was iperf3's one test: start a fresh server.
        let _ = server.kill();
        let _ = server.wait();
        if up.is_none() {
            bail!("iperf3 server did not start in {}", path.to.name);
        }
        let mut server = path.to.spawn(
            Command::new("iperf3")
                .args(["-s", "-1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = path.from.command_output(Command::new("iperf3").args([
            "-c",
            &path.to_ip.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ]));
        let _ = server.wait();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3: {}", report["error"]))
    }

    fn pods(lab: &mut Lab, layout: &[(&str, &str)]) -> Result<()> {
        for (pod, node) in layout {
            lab.run_pod(pod, node, &Default::default())?;
        }
        Ok(())
    }

    pub fn run(seconds: u64, rounds: usize, requests: usize) -> Result<String> {
        ferrynet_tests::require_root();
        let mut native = LabGuard::up(2, "native");
        let mut vxlan = LabGuard::up(2, "vxlan");
        pods(&mut native, &[("a", "n1"), ("b", "n1"), ("c", "n2")])?;
        pods(&mut vxlan, &[("a", "n1"), ("c", "n2")])?;
        let path = |lab: &Lab, label: &'static str, from: &str, to: &str| -> Result<Path> {
            Ok(Path {
                label,
                from: lab.pod_ns(from)?,
                to: lab.pod_ns(to)?,
                to_ip: lab.pod(to)?.ip(true),
            })
        };
        let paths = [
            path(&native, "same node", "a", "b")?,
            path(&native, "across nodes, native routing", "a", "c")?,
            path(&vxlan, "across nodes, VXLAN", "a", "c")?,
        ];
        let mut bps: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut rr_samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        let mut crr_samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        let mut port = 7000;
        // Rounds interleave the paths (rotating which goes first), so drift hits all alike.
        for round in 0..rounds {
            for k in 0..paths.len() {
                let i = (k + round) % paths.len();
                port += 1;
                bps[i].push(throughput(&paths[i], port, seconds)?);
                port += 1;
                rr_samples[i].extend(rr(&paths[i], port, requests)?);
                port += 1;
                crr_samples[i].extend(crr(&paths[i], port, requests / 10)?);
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
        let mut md = String::new();
        writeln!(
            md,
            "# Pod-to-pod throughput and latency: same node, across nodes native, across nodes VXLAN\n"
        )?;
        writeln!(
            md,
            "Measured by `ferrynet-bench net --seconds {seconds} --rounds {rounds} --requests {requests}` on {}.\n",
            super::machine()
        )?;
        writeln!(
            md,
            "Two labs run at once on this machine (see the README's section on the lab): a native-routing one and a VXLAN one, 2 nodes each, every node with its ferrynet-agent and every pod set up by the real `ferrynet` CNI. Throughput is iperf3 (one TCP stream, {seconds} s, median of {rounds} runs). Request latency is an in-repo tool: 64-byte request and response on one connection (like netperf's TCP_RR, {requests} per run), and with a new connection per request (TCP_CRR, {} per run); p50 and p99 over all runs. The paths alternate round by round. Ratios are against the same-node path, the direct pod-IP anchor: it crosses two veths and the node's routing, with no underlay at all. Pod MTU is 1500 natively and 1450 over VXLAN. Everything runs on the same 2 CPUs, so absolute throughput is bounded by the machine, not a wire.\n",
            requests / 10
        )?;
        writeln!(
            md,
            "| path | throughput (Gbit/s) | vs same node | RR p50 (µs) | RR p99 (µs) | CRR p50 (µs) | CRR p99 (µs) | RR p50 vs same node |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        let base_bps = median(&bps[0]);
        let base_rr = Summary::of(&rr_samples[0]);
        for (i, p) in paths.iter().enumerate() {
            let (rr, crr) = (Summary::of(&rr_samples[i]), Summary::of(&crr_samples[i]));
            writeln!(
                md,
                "| {} | {:.2} | {:.2}× | {} | {} | {} | {} | {} |",
                p.label,
                median(&bps[i]) / 1e9,
                median(&bps[i]) / base_bps,
                us(rr.p50),
                us(rr.p99),
                us(crr.p50),
                us(crr.p99),
                ratio(rr.p50, base_rr.p50)
            )?;
        }
        drop(paths);
        Ok(md)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn only_a_commands_own_flags_with_values_pass() {
        check_flags("services", &args(&["--scales", "100", "--modes", "socket-lb"])).unwrap();
        check_flags("crr-client", &args(&["--to", "10.0.0.1:80", "--connections", "5"])).unwrap();
        // A mistyped or foreign flag, a flag without its value, an unknown command.
        for (command, flags) in [
            ("services", &["--scale", "100"][..]),
            ("services", &["--ops", "100"][..]),
            ("services", &["--scales"][..]),
            ("services", &["--scales", "100", "extra"][..]),
            ("bench-all", &[][..]),
        ] {
            assert!(check_flags(command, &args(flags)).is_err(), "{command} {flags:?}");
        }
    }
}
