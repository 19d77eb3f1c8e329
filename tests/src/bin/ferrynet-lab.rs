//! `ferrynet-lab`: a whole ferrynet cluster on one Linux machine, in network namespaces.
//! See the README's "The lab" (and `tests/src/lab/mod.rs`) for what it builds. Run as root.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferrynet_tests::{
    apiserver::{ApiServer, Settings},
    lab::{self, Lab, LabOptions, ServicePort},
};

#[derive(Parser)]
#[command(
    name = "ferrynet-lab",
    about = "A multi-node ferrynet cluster on one machine, in network namespaces"
)]
struct Cli {
    /// The lab's name (namespaces are fl-<name>-*, state in /run/ferrynet-lab/<name>).
    #[arg(long, global = true, default_value = "lab", env = "FERRYNET_LAB_NAME")]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a lab (removing leftovers of an earlier one first).
    Up {
        #[arg(long, default_value = "3")]
        nodes: u8,
        /// The agents' routing mode: native, vxlan or auto.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Underlay L2 segments, routed between each other (nodes are dealt out over them).
        #[arg(long, default_value = "1")]
        segments: u8,
        /// No cluster DNS (by default a `kube-dns` pod and Service answer Services by name).
        #[arg(long)]
        no_dns: bool,
    },
    /// Remove everything the lab created, whatever state it is in.
    Down,
    /// Nodes, agents and pods.
    Status,
    /// Add a node (with its agent).
    AddNode,
    /// Remove a node (its Node object, pods, agent and namespace).
    DeleteNode { node: String },
    /// Stop and start a node's agent.
    RestartAgent { node: String },
    /// Stop and start the API stand-in.
    RestartApiserver,
    /// Run a pod on a node.
    RunPod {
        pod: String,
        #[arg(long)]
        node: String,
        /// key=value, repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Delete a pod.
    DeletePod { pod: String },
    /// List pods.
    Pods,
    /// Run a command in a pod's namespace.
    ExecPod {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run a command in a node's namespace (the node's "host").
    ExecNode {
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Create a Service selecting pods by labels; the lab writes its EndpointSlices.
    CreateService {
        service: String,
        /// key=value, repeatable.
        #[arg(long = "selector", value_parser = parse_label, required = true)]
        selector: Vec<(String, String)>,
        /// port[:targetPort], repeatable.
        #[arg(long = "port", value_parser = parse_port, required = true)]
        ports: Vec<(u16, u16)>,
        #[arg(long = "type", default_value = "ClusterIP")]
        kind: String,
    },
    /// Play the cloud's load balancer: give a Service load balancer IPs (its status), and route
    /// them from the external client's namespace to nodes (several: ECMP).
    ExposeLoadBalancer {
        service: String,
        /// A load balancer IP, repeatable.
        #[arg(long = "ip", required = true)]
        ips: Vec<std::net::IpAddr>,
        /// A node to route the IPs to, repeatable (on the external client's segment).
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
    /// Delete a Service (and its EndpointSlices).
    DeleteService { service: String },
    /// kubectl against the lab (run from the external client's namespace). `kubectl exec POD --
    /// CMD` is the lab's own verb: it runs CMD in the pod's namespaces (network, cgroup, and its
    /// resolv.conf), as `exec-pod` does, since the API stand-in has no exec streaming.
    Kubectl {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The four myths about kube-proxy and the CNI, each settled by the kubectl commands a user
    /// types, on a fresh 3-node lab; ends with a summary and exits non-zero if any myth failed.
    Demo {
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Underlay L2 segments (with 2 and mode auto, n2 is reached over VXLAN, n3 natively).
        #[arg(long, default_value = "1")]
        segments: u8,
        /// Leave the lab running afterwards.
        #[arg(long)]
        keep: bool,
        /// Run only this myth (1 to 4), still on a fresh lab.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=4))]
        myth: Option<u8>,
    },
    /// (internal) Run the lab's controllers and kubelets (started by `up`).
    Controllers,
    /// (internal) Serve the API stand-in.
    Apiserver {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// (internal) A client, for running inside a pod or node: one request, a connected UDP
    /// client, or a steady load.
    Probe {
        #[command(subcommand)]
        probe: Probe,
    },
    /// (internal) A pod's server.
    PodServer {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "8080")]
        port: u16,
        /// The pod's addresses (its UDP server answers on each).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
    },
}

#[derive(Subcommand)]
enum Probe {
    /// One request (a line over TCP, or a datagram); prints the answer.
    Request {
        to: SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value = "3")]
        timeout_seconds: u64,
    },
    /// One TCP request from each source port of a range (`FIRST-LAST`, inside 20000-29999),
    /// each connection reset at its end; prints `<port> <answer>` per port.
    Flows {
        to: SocketAddr,
        #[arg(long, value_parser = parse_port_range)]
        source_ports: (u16, u16),
        #[arg(long, default_value = "2")]
        timeout_seconds: u64,
    },
    /// A connected UDP socket (or, with `--tcp`, a TCP connection held open) asking every
    /// interval, logging each answer or error and making its socket anew after an error. With
    /// `--tcp`, `getpeername` is logged for each connection's first answer, and again once the
    /// `--ask-peer` file appears.
    Connected {
        to: SocketAddr,
        #[arg(long)]
        tcp: bool,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value = "100")]
        interval_ms: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, requires = "tcp")]
        ask_peer: Option<PathBuf>,
    },
    /// New TCP connections back to back until the stop file exists; counts failures.
    Load {
        to: SocketAddr,
        #[arg(long)]
        stop: PathBuf,
        #[arg(long, default_value = "300")]
        max_seconds: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (first, last) = s.split_once('-').unwrap_or((s, s));
    let first: u16 = first.parse().map_err(|_| format!("bad port {first}"))?;
    let last: u16 = last.parse().map_err(|_| format!("bad port {last}"))?;
    if first == 0 || last < first {
        return Err(format!("{s:?} is not a range FIRST-LAST of ports"));
    }
    let fixed = ferrynet_tests::probe::FIXED_SOURCE_PORTS;
    if !fixed.contains(&first) || !fixed.contains(&last) {
        return Err(format!(
            "{s:?} is not inside {}-{}: a port in the kernel's ephemeral range may be held by an earlier connection",
            fixed.start,
            fixed.end - 1
        ));
    }
    Ok((first, last))
}

