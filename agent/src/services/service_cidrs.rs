//! The cluster's Service CIDRs: where an address that no Service holds is refused, and what the
//! known-flow shortcut covers. Given by `--service-cidrs`, or else read from the API's
//! ServiceCIDR objects (`networking.k8s.io/v1`, Kubernetes 1.33 and later; the API server keeps
//! one, `kubernetes`, for its `--service-cluster-ip-range`), as kube-proxy's nftables mode
//! reads them.
//!
//! [`ServiceCidrSource::from_flag`] and [`cidrs_of`] are pure; [`ServiceCidrWatch`] follows the
//! objects.
use std::{collections::BTreeMap, net::IpAddr};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::node::topology::NodeInfo;

/// Where the cluster's Service CIDRs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceCidrSource {
    /// `--service-cidrs` lists them: these, and the API is not asked.
    Given(Vec<IpNet>),
    /// `--service-cidrs` is empty: the API's ServiceCIDR objects, followed as they change.
    Api,
    /// `--service-cidrs none`: none at all (nothing is refused for being in them).
    Off,
}

impl ServiceCidrSource {
    /// The source `--service-cidrs` names: CIDRs, `none`, or nothing (the API).
    pub fn from_flag(values: &[String]) -> Result<Self, String> {
        let values: Vec<&str> = values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()).collect();
        match values.as_slice() {
            [] => Ok(Self::Api),
            ["none"] => Ok(Self::Off),
            _ if values.contains(&"none") => Err("--service-cidrs: `none` cannot be given with CIDRs".into()),
            _ => {
                let cidrs = values
                    .iter()
                    .map(|v| v.parse::<IpNet>().map_err(|e| format!("--service-cidrs: {v:?}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                    let n = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_)) == v4).count();
                    if n > PER_FAMILY_AT_MOST {
                        return Err(format!(
                            "--service-cidrs: {n} {family} CIDRs, more than the datapath holds ({PER_FAMILY_AT_MOST})"
                        ));
                    }
                }
                Ok(Self::Given(cidrs))
            }
        }
    }

    /// The CIDRs, when the flag fixes them (given, or none); None when the API has them.
    pub fn fixed(&self) -> Option<&[IpNet]> {
        match self {
            Self::Given(cidrs) => Some(cidrs),
            Self::Off => Some(&[]),
            Self::Api => None,
        }
    }
}

/// The shortest prefix a ServiceCIDR may have here: a shorter one would have the node refuse
/// traffic to a good part of the Internet (the API server allocates ClusterIPs from far smaller
/// ranges).
const SHORTEST_PREFIX_V4: u8 = 8;
const SHORTEST_PREFIX_V6: u8 = 64;

/// How many CIDRs of each family the datapath's tries hold (`MAX_SERVICE_CIDRS`).
const PER_FAMILY_AT_MOST: usize = ferrynet_common::MAX_SERVICE_CIDRS as usize;

/// The ServiceCIDR the API server keeps for its `--service-cluster-ip-range`: its CIDRs come first
/// when there are more than the datapath holds.
const DEFAULT_SERVICE_CIDR: &str = "kubernetes";

/// The Service CIDRs that ServiceCIDR objects (by name: their `spec.cidrs`) give, sorted and
/// without duplicates, and what was left out and why (pure).
pub fn cidrs_of(objects: &BTreeMap<String, Vec<String>>) -> (Vec<IpNet>, Vec<String>) {
    let mut problems = Vec::new();
    let mut cidrs: Vec<IpNet> = Vec::new();
    let default_first = objects
        .get_key_value(DEFAULT_SERVICE_CIDR)
        .into_iter()
        .chain(objects.iter().filter(|(name, _)| *name != DEFAULT_SERVICE_CIDR));
    for (name, given) in default_first {
        for text in given {
            let cidr = match text.trim().parse::<IpNet>() {
                Ok(cidr) => cidr.trunc(),
                Err(e) => {
                    problems.push(format!("ServiceCIDR {name}: {text:?} is no CIDR ({e}): left out"));
                    continue;
                }
            };
            let shortest = match cidr {
                IpNet::V4(_) => SHORTEST_PREFIX_V4,
                IpNet::V6(_) => SHORTEST_PREFIX_V6,
            };
            if cidr.prefix_len() < shortest {
                problems.push(format!(
                    "ServiceCIDR {name}: {cidr} is wider than a /{shortest}: left out"
                ));
                continue;
            }
            cidrs.push(cidr);
        }
    }
    // In the objects' order (the default's first), each once.
    let mut seen = std::collections::BTreeSet::new();
    cidrs.retain(|cidr| seen.insert(*cidr));
    let mut kept = Vec::with_capacity(cidrs.len());
    for v4 in [true, false] {
        let family: Vec<IpNet> = cidrs
            .iter()
            .copied()
            .filter(|c| matches!(c, IpNet::V4(_)) == v4)
            .collect();
        if family.len() > PER_FAMILY_AT_MOST {
            problems.push(format!(
                "{} IPv{} Service CIDRs: only the first {PER_FAMILY_AT_MOST} are used",
                family.len(),
                if v4 { 4 } else { 6 }
            ));
        }
        kept.extend(family.into_iter().take(PER_FAMILY_AT_MOST));
    }
    kept.sort();
    (kept, problems)
}

/// The Service CIDRs that hold none of the cluster's own addresses, and what was left out and
/// why (pure). A CIDR holding a node's InternalIP, or overlapping a node's PodCIDR, would have
/// every node refuse traffic there (no Service holds those addresses): the nodes' own
/// connections to each other, or to pods. One holding an address of the API server itself (the
/// `default/kubernetes` Service's endpoints: a managed control plane lives outside the nodes)
/// would cut every agent off from the API, and with it from the fix. A ServiceCIDR is a cluster
/// administrator's object, but one typo must not cut the nodes off; kube-proxy's nftables mode
/// has no such guard.
pub fn clear_of_cluster(cidrs: &[IpNet], nodes: &[NodeInfo], api_servers: &[IpAddr]) -> (Vec<IpNet>, Vec<String>) {
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let mut problems = Vec::new();
    let kept = cidrs
        .iter()
        .copied()
        .filter(|cidr| {
            let held = nodes
                .iter()
                .find_map(|node| {
                    if let Some(ip) = node.internal_ips.iter().find(|ip| cidr.contains(*ip)) {
                        return Some(format!("node {}'s InternalIP {ip}", node.name));
                    }
                    let pods = node.pod_cidrs.iter().find(|pods| overlaps(cidr, pods))?;
                    Some(format!("node {}'s PodCIDR {pods}", node.name))
                })
                .or_else(|| {
                    let ip = api_servers.iter().find(|ip| cidr.contains(*ip))?;
                    Some(format!("the API server's address {ip}"))
                });
            if let Some(what) = &held {
                problems.push(format!("Service CIDR {cidr} holds {what}: left out"));
            }
            held.is_none()
        })
        .collect();
    (kept, problems)
}

/// What a ServiceCIDR object gives: its name and `spec.cidrs`.
fn given(object: &ServiceCIDR) -> Option<(String, Vec<String>)> {
    let name = object.metadata.name.clone()?;
    let cidrs = object.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default();
    Some((name, cidrs))
}

/// The API's ServiceCIDR objects, followed (with kube's backoff on errors) by a task of its own,
/// which ends with this.
pub struct ServiceCidrWatch {
    /// None until the objects have been listed, then the CIDRs they give.
    cidrs: watch::Receiver<Option<Vec<IpNet>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceCidrWatch {
    /// Starts following the objects. An API without them (before Kubernetes 1.33, or without the
    /// RBAC to read them) leaves the CIDRs unknown, which is said once, and the watch keeps
    /// trying.
    pub fn start(client: Client) -> Self {
        let (tx, cidrs) = watch::channel(None);
        let task = tokio::spawn(follow(client, tx));
        Self { cidrs, task }
    }

    /// The CIDRs, if the objects have been listed (and marks them seen).
    pub fn current(&mut self) -> Option<Vec<IpNet>> {
        self.cidrs.borrow_and_update().clone()
    }

    /// Waits until the CIDRs change, and returns them.
    pub async fn changed(&mut self) -> Vec<IpNet> {
        loop {
            if self.cidrs.changed().await.is_err() {
                // The task ended (it never should): nothing more will come.
                warn!("the ServiceCIDR watch ended: the Service CIDRs stay as they are");
                return std::future::pending().await;
            }
            if let Some(cidrs) = self.current() {
                return cidrs;
            }
        }
    }
}

impl Drop for ServiceCidrWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a watch error says this agent cannot have ServiceCIDRs at all: the API does not serve
/// the kind (404: before Kubernetes 1.33) or will not let it read them (403: no RBAC for them).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => matches!(status.code, 403 | 404),
        _ => false,
    }
}

