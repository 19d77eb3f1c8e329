//! The kind scripts (`manifests/kind/*.sh`) cannot run here (no container engine that runs
//! kind), so this checks what can be checked without a cluster:
//! - every script passes `bash -n` (and shellcheck, where it is installed);
//! - every kubectl call in them (each goes through the shell function `k`) is found, expanded by
//!   bash with sample values, and run by the installed kubectl against a stand-in that answers
//!   discovery only: `run` and `create` as a client-side dry run whose output parses into typed
//!   objects; `apply` with the files it names, each of which parses into typed objects field for
//!   field; `patch` and `set env` applied locally to the objects they target; everything else
//!   must get as far as asking the server (a NotFound), so that a misspelled verb, flag, resource
//!   type, output format, jsonpath or wait condition fails here;
//! - a deliberately wrong call of each kind is rejected by the same check.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Pod, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scripts() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join("manifests/kind"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    found.sort();
    let names: Vec<_> = found.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(names, ["cluster.sh", "demo.sh", "kube-proxy.sh", "lib.sh"]);
    found
}

// ---------------------------------------------------------------------------------------------
// Finding the kubectl calls.

/// A kubectl call as the script has it: the word `k` up to the end of its simple command.
#[derive(Debug, Clone)]
struct Call {
    script: String,
    line: usize,
    text: String,
}

/// Where the scanner is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ctx {
    /// Shell code; `Some(depth)` inside `$( )`, counting its open parentheses.
    Code(Option<u32>),
    /// Inside double quotes.
    Quoted,
}

/// Every `k` call and every direct `kubectl` call (as a word of shell code) in a script. A
/// small scanner that knows quoting, comments and command substitution, which is all the
/// scripts use (heredocs and backticks are refused).
fn scan(script: &str, text: &str) -> (Vec<Call>, Vec<usize>) {
    for (i, l) in text.lines().enumerate() {
        // `<<EOF`, `<<-EOF`, `<<'EOF'` (not `<<<` nor an arithmetic shift `a << 2`).
        let heredoc = l.match_indices("<<").any(|(at, _)| {
            let rest = l[at + 2..].trim_start_matches('-');
            !l[at..].starts_with("<<<")
                && (at == 0 || l.as_bytes()[at - 1] != b'<')
                && rest.starts_with(|c: char| c == '\'' || c == '"' || c == '_' || c.is_ascii_alphabetic())
        });
        assert!(
            !heredoc,
            "{script}:{}: a heredoc (the scanner does not know them)",
            i + 1
        );
    }
    let b = text.as_bytes();
    let line_of = |at: usize| text[..at].matches('\n').count() + 1;
    let mut calls = Vec::new();
    let mut direct = Vec::new();
    let mut stack = vec![Ctx::Code(None)];
    let mut i = 0;
    // Whether the previous character ends a word (so a word starts here).
    let boundary = |i: usize| i == 0 || matches!(b[i - 1], b' ' | b'\t' | b'\n' | b';' | b'(' | b'|' | b'&');
    let is_word = |i: usize, w: &str| {
        text[i..].starts_with(w)
            && b.get(i + w.len())
                .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b';' | b')'))
    };
    while i < b.len() {
        let ctx = *stack.last().unwrap();
        let c = b[i];
        match ctx {
            _ if c == b'`' => panic!("{script}:{}: backticks (use $( ))", line_of(i)),
            Ctx::Quoted => match c {
                b'"' => {
                    stack.pop();
                }
                b'\\' => i += 1,
                b'$' if b.get(i + 1) == Some(&b'(') => {
                    stack.push(Ctx::Code(Some(1)));
                    i += 1;
                }
                _ => {}
            },
            Ctx::Code(depth) => match c {
                b'#' if boundary(i) => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    continue;
                }
                b'\'' => {
                    i += 1;
                    while b[i] != b'\'' {
                        i += 1;
                    }
                }
                b'"' => stack.push(Ctx::Quoted),
                b'\\' => i += 1,
                b'$' if b.get(i + 1) == Some(&b'(') => {
                    stack.push(Ctx::Code(Some(1)));
                    i += 1;
                }
                b'(' if depth.is_some() => {
                    *stack.last_mut().unwrap() = Ctx::Code(depth.map(|d| d + 1));
                }
                b')' if depth.is_some() => {
                    if depth == Some(1) {
                        stack.pop();
                    } else {
                        *stack.last_mut().unwrap() = Ctx::Code(depth.map(|d| d - 1));
                    }
                }
                _ if boundary(i) && is_word(i, "kubectl") => direct.push(line_of(i)),
                _ if boundary(i) && is_word(i, "k") => {
                    let end = call_end(script, text, i);
                    calls.push(Call {
                        script: script.to_string(),
                        line: line_of(i),
                        text: text[i..end].trim_end().to_string(),
                    });
                    i = end;
                    continue;
                }
                _ => {}
            },
        }
        i += 1;
    }
    assert_eq!(stack, [Ctx::Code(None)], "{script}: unbalanced quotes or $( )");
    (calls, direct)
}

