//! Where refused Service traffic goes. The per-packet service path only marks a packet it refuses
//! (a Service port without endpoints, a Service CIDR address nobody holds); the firewall table
//! rejects marked packets. For the packet to reach the firewall whatever the node's routes are (on
//! a node without a default route, routing would drop it with "network unreachable" first), a
//! policy rule sends marked packets to a table of their own, [`REFUSAL_TABLE`], whose one route
//! delivers everything locally (the TPROXY recipe). Delivered locally, the packet meets the
//! firewall's `input` reject before any socket could take it, and the client gets a TCP reset or
//! an ICMP port unreachable from the Service address, as with kube-proxy.
//!
//! Read back ([`observe`]), diffed against what is wanted ([`diff`], pure), applied ([`apply`]).
//! The table is the agent's alone: any rule that looks it up and any route in it that is not the
//! wanted one is removed.
use ferrynet_kernel::{
    ids::{LOOPBACK_IFINDEX, REFUSAL_RULE_PRIORITY, REFUSAL_TABLE, ROUTE_PROTOCOL_AGENT},
    netlink::{Netlink, NetlinkError, NetlinkRequest, RouteSpec, RuleSpec, inspect},
};
use ipnet::IpNet;
use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};

use crate::warning::ErrorList;

/// What one address family has of the refusal path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyState {
    /// Every rule that looks up [`REFUSAL_TABLE`].
    pub rules: Vec<RuleSpec>,
    /// Every route in [`REFUSAL_TABLE`]: its destination, and whether it is the wanted one
    /// (local delivery through loopback).
    pub routes: Vec<(IpNet, bool)>,
}

/// One change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalOp {
    AddRoute(RouteSpec),
    DeleteRoute(RouteSpec),
    AddRule(RuleSpec),
    DeleteRule(RuleSpec),
}

/// The rule: packets the service path marked look up the refusal table.
pub fn rule(ipv4: bool) -> RuleSpec {
    RuleSpec {
        ipv4,
        priority: REFUSAL_RULE_PRIORITY,
        fwmark: ferrynet_common::MARK_REJECT,
        fwmask: ferrynet_common::MARK_MASK,
        table: REFUSAL_TABLE,
        protocol: RouteProtocol::Other(ROUTE_PROTOCOL_AGENT),
    }
}

/// The table's route: every destination is delivered locally.
pub fn route(ipv4: bool) -> RouteSpec {
    let everything: IpNet = if ipv4 {
        "0.0.0.0/0".parse().expect("a valid CIDR")
    } else {
        "::/0".parse().expect("a valid CIDR")
    };
    RouteSpec {
        oif: Some(LOOPBACK_IFINDEX),
        scope: RouteScope::Host,
        table: REFUSAL_TABLE,
        kind: RouteType::Local,
        ..RouteSpec::new(everything, RouteProtocol::Other(ROUTE_PROTOCOL_AGENT))
    }
}

/// The changes that make one family's state `wanted` (on) or absent (off). The route goes in
/// before the rule and out after it, so the rule never points at an empty table.
pub fn diff(observed: &FamilyState, ipv4: bool, wanted: bool) -> Vec<RefusalOp> {
    let want_rule = rule(ipv4);
    let want_route = route(ipv4);
    let same_rule = |r: &RuleSpec| {
        RuleSpec {
            protocol: want_rule.protocol,
            ..*r
        } == want_rule
    };
    let mut ops = Vec::new();
    let has_route = observed
        .routes
        .iter()
        .any(|(dst, ours)| *ours && *dst == want_route.dst);
    if wanted && !has_route {
        ops.push(RefusalOp::AddRoute(want_route));
    }
    let mut has_rule = false;
    for r in &observed.rules {
        if wanted && same_rule(r) && !has_rule {
            has_rule = true;
        } else {
            ops.push(RefusalOp::DeleteRule(*r));
        }
    }
    if wanted && !has_rule {
        ops.push(RefusalOp::AddRule(want_rule));
    }
    for (dst, ours) in &observed.routes {
        if !(wanted && *ours && *dst == want_route.dst) {
            ops.push(RefusalOp::DeleteRoute(RouteSpec {
                dst: *dst,
                kind: if *ours { RouteType::Local } else { RouteType::Unicast },
                ..want_route
            }));
        }
    }
    // A duplicate of the wanted route cannot exist (one destination per table), so deleting
    // by destination never removes the route that is kept.
    ops
}