async fn follow(client: Client, tx: watch::Sender<Option<Vec<IpNet>>>) {
    let stream = watcher(Api::<ServiceCIDR>::all(client), watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut objects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // A list in progress (Init to InitDone): it replaces what is known once it is complete.
    let mut listing: Option<BTreeMap<String, Vec<String>>> = None;
    let mut failing = false;
    // What `publish` last said was left out, so that it is said once, not at every event.
    let mut said: Vec<String> = Vec::new();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                if !failing {
                    warn!(
                        "the API's ServiceCIDR objects cannot be read ({e}): until they can, the Service CIDRs are not known (--service-cidrs gives them)"
                    );
                }
                failing = true;
                // A cluster without them has none: nothing is refused for being in an earlier
                // run's (or an earlier flag's), which would otherwise stay in force unseen.
                if not_served(&e) && tx.borrow().is_none() {
                    publish(&tx, &BTreeMap::new(), &mut said);
                }
                continue;
            }
        };
        failing = false;
        match event {
            watcher::Event::Init => listing = Some(BTreeMap::new()),
            watcher::Event::InitApply(object) => {
                if let (Some(list), Some((name, cidrs))) = (listing.as_mut(), given(&object)) {
                    list.insert(name, cidrs);
                }
            }
            watcher::Event::InitDone => {
                objects = listing.take().unwrap_or_default();
                publish(&tx, &objects, &mut said);
            }
            watcher::Event::Apply(object) => {
                if let Some((name, cidrs)) = given(&object) {
                    objects.insert(name, cidrs);
                    publish(&tx, &objects, &mut said);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some((name, _)) = given(&object) {
                    objects.remove(&name);
                    publish(&tx, &objects, &mut said);
                }
            }
        }
    }
}