/// Where the simple command starting at `start` ends: at an unquoted newline (not continued),
/// `;`, `|`, `&`, `)`, `<`, `>` or comment. A redirection's file descriptor (`2>`) is left out.
/// A command substitution in a call is refused: values go into variables first.
fn call_end(script: &str, text: &str, start: usize) -> usize {
    let b = text.as_bytes();
    let mut i = start;
    let mut quoted = false;
    while i < b.len() {
        let c = b[i];
        if quoted {
            match c {
                b'"' => quoted = false,
                b'\\' => i += 1,
                _ => {}
            }
        } else {
            match c {
                b'\'' => {
                    i += 1;
                    while b[i] != b'\'' {
                        i += 1;
                    }
                }
                b'"' => quoted = true,
                b'\\' => i += 1,
                b'\n' | b';' | b'|' | b'&' | b')' | b'<' | b'>' => break,
                b'#' if matches!(b[i - 1], b' ' | b'\t') => break,
                _ => {}
            }
        }
        if c == b'$' && b.get(i + 1) == Some(&b'(') {
            panic!(
                "{script}: a command substitution in a kubectl call ({}): put it in a variable first",
                &text[start..=i + 1]
            );
        }
        i += 1;
    }
    let mut end = i;
    if matches!(b.get(i), Some(b'<' | b'>')) {
        while end > start && b[end - 1].is_ascii_digit() {
            end -= 1;
        }
    }
    end
}

/// The kubectl arguments of a call, expanded by bash: lib.sh's settings as the scripts have them,
/// and a sample value for each variable the calls use.
fn expand(call: &Call) -> Vec<String> {
    let lib = repo().join("manifests/kind/lib.sh");
    let script = format!(
        "set -euo pipefail\nsource {lib:?}\nk() {{ printf '%s\\0' \"$@\"; }}\n\
         node=ferrynet-worker agent=ferrynet-agent-x7k2p pod=demo-5d8f7c9b4-abcde\n\
         ip=10.244.1.5 cip=10.96.12.34\n\
         set -- true\n{}\n",
        call.text
    );
    let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}:{}: bash could not expand `{}`: {}",
        call.script,
        call.line,
        call.text,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_terminator('\0')
        .map(String::from)
        .collect()
}

fn all_calls() -> Vec<(Call, Vec<String>)> {
    let mut all = Vec::new();
    for path in scripts() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let (calls, direct) = scan(&name, &text);
        if name == "lib.sh" {
            assert_eq!(direct.len(), 1, "lib.sh calls kubectl only in k(): lines {direct:?}");
        } else {
            assert!(
                direct.is_empty(),
                "{name} calls kubectl directly (use k): lines {direct:?}"
            );
        }
        for call in calls {
            let args = expand(&call);
            all.push((call, args));
        }
    }
    all
}

// ---------------------------------------------------------------------------------------------
// A stand-in server: discovery for the kinds the scripts use, empty lists, NotFound for the rest.

struct Resource {
    name: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
}

