//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
use crate::error::CniError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Keys every ferrynet plugin understands. Others are an error unless `IgnoreUnknown` is set,
    /// as with the reference plugins.
    pub const KNOWN: [&'static str; 6] = [
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "IP",
    ];

    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let mut pairs = Vec::new();
        for part in raw.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| CniError::invalid_env(format!("CNI_ARGS entry {part:?} is not KEY=VALUE")))?;
            pairs.push((k.to_string(), v.to_string()));
        }
        let args = Self { pairs };
        if !args.ignore_unknown()
            && let Some((k, _)) = args.pairs.iter().find(|(k, _)| !Self::KNOWN.contains(&k.as_str()))
        {
            return Err(CniError::invalid_env(format!(
                "CNI_ARGS has unknown key {k:?} (set IgnoreUnknown=1 to allow)"
            )));
        }
        Ok(args)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn ignore_unknown(&self) -> bool {
        self.get("IgnoreUnknown")
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.get("K8S_POD_NAME").filter(|v| !v.is_empty())
    }
}
