//! The CNI plugin protocol (spec 1.1.0), shared by `ferrynet` and `ferrynet-ipam`.
//!
//! Wire types (network config, results, legacy result encoding) come from `rscni-types`. The
//! dispatcher is our own. `rscni-plugin`'s `Plugin::run` reads stdin and deserialises the whole
//! config strictly before plugin code runs, and its `portMappings` type only knows camelCase
//! keys. containerd's CRI plugin sends them capitalised (`HostPort`, `ContainerPort`), so every
//! pod with a hostPort would fail with code 6 before ferrynet saw it. Here stdin is read once,
//! normalised, and then decoded.
use std::{
    ffi::OsStr,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    str::FromStr,
};

use rscni_types::{
    legacy,
    types::{CNIResult, CNIResultWithVersion, NetConf},
    version::SpecVersion,
};
use serde::Serialize;
use serde_json::Value;

use crate::{error::IpamError, store::AttachmentKey};

/// Config versions we accept and answer in. 0.3.0 rides along with 0.3.1: the format is the same.
pub const SUPPORTED_VERSIONS: [SpecVersion; 5] = [
    SpecVersion::new(0, 3, 0),
    SpecVersion::new(0, 3, 1),
    SpecVersion::new(0, 4, 0),
    SpecVersion::new(1, 0, 0),
    SpecVersion::new(1, 1, 0),
];
pub const CURRENT_VERSION: SpecVersion = SpecVersion::new(1, 1, 0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl FromStr for Command {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => return Err(CniError::invalid_env(format!("unknown CNI_COMMAND {other:?}"))),
        })
    }
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

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

    fn to_json(&self, version: SpecVersion) -> String {
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
            details: &self.details,
        })
        .expect("error serialises")
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}): {}", self.msg, self.code, self.details)
    }
}

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
            IpamError::Io { .. } | IpamError::Corrupt { .. } => Self::new(codes::STORE, "IPAM store failure", details),
        }
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
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

/// One invocation: the environment and the decoded config.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
    /// The config's version, which results and errors are answered in.
    pub version: SpecVersion,
    /// Typed view of the config.
    pub config: NetConf,
    /// The whole config (after key normalisation), for plugin-specific fields.
    pub raw: Value,
    /// stdin exactly as received, handed unchanged to delegated plugins.
    pub stdin: Vec<u8>,
}