const CORE: &[Resource] = &[
    Resource {
        name: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
    },
    Resource {
        name: "pods/exec",
        singular: "",
        kind: "PodExecOptions",
        namespaced: true,
        short: &[],
    },
    Resource {
        name: "pods/log",
        singular: "",
        kind: "Pod",
        namespaced: true,
        short: &[],
    },
    Resource {
        name: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
    },
    Resource {
        name: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short: &["ep"],
    },
    Resource {
        name: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short: &["no"],
    },
    Resource {
        name: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
    },
    Resource {
        name: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
    },
    Resource {
        name: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
    },
    Resource {
        name: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short: &["sa"],
    },
];
const APPS: &[Resource] = &[
    Resource {
        name: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short: &["deploy"],
    },
    Resource {
        name: "deployments/scale",
        singular: "",
        kind: "Scale",
        namespaced: true,
        short: &[],
    },
    Resource {
        name: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short: &["ds"],
    },
];
const RBAC: &[Resource] = &[
    Resource {
        name: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short: &[],
    },
    Resource {
        name: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short: &[],
    },
];

fn resource_list(group_version: &str, resources: &[Resource]) -> Value {
    let resources: Vec<Value> = resources
        .iter()
        .map(|r| {
            json!({"name": r.name, "singularName": r.singular, "kind": r.kind, "namespaced": r.namespaced,
                   "shortNames": r.short, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn respond(method: &str, path: &str) -> (u16, Value) {
    let group = |name: &str| {
        json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
                                    "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}})
    };
    match path {
        "/version" => return (200, json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0"})),
        "/api" => {
            return (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"],
                       "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            );
        }
        "/apis" => {
            return (
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1",
                       "groups": [group("apps"), group("rbac.authorization.k8s.io")]}),
            );
        }
        "/api/v1" => return (200, resource_list("v1", CORE)),
        "/apis/apps/v1" => return (200, resource_list("apps/v1", APPS)),
        "/apis/rbac.authorization.k8s.io/v1" => return (200, resource_list("rbac.authorization.k8s.io/v1", RBAC)),
        _ => {}
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    if method == "GET"
        && let Some(r) = CORE.iter().chain(APPS).chain(RBAC).find(|r| r.name == last)
    {
        return (
            200,
            json!({"kind": format!("{}List", r.kind), "apiVersion": "v1", "metadata": {}, "items": []}),
        );
    }
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "not found (the test's stand-in)", "reason": "NotFound", "code": 404}),
    )
}

fn serve(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, value) = respond(method, target.split('?').next().unwrap());
    let body = value.to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// kubectl, set up to talk to the stand-in.
struct Kubectl {
    home: tempfile::TempDir,
}

impl Kubectl {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || serve(stream));
            }
        });
        let home = tempfile::tempdir().unwrap();
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster: {{server: \"http://{addr}\"}}\n\
             users:\n- name: stand-in\n  user: {{token: none}}\ncontexts:\n- name: stand-in\n  context: {{cluster: stand-in, user: stand-in}}\n\
             current-context: stand-in\n"
        );
        std::fs::write(home.path().join("config"), config).unwrap();
        Self { home }
    }

    fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        Command::new("kubectl")
            .args(args)
            .arg("--request-timeout=10s")
            .env("KUBECONFIG", self.home.path().join("config"))
            .env("HOME", self.home.path())
            .current_dir(repo())
            .output()
            .expect("kubectl is not installed (the test needs the real one)")
    }
}

// ---------------------------------------------------------------------------------------------
// Checking a call.

/// Every YAML document of a text, as JSON.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[track_caller]
fn parse<T: DeserializeOwned + serde::Serialize>(doc: &Value, lossless: bool) -> Result<(), String> {
    let object: T = serde_json::from_value(doc.clone()).map_err(|e| format!("{e}: {doc}"))?;
    if lossless && serde_json::to_value(&object).unwrap() != *doc {
        return Err(format!("fields were lost in the round trip (a misspelling?): {doc}"));
    }
    Ok(())
}

