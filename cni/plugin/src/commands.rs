//! The `ferrynet` plugin's commands: one veth pair per pod, routed (no bridge); the README's
//! "Pod networking" describes the result.
//!
//! Pod side: `CNI_IFNAME` with the pod's /32 and /128, loopback up, a default route via the
//! link-local gateways 169.254.1.1 and fe80::1, and permanent neighbour entries that resolve both
//! to the host veth's MAC. Host side: a veth named from (container ID, ifname) and a /32 or /128
//! route per pod address through it.
use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
};

use ferrynet_cni_protocol::{
    AttachmentKey, CniError, CniPlugin, Command, Invocation, codes,
    rscni_types::types::{CNIResult, Interface, IpConfig, Route},
};
use ferrynet_ipam::{AttachmentLock, Store, cni_commands};
use ferrynet_kernel::{
    ids::{LOOPBACK_IFINDEX, MAIN_TABLE, ROUTE_PROTOCOL_POD},
    names::{self, GATEWAY_V4, GATEWAY_V6, HostVeth},
    netlink::{Netlink, NetlinkError, NetlinkRequest, RouteSpec, VethSpec, inspect},
    netns,
};
use ipnet::IpNet;
use netlink_packet_route::route::{RouteProtocol, RouteScope};

use crate::config::{IpamBackend, PluginConfig};

/// The `ferrynet` plugin: routed L3, one veth pair per pod.
pub struct RoutedVethPlugin;

/// Where the operation locks of attachments live when another plugin manages addresses (with
/// ferrynet's IPAM they live in its store). Under /run: they mean nothing after a reboot.
pub const DELEGATED_LOCK_DIR: &str = "/run/ferrynet/attachments";

/// The host veth of an attachment.
pub fn host_veth(key: &AttachmentKey) -> HostVeth {
    HostVeth::new(key.container_id(), key.ifname())
}

fn host_veth_alias(network: &str, key: &AttachmentKey) -> String {
    HostVeth::alias(network, key.container_id(), key.ifname())
}

fn kernel(e: NetlinkError) -> CniError {
    CniError::kernel(e.to_string())
}

fn kernel_io(what: &str, e: std::io::Error) -> CniError {
    CniError::kernel(format!("{what}: {e}"))
}

/// Opens the pod's netns: a missing one means the container is gone (code 3); anything that is
/// not a network namespace, or is the plugin's own, is a bad CNI_NETNS (code 4).
fn open_pod_netns(inv: &Invocation) -> Result<OwnedFd, CniError> {
    let path = inv
        .netns
        .as_ref()
        .ok_or_else(|| CniError::invalid_env("CNI_NETNS is not set"))?;
    let fd = netns::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CniError::unknown_container(format!("netns {} does not exist", path.display())),
        _ => CniError::invalid_env(format!("cannot open netns {}: {e}", path.display())),
    })?;
    if !netns::is_netns(fd.as_fd()) {
        return Err(CniError::invalid_env(format!(
            "{} is not a network namespace",
            path.display()
        )));
    }
    // The runtime runs the plugin in the host's namespace: a "pod" namespace that is that same
    // namespace would put the pod's interface, address and default route on the host.
    if netns::is_current_netns(fd.as_fd())
        .map_err(|e| CniError::invalid_env(format!("cannot compare {} with this namespace: {e}", path.display())))?
    {
        return Err(CniError::invalid_env(format!(
            "{} is the plugin's own network namespace, not a pod's",
            path.display()
        )));
    }
    Ok(fd)
}

fn gateway_for(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() {
        IpAddr::V4(GATEWAY_V4)
    } else {
        IpAddr::V6(GATEWAY_V6)
    }
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix is valid")
}

fn default_route(ipv4: bool) -> IpNet {
    if ipv4 {
        "0.0.0.0/0".parse().expect("valid")
    } else {
        "::/0".parse().expect("valid")
    }
}

/// Addresses and extra routes an IPAM handed out.
struct Addresses {
    ips: Vec<IpAddr>,
    routes: Vec<IpNet>,
}

