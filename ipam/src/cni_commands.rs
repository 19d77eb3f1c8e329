//! The IPAM's CNI commands, on top of the store: what the `ferrynet-ipam` plugin runs, and what
//! the main `ferrynet` plugin calls in-process instead of executing that binary.
use std::net::IpAddr;

use ferrynet_cni_protocol::{
    CniError, CniPlugin, Invocation, codes,
    rscni_types::types::{CNIResult, IpConfig, Route},
};
use ipnet::IpNet;
use serde_json::Value;

use crate::{
    config::IpamConfig,
    error::IpamError,
    store::{AllocationRequest, Attachment, LockedStore, Store},
};

/// Every IPAM failure as the spec error a runtime sees.
impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let details = e.to_string();
        match e {
            IpamError::InvalidConfig(_) => Self::invalid_config(details),
            IpamError::InvalidKey(_) => Self::invalid_env(details),
            IpamError::Exhausted(_) => Self::new(codes::NO_FREE_ADDRESS, "no free address", details),
            IpamError::RequestedOutOfRange(_) | IpamError::RequestedInUse { .. } => {
                Self::new(codes::ADDRESS_UNAVAILABLE, "requested address unavailable", details)
            }
            IpamError::LockTimeout(_) => Self::new(codes::TRY_AGAIN_LATER, "try again later", details),
            IpamError::Io { .. } | IpamError::Corrupt { .. } | IpamError::UnsafeStore { .. } => {
                Self::new(codes::STORE, "IPAM store failure", details)
            }
        }
    }
}

/// Parses the `ipam` section of an invocation's config.
pub fn config_of(inv: &Invocation) -> Result<IpamConfig, CniError> {
    let section = inv
        .raw
        .get("ipam")
        .ok_or_else(|| CniError::invalid_config("missing `ipam` section"))?;
    Ok(IpamConfig::from_value(section)?)
}

/// Opens and locks the store of this invocation's network.
pub fn lock_store(inv: &Invocation, config: &IpamConfig) -> Result<LockedStore, CniError> {
    Ok(Store::open(&config.data_dir, &inv.config.name)?
        .with_lock_timeout(config.lock_timeout)
        .lock()?)
}

/// What the runtime asked for beyond "any address": specific IPs and the pod's identity.
pub fn request_of(inv: &Invocation) -> Result<AllocationRequest, CniError> {
    let mut requested = Vec::new();
    // The `ips` capability (runtimeConfig), then args.cni.ips, then CNI_ARGS IP=, as host-local.
    let lists = [inv.raw.pointer("/runtimeConfig/ips"), inv.raw.pointer("/args/cni/ips")];
    for list in lists.into_iter().flatten() {
        let items = list
            .as_array()
            .ok_or_else(|| CniError::invalid_config("`ips` must be a list"))?;
        for item in items {
            requested.push(parse_requested(item.as_str().unwrap_or(""))?);
        }
    }
    if let Some(ips) = inv.args.get("IP") {
        for ip in ips.split(',').filter(|s| !s.is_empty()) {
            requested.push(parse_requested(ip)?);
        }
    }
    requested.sort();
    requested.dedup();
    Ok(AllocationRequest {
        requested,
        pod_namespace: inv.args.pod_namespace().map(str::to_string),
        pod_name: inv.args.pod_name().map(str::to_string),
        netns: inv.netns.as_ref().map(|p| p.display().to_string()),
    })
}

fn parse_requested(s: &str) -> Result<IpAddr, CniError> {
    let addr = s.split('/').next().unwrap_or("");
    addr.parse()
        .map_err(|_| CniError::invalid_config(format!("requested IP {s:?} is not an address")))
}

/// The IPAM result for an allocation: addresses with the subnet gateway, plus configured routes.
pub fn result_of(config: &IpamConfig, attachment: &Attachment) -> CNIResult {
    let ips = attachment
        .ips
        .iter()
        .map(|net| IpConfig {
            interface: None,
            address: *net,
            gateway: config
                .range_sets
                .iter()
                .flat_map(|s| &s.ranges)
                .find(|r| r.subnet.contains(&net.addr()))
                .map(|r| r.gateway),
        })
        .collect();
    let routes = config
        .routes
        .iter()
        .map(|r| Route {
            dst: r.dst,
            gw: r.gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        })
        .collect();
    CNIResult {
        interfaces: Vec::new(),
        ips,
        routes,
        dns: None,
    }
}