/// A manifest document as the typed object its kind says. `lossless`: nothing may be lost in the
/// round trip (a manifest file; kubectl's own output has nulls k8s-openapi leaves out).
fn typed(doc: &Value, lossless: bool) -> Result<String, String> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    match kind.as_str() {
        "Pod" => parse::<Pod>(doc, lossless),
        "Service" => parse::<Service>(doc, lossless),
        "Deployment" => parse::<Deployment>(doc, lossless),
        "DaemonSet" => parse::<DaemonSet>(doc, lossless),
        "ConfigMap" => parse::<ConfigMap>(doc, lossless),
        "ServiceAccount" => parse::<ServiceAccount>(doc, lossless),
        "ClusterRole" => parse::<ClusterRole>(doc, lossless),
        "ClusterRoleBinding" => parse::<ClusterRoleBinding>(doc, lossless),
        other => Err(format!("no typed check for kind {other:?}")),
    }?;
    Ok(kind)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of a flag (`-p X`, `-p=X`, `--patch X`).
fn flag<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        names.iter().find_map(|n| {
            if a == n {
                args.get(i + 1).map(String::as_str)
            } else {
                a.strip_prefix(&format!("{n}=")).filter(|_| n.starts_with("--"))
            }
        })
    })
}

/// A call with flags added: before a `--` (after it, arguments are the pod's command).
fn with_flags(args: &[String], flags: &[&str]) -> Vec<String> {
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let mut out = args[..at].to_vec();
    out.extend(flags.iter().map(|f| f.to_string()));
    out.extend_from_slice(&args[at..]);
    out
}

/// kubeadm's kube-proxy DaemonSet, reduced to what the patches touch.
fn kube_proxy_daemonset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
           "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"k8s-app": "kube-proxy"}},
           "spec": {"selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                    "template": {"metadata": {"labels": {"k8s-app": "kube-proxy"}},
                                 "spec": {"nodeSelector": {"kubernetes.io/os": "linux"},
                                          "containers": [{"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.32.0"}]}}}})
}