/// Something that reads process environment variables; the real one is `std::env`.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Invocation {
    /// Decodes an invocation. On error, also returns the version to answer the error in.
    pub fn parse(env: &impl Environment, command: Command, stdin: Vec<u8>) -> Result<Self, (CniError, SpecVersion)> {
        let mut raw: Value = serde_json::from_slice(&stdin)
            .map_err(|e| (CniError::decode(format!("stdin is not JSON: {e}")), CURRENT_VERSION))?;
        if !raw.is_object() {
            return Err((CniError::decode("network config is not a JSON object"), CURRENT_VERSION));
        }
        normalise_port_mappings(&mut raw);
        // Decode the version first, so that every later error is answered in it.
        let declared = raw.get("cniVersion").and_then(Value::as_str).unwrap_or("");
        let version = parse_version(declared).map_err(|e| (e, CURRENT_VERSION))?;
        let fail = |e: CniError| (e, version);
        let config: NetConf = serde_json::from_value(raw.clone()).map_err(|e| fail(CniError::decode(e.to_string())))?;
        let floor = match command {
            Command::Check => SpecVersion::new(0, 4, 0),
            Command::Status | Command::Gc => SpecVersion::new(1, 1, 0),
            _ => SpecVersion::new(0, 0, 0),
        };
        if version < floor {
            return Err(fail(CniError::incompatible_version(format!(
                "{} needs cniVersion {floor} or later, the config has {version}",
                command.as_str()
            ))));
        }
        if config.name.is_empty() {
            return Err(fail(CniError::invalid_config("missing network name")));
        }
        if !crate::store::is_valid_name(&config.name) {
            return Err(fail(CniError::invalid_config(format!(
                "invalid network name {:?}",
                config.name
            ))));
        }

        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = env.var("CNI_CONTAINERID");
        let ifname = env.var("CNI_IFNAME");
        let netns = env.var("CNI_NETNS").map(PathBuf::from);
        if needs_container {
            let mut missing = Vec::new();
            if container_id.is_none() {
                missing.push("CNI_CONTAINERID");
            }
            if ifname.is_none() {
                missing.push("CNI_IFNAME");
            }
            // DEL must work without a netns: containerd's second DEL sends CNI_NETNS="".
            if netns.is_none() && command != Command::Del {
                missing.push("CNI_NETNS");
            }
            if !missing.is_empty() {
                return Err(fail(CniError::invalid_env(format!(
                    "required variables missing: {}",
                    missing.join(", ")
                ))));
            }
            AttachmentKey::new(container_id.as_deref().unwrap_or(""), ifname.as_deref().unwrap_or(""))
                .map_err(|e| fail(CniError::invalid_env(e.to_string())))?;
        }
        let args = CniArgs::parse(&env.var("CNI_ARGS").unwrap_or_default()).map_err(fail)?;
        let path = env
            .var("CNI_PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
            version,
            config,
            raw,
            stdin,
        })
    }

    /// The (container ID, ifname) key of ADD, DEL and CHECK.
    pub fn key(&self) -> Result<AttachmentKey, CniError> {
        AttachmentKey::new(
            self.container_id.as_deref().unwrap_or(""),
            self.ifname.as_deref().unwrap_or(""),
        )
        .map_err(|e| CniError::invalid_env(e.to_string()))
    }

    /// GC's keep list: `cni.dev/valid-attachments`, or the older `cni.dev/attachments`.
    pub fn valid_attachments(&self) -> Result<Vec<AttachmentKey>, CniError> {
        let list = self
            .raw
            .get("cni.dev/valid-attachments")
            .or_else(|| self.raw.get("cni.dev/attachments"));
        // A missing list is an error, not "nothing is valid": releasing everything because a
        // runtime left the key out would cut every pod off.
        let Some(list) = list else {
            return Err(CniError::invalid_config(
                "GC needs cni.dev/valid-attachments (an empty list releases everything)",
            ));
        };
        let entries = list
            .as_array()
            .ok_or_else(|| CniError::invalid_config("cni.dev/valid-attachments is not a list"))?;
        entries
            .iter()
            .map(|e| {
                let cid = e.get("containerID").and_then(Value::as_str).unwrap_or("");
                let ifname = e.get("ifname").and_then(Value::as_str).unwrap_or("");
                AttachmentKey::new(cid, ifname)
                    .map_err(|err| CniError::invalid_config(format!("valid-attachments: {err}")))
            })
            .collect()
    }

    /// Finds an executable plugin `kind` on `CNI_PATH`.
    pub fn find_plugin(&self, kind: &str) -> Result<PathBuf, CniError> {
        if kind.is_empty() || kind.contains('/') {
            return Err(CniError::invalid_config(format!("invalid plugin type {kind:?}")));
        }
        if self.path.is_empty() {
            return Err(CniError::invalid_env(format!(
                "CNI_PATH is not set, so plugin {kind:?} cannot be found"
            )));
        }
        self.path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::invalid_config(format!("plugin {kind:?} not found on CNI_PATH")))
    }

    /// Runs plugin `kind` with this invocation's environment and stdin (CNI delegation), for
    /// `command`. Returns its result for ADD.
    pub fn delegate(&self, kind: &str, command: Command) -> Result<Option<CNIResult>, CniError> {
        let exe = self.find_plugin(kind)?;
        run_plugin(&exe, command, &self.stdin)
    }

    /// Encodes `result` in the config's version.
    pub fn encode_result(&self, mut result: CNIResult) -> String {
        if self.version < SpecVersion::new(1, 1, 0) {
            // Interface MTU, socketPath and pciID are 1.1.0 additions.
            for iface in &mut result.interfaces {
                iface.mtu = None;
                iface.socket_path = None;
                iface.pci_id = None;
            }
        }
        if self.version.is_legacy() {
            serde_json::to_string(&legacy::CNIResult::new(self.version, result))
        } else {
            serde_json::to_string(&CNIResultWithVersion::new(self.version, result))
        }
        .expect("result serialises")
    }
}