impl IpamBackend {
    fn add(&self, inv: &Invocation) -> Result<Addresses, CniError> {
        match self {
            Self::Own(config) => {
                let attachment = cni_commands::allocate(inv, config)?;
                Ok(Addresses {
                    ips: attachment.ips.iter().map(IpNet::addr).collect(),
                    routes: config.routes.iter().map(|r| r.dst).collect(),
                })
            }
            Self::Delegated(kind) => {
                let result = inv
                    .delegate(kind, Command::Add)?
                    .ok_or_else(|| CniError::new(codes::DELEGATE, "IPAM returned no result", kind.clone()))?;
                if result.ips.is_empty() {
                    return Err(CniError::new(codes::DELEGATE, "IPAM returned no address", kind.clone()));
                }
                Ok(Addresses {
                    ips: result.ips.iter().map(|ip| ip.address.addr()).collect(),
                    routes: result.routes.iter().map(|r| r.dst).collect(),
                })
            }
        }
    }

    fn del(&self, inv: &Invocation) -> Result<(), CniError> {
        match self {
            Self::Own(config) => cni_commands::release(inv, config).map(|_| ()),
            Self::Delegated(kind) => inv.delegate(kind, Command::Del).map(|_| ()),
        }
    }

    /// Takes the attachment's operation lock (see `Store::lock_attachment`): in the store with
    /// our own IPAM, under [`DELEGATED_LOCK_DIR`] otherwise.
    fn lock_attachment(&self, network: &str, key: &AttachmentKey) -> Result<AttachmentLock, CniError> {
        let store = match self {
            Self::Own(config) => Store::open(&config.data_dir, network)?.with_lock_timeout(config.lock_timeout),
            Self::Delegated(_) => Store::open(std::path::Path::new(DELEGATED_LOCK_DIR), network)?,
        };
        Ok(store.lock_attachment(key)?)
    }

    fn has_ipv6(&self) -> bool {
        match self {
            Self::Own(config) => config.range_sets.iter().any(|s| !s.is_ipv4()),
            Self::Delegated(_) => false,
        }
    }
}

impl CniPlugin for RoutedVethPlugin {
    fn add(&self, inv: &Invocation) -> Result<CNIResult, CniError> {
        let config = PluginConfig::from_invocation(inv)?;
        let key = inv.key()?;
        let pod_netns = open_pod_netns(inv)?;
        // Held to the end: no DEL of this attachment runs until the pod is fully wired or fully
        // rolled back.
        let _operation = config.ipam.lock_attachment(&config.network, &key)?;
        let mut host = Netlink::current().map_err(|e| kernel_io("netlink socket", e))?;
        let mut pod =
            Netlink::in_netns(pod_netns.as_fd()).map_err(|e| kernel_io("netlink socket in the pod netns", e))?;
        let veth = host_veth(&key);

        let addresses = config.ipam.add(inv)?;
        let mut veth_created = false;
        match wire(
            inv,
            &config,
            &key,
            &veth,
            &addresses,
            &pod_netns,
            &mut host,
            &mut pod,
            &mut veth_created,
        ) {
            Ok(mut result) => {
                if let Some(prev) = inv.config.prev_result.clone() {
                    result = merge_after(prev, result);
                }
                Ok(result)
            }
            Err(mut error) => {
                // Undo in reverse, and keep going: every step is attempted, every failure reported.
                let mut undo_failures = Vec::new();
                if veth_created && let Err(e) = host.delete_link_by_name(&veth.name) {
                    undo_failures.push(e.to_string());
                }
                if let Some(pins) = &config.datapath_pins {
                    crate::pod_datapath::forget(pins, &veth.name);
                }
                if let Err(e) = config.ipam.del(inv) {
                    undo_failures.push(e.to_string());
                }
                if !undo_failures.is_empty() {
                    error.details = format!("{}; rollback also failed: {}", error.details, undo_failures.join("; "));
                }
                Err(error)
            }
        }
    }