/// Checks one kubectl call (its arguments after `kubectl`); says what was checked.
fn check(kubectl: &Kubectl, args: &[String]) -> Result<String, String> {
    let verb = args.first().map(String::as_str).unwrap_or_default();
    let scratch = tempfile::tempdir().unwrap();
    match verb {
        // Client-side dry runs: the objects kubectl would send, typed.
        "run" | "create" if !args.iter().any(|a| a == "-f") => {
            let out = kubectl.run(&with_flags(args, &["--dry-run=client", "-o", "yaml"]));
            let (stdout, stderr) = text(&out);
            if !out.status.success() {
                return Err(format!("dry run failed: {stderr}"));
            }
            let kinds = documents(&stdout)
                .iter()
                .map(|d| typed(d, false))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(format!("dry run: {}", kinds.join(" + ")))
        }
        "apply" => {
            let mut files = Vec::new();
            for (i, a) in args.iter().enumerate() {
                if a == "-f" {
                    files.push(args.get(i + 1).ok_or("-f without a file")?.clone());
                }
            }
            if files.is_empty() {
                return Err("apply without -f".into());
            }
            let mut kinds = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
                for doc in documents(&text) {
                    kinds.push(typed(&doc, true).map_err(|e| format!("{f}: {e}"))?);
                }
            }
            let out = kubectl.run(&with_flags(
                args,
                &["--dry-run=client", "--validate=false", "-o", "yaml"],
            ));
            let (stdout, stderr) = text(&out);
            if !out.status.success() {
                return Err(format!("dry run failed: {stderr}"));
            }
            // Several objects come back as one List.
            let printed: Vec<Value> = documents(&stdout)
                .into_iter()
                .flat_map(|d| match d["kind"].as_str() {
                    Some("List") => d["items"].as_array().cloned().unwrap_or_default(),
                    _ => vec![d],
                })
                .collect();
            let printed_kinds: Vec<&str> = printed.iter().map(|d| d["kind"].as_str().unwrap_or_default()).collect();
            if printed_kinds != kinds {
                return Err(format!("kubectl read other objects than the files hold: {stdout}"));
            }
            Ok(format!("files typed and dry run: {}", kinds.join(", ")))
        }
        // A patch, applied locally to the object it targets.
        "patch" => {
            let patch = flag(args, &["-p", "--patch"]).ok_or("patch without -p")?;
            serde_json::from_str::<Value>(patch).map_err(|e| format!("the patch is no JSON: {e}: {patch}"))?;
            let target = args.get(1..3).map(|t| t.join(" ")).unwrap_or_default();
            let object = match target.as_str() {
                "daemonset kube-proxy" => kube_proxy_daemonset(),
                other => return Err(format!("no fixture to apply a patch of {other:?} to")),
            };
            let file = scratch.path().join("object.json");
            std::fs::write(&file, object.to_string()).unwrap();
            let mut local: Vec<String> = vec![
                "patch".into(),
                "--local".into(),
                "-f".into(),
                file.display().to_string(),
            ];
            local.extend(["-p".into(), patch.into(), "-o".into(), "json".into()]);
            if let Some(t) = flag(args, &["--type"]) {
                local.push(format!("--type={t}"));
            }
            let out = kubectl.run(&local);
            let (stdout, stderr) = text(&out);
            if !out.status.success() {
                return Err(format!("the patch does not apply: {stderr}"));
            }
            let patched: Value = serde_json::from_str(&stdout).map_err(|e| e.to_string())?;
            typed(&patched, false)?;
            Ok(format!(
                "patched locally: nodeSelector {}",
                patched["spec"]["template"]["spec"]["nodeSelector"]
            ))
        }
        // `set env` on the DaemonSet in manifests/, locally; every variable is an agent setting.
        "set" if args.get(1).is_some_and(|a| a == "env") => {
            if args.get(2).map(String::as_str) != Some("daemonset/ferrynet-agent") {
                return Err(format!("no fixture for set env on {:?}", args.get(2)));
            }
            let settings: BTreeSet<String> =
                documents(&std::fs::read_to_string(repo().join("manifests/configmap.yaml")).unwrap())[0]["data"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect();
            let assignments: Vec<&String> = args[3..]
                .iter()
                .filter(|a| !a.starts_with('-') && a.contains('='))
                .collect();
            for a in &assignments {
                let name = a.split('=').next().unwrap().trim_end_matches('-');
                if !settings.contains(name) {
                    return Err(format!("{name} is no setting of the agent's ConfigMap"));
                }
            }
            let mut local: Vec<String> = vec![
                "set".into(),
                "env".into(),
                "--local".into(),
                "-f".into(),
                "manifests/daemonset.yaml".into(),
            ];
            local.extend(assignments.iter().map(|a| a.to_string()));
            local.extend(["-o".into(), "json".into()]);
            let out = kubectl.run(&local);
            let (stdout, stderr) = text(&out);
            if !out.status.success() {
                return Err(format!("set env does not apply: {stderr}"));
            }
            let ds: Value = serde_json::from_str(&stdout).map_err(|e| e.to_string())?;
            typed(&ds, false)?;
            // And the call as written gets as far as the server.
            server_side(kubectl, args)?;
            Ok(format!(
                "set locally on manifests/daemonset.yaml: {}",
                assignments.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" ")
            ))
        }
        // A ferrynet-agent command run in the agent's pod: the agent knows it.
        "exec"
            if args
                .iter()
                .skip_while(|a| *a != "--")
                .nth(1)
                .is_some_and(|c| c == "ferrynet-agent") =>
        {
            let command: Vec<&String> = args.iter().skip_while(|a| *a != "--").skip(2).collect();
            let out = Command::new(ferrynet_tests::binary("ferrynet-agent"))
                .args(command.iter().take(1))
                .arg("--help")
                .output()
                .unwrap();
            if !out.status.success() || command.is_empty() {
                return Err(format!(
                    "ferrynet-agent has no command {command:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            server_side(kubectl, args).map(|how| format!("{how}; ferrynet-agent {} exists", command[0]))
        }
        _ => server_side(kubectl, args),
    }
}

/// A call that needs a server: it must get as far as asking it. The stand-in lists nothing and
/// finds nothing, so success, NotFound, "no matching resources" and an index out of an empty
/// list's bounds (the jsonpath parsed and ran) are the answers of a call kubectl understood.
fn server_side(kubectl: &Kubectl, args: &[String]) -> Result<String, String> {
    let out = kubectl.run(args);
    let (_, stderr) = text(&out);
    let reached = [
        "(NotFound)",
        "not found",
        "no matching resources found",
        "array index out of bounds",
    ];
    if out.status.success() {
        Ok("reached the server".into())
    } else if reached.iter().any(|r| stderr.contains(r)) && !stderr.contains("unknown") {
        Ok("reached the server (NotFound)".into())
    } else {
        Err(format!("kubectl refused it: {}", stderr.trim()))
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_script_passes_bash_n_and_shellcheck() {
    for script in scripts() {
        let out = Command::new("bash").arg("-n").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // shellcheck, where it is installed (`apt-get install shellcheck`).
    match Command::new("shellcheck")
        .arg("-x")
        .args(scripts())
        .current_dir(repo().join("manifests/kind"))
        .output()
    {
        Ok(out) => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => eprintln!("shellcheck not run: {e}"),
    }
}

#[test]
fn every_kubectl_call_in_the_scripts_is_one_kubectl_understands() {
    let kubectl = Kubectl::new();
    let calls = all_calls();
    let mut failures = Vec::new();
    for (call, args) in &calls {
        match check(&kubectl, args) {
            Ok(how) => eprintln!("ok   {}:{} kubectl {} ({how})", call.script, call.line, args.join(" ")),
            Err(e) => failures.push(format!(
                "{}:{}: kubectl {}\n    {e}",
                call.script,
                call.line,
                args.join(" ")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} calls fail:\n{}",
        failures.len(),
        calls.len(),
        failures.join("\n")
    );
    assert!(
        calls.len() >= 40,
        "only {} kubectl calls found: is the scanner still finding them?",
        calls.len()
    );

    // The commands of issue 10's demos, as a user types them, are among them.
    let typed: BTreeSet<String> = calls.iter().map(|(_, a)| a.join(" ")).collect();
    for command in [
        "run test-pod --image=nginx --restart=Never",
        "get pods -o wide",
        "run nginx --image=nginx --port=80 --expose",
        "create deployment demo --image=nginx",
        "expose deployment demo --port=80",
        "scale deployment demo --replicas=3",
        "exec -n kube-system ferrynet-agent-x7k2p -- ferrynet-agent explain 10.96.12.34:80",
        "patch daemonset kube-proxy -n kube-system -p {\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":{\"non-existing\":\"true\"}}}}}",
    ] {
        assert!(typed.contains(command), "no call `kubectl {command}`");
    }
    // kube-proxy is a DaemonSet: nothing scales it.
    assert!(!typed.iter().any(|c| c.starts_with("scale") && c.contains("kube-proxy")));
}

#[test]
fn a_wrong_kubectl_call_is_rejected() {
    let kubectl = Kubectl::new();
    let call = |text: &str| Call {
        script: "test".into(),
        line: 0,
        text: text.into(),
    };
    for wrong in [
        "k gett pods",                                                 // verb
        "k get pods --namepsace kube-system",                          // flag
        "k get podz",                                                  // resource type
        "k get pods -o jsonpathh='{.items[*].metadata.name}'",         // output format
        "k get pods -o jsonpath='{.items[*].metadata.name'",           // jsonpath
        "k wait --for=condtion=Ready pod/client --timeout=10s",        // wait condition
        "k run test-pod --image=nginx --restrat=Never",                // a dry run's flag
        "k create deploymnt demo --image=nginx",                       // a dry run's kind
        "k apply -f manifests/kind/missing.yaml",                      // a missing manifest
        "k patch daemonset kube-proxy -n kube-system -p '{\"spec\":'", // a broken patch
        "k patch daemonset kube-proxy -n kube-system -p '{\"spec\":{\"template\":{\"spec\":{\"nodeSelector\":\"x\"}}}}'", // a patch that does not apply
        "k set env daemonset/ferrynet-agent -n kube-system FERRYNET_SERVCE_PROXY=false", // a setting
        "k exec -n kube-system \"$agent\" -- ferrynet-agent explian \"$cip:80\"",        // the agent's command
        "k exec -n kube-system \"$agent\" -- ferrynet-agent explain \"$cip:80\" --nope", // kubectl's flag after `--` is the pod's: fine
    ] {
        let args = expand(&call(wrong));
        let result = check(&kubectl, &args);
        eprintln!("{wrong}\n    {result:?}");
        if wrong.ends_with("--nope") {
            assert!(result.is_ok(), "{wrong}: {result:?}");
        } else {
            assert!(result.is_err(), "`{wrong}` was not rejected: {result:?}");
        }
    }
    // And the right ones pass the same check.
    for right in [
        "k get pods -o jsonpath='{.items[*].metadata.name}'",
        "k wait --for=condition=Ready pod/client --timeout=10s",
        "k run test-pod --image=nginx --restart=Never",
    ] {
        let args = expand(&call(right));
        assert!(check(&kubectl, &args).is_ok(), "{right}: {:?}", check(&kubectl, &args));
    }
}

#[test]
fn the_scanner_finds_calls_and_refuses_what_it_cannot_check() {
    let text = "f() {\n    k get pods -o wide | grep x\n    v=$(k get pod \"$1\" -o name 2>/dev/null)\n    echo \"k is a $(k version)\" # k not\n    check 'k get' k get nodes\n    kubectl get pods\n}\n";
    let (calls, direct) = scan("t", text);
    let found: Vec<&str> = calls.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        found,
        [
            "k get pods -o wide",
            "k get pod \"$1\" -o name",
            "k version",
            "k get nodes"
        ]
    );
    assert_eq!(calls[1].line, 3);
    assert_eq!(direct, [6]);
    let refused = std::panic::catch_unwind(|| scan("t", "k get pod \"$(whoami)\"\n"));
    assert!(refused.is_err(), "a command substitution in a call is refused");
}

#[test]
fn kube_proxy_goes_off_every_node_and_comes_back() {
    let kubectl = Kubectl::new();
    let patches: Vec<Vec<String>> = all_calls()
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| a.starts_with(&["patch".into(), "daemonset".into(), "kube-proxy".into()]))
        .collect();
    assert_eq!(patches.len(), 2, "down and restore: {patches:?}");
    let apply = |object: &Value, args: &[String]| -> Value {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ds.json");
        std::fs::write(&file, object.to_string()).unwrap();
        let patch = flag(args, &["-p"]).unwrap();
        let out = kubectl.run(&[
            "patch",
            "--local",
            "-f",
            file.to_str().unwrap(),
            "-p",
            patch,
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let down = apply(&kube_proxy_daemonset(), &patches[0]);
    let selector = &down["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(selector, &json!({"kubernetes.io/os": "linux", "non-existing": "true"}));
    let restored = apply(&down, &patches[1]);
    assert_eq!(
        restored["spec"]["template"]["spec"]["nodeSelector"],
        json!({"kubernetes.io/os": "linux"})
    );
}

#[test]
fn the_main_script_says_it_has_not_been_run_here() {
    let text = std::fs::read_to_string(repo().join("manifests/kind/demo.sh")).unwrap();
    let header: String = text.lines().take(12).collect::<Vec<_>>().join("\n");
    assert!(header.contains("have not been run against a real cluster"), "{header}");
    let proxy = std::fs::read_to_string(repo().join("manifests/kind/kube-proxy.sh")).unwrap();
    assert!(
        proxy.contains("kubectl scale deployment"),
        "the common mistake is named"
    );
    assert!(Path::new(&repo().join("manifests/kind-config.yaml")).is_file());
}