/// Runs a CNI plugin executable as a runtime would (environment inherited, `command` set, config
/// on stdin), and decodes its answer.
pub fn run_plugin(exe: &Path, command: Command, stdin: &[u8]) -> Result<Option<CNIResult>, CniError> {
    let mut child = std::process::Command::new(exe)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(
                codes::DELEGATE,
                "delegated plugin failed",
                format!("{}: {e}", exe.display()),
            )
        })?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin);
    }
    let output = child.wait_with_output().map_err(|e| {
        CniError::new(
            codes::DELEGATE,
            "delegated plugin failed",
            format!("{}: {e}", exe.display()),
        )
    })?;
    let name = exe.file_name().unwrap_or(OsStr::new("?")).to_string_lossy();
    if !output.status.success() {
        let parsed: Option<Value> = serde_json::from_slice(&output.stdout).ok();
        return Err(
            match parsed.as_ref().and_then(|v| v.get("code")).and_then(Value::as_u64) {
                Some(code) => CniError::new(
                    code as u32,
                    parsed
                        .as_ref()
                        .and_then(|v| v.get("msg"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    format!(
                        "{name}: {}",
                        parsed
                            .as_ref()
                            .and_then(|v| v.get("details"))
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    ),
                ),
                None => CniError::new(
                    codes::DELEGATE,
                    "delegated plugin failed",
                    format!(
                        "{name} exited with {}: {}",
                        output.status,
                        String::from_utf8_lossy(&output.stdout)
                    ),
                ),
            },
        );
    }
    if command != Command::Add {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout).map(Some).map_err(|e| {
        CniError::new(
            codes::DELEGATE,
            "delegated plugin returned an undecodable result",
            format!("{name}: {e}"),
        )
    })
}

/// What a plugin does for each command.
pub trait Plugin {
    fn add(&self, inv: &Invocation) -> Result<CNIResult, CniError>;
    fn del(&self, inv: &Invocation) -> Result<(), CniError>;
    fn check(&self, inv: &Invocation) -> Result<(), CniError>;
    fn status(&self, inv: &Invocation) -> Result<(), CniError>;
    fn gc(&self, inv: &Invocation) -> Result<(), CniError>;
}

/// The whole process: read the environment and stdin, run the command, print the answer.
/// Never panics outward: a panic becomes a code 999 error on stdout.
pub fn main(plugin: &impl Plugin, about: &str) -> ExitCode {
    let stdout = std::io::stdout();
    let (answer, ok) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(plugin, about, &ProcessEnv, &mut std::io::stdin())
    })) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (
                CniError::new(codes::INTERNAL, "internal error", what).to_json(CURRENT_VERSION),
                false,
            )
        }
    };
    let mut out = stdout.lock();
    let _ = out.write_all(answer.as_bytes()).and_then(|()| out.flush());
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Runs one command; returns what to print on stdout and whether it succeeded.
pub fn dispatch(plugin: &impl Plugin, about: &str, env: &impl Environment, stdin: &mut impl Read) -> (String, bool) {
    let Some(raw_command) = env.var("CNI_COMMAND") else {
        eprintln!(
            "{about}\nCNI protocol versions supported: {}",
            version_list().join(", ")
        );
        return (String::new(), true);
    };
    let mut input = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut input) {
        return (
            CniError::new(codes::IO_FAILURE, "I/O failure", format!("reading stdin: {e}")).to_json(CURRENT_VERSION),
            false,
        );
    }
    let command = match raw_command.parse::<Command>() {
        Ok(c) => c,
        Err(e) => return (e.to_json(answer_version(&input)), false),
    };
    if command == Command::Version {
        return (version_answer(&input), true);
    }
    let inv = match Invocation::parse(env, command, input) {
        Ok(inv) => inv,
        Err((e, version)) => return (e.to_json(version), false),
    };
    let outcome = match command {
        Command::Add => plugin.add(&inv).map(|r| inv.encode_result(r)),
        Command::Del => plugin.del(&inv).map(|()| String::new()),
        Command::Check => plugin.check(&inv).map(|()| String::new()),
        Command::Status => plugin.status(&inv).map(|()| String::new()),
        Command::Gc => plugin.gc(&inv).map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    };
    match outcome {
        Ok(out) => (out, true),
        Err(e) => (e.to_json(inv.version), false),
    }
}

fn version_list() -> Vec<String> {
    SUPPORTED_VERSIONS.iter().map(ToString::to_string).collect()
}

/// The version to answer in: the one stdin declares when we support it, else ours.
fn answer_version(input: &[u8]) -> SpecVersion {
    serde_json::from_slice::<Value>(input)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .and_then(|v| v.parse::<SpecVersion>().ok())
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(CURRENT_VERSION)
}

/// VERSION's answer, in the version the caller asked with when we know it.
fn version_answer(input: &[u8]) -> String {
    serde_json::json!({"cniVersion": answer_version(input).to_string(), "supportedVersions": version_list()})
        .to_string()
}

