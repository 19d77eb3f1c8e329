//! The `ferrynet` plugin's own network config fields:
//!
//! ```json
//! {"cniVersion": "1.1.0", "name": "ferrynet", "type": "ferrynet", "mtu": 1450,
//!  "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.244.1.0/24"}]]}}
//! ```
//!
//! `mtu` is optional: without it the plugin uses the MTU of the host's default-route interface
//! (the agent always writes it, derived from the uplink minus overlay overhead).
use ferrynet_ipam::{
    IpamConfig, ipam_plugin,
    plugin::{CniError, Invocation},
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    mtu: Option<u32>,
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
}

impl PluginConfig {
    pub fn from_invocation(inv: &Invocation) -> Result<Self, CniError> {
        let raw: RawConfig =
            serde_json::from_value(inv.raw.clone()).map_err(|e| CniError::invalid_config(e.to_string()))?;
        let ipam = if ipam_plugin::is_own_ipam(&inv.raw) {
            IpamBackend::Own(ipam_plugin::config_of(inv)?)
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
        Ok(Self {
            network: inv.config.name.clone(),
            mtu: raw.mtu,
            ipam,
        })
    }
}
