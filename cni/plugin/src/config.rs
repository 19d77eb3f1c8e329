//! The `ferrynet` plugin's own network config fields:
//!
//! ```json
//! {"cniVersion": "1.1.0", "name": "ferrynet", "type": "ferrynet", "mtu": 1450,
//!  "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.244.1.0/24"}]]}}
//! ```
//!
//! `mtu` is optional: without it the plugin uses the MTU of the host's default-route interface
//! (the agent always writes it, derived from the uplink minus overlay overhead).
use ferrynet_cni_protocol::{CniError, Invocation};
use ferrynet_ipam::{IpamConfig, cni_commands};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    datapath: Option<RawDatapath>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDatapath {
    pin_path: std::path::PathBuf,
}

/// Where addresses come from.
#[derive(Debug, Clone)]
pub enum IpamBackend {
    /// ferrynet's own IPAM, run in-process.
    Own(IpamConfig),
    /// Another IPAM plugin, executed from CNI_PATH as the spec's delegation describes.
    Delegated(String),
}

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub network: String,
    pub mtu: Option<u32>,
    pub ipam: IpamBackend,
    /// Where the agent pins the service datapath (`{"datapath": {"pinPath": ...}}`): its pod
    /// programs are attached to each new pod's veth, when they are there.
    pub datapath_pins: Option<std::path::PathBuf>,
}

impl PluginConfig {
    pub fn from_invocation(inv: &Invocation) -> Result<Self, CniError> {
        let raw: RawConfig =
            serde_json::from_value(inv.raw.clone()).map_err(|e| CniError::invalid_config(e.to_string()))?;
        let ipam = if cni_commands::is_own_ipam(&inv.raw) {
            IpamBackend::Own(cni_commands::config_of(inv)?)
        } else {
            IpamBackend::Delegated(inv.config.ipam.as_ref().map(|i| i.r#type.clone()).unwrap_or_default())
        };
        if let Some(mtu) = raw.mtu {
            let has_v6 = matches!(&ipam, IpamBackend::Own(c) if c.range_sets.iter().any(|s| !s.is_ipv4()));
            let min = if has_v6 { 1280 } else { 68 };
            if !(min..=65535).contains(&mtu) {
                return Err(CniError::invalid_config(format!("mtu {mtu} is outside {min}..=65535")));
            }
        }
        let datapath_pins = match raw.datapath {
            Some(d) if !d.pin_path.is_absolute() => {
                return Err(CniError::invalid_config(format!(
                    "datapath.pinPath {} is not an absolute path",
                    d.pin_path.display()
                )));
            }
            Some(d) => Some(d.pin_path),
            None => None,
        };
        Ok(Self {
            network: inv.config.name.clone(),
            mtu: raw.mtu,
            ipam,
            datapath_pins,
        })
    }
}

#[cfg(test)]
mod tests {
    use ferrynet_cni_protocol::{Command, Environment, Invocation, codes};
    use serde_json::{Value, json};

    use super::*;

    /// The environment of an ADD.
    struct AddEnv;
    impl Environment for AddEnv {
        fn var(&self, name: &str) -> Option<String> {
            match name {
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_NETNS" => Some("/run/netns/c1".into()),
                "CNI_PATH" => Some("/opt/cni/bin".into()),
                _ => None,
            }
        }
    }

    fn parse(config: Value) -> Result<PluginConfig, CniError> {
        let inv = Invocation::parse(&AddEnv, Command::Add, config.to_string().into_bytes()).map_err(|(e, _)| e)?;
        PluginConfig::from_invocation(&inv)
    }

    fn config(extra: Value) -> Value {
        let mut c = json!({"cniVersion": "1.1.0", "name": "podnet", "type": "ferrynet",
                           "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:244:1::/64"}]]}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn own_ipam_runs_in_process_and_the_mtu_is_optional() {
        let c = parse(config(json!({"mtu": 1450}))).unwrap();
        assert_eq!(c.network, "podnet");
        assert_eq!(c.mtu, Some(1450));
        assert!(matches!(&c.ipam, IpamBackend::Own(ipam) if ipam.range_sets.len() == 2));
        assert_eq!(parse(config(json!({}))).unwrap().mtu, None);
        // The spec requires an ipam section to name its type.
        let untyped = parse(config(json!({"ipam": {"ranges": [[{"subnet": "10.0.0.0/24"}]]}}))).unwrap_err();
        assert_eq!(untyped.code, codes::DECODE, "{untyped:?}");
    }

    #[test]
    fn another_ipam_type_is_delegated() {
        let c = parse(config(
            json!({"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.0.0.0/24"}]]}}),
        ))
        .unwrap();
        assert!(matches!(c.ipam, IpamBackend::Delegated(ref kind) if kind == "host-local"));
    }

    #[test]
    fn an_mtu_the_kernel_cannot_use_is_invalid_config() {
        // IPv6 needs at least 1280.
        for mtu in [0, 1279, 65536] {
            let err = parse(config(json!({"mtu": mtu}))).unwrap_err();
            assert_eq!(err.code, codes::INVALID_CONFIG, "{mtu}: {err:?}");
        }
        let v4_only = json!({"mtu": 576, "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.0.0.0/24"}]]}});
        assert_eq!(parse(config(v4_only)).unwrap().mtu, Some(576));
        let v4_tiny = json!({"mtu": 67, "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.0.0.0/24"}]]}});
        assert_eq!(parse(config(v4_tiny)).unwrap_err().code, codes::INVALID_CONFIG);
        // Not a number at all.
        assert_eq!(
            parse(config(json!({"mtu": "big"}))).unwrap_err().code,
            codes::INVALID_CONFIG
        );
    }

    #[test]
    fn a_broken_ipam_section_is_invalid_config() {
        for ipam in [
            json!({"type": "ferrynet-ipam"}),
            json!({"type": "ferrynet-ipam", "ranges": [[{"subnet": "not-a-cidr"}]]}),
            json!({"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/24"}]]}),
        ] {
            let err = parse(config(json!({ "ipam": ipam }))).unwrap_err();
            assert_eq!(err.code, codes::INVALID_CONFIG, "{ipam}: {err:?}");
        }
    }
}
