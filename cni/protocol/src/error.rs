//! Spec-shaped errors: `{"cniVersion","code","msg","details"}` on stdout, exit status 1.
use rscni_types::version::SpecVersion;
use serde::Serialize;

/// A spec-shaped error: printed as `{"cniVersion","code","msg","details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Error codes. 1-99 are the spec's; 100 and up are ferrynet's own.
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// Every address of a range set is in use.
    pub const NO_FREE_ADDRESS: u32 = 100;
    /// CHECK found the container's networking different from what ADD set up.
    pub const CHECK_FAILED: u32 = 101;
    /// The kernel refused a network change (netlink, sysctl, namespace).
    pub const KERNEL: u32 = 102;
    /// The allocation store could not be read or written.
    pub const STORE: u32 = 103;
    /// A delegated plugin failed without a CNI error of its own.
    pub const DELEGATE: u32 = 104;
    /// A requested address is taken or outside the ranges.
    pub const ADDRESS_UNAVAILABLE: u32 = 105;
    /// A bug: ferrynet caught its own panic.
    pub const INTERNAL: u32 = 999;
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
    pub fn incompatible_version(details: impl Into<String>) -> Self {
        Self::new(codes::INCOMPATIBLE_VERSION, "incompatible CNI version", details)
    }
    pub fn invalid_env(details: impl Into<String>) -> Self {
        Self::new(codes::INVALID_ENV, "invalid environment variables", details)
    }
    pub fn decode(details: impl Into<String>) -> Self {
        Self::new(codes::DECODE, "failed to decode network config", details)
    }
    pub fn invalid_config(details: impl Into<String>) -> Self {
        Self::new(codes::INVALID_CONFIG, "invalid network config", details)
    }
    pub fn unknown_container(details: impl Into<String>) -> Self {
        Self::new(codes::UNKNOWN_CONTAINER, "container unknown or does not exist", details)
    }
    pub fn kernel(details: impl Into<String>) -> Self {
        Self::new(codes::KERNEL, "kernel network operation failed", details)
    }
    pub fn check_failed(details: impl Into<String>) -> Self {
        Self::new(
            codes::CHECK_FAILED,
            "container networking differs from what ADD set up",
            details,
        )
    }
    pub fn not_available(details: impl Into<String>) -> Self {
        Self::new(codes::NOT_AVAILABLE, "plugin not available", details)
    }
    pub fn limited_connectivity(details: impl Into<String>) -> Self {
        Self::new(
            codes::LIMITED_CONNECTIVITY,
            "plugin not available, existing containers may have limited connectivity",
            details,
        )
    }

    /// The error as the spec's JSON. `details` is cut to [`MAX_DETAILS_LEN`] bytes (on a
    /// character boundary, marked): a runtime logs it, and no failure should flood a log.
    pub fn to_json(&self, version: SpecVersion) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: String,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version: version.to_string(),
            code: self.code,
            msg: &self.msg,
            details: &bounded_details(&self.details),
        })
        .expect("error serialises")
    }
}

/// The most bytes of `details` an error prints.
pub const MAX_DETAILS_LEN: usize = 4096;

fn bounded_details(details: &str) -> std::borrow::Cow<'_, str> {
    if details.len() <= MAX_DETAILS_LEN {
        return details.into();
    }
    let mut cut = MAX_DETAILS_LEN;
    while !details.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} more bytes)", &details[..cut], details.len() - cut).into()
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}): {}", self.msg, self.code, self.details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_bounded_on_a_character_boundary() {
        let long = "é".repeat(10_000);
        let json: serde_json::Value =
            serde_json::from_str(&CniError::kernel(long).to_json(crate::version::CURRENT_VERSION)).unwrap();
        let details = json["details"].as_str().unwrap();
        assert!(details.len() <= MAX_DETAILS_LEN + 40, "{}", details.len());
        assert!(
            details.ends_with("(15904 more bytes)"),
            "{}",
            &details[details.len() - 30..]
        );
        let short: serde_json::Value =
            serde_json::from_str(&CniError::kernel("short").to_json(crate::version::CURRENT_VERSION)).unwrap();
        assert_eq!(short["details"], "short");
    }
}
