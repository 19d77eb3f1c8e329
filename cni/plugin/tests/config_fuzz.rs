//! A bounded config fuzzer: generated network configs and environments, hostile in the ways the
//! hostile-input review found, go through the plugin's real parsing and validation (the code ADD
//! runs before it touches the kernel). Whatever comes in, nothing panics, a refusal is a
//! spec-shaped error with a config or environment code and bounded details, and whatever is
//! accepted is safe to act on.
//!
//! The seed corpus names one case per class the review reported; the property test mixes those
//! classes with random structure.
use std::{collections::BTreeMap, net::IpAddr};

use ferrynet_cni::config::{IpamBackend, PluginConfig};
use ferrynet_cni_protocol::{CniError, Command, Environment, Invocation, MAX_DETAILS_LEN, codes};
use ferrynet_ipam::{cni_commands, config::SPECIAL_PURPOSE};
use ipnet::IpNet;
use proptest::prelude::*;
use serde_json::{Value, json};

struct Env(BTreeMap<&'static str, String>);

impl Environment for Env {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

fn env(ifname: &str, args: &str) -> Env {
    Env(BTreeMap::from([
        ("CNI_CONTAINERID", "c1".to_string()),
        ("CNI_IFNAME", ifname.to_string()),
        ("CNI_NETNS", "/run/netns/c1".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        ("CNI_ARGS", args.to_string()),
    ]))
}

/// Everything ADD validates before it changes anything.
fn validate(config: &Value, env: &Env) -> Result<PluginConfig, CniError> {
    let inv = Invocation::parse(env, Command::Add, config.to_string().into_bytes()).map_err(|(e, _)| e)?;
    inv.key()?;
    let plugin = PluginConfig::from_invocation(&inv)?;
    cni_commands::request_of(&inv)?;
    Ok(plugin)
}

fn base(ipam: Value) -> Value {
    json!({"cniVersion": "1.1.0", "name": "fuzz", "type": "ferrynet", "ipam": ipam})
}

/// The properties every outcome must have.
fn check(config: &Value, env: &Env, outcome: &Result<PluginConfig, CniError>) {
    match outcome {
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    codes::INCOMPATIBLE_VERSION
                        | codes::UNSUPPORTED_FIELD
                        | codes::INVALID_ENV
                        | codes::DECODE
                        | codes::INVALID_CONFIG
                ),
                "{config}: unexpected code {e:?}"
            );
            let wire: Value =
                serde_json::from_str(&e.to_json(ferrynet_cni_protocol::version::CURRENT_VERSION)).unwrap();
            assert!(
                wire["details"].as_str().unwrap().len() <= MAX_DETAILS_LEN + 64,
                "{config}"
            );
        }
        Ok(plugin) => {
            let ifname = env.var("CNI_IFNAME").unwrap();
            assert!(!ifname.chars().any(char::is_control), "{ifname:?} accepted");
            let IpamBackend::Own(ipam) = &plugin.ipam else {
                return;
            };
            assert!(ipam.data_dir.is_absolute(), "{config}");
            assert!(
                !ipam.data_dir.components().any(|c| c == std::path::Component::ParentDir),
                "{config}"
            );
            assert!(ipam.routes.len() <= ferrynet_ipam::config::MAX_ROUTES, "{config}");
            for route in &ipam.routes {
                assert_eq!(route.dst, route.dst.trunc(), "{config}: route with host bits accepted");
            }
            let special: Vec<IpNet> = SPECIAL_PURPOSE.iter().map(|b| b.parse().unwrap()).collect();
            for range in ipam.range_sets.iter().flat_map(|s| &s.ranges) {
                let inside = |ip: IpAddr| range.start <= ip && ip <= range.end;
                for block in &special {
                    let same_family = block.addr().is_ipv4() == range.start.is_ipv4();
                    assert!(
                        !(same_family
                            && (inside(block.network()) || block.contains(&range.start) || block.contains(&range.end))),
                        "{config}: range {range} touches {block}"
                    );
                }
            }
        }
    }
}

/// One case per class of the hostile-input review, with the code each must get.
#[test]
fn the_seed_corpus_is_refused_with_the_right_codes() {
    let ranges = |subnet: &str| json!([[{ "subnet": subnet }]]);
    let mut cases: Vec<(String, Value, Env, u32)> = Vec::new();
    for block in SPECIAL_PURPOSE {
        cases.push((
            format!("special-purpose {block}"),
            base(json!({"type": "ferrynet-ipam", "ranges": ranges(block)})),
            env("eth0", ""),
            codes::INVALID_CONFIG,
        ));
    }
    let routes: Vec<Value> = (0..10_000)
        .map(|i| json!({"dst": format!("10.{}.{}.0/24", i / 256, i % 256)}))
        .collect();
    cases.push((
        "10,000 routes".into(),
        base(json!({"type": "ferrynet-ipam", "ranges": ranges("10.0.0.0/24"), "routes": routes})),
        env("eth0", ""),
        codes::INVALID_CONFIG,
    ));
    cases.push((
        "route with host bits".into(),
        base(json!({"type": "ferrynet-ipam", "ranges": ranges("10.0.0.0/24"), "routes": [{"dst": "10.1.2.3/24"}]})),
        env("eth0", ""),
        codes::INVALID_CONFIG,
    ));
    for dir in ["relative", "./x", "/var/lib/../etc", "/a/b/.."] {
        cases.push((
            format!("dataDir {dir}"),
            base(json!({"type": "ferrynet-ipam", "ranges": ranges("10.0.0.0/24"), "dataDir": dir})),
            env("eth0", ""),
            codes::INVALID_CONFIG,
        ));
    }
    for ifname in ["eth\u{1b}[31m", "eth\u{7}", "eth0\n", "e\u{85}"] {
        cases.push((
            format!("ifname {ifname:?}"),
            base(json!({"type": "ferrynet-ipam", "ranges": ranges("10.0.0.0/24")})),
            env(ifname, ""),
            codes::INVALID_ENV,
        ));
    }
    for args in ["IP=10.0.0.5;IP=10.0.0.6", "K8S_POD_NAME=a;K8S_POD_NAME=b"] {
        cases.push((
            format!("CNI_ARGS {args}"),
            base(json!({"type": "ferrynet-ipam", "ranges": ranges("10.0.0.0/24")})),
            env("eth0", args),
            codes::INVALID_ENV,
        ));
    }
    for (what, case, env, code) in cases {
        let outcome = validate(&case, &env);
        check(&case, &env, &outcome);
        let err = outcome.err().unwrap_or_else(|| panic!("{what} was accepted"));
        assert_eq!(err.code, code, "{what}: {err:?}");
    }
}

