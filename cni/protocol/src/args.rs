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
            // A key given twice is ambiguous (which IP= or pod name is meant?): refuse it rather
            // than silently take one.
            if pairs.iter().any(|(seen, _): &(String, String)| seen == k) {
                return Err(CniError::invalid_env(format!("CNI_ARGS gives {k:?} more than once")));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_read_and_unknown_keys_need_ignore_unknown() {
        let args = CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;IP=10.0.0.5").unwrap();
        assert_eq!(args.pod_namespace(), Some("default"));
        assert_eq!(args.get("IP"), Some("10.0.0.5"));
        assert!(CniArgs::parse("FOO=1").is_err());
        assert_eq!(CniArgs::parse("IgnoreUnknown=1;FOO=1").unwrap().get("FOO"), Some("1"));
        assert!(CniArgs::parse("novalue").is_err());
    }

    #[test]
    fn a_key_given_twice_is_an_error() {
        for raw in [
            "IP=10.0.0.5;IP=10.0.0.6",
            "K8S_POD_NAME=a;K8S_POD_NAME=a",
            "IgnoreUnknown=1;X=1;X=2",
        ] {
            let err = CniArgs::parse(raw).unwrap_err();
            assert_eq!(err.code, crate::codes::INVALID_ENV, "{raw}");
            assert!(err.details.contains("more than once"), "{raw}: {}", err.details);
        }
    }
}