fn parse_port(s: &str) -> Result<(u16, u16), String> {
    let (p, t) = s.split_once(':').unwrap_or((s, s));
    Ok((
        p.parse().map_err(|_| format!("bad port {p}"))?,
        t.parse().map_err(|_| format!("bad port {t}"))?,
    ))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrynet-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apiserver { listen, data } => {
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(async move {
                let server = ApiServer::new(Settings {
                    data_file: data,
                    ..Default::default()
                })?;
                let listener = tokio::net::TcpListener::bind(listen).await?;
                eprintln!("API stand-in (not Kubernetes) serving on http://{listen}");
                // SIGTERM (the lab's stop) ends it once every change is in the data file.
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let persisted = server.clone();
                tokio::select! {
                    served = server.serve(listener) => served?,
                    _ = term.recv() => {
                        if !persisted.flush() {
                            anyhow::bail!("the data file could not be brought up to date within 10 s");
                        }
                    }
                }
                Ok(())
            });
        }
        Command::PodServer { name, node, port, ips } => return lab::pod_server(&name, &node, port, &ips),
        Command::Probe { probe } => {
            use ferrynet_tests::probe;
            return match probe {
                Probe::Request {
                    to,
                    udp,
                    timeout_seconds,
                } => {
                    println!("{}", probe::request(to, udp, Duration::from_secs(timeout_seconds))?);
                    Ok(())
                }
                Probe::Flows {
                    to,
                    source_ports: (first, last),
                    timeout_seconds,
                } => {
                    for line in probe::flows(to, first..=last, Duration::from_secs(timeout_seconds)) {
                        println!("{line}");
                    }
                    Ok(())
                }
                Probe::Connected {
                    to,
                    tcp,
                    seconds,
                    interval_ms,
                    out,
                    ask_peer,
                } => {
                    let (duration, interval) = (Duration::from_secs_f64(seconds), Duration::from_millis(interval_ms));
                    if tcp {
                        probe::connected_tcp(to, duration, interval, &out, ask_peer.as_deref())
                    } else {
                        probe::connected_udp(to, duration, interval, &out)
                    }
                }
                Probe::Load {
                    to,
                    stop,
                    max_seconds,
                    out,
                } => probe::load(to, &stop, Duration::from_secs(max_seconds), &out),
            };
        }
        _ => {}
    }
    ferrynet_tests::require_root();
    match cli.command {
        Command::Up {
            nodes,
            mode,
            segments,
            no_dns,
        } => {
            let lab = Lab::up(&LabOptions {
                name: cli.name,
                nodes,
                mode,
                segments,
                dns: !no_dns,
            })?;
            print!("{}", lab.summary());
        }
        Command::Down => Lab::down(&cli.name)?,
        Command::Status => print!("{}", Lab::open(&cli.name)?.summary()),
        Command::AddNode => {
            let mut lab = Lab::open(&cli.name)?;
            let node = lab.add_node()?;
            lab.wait_converged(Duration::from_secs(60))?;
            println!("added {node}");
        }
        Command::DeleteNode { node } => Lab::open(&cli.name)?.delete_node(&node)?,
        Command::RestartAgent { node } => {
            let lab = Lab::open(&cli.name)?;
            lab.stop_agent(&node)?;
            lab.start_agent(&node)?;
            lab.wait_converged(Duration::from_secs(60))?;
        }
        Command::RestartApiserver => {
            let lab = Lab::open(&cli.name)?;
            lab.stop_apiserver()?;
            lab.start_apiserver()?;
        }
        Command::RunPod { pod, node, labels } => {
            let mut lab = Lab::open(&cli.name)?;
            let p = lab.run_pod(&pod, &node, &labels.into_iter().collect())?;
            let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
            println!("pod {} on {}: {}", p.name, p.node, ips.join(", "));
        }
        Command::DeletePod { pod } => Lab::open(&cli.name)?.delete_pod(&pod)?,
        Command::Pods => {
            for p in &Lab::open(&cli.name)?.state.pods {
                let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
                let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<16} {:<6} {:<40} {}",
                    p.name,
                    p.node,
                    ips.join(","),
                    labels.join(",")
                );
            }
        }
        Command::ExecPod { pod, command } => exit_with(Lab::open(&cli.name)?.exec(&format!("pod-{pod}"), &command)?),
        Command::ExecNode { node, command } => exit_with(Lab::open(&cli.name)?.exec(&node, &command)?),
        Command::CreateService {
            service,
            selector,
            ports,
            kind,
        } => {
            let mut lab = Lab::open(&cli.name)?;
            let ports: Vec<ServicePort> = ports
                .into_iter()
                .map(|(port, target_port)| ServicePort { port, target_port })
                .collect();
            let svc = lab.create_service(&service, &selector.into_iter().collect(), &ports, &kind)?;
            let spec = svc.spec.unwrap_or_default();
            let ips = spec.cluster_ips.unwrap_or_default();
            let node_ports: Vec<String> = spec
                .ports
                .into_iter()
                .flatten()
                .filter_map(|p| Some(format!("{}->{}", p.port, p.node_port?)))
                .collect();
            if node_ports.is_empty() {
                println!("service {service}: clusterIPs {}", ips.join(", "));
            } else {
                println!(
                    "service {service}: clusterIPs {}, nodePorts {}",
                    ips.join(", "),
                    node_ports.join(", ")
                );
            }
        }
        Command::ExposeLoadBalancer { service, ips, nodes } => {
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            Lab::open(&cli.name)?.expose_load_balancer(&service, &ips, &nodes)?;
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            println!(
                "service {service}: load balancer {} via {}",
                ips.join(", "),
                nodes.join(", ")
            );
        }
        Command::DeleteService { service } => Lab::open(&cli.name)?.delete_service(&service)?,
        Command::Kubectl { args } if args.first().is_some_and(|a| a == "exec") => {
            let (namespace, pod, command) = parse_kubectl_exec(&args[1..])?;
            let lab = Lab::open(&cli.name)?;
            exit_with(lab.exec(&lab::kubelet::pod_part(&namespace, &pod), &command)?)
        }
        Command::Kubectl { args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            print!("{}", Lab::open(&cli.name)?.kubectl(&args)?);
        }
        Command::Controllers => lab::controllers::run(&cli.name)?,
        Command::Demo {
            mode,
            segments,
            keep,
            myth,
        } => {
            let code = lab::demo::run(&lab::demo::DemoOptions {
                name: cli.name,
                mode,
                segments,
                keep,
                myth,
            })?;
            if code != 0 {
                std::process::exit(code.into());
            }
        }
        Command::Apiserver { .. } | Command::PodServer { .. } | Command::Probe { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

/// `kubectl exec`'s arguments after `exec`: `[-n NS] [-i] [-t] [-c CONTAINER] POD -- CMD...`
/// (also `pod/POD` and `--namespace=NS`); returns the namespace, pod and command.
fn parse_kubectl_exec(args: &[String]) -> Result<(String, String, Vec<String>)> {
    let split = args
        .iter()
        .position(|a| a == "--")
        .context("usage: kubectl exec [-n NAMESPACE] POD -- COMMAND [ARGS...]")?;
    let (options, command) = (&args[..split], &args[split + 1..]);
    if command.is_empty() {
        bail!("kubectl exec: no command after --");
    }
    let mut namespace = "default".to_string();
    let mut pod = None;
    let mut options = options.iter();
    while let Some(option) = options.next() {
        match option.as_str() {
            "-n" | "--namespace" => namespace = options.next().context("-n needs a namespace")?.clone(),
            "-c" | "--container" => {
                options.next().context("-c needs a container")?;
            }
            "-i" | "-t" | "-it" | "-ti" | "--stdin" | "--tty" | "-q" | "--quiet" => {}
            o if o.starts_with("--namespace=") => namespace = o["--namespace=".len()..].to_string(),
            o if o.starts_with('-') => bail!("kubectl exec: the lab's exec does not take {o}"),
            o if pod.is_none() => pod = Some(o.strip_prefix("pod/").unwrap_or(o).to_string()),
            o => bail!("kubectl exec: unexpected argument {o}"),
        }
    }
    Ok((namespace, pod.context("kubectl exec: which pod?")?, command.to_vec()))
}

fn exit_with(status: std::process::ExitStatus) -> ! {
    std::process::exit(status.code().unwrap_or(1))
}
