//! One plugin invocation, decoded: `CNI_COMMAND` and the other `CNI_*` variables, and the network
//! config from stdin. Also delegation: running another plugin exactly as a runtime would.
use std::{
    ffi::OsStr,
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    str::FromStr,
};

use rscni_types::{
    legacy,
    types::{CNIResult, CNIResultWithVersion, NetConf},
    version::SpecVersion,
};
use serde_json::Value;

use crate::{
    args::CniArgs,
    attachment::{AttachmentKey, is_valid_name},
    error::{CniError, codes},
    version::{CURRENT_VERSION, parse_version},
};

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
        if !is_valid_name(&config.name) {
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

/// containerd's CRI plugin sends `portMappings` entries with Go's field names (`HostPort`,
/// `ContainerPort`, `Protocol`, `HostIP`); podman and the spec use camelCase. Accept both by
/// rewriting the former into the latter.
pub(crate) fn normalise_port_mappings(raw: &mut Value) {
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