fn hostile_subnet() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(SPECIAL_PURPOSE.to_vec()).prop_map(str::to_string),
        (any::<[u8; 4]>(), 0u8..=33).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
        (any::<[u16; 8]>(), 0u8..=129).prop_map(|(a, p)| format!("{}/{p}", std::net::Ipv6Addr::from(a))),
        Just("10.0.0.0/24".to_string()),
        Just("fd00::/64".to_string()),
        ".{0,20}",
    ]
}

fn hostile_ip() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|a| json!(std::net::Ipv4Addr::from(a).to_string())),
        any::<[u16; 8]>().prop_map(|a| json!(std::net::Ipv6Addr::from(a).to_string())),
        Just(json!(7)),
        Just(json!(null)),
        ".{0,10}".prop_map(|s| json!(s)),
    ]
}

fn hostile_range() -> impl Strategy<Value = Value> {
    (
        hostile_subnet(),
        proptest::option::of(hostile_ip()),
        proptest::option::of(hostile_ip()),
        proptest::option::of(hostile_ip()),
    )
        .prop_map(|(subnet, start, end, gateway)| {
            let mut r = json!({ "subnet": subnet });
            for (k, v) in [("rangeStart", start), ("rangeEnd", end), ("gateway", gateway)] {
                if let Some(v) = v {
                    r[k] = v;
                }
            }
            r
        })
}

fn hostile_route() -> impl Strategy<Value = Value> {
    (hostile_subnet(), proptest::option::of(hostile_ip())).prop_map(|(dst, gw)| match gw {
        Some(gw) => json!({"dst": dst, "gw": gw}),
        None => json!({ "dst": dst }),
    })
}

fn hostile_data_dir() -> impl Strategy<Value = Option<Value>> {
    proptest::option::of(prop_oneof![
        Just(json!("/var/lib/ferrynet/ipam")),
        Just(json!("relative/dir")),
        Just(json!("/var/../etc")),
        Just(json!("")),
        Just(json!(42)),
        "/[a-z./]{0,20}".prop_map(|s| json!(s)),
    ])
}

fn hostile_ifname() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("eth0".to_string()),
        "[a-z0-9]{1,15}",
        "[a-z\\x01-\\x1f\\x7f /:.]{0,20}",
        ".{0,20}".prop_map(|s| s.replace('\0', "")),
    ]
}

fn hostile_args() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".to_string()),
        proptest::collection::vec(
            (
                proptest::sample::select(vec!["IP", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "IgnoreUnknown", "X"]),
                "[0-9a-z.:,]{0,16}"
            ),
            0..5
        )
        .prop_map(|pairs| pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")),
    ]
}

fn hostile_config() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(proptest::collection::vec(hostile_range(), 0..3), 0..3),
        proptest::collection::vec(hostile_route(), 0..6),
        hostile_data_dir(),
        proptest::option::of(prop_oneof![
            any::<u32>().prop_map(|m| json!(m)),
            Just(json!("big")),
            Just(json!(-1))
        ]),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(ranges, routes, data_dir, mtu, lock_timeout)| {
            let mut ipam = json!({"type": "ferrynet-ipam", "ranges": ranges, "routes": routes});
            if let Some(d) = data_dir {
                ipam["dataDir"] = d;
            }
            if let Some(t) = lock_timeout {
                ipam["lockTimeoutMs"] = json!(t);
            }
            let mut config = base(ipam);
            if let Some(m) = mtu {
                config["mtu"] = m;
            }
            config
        })
}

proptest! {
    // Bounded: a few seconds in the test suite. The seeds above pin every class; this explores
    // their combinations.
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_configs_are_refused_cleanly_or_are_safe_to_use(
        config in hostile_config(),
        ifname in hostile_ifname(),
        args in hostile_args(),
    ) {
        let env = env(&ifname, &args);
        let outcome = std::panic::catch_unwind(|| validate(&config, &env))
            .unwrap_or_else(|_| panic!("validation panicked on {config} / {ifname:?} / {args:?}"));
        check(&config, &env, &outcome);
    }
}