fn parse_version(declared: &str) -> Result<SpecVersion, CniError> {
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

/// containerd's CRI plugin sends `portMappings` entries with Go's field names (`HostPort`,
/// `ContainerPort`, `Protocol`, `HostIP`); podman and the spec use camelCase. Accept both by
/// rewriting the former into the latter.
fn normalise_port_mappings(raw: &mut Value) {
    let Some(mappings) = raw
        .pointer_mut("/runtimeConfig/portMappings")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for mapping in mappings.iter_mut().filter_map(Value::as_object_mut) {
        for (from, to) in [
            ("HostPort", "hostPort"),
            ("ContainerPort", "containerPort"),
            ("Protocol", "protocol"),
            ("HostIP", "hostIP"),
        ] {
            if !mapping.contains_key(to)
                && let Some(v) = mapping.remove(from)
            {
                mapping.insert(to.to_string(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);
    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).filter(|v| !v.is_empty()).map(|v| v.to_string())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> FakeEnv {
        FakeEnv(pairs.iter().copied().collect())
    }

    fn add_env() -> FakeEnv {
        env(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
    }

    /// Echoes the invocation it was given, so dispatch can be tested without side effects.
    struct Echo;
    impl Plugin for Echo {
        fn add(&self, inv: &Invocation) -> Result<CNIResult, CniError> {
            Ok(CNIResult {
                ips: vec![rscni_types::types::IpConfig {
                    interface: Some(0),
                    address: "10.0.0.5/32".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                }],
                interfaces: vec![rscni_types::types::Interface {
                    name: inv.ifname.clone().unwrap(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1450),
                    sandbox: inv.netns.as_ref().map(|p| p.display().to_string()),
                    socket_path: None,
                    pci_id: None,
                }],
                ..Default::default()
            })
        }
        fn del(&self, _: &Invocation) -> Result<(), CniError> {
            Ok(())
        }
        fn check(&self, _: &Invocation) -> Result<(), CniError> {
            Ok(())
        }
        fn status(&self, _: &Invocation) -> Result<(), CniError> {
            Err(CniError::not_available("because"))
        }
        fn gc(&self, inv: &Invocation) -> Result<(), CniError> {
            inv.valid_attachments().map(|_| ())
        }
    }

    fn run(command: &'static str, mut e: FakeEnv, stdin: Value) -> (Value, bool) {
        e.0.insert("CNI_COMMAND", command);
        let bytes = stdin.to_string().into_bytes();
        let (out, ok) = dispatch(&Echo, "about", &e, &mut bytes.as_slice());
        (
            if out.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&out).unwrap()
            },
            ok,
        )
    }

    fn conf(version: &str) -> Value {
        json!({"cniVersion": version, "name": "net", "type": "echo"})
    }

    #[test]
    fn add_answers_in_each_supported_version() {
        for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let (out, ok) = run("ADD", add_env(), conf(version));
            assert!(ok, "{version}: {out}");
            assert_eq!(out["cniVersion"], version);
            let legacy = version.starts_with('0');
            assert_eq!(out["ips"][0].get("version").is_some(), legacy, "{version}: {out}");
            assert_eq!(
                out["interfaces"][0].get("mtu").is_some(),
                version == "1.1.0",
                "{version}: {out}"
            );
        }
    }

    #[test]
    fn version_negotiation() {
        let mut e = env(&[]);
        e.0.insert("CNI_COMMAND", "VERSION");
        let (out, ok) = dispatch(&Echo, "", &e, &mut br#"{"cniVersion":"0.4.0"}"#.as_slice());
        assert!(ok);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let (out, _) = dispatch(&Echo, "", &e, &mut b"".as_slice());
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["cniVersion"], "1.1.0");
    }

    #[test]
    fn errors_carry_spec_codes_and_the_config_version() {
        let cases: Vec<(&'static str, FakeEnv, Value, u32)> = vec![
            ("ADD", add_env(), conf("0.2.0"), 1),
            ("ADD", add_env(), conf("banana"), 1),
            ("ADD", add_env(), json!({"name": "n", "type": "x"}), 1),
            ("CHECK", add_env(), conf("0.3.1"), 1),
            ("STATUS", env(&[]), conf("1.0.0"), 1),
            ("GC", env(&[]), conf("0.4.0"), 1),
            (
                "ADD",
                env(&[("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]),
                conf("1.0.0"),
                4,
            ),
            (
                "ADD",
                env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")]),
                conf("1.0.0"),
                4,
            ),
            (
                "ADD",
                env(&[
                    ("CNI_CONTAINERID", "bad id!"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                ]),
                conf("1.0.0"),
                4,
            ),
            (
                "ADD",
                env(&[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "waytoolonginterfacename"),
                    ("CNI_NETNS", "/x"),
                ]),
                conf("1.0.0"),
                4,
            ),
            (
                "ADD",
                env(&[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_ARGS", "FOO=bar"),
                ]),
                conf("1.0.0"),
                4,
            ),
            (
                "ADD",
                env(&[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_ARGS", "garbage"),
                ]),
                conf("1.0.0"),
                4,
            ),
            ("BOGUS", add_env(), conf("1.0.0"), 4),
            ("ADD", add_env(), json!({"cniVersion": "1.0.0", "type": "x"}), 7),
            (
                "ADD",
                add_env(),
                json!({"cniVersion": "1.0.0", "name": "a/b", "type": "x"}),
                7,
            ),
            ("ADD", add_env(), json!({"cniVersion": "1.0.0", "name": "n"}), 6),
            ("ADD", add_env(), json!(["not", "an", "object"]), 6),
            ("STATUS", env(&[]), conf("1.1.0"), 50),
            (
                "GC",
                env(&[]),
                json!({"cniVersion": "1.1.0", "name": "n", "type": "x", "cni.dev/valid-attachments": [{"containerID": "", "ifname": "eth0"}]}),
                7,
            ),
        ];
        for (command, e, stdin, code) in cases {
            let (out, ok) = run(command, e, stdin.clone());
            assert!(!ok, "{command} {stdin} should fail");
            assert_eq!(out["code"], code, "{command} {stdin}: {out}");
            assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(out.get("details").is_some());
            let expected_version = stdin
                .get("cniVersion")
                .and_then(Value::as_str)
                .filter(|v| SUPPORTED_VERSIONS.iter().any(|s| s.to_string() == *v))
                .unwrap_or("1.1.0");
            assert_eq!(out["cniVersion"], expected_version, "{command} {stdin}: {out}");
        }
        let mut e = add_env();
        e.0.insert("CNI_COMMAND", "ADD");
        let (out, ok) = dispatch(&Echo, "", &e, &mut b"{not json".as_slice());
        assert!(!ok);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], 6);
    }

    #[test]
    fn del_without_netns_is_accepted() {
        let (_, ok) = run(
            "DEL",
            env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "")]),
            conf("1.0.0"),
        );
        assert!(ok);
    }

    #[test]
    fn cri_and_podman_port_mappings_both_decode() {
        for mappings in [
            json!([{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}]),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]),
        ] {
            let mut stdin = conf("1.0.0");
            stdin["runtimeConfig"] = json!({"portMappings": mappings});
            let mut e = add_env();
            e.0.insert("CNI_COMMAND", "ADD");
            let bytes = stdin.to_string().into_bytes();
            let inv = Invocation::parse(&e, Command::Add, bytes).unwrap();
            let pm = &inv.config.runtime_config.as_ref().unwrap().port_mappings[0];
            assert_eq!((pm.host_port, pm.container_port), (8080, 80));
        }
    }

    #[test]
    fn cni_args_with_ignore_unknown_and_k8s_keys() {
        let a = CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u;FOO=1;IgnoreUnknown=1").unwrap();
        assert_eq!(a.pod_namespace(), Some("default"));
        assert_eq!(a.pod_name(), Some("web-0"));
        assert_eq!(a.get("FOO"), Some("1"));
        assert!(CniArgs::parse("FOO=1").is_err());
        assert!(CniArgs::parse("").unwrap().pod_name().is_none());
    }

    #[test]
    fn valid_attachments_accepts_both_keys() {
        let mut e = env(&[]);
        e.0.insert("CNI_COMMAND", "GC");
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let mut stdin = conf("1.1.0");
            stdin[key] = json!([{"containerID": "c1", "ifname": "eth0"}]);
            let inv = Invocation::parse(&e, Command::Gc, stdin.to_string().into_bytes()).unwrap();
            let keep = inv.valid_attachments().unwrap();
            assert_eq!(keep, vec![AttachmentKey::new("c1", "eth0").unwrap()]);
        }
    }
}