    fn del(&self, inv: &Invocation) -> Result<(), CniError> {
        let key = inv.key()?;
        let veth = host_veth(&key);
        let mut errors = Vec::new();
        let config = PluginConfig::from_invocation(inv);
        // Waits for an ADD of this attachment that is still running (its rollback or its last
        // route), so that what this DEL removes is everything that ADD made.
        let operation = match &config {
            Ok(config) => match config.ipam.lock_attachment(&config.network, &key) {
                Ok(lock) => Some(lock),
                // Busy: the runtime retries later, and then finds the ADD finished.
                Err(e) if e.code == codes::TRY_AGAIN_LATER => return Err(e),
                // No lock file could be made (a full disk, an unsafe store): DEL still removes
                // what it can. An unsafe store is reported by the IPAM step below.
                Err(_) => None,
            },
            Err(_) => None,
        };
        // The host veth goes first (its peer and the host routes go with it), so an address is
        // never free while something still routes to it. This needs no netns and no prevResult.
        match Netlink::current() {
            Ok(mut host) => {
                if let Err(e) = delete_own_veth(&mut host, &veth, &inv.config.name, &key) {
                    errors.push(kernel(e));
                }
            }
            Err(e) => errors.push(kernel_io("netlink socket", e)),
        }
        match config {
            Ok(config) => {
                if let Some(pins) = &config.datapath_pins {
                    crate::pod_datapath::forget(pins, &veth.name);
                }
                if let Err(e) = config.ipam.del(inv) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(e),
        }
        // The lock file goes only when everything else did: a DEL that is retried must still
        // exclude a concurrent ADD.
        if errors.is_empty()
            && let Some(operation) = operation
            && let Err(e) = operation.remove()
        {
            errors.push(e.into());
        }
        combine(errors)
    }

    fn check(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = PluginConfig::from_invocation(inv)?;
        let key = inv.key()?;
        let prev = inv
            .config
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::invalid_config("CHECK needs prevResult"))?;
        let _operation = config.ipam.lock_attachment(&config.network, &key)?;
        match &config.ipam {
            IpamBackend::Own(ipam) => {
                cni_commands::check(inv, ipam)?;
            }
            IpamBackend::Delegated(kind) => {
                inv.delegate(kind, Command::Check)?;
            }
        }
        let pod_netns = open_pod_netns(inv)?;
        let mut host = Netlink::current().map_err(|e| kernel_io("netlink socket", e))?;
        let mut pod =
            Netlink::in_netns(pod_netns.as_fd()).map_err(|e| kernel_io("netlink socket in the pod netns", e))?;
        let veth = host_veth(&key);
        let ifname = inv.ifname.as_deref().unwrap_or_default();
        let failed = |what: String| Err(CniError::check_failed(what));

        let Some(host_link) = host.link_by_name(&veth.name).map_err(kernel)? else {
            return failed(format!("host veth {} is missing", veth.name));
        };
        if !inspect::link_is_up(&host_link) {
            return failed(format!("host veth {} is down", veth.name));
        }
        let Some(pod_link) = pod.link_by_name(ifname).map_err(kernel)? else {
            return failed(format!("{ifname} is missing in the pod"));
        };
        if !inspect::link_is_up(&pod_link) {
            return failed(format!("{ifname} is down in the pod"));
        }
        if let Some(mtu) = config.mtu
            && inspect::link_mtu(&pod_link) != Some(mtu)
        {
            return failed(format!(
                "{ifname} has MTU {:?}, config says {mtu}",
                inspect::link_mtu(&pod_link)
            ));
        }
        let pod_addrs: Vec<IpNet> = pod
            .addresses(Some(pod_link.header.index))
            .map_err(kernel)?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        let host_routes: Vec<_> = [true, false]
            .into_iter()
            .map(|v4| host.routes(v4))
            .collect::<Result<Vec<_>, _>>()
            .map_err(kernel)?
            .into_iter()
            .flatten()
            .collect();
        let mine: Vec<IpAddr> = prev
            .ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .and_then(|i| prev.interfaces.get(i as usize))
                    .is_none_or(|i| i.name == ifname)
            })
            .map(|ip| ip.address.addr())
            .collect();
        for ip in mine {
            if !pod_addrs.contains(&host_prefix(ip)) {
                return failed(format!("{ifname} lacks {ip}"));
            }
            let routed = host_routes.iter().any(|r| {
                inspect::route_dst(r) == Some(host_prefix(ip)) && inspect::route_oif(r) == Some(host_link.header.index)
            });
            if !routed {
                return failed(format!("no host route to {ip} via {}", veth.name));
            }
            let pod_mac = inspect::link_mac(&pod_link);
            let host_neighbours = host.neighbours(host_link.header.index, ip.is_ipv4()).map_err(kernel)?;
            if !host_neighbours.iter().any(|n| {
                inspect::neighbour_ip(n) == Some(ip)
                    && inspect::neighbour_is_permanent(n)
                    && inspect::neighbour_mac(n) == pod_mac
            }) {
                return failed(format!("no permanent neighbour entry for {ip} on {}", veth.name));
            }
            let gateway = gateway_for(ip);
            let neighbours = pod.neighbours(pod_link.header.index, ip.is_ipv4()).map_err(kernel)?;
            let resolved = neighbours.iter().any(|n| {
                inspect::neighbour_ip(n) == Some(gateway)
                    && inspect::neighbour_is_permanent(n)
                    && inspect::neighbour_mac(n) == Some(veth.mac)
            });
            if !resolved {
                return failed(format!("no permanent neighbour entry for {gateway} in the pod"));
            }
            let pod_routes = pod.routes(ip.is_ipv4()).map_err(kernel)?;
            let has_default = pod_routes.iter().any(|r| {
                inspect::route_dst(r) == Some(default_route(ip.is_ipv4())) && inspect::route_gateway(r) == Some(gateway)
            });
            if !has_default {
                return failed(format!("the pod has no default route via {gateway}"));
            }
        }
        Ok(())
    }

    fn status(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = PluginConfig::from_invocation(inv)?;
        // Without forwarding, the node cannot carry pod traffic: existing pods are cut off from
        // everything beyond their own veth (51). The agent turns it on when it prepares the node.
        let mut off = Vec::new();
        if netns::read_sysctl("net/ipv4/ip_forward").ok().as_deref() != Some("1") {
            off.push("net.ipv4.ip_forward");
        }
        if config.ipam.has_ipv6() && netns::read_sysctl("net/ipv6/conf/all/forwarding").ok().as_deref() != Some("1") {
            off.push("net.ipv6.conf.all.forwarding");
        }
        if !off.is_empty() {
            return Err(CniError::limited_connectivity(format!(
                "{} {} off on this node",
                off.join(" and "),
                if off.len() > 1 { "are" } else { "is" }
            )));
        }
        match &config.ipam {
            IpamBackend::Own(ipam) => cni_commands::status(inv, ipam),
            IpamBackend::Delegated(kind) => inv.delegate(kind, Command::Status).map(|_| ()),
        }
    }

    fn gc(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = PluginConfig::from_invocation(inv)?;
        let keep = inv.valid_attachments()?;
        let mut errors = Vec::new();
        let mut host = Netlink::current().map_err(|e| kernel_io("netlink socket", e))?;
        let delete = |host: &mut Netlink, index: u32, errors: &mut Vec<CniError>| {
            if let Err(e) = host.delete_link(index)
                && !e.is_not_found()
            {
                errors.push(kernel(e));
            }
        };
        match &config.ipam {
            IpamBackend::Own(ipam) => {
                // Every record is written before its veth exists, so the records GC releases
                // name every veth a killed ADD can have left, alias or not. Those veths go first,
                // under the store lock, so no address is free while something still routes to it.
                let mut store = cni_commands::lock_store(inv, ipam)?;
                // Unreadable records whose file name says whose they are count too: `gc`
                // removes those that are not listed, and their veths must go first.
                let unreadable = store.unreadable_records()?.into_iter().filter_map(|(_, key)| key);
                let readable = store
                    .attachments_lenient()?
                    .iter()
                    .map(|a| a.key())
                    .collect::<Result<Vec<_>, _>>()?;
                for key in readable.into_iter().chain(unreadable) {
                    // The record names the veth; its alias must agree (as for DEL), so that a
                    // name collision never costs another network's pod its veth.
                    if !keep.contains(&key)
                        && let Err(e) = delete_own_veth(&mut host, &host_veth(&key), &config.network, &key)
                    {
                        errors.push(kernel(e));
                    }
                }
                let report = store.gc(|key| keep.contains(key))?;
                if !report.corrupt.is_empty() {
                    let paths: Vec<String> = report.corrupt.iter().map(|p| p.display().to_string()).collect();
                    errors.push(CniError::new(
                        codes::STORE,
                        "IPAM store failure",
                        format!(
                            "released what was not listed, but kept unreadable records of listed attachments (repair or remove them): {}",
                            paths.join(", ")
                        ),
                    ));
                }
            }
            IpamBackend::Delegated(kind) => {
                if let Err(e) = inv.delegate(kind, Command::Gc) {
                    errors.push(e);
                }
            }
        }
        // Any other veth of this network's that is not listed (recognised by its alias).
        let expected: Vec<String> = keep.iter().map(|k| host_veth(k).name).collect();
        let prefix = HostVeth::alias_prefix(&config.network);
        for link in host.links().map_err(kernel)? {
            let ours = inspect::link_alias(&link).is_some_and(|a| a.starts_with(&prefix));
            if ours && !expected.iter().any(|n| Some(n.as_str()) == inspect::link_name(&link)) {
                delete(&mut host, link.header.index, &mut errors);
            }
        }
        combine(errors)
    }
}

