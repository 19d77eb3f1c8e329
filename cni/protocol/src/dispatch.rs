//! The process entry point both plugins share, and the trait they implement.
use std::{
    io::{Read, Write},
    process::ExitCode,
};

use rscni_types::types::CNIResult;

use crate::{
    error::{CniError, codes},
    invocation::{Command, Environment, Invocation, ProcessEnv},
    version::{CURRENT_VERSION, answer_version, version_answer, version_list},
};

/// What a plugin does for each command.
pub trait CniPlugin {
    fn add(&self, inv: &Invocation) -> Result<CNIResult, CniError>;
    fn del(&self, inv: &Invocation) -> Result<(), CniError>;
    fn check(&self, inv: &Invocation) -> Result<(), CniError>;
    fn status(&self, inv: &Invocation) -> Result<(), CniError>;
    fn gc(&self, inv: &Invocation) -> Result<(), CniError>;
}

/// The whole process: read the environment and stdin, run the command, print the answer.
/// Never panics outward: a panic becomes a code 999 error on stdout.
pub fn main(plugin: &impl CniPlugin, about: &str) -> ExitCode {
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
pub fn dispatch(plugin: &impl CniPlugin, about: &str, env: &impl Environment, stdin: &mut impl Read) -> (String, bool) {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::{Value, json};

    use super::*;
    use crate::{args::CniArgs, attachment::AttachmentKey, version::SUPPORTED_VERSIONS};

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
    impl CniPlugin for Echo {
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