/// Allocates (or returns the existing allocation) for the invocation's key.
pub fn allocate(inv: &Invocation, config: &IpamConfig) -> Result<Attachment, CniError> {
    let request = request_of(inv)?;
    let mut store = lock_store(inv, config)?;
    Ok(store.allocate(&inv.key()?, &config.range_sets, &request)?)
}

/// Releases the invocation's allocation, if any.
pub fn release(inv: &Invocation, config: &IpamConfig) -> Result<Option<Attachment>, CniError> {
    let mut store = lock_store(inv, config)?;
    Ok(store.release(&inv.key()?)?)
}

/// CHECK: the allocation exists and holds exactly the addresses the previous result reported.
pub fn check(inv: &Invocation, config: &IpamConfig) -> Result<Attachment, CniError> {
    let store = lock_store(inv, config)?;
    let key = inv.key()?;
    let attachment = store
        .get(&key)?
        .ok_or_else(|| CniError::check_failed(format!("no address is allocated to {key}")))?;
    if let Some(prev) = &inv.config.prev_result {
        // Only addresses of this network's subnets: other plugins in the chain (loopback, a
        // second interface) report addresses of their own.
        let ours = |ip: &IpAddr| {
            config
                .range_sets
                .iter()
                .flat_map(|set| &set.ranges)
                .any(|range| range.subnet.contains(ip))
        };
        let mut reported: Vec<IpAddr> = prev.ips.iter().map(|ip| ip.address.addr()).filter(ours).collect();
        let mut held: Vec<IpAddr> = attachment.ips.iter().map(IpNet::addr).collect();
        reported.sort();
        held.sort();
        // The main plugin reports only its own addresses; allocations may hold them all.
        if !reported.iter().all(|ip| held.contains(ip)) {
            return Err(CniError::check_failed(format!(
                "{key} holds {held:?}, prevResult reports {reported:?}"
            )));
        }
    }
    Ok(attachment)
}

/// STATUS: the store is usable and every range set has a free address.
pub fn status(inv: &Invocation, config: &IpamConfig) -> Result<(), CniError> {
    let mut store = lock_store(inv, config).map_err(|e| CniError::not_available(e.details))?;
    let usage = store
        .usage(&config.range_sets)
        .map_err(|e| CniError::not_available(e.to_string()))?;
    if let Some(full) = usage.iter().find(|u| u.free == 0) {
        return Err(CniError::not_available(format!(
            "no free address left in range set {}",
            full.range_set
        )));
    }
    Ok(())
}

/// GC: releases every allocation not in the valid-attachments list.
pub fn gc(inv: &Invocation, config: &IpamConfig) -> Result<Vec<Attachment>, CniError> {
    let keep = inv.valid_attachments()?;
    let mut store = lock_store(inv, config)?;
    let report = store.gc(|key| keep.contains(key))?;
    if !report.corrupt.is_empty() {
        let paths: Vec<String> = report.corrupt.iter().map(|p| p.display().to_string()).collect();
        return Err(CniError::new(
            codes::STORE,
            "IPAM store failure",
            format!(
                "released what was not listed, but kept unreadable records (repair or remove them): {}",
                paths.join(", ")
            ),
        ));
    }
    Ok(report.released)
}

/// `ferrynet-ipam` as a CNI plugin.
pub struct IpamPlugin;

impl CniPlugin for IpamPlugin {
    fn add(&self, inv: &Invocation) -> Result<CNIResult, CniError> {
        let config = config_of(inv)?;
        let attachment = allocate(inv, &config)?;
        Ok(result_of(&config, &attachment))
    }

    fn del(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = config_of(inv)?;
        release(inv, &config).map(|_| ())
    }

    fn check(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = config_of(inv)?;
        check(inv, &config).map(|_| ())
    }

    fn status(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = config_of(inv)?;
        status(inv, &config)
    }

    fn gc(&self, inv: &Invocation) -> Result<(), CniError> {
        let config = config_of(inv)?;
        gc(inv, &config).map(|_| ())
    }
}

/// True when the `ipam` section names ferrynet's own IPAM, which the main plugin then runs
/// in-process. (Decoding already refused an `ipam` without a `type`, as the spec requires; with
/// no `ipam` at all, ours reports the missing ranges.)
pub fn is_own_ipam(raw: &Value) -> bool {
    matches!(
        raw.pointer("/ipam/type").and_then(Value::as_str),
        None | Some("ferrynet-ipam")
    )
}