/// Teardown keeps going after a failure and reports every failure: the first one's code, with
/// all of them in the details.
fn combine(errors: Vec<CniError>) -> Result<(), CniError> {
    let mut iter = errors.into_iter();
    let Some(mut first) = iter.next() else {
        return Ok(());
    };
    for e in iter {
        first.details = format!("{}; {}", first.details, e);
    }
    Err(first)
}

/// Deletes the attachment's host veth if it is ours (its alias names this attachment); a veth
/// with the same name but someone else's alias would mean a hash collision, and is left alone.
fn delete_own_veth(
    host: &mut Netlink,
    veth: &HostVeth,
    network: &str,
    key: &AttachmentKey,
) -> Result<(), NetlinkError> {
    let Some(link) = host.link_by_name(&veth.name)? else {
        return Ok(());
    };
    let alias = inspect::link_alias(&link).unwrap_or_default();
    if !alias.is_empty() && alias != host_veth_alias(network, key) {
        return Ok(());
    }
    match host.delete_link(link.header.index) {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

/// The host's default-route interface MTU: the right pod MTU when nothing else is known.
fn detect_mtu(host: &mut Netlink) -> u32 {
    let default_oif = [true, false].into_iter().find_map(|v4| {
        host.routes(v4).ok()?.into_iter().find_map(|r| {
            (inspect::route_dst(&r) == Some(default_route(v4)) && inspect::route_table(&r) == MAIN_TABLE)
                .then(|| inspect::route_oif(&r))
                .flatten()
        })
    });
    let mtu = default_oif.and_then(|oif| {
        host.links()
            .ok()?
            .into_iter()
            .find(|l| l.header.index == oif)
            .and_then(|l| inspect::link_mtu(&l))
    });
    mtu.unwrap_or(1500)
}

#[allow(clippy::too_many_arguments)]
fn wire(
    inv: &Invocation,
    config: &PluginConfig,
    key: &AttachmentKey,
    veth: &HostVeth,
    addresses: &Addresses,
    pod_netns: &OwnedFd,
    host: &mut Netlink,
    pod: &mut Netlink,
    veth_created: &mut bool,
) -> Result<CNIResult, CniError> {
    let ifname = inv.ifname.as_deref().unwrap_or_default();
    let mtu = config.mtu.unwrap_or_else(|| detect_mtu(host));
    let alias = host_veth_alias(&config.network, key);

    let spec = VethSpec {
        host_name: &veth.name,
        host_mac: veth.mac,
        peer_name: ifname,
        peer_mac: veth.pod_mac,
        peer_netns: pod_netns.as_fd(),
        mtu,
    };
    let (host_index, pod_index) = match host.create_veth(&spec) {
        Ok(index) => index,
        // A veth left by an earlier ADD of this same attachment (a runtime retry) is replaced.
        Err(e) if e.is_exists() && host.link_by_name(&veth.name).map_err(kernel)?.is_some() => {
            delete_own_veth(host, veth, &config.network, key).map_err(kernel)?;
            host.create_veth(&spec).map_err(kernel)?
        }
        Err(e) if e.is_exists() => {
            return Err(CniError::kernel(format!(
                "{ifname} already exists in the pod netns: {e}"
            )));
        }
        Err(e) => return Err(kernel(e)),
    };
    *veth_created = true;
    // The service datapath's pod programs go on the host veth before the pod's interface comes
    // up, so that the pod's very first packet is translated.
    if let Some(pins) = &config.datapath_pins {
        crate::pod_datapath::attach(pins, &veth.name).map_err(CniError::kernel)?;
    }
    // The pod side, one batch.
    let pod_mac = veth.pod_mac;
    // Loopback is always ifindex 1 in a network namespace.
    let mut pod_changes = vec![NetlinkRequest::link_up(LOOPBACK_IFINDEX)];
    pod_changes.extend(
        addresses
            .ips
            .iter()
            .map(|ip| NetlinkRequest::add_address(pod_index, host_prefix(*ip), true)),
    );
    pod_changes.push(NetlinkRequest::link_up(pod_index));
    let mut families: Vec<bool> = addresses.ips.iter().map(IpAddr::is_ipv4).collect();
    families.dedup();
    let mut routes = Vec::new();
    for v4 in families {
        let gateway = if v4 {
            IpAddr::V4(GATEWAY_V4)
        } else {
            IpAddr::V6(GATEWAY_V6)
        };
        pod_changes.push(NetlinkRequest::permanent_neighbour(pod_index, gateway, veth.mac));
        let extra = addresses
            .routes
            .iter()
            .filter(|d| d.addr().is_ipv4() == v4 && **d != default_route(v4));
        for dst in std::iter::once(default_route(v4)).chain(extra.copied()) {
            let spec = RouteSpec {
                gateway: Some(gateway),
                oif: Some(pod_index),
                onlink: true,
                ..RouteSpec::new(dst, RouteProtocol::Boot)
            };
            pod_changes.push(NetlinkRequest::replace_route(&spec));
            routes.push(Route {
                dst,
                gw: Some(gateway),
                mtu: None,
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            });
        }
    }
    pod.apply_all(pod_changes).map_err(kernel)?;

    // The host side, one batch. The alias is set here because the kernel ignores IFLA_IFALIAS
    // when creating a link; it shows in `ip link` and is how GC recognises this network's veths.
    // Per pod address: a permanent neighbour entry for the pod's MAC and a route. With static
    // entries at both ends no packet waits for ARP or NDP. That matters for IPv6: a fresh veth
    // has no link-local address until the kernel's link watcher reports its carrier (up to a
    // second), and without one the host cannot run neighbour discovery.
    let mut host_changes = vec![NetlinkRequest::alias_and_up(host_index, &alias)];
    for ip in &addresses.ips {
        host_changes.push(NetlinkRequest::permanent_neighbour(host_index, *ip, pod_mac));
        let spec = RouteSpec {
            oif: Some(host_index),
            scope: RouteScope::Link,
            ..RouteSpec::new(host_prefix(*ip), RouteProtocol::Other(ROUTE_PROTOCOL_POD))
        };
        host_changes.push(NetlinkRequest::replace_route(&spec));
    }
    host.apply_all(host_changes).map_err(kernel)?;

    let sandbox = inv.netns.as_ref().map(|p| p.display().to_string());
    Ok(CNIResult {
        interfaces: vec![
            Interface {
                name: veth.name.clone(),
                mac: names::format_mac(&veth.mac),
                mtu: Some(mtu),
                sandbox: None,
                socket_path: None,
                pci_id: None,
            },
            Interface {
                name: ifname.to_string(),
                mac: names::format_mac(&pod_mac),
                mtu: Some(mtu),
                sandbox,
                socket_path: None,
                pci_id: None,
            },
        ],
        ips: addresses
            .ips
            .iter()
            .map(|ip| IpConfig {
                interface: Some(1),
                address: host_prefix(*ip),
                gateway: Some(gateway_for(*ip)),
            })
            .collect(),
        routes,
        dns: inv.config.dns.clone(),
    })
}

/// When ferrynet is not the first plugin, its result is appended to the previous one, with
/// interface indexes shifted past the interfaces already there.
fn merge_after(mut prev: CNIResult, mine: CNIResult) -> CNIResult {
    let shift = prev.interfaces.len() as u32;
    prev.interfaces.extend(mine.interfaces);
    prev.ips.extend(mine.ips.into_iter().map(|mut ip| {
        ip.interface = ip.interface.map(|i| i + shift);
        ip
    }));
    prev.routes.extend(mine.routes);
    if prev.dns.is_none() {
        prev.dns = mine.dns;
    }
    prev
}