/// One family's rules and routes of the refusal table.
pub fn observe(netlink: &mut Netlink, ipv4: bool) -> Result<FamilyState, NetlinkError> {
    let rules = netlink
        .rules(ipv4)?
        .iter()
        .map(inspect::rule_spec)
        .filter(|r| r.table == REFUSAL_TABLE)
        .collect();
    let routes = netlink
        .routes(ipv4)?
        .iter()
        .filter(|r| inspect::route_table(r) == REFUSAL_TABLE)
        .filter_map(|r| {
            let dst = inspect::route_dst(r)?;
            let ours = inspect::route_kind(r) == RouteType::Local && inspect::route_oif(r) == Some(LOOPBACK_IFINDEX);
            Some((dst, ours))
        })
        .collect();
    Ok(FamilyState { rules, routes })
}

/// Applies `ops` in order; returns how many changed something. Every change is attempted.
pub fn apply(netlink: &mut Netlink, ops: &[RefusalOp]) -> Result<usize, ErrorList<NetlinkError>> {
    let requests = ops
        .iter()
        .map(|op| match op {
            RefusalOp::AddRoute(r) => NetlinkRequest::add_route(r),
            RefusalOp::DeleteRoute(r) => NetlinkRequest::delete_route(r),
            RefusalOp::AddRule(r) => NetlinkRequest::add_rule(r),
            RefusalOp::DeleteRule(r) => NetlinkRequest::delete_rule(r),
        })
        .collect();
    let mut applied = 0;
    let mut failures = ErrorList::default();
    for result in netlink.apply_each(requests).map_err(|e| ErrorList(vec![e]))? {
        match result {
            Ok(()) => applied += 1,
            // Gone already, or made by a racing pass: the state is what was asked for.
            Err(e) if e.is_not_found() && e.op.starts_with("delete") => {}
            Err(e) if e.is_exists() && e.op.starts_with("add") => {}
            Err(e) => failures.push(e),
        }
    }
    failures.into_result().map(|()| applied)
}

/// Makes both families as wanted: IPv4 always, IPv6 when `ipv6`. Returns the changes made.
pub fn converge(netlink: &mut Netlink, ipv6: bool) -> Result<usize, ErrorList<NetlinkError>> {
    let mut applied = 0;
    let mut errors = ErrorList::default();
    for (ipv4, wanted) in [(true, true), (false, ipv6)] {
        match observe(netlink, ipv4) {
            // A node without IPv6 has nothing to remove and cannot take IPv6 rules.
            Err(e) if !ipv4 && !wanted && e.errno() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => errors.push(e),
            Ok(observed) => match apply(netlink, &diff(&observed, ipv4, wanted)) {
                Ok(n) => applied += n,
                Err(e) => errors.0.extend(e.0),
            },
        }
    }
    errors.into_result().map(|()| applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(rules: Vec<RuleSpec>, routes: Vec<(IpNet, bool)>) -> FamilyState {
        FamilyState { rules, routes }
    }

    #[test]
    fn nothing_yet_gets_the_route_then_the_rule() {
        assert_eq!(
            diff(&FamilyState::default(), true, true),
            [RefusalOp::AddRoute(route(true)), RefusalOp::AddRule(rule(true))]
        );
        assert_eq!(
            diff(&FamilyState::default(), false, true),
            [RefusalOp::AddRoute(route(false)), RefusalOp::AddRule(rule(false))]
        );
        assert!(diff(&FamilyState::default(), false, false).is_empty());
    }

    #[test]
    fn the_wanted_state_is_kept_and_strays_go() {
        let done = have(vec![rule(true)], vec![(route(true).dst, true)]);
        assert!(diff(&done, true, true).is_empty());
        // A rule made by someone else's tool has no protocol: it is still the same rule.
        let unmarked = have(
            vec![RuleSpec {
                protocol: RouteProtocol::Unspec,
                ..rule(true)
            }],
            vec![(route(true).dst, true)],
        );
        assert!(diff(&unmarked, true, true).is_empty());
        let stray_rule = RuleSpec {
            priority: 7,
            ..rule(true)
        };
        let stray_route: IpNet = "10.0.0.0/8".parse().unwrap();
        let messy = have(
            vec![stray_rule, rule(true), rule(true)],
            vec![(route(true).dst, true), (stray_route, false)],
        );
        let ops = diff(&messy, true, true);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(ops[0], RefusalOp::DeleteRule(stray_rule));
        assert_eq!(ops[1], RefusalOp::DeleteRule(rule(true)));
        assert!(matches!(ops[2], RefusalOp::DeleteRoute(r) if r.dst == stray_route && r.kind == RouteType::Unicast));
    }

    #[test]
    fn off_removes_the_rule_before_the_route() {
        let done = have(vec![rule(false)], vec![(route(false).dst, true)]);
        assert_eq!(
            diff(&done, false, false),
            [RefusalOp::DeleteRule(rule(false)), RefusalOp::DeleteRoute(route(false))]
        );
    }
}