/// Sends the CIDRs `objects` give, when they changed; says what they leave out when that
/// changed (`said`: what was said last).
fn publish(tx: &watch::Sender<Option<Vec<IpNet>>>, objects: &BTreeMap<String, Vec<String>>, said: &mut Vec<String>) {
    let (cidrs, problems) = cidrs_of(objects);
    if problems != *said {
        for problem in &problems {
            warn!("{problem}");
        }
        *said = problems;
    }
    tx.send_if_modified(|current| {
        if current.as_ref() == Some(&cidrs) {
            return false;
        }
        info!(
            "Service CIDRs from the API's ServiceCIDR objects: {}",
            if cidrs.is_empty() {
                "none".to_string()
            } else {
                cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            }
        );
        *current = Some(cidrs.clone());
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(values: &[&str]) -> Result<ServiceCidrSource, String> {
        ServiceCidrSource::from_flag(&values.iter().map(ToString::to_string).collect::<Vec<_>>())
    }

    #[test]
    fn the_flag_gives_cidrs_none_or_the_api() {
        assert_eq!(flag(&[]), Ok(ServiceCidrSource::Api));
        assert_eq!(flag(&["", " "]), Ok(ServiceCidrSource::Api));
        assert_eq!(flag(&["none"]), Ok(ServiceCidrSource::Off));
        assert_eq!(
            flag(&["10.96.0.0/16", " fd00:96::/108"]),
            Ok(ServiceCidrSource::Given(vec![
                "10.96.0.0/16".parse().unwrap(),
                "fd00:96::/108".parse().unwrap()
            ]))
        );
        assert!(flag(&["none", "10.96.0.0/16"]).unwrap_err().contains("none"));
        assert!(flag(&["10.96.0.0/33"]).unwrap_err().contains("10.96.0.0/33"));
        assert!(flag(&["garbage"]).unwrap_err().contains("garbage"));
        let too_many: Vec<String> = (0..=PER_FAMILY_AT_MOST).map(|i| format!("10.{i}.0.0/16")).collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        assert!(flag(&too_many).unwrap_err().contains("more than"));
    }

    fn objects(given: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        given
            .iter()
            .map(|(name, cidrs)| (name.to_string(), cidrs.iter().map(ToString::to_string).collect()))
            .collect()
    }

    fn nets(cidrs: &[&str]) -> Vec<IpNet> {
        cidrs.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn every_objects_cidrs_count_once_in_order() {
        let (cidrs, problems) = cidrs_of(&objects(&[
            ("kubernetes", &["10.96.0.0/16", "fd00:96::/108"]),
            ("extra", &["10.97.0.0/24", "10.96.0.0/16"]),
        ]));
        assert_eq!(cidrs, nets(&["10.96.0.0/16", "10.97.0.0/24", "fd00:96::/108"]));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cidrs_of(&BTreeMap::new()), (Vec::new(), Vec::new()));
    }

    #[test]
    fn hostile_cidrs_are_left_out_and_said() {
        let (cidrs, problems) = cidrs_of(&objects(&[(
            "hostile",
            &[
                "garbage",
                "10.96.0.5/16",
                "0.0.0.0/0",
                "::/0",
                "10.0.0.0/7",
                "",
                "fd00::/64",
            ],
        )]));
        // A host address with a prefix counts as its network.
        assert_eq!(cidrs, nets(&["10.96.0.0/16", "fd00::/64"]));
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("\"garbage\"")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("0.0.0.0/0")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("::/0")), "{problems:?}");
    }

    #[test]
    fn the_api_servers_own_cidrs_are_kept_first_when_there_are_too_many() {
        let many: Vec<String> = (0..PER_FAMILY_AT_MOST).map(|i| format!("10.{i}.0.0/16")).collect();
        let given = BTreeMap::from([
            ("aaa".to_string(), many),
            (DEFAULT_SERVICE_CIDR.to_string(), vec!["10.200.0.0/16".to_string()]),
        ]);
        let (cidrs, problems) = cidrs_of(&given);
        assert!(cidrs.contains(&"10.200.0.0/16".parse().unwrap()), "{cidrs:?}");
        assert_eq!(cidrs.len(), PER_FAMILY_AT_MOST);
        assert!(cidrs.windows(2).all(|w| w[0] < w[1]), "sorted: {cidrs:?}");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn an_api_without_the_kind_or_the_right_to_read_it_has_none() {
        let api = |code: u16| kube::Error::Api(kube::core::Status::failure("no", "NotFound").with_code(code).boxed());
        assert!(not_served(&watcher::Error::InitialListFailed(api(404))));
        assert!(not_served(&watcher::Error::WatchStartFailed(api(403))));
        // Anything else (the API server down, a 500) may pass: what is known stays.
        assert!(!not_served(&watcher::Error::InitialListFailed(api(500))));
        assert!(!not_served(&watcher::Error::WatchFailed(api(404))));
    }

    #[test]
    fn no_more_cidrs_of_a_family_than_the_tries_hold() {
        let many: Vec<String> = (0..PER_FAMILY_AT_MOST + 3).map(|i| format!("10.{i}.0.0/16")).collect();
        let given = BTreeMap::from([
            ("many".to_string(), many),
            ("v6".to_string(), vec!["fd00:96::/108".to_string()]),
        ]);
        let (cidrs, problems) = cidrs_of(&given);
        assert_eq!(
            cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count(),
            PER_FAMILY_AT_MOST
        );
        assert!(cidrs.contains(&"fd00:96::/108".parse().unwrap()));
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    fn node_at(name: &str, ips: &[&str], pod_cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            created: None,
            internal_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            pod_cidrs: nets(pod_cidrs),
            zone: None,
        }
    }

    #[test]
    fn a_cidr_holding_a_nodes_address_or_pods_is_left_out_and_said() {
        let nodes = [
            node_at(
                "n1",
                &["192.168.0.1", "fd00:1::1"],
                &["10.244.1.0/24", "fd00:244:1::/64"],
            ),
            node_at("n2", &["192.168.0.2"], &["10.244.2.0/24"]),
        ];
        let cidrs = nets(&[
            "10.96.0.0/16",
            // A node's address, alone or in a wider range.
            "192.168.0.2/32",
            "192.168.0.0/16",
            "fd00:1::/64",
            // Inside a PodCIDR, and around all of them.
            "10.244.1.128/25",
            "10.244.0.0/16",
            "fd00:96::/108",
        ]);
        let (kept, problems) = clear_of_cluster(&cidrs, &nodes, &[]);
        assert_eq!(kept, nets(&["10.96.0.0/16", "fd00:96::/108"]));
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("192.168.0.2/32") && p.contains("node n2")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("10.244.1.128/25") && p.contains("PodCIDR 10.244.1.0/24")),
            "{problems:?}"
        );
        // Without nodes, or beside them, everything stays.
        assert_eq!(clear_of_cluster(&cidrs, &[], &[]), (cidrs.clone(), vec![]));
        let (kept, problems) = clear_of_cluster(&nets(&["10.96.0.0/12", "10.245.0.0/16"]), &nodes, &[]);
        assert_eq!((kept.len(), problems.len()), (2, 0));
    }

    #[test]
    fn a_cidr_holding_the_api_servers_address_is_left_out_and_said() {
        let nodes = [node_at("n1", &["192.168.0.1"], &["10.244.1.0/24"])];
        // A managed control plane: its addresses are on no node.
        let api_servers: Vec<IpAddr> = vec!["172.16.5.10".parse().unwrap(), "fd00:5::10".parse().unwrap()];
        let cidrs = nets(&["10.96.0.0/16", "172.16.0.0/16", "fd00:5::/64", "fd00:96::/108"]);
        let (kept, problems) = clear_of_cluster(&cidrs, &nodes, &api_servers);
        assert_eq!(kept, nets(&["10.96.0.0/16", "fd00:96::/108"]));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("172.16.0.0/16") && p.contains("API server's address 172.16.5.10")),
            "{problems:?}"
        );
        // A node's address is said first when a CIDR holds both.
        let (_, problems) = clear_of_cluster(&nets(&["192.168.0.0/16"]), &nodes, &["192.168.0.9".parse().unwrap()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("node n1"), "{problems:?}");
    }
}
