//! The spec versions ferrynet accepts and answers in, and VERSION's negotiation.
use rscni_types::version::SpecVersion;
use serde_json::Value;

use crate::error::CniError;

/// Config versions we accept and answer in. 0.3.0 rides along with 0.3.1: the format is the same.
pub const SUPPORTED_VERSIONS: [SpecVersion; 5] = [
    SpecVersion::new(0, 3, 0),
    SpecVersion::new(0, 3, 1),
    SpecVersion::new(0, 4, 0),
    SpecVersion::new(1, 0, 0),
    SpecVersion::new(1, 1, 0),
];
pub const CURRENT_VERSION: SpecVersion = SpecVersion::new(1, 1, 0);

pub fn version_list() -> Vec<String> {
    SUPPORTED_VERSIONS.iter().map(ToString::to_string).collect()
}

/// The version to answer in: the one stdin declares when we support it, else ours.
pub fn answer_version(input: &[u8]) -> SpecVersion {
    serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .and_then(|v| v.parse::<SpecVersion>().ok())
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(CURRENT_VERSION)
}

/// VERSION's answer, in the version the caller asked with when we know it.
pub fn version_answer(input: &[u8]) -> String {
    serde_json::json!({"cniVersion": answer_version(input).to_string(), "supportedVersions": version_list()})
        .to_string()
}

pub fn parse_version(declared: &str) -> Result<SpecVersion, CniError> {
    if declared.is_empty() {
        return Err(CniError::incompatible_version(format!(
            "the config has no cniVersion (0.1.0); supported: {}",
            version_list().join(", ")
        )));
    }
    let version = declared
        .parse::<SpecVersion>()
        .map_err(|_| CniError::incompatible_version(format!("cniVersion {declared:?} is not a version")))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::incompatible_version(format!(
            "cniVersion {declared} is not supported; supported: {}",
            version_list().join(", ")
        )));
    }
    Ok(version)
}
