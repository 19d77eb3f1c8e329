//! Kubernetes' protobuf encoding, decoded into the JSON objects the stand-in stores.
//!
//! client-go's typed clients (kubectl's `create deployment`, `create service`, ...) send
//! `application/vnd.kubernetes.protobuf`: the magic `k8s\0`, then a `runtime.Unknown` envelope
//! (`typeMeta` = 1 {`apiVersion` = 1, `kind` = 2}, `raw` = 2, `contentEncoding` = 3,
//! `contentType` = 4) whose `raw` is the object's message. The messages are decoded by a schema
//! of their fields, numbered as in Kubernetes' `generated.proto` files (`k8s.io/api` core/v1 and
//! apps/v1, `k8s.io/apimachinery` meta/v1, intstr and resource), and written as JSON the way
//! Kubernetes' JSON encoding writes the Go types:
//! - Go's protobuf code writes every non-pointer field, empty or not, so an empty string, a zero
//!   or `false` in a non-pointer field is left out (its JSON tag has `omitempty`), while a
//!   pointer field (`replicas`, `terminationGracePeriodSeconds`, ...) is kept even when zero;
//! - a struct field is kept even when empty (`resources: {}`, `strategy: {}`), as Go writes it;
//!   a zero `Time` is left out (Go writes `null`);
//! - an embedded struct (`Probe`'s handler, a key selector's `LocalObjectReference`) is inlined.
//!
//! A field the schema does not know is refused, naming its number and message, unless its value
//! is empty (a zero, or a message of nothing but empty fields): never silently dropped.
use serde_json::{Map, Value, json};

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// Not valid protobuf (400).
    Malformed(String),
    /// Valid, but something the stand-in does not decode (415).
    Unsupported(String),
}

/// The prefix of every Kubernetes protobuf body.
const MAGIC: &[u8; 4] = b"k8s\0";

/// How a field's value is encoded, and written in JSON.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    Msg(&'static Message),
    /// `map<string, string>`.
    StrMap,
    /// `map<string, resource.Quantity>`.
    QuantityMap,
    /// `intstr.IntOrString`: a number or a string in JSON.
    IntOrString,
    /// `meta/v1.Time`: RFC 3339 in JSON.
    Time,
    /// `resource.Quantity`: a string in JSON.
    Quantity,
}

#[derive(Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
    /// A pointer in Go: written only when set, so a zero is a value.
    pointer: bool,
    /// An embedded struct whose fields JSON writes in the parent.
    inline: bool,
}

const fn f(number: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        number,
        name,
        ty,
        repeated: false,
        pointer: false,
        inline: false,
    }
}

impl Field {
    const fn rep(self) -> Self {
        Field { repeated: true, ..self }
    }
    const fn ptr(self) -> Self {
        Field { pointer: true, ..self }
    }
    const fn inline(self) -> Self {
        Field { inline: true, ..self }
    }
}

/// A message type: its full protobuf name (for errors) and the fields the stand-in knows.
pub struct Message {
    name: &'static str,
    fields: &'static [Field],
}

use Ty::{Bool, Int, IntOrString, Msg, Quantity, QuantityMap, Str, StrMap, Time};

// k8s.io/apimachinery/pkg/apis/meta/v1
static OBJECT_META: Message = Message {
    name: "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    fields: &[
        f(1, "name", Str),
        f(2, "generateName", Str),
        f(3, "namespace", Str),
        f(4, "selfLink", Str),
        f(5, "uid", Str),
        f(6, "resourceVersion", Str),
        f(7, "generation", Int),
        f(8, "creationTimestamp", Time),
        f(9, "deletionTimestamp", Time).ptr(),
        f(10, "deletionGracePeriodSeconds", Int).ptr(),
        f(11, "labels", StrMap),
        f(12, "annotations", StrMap),
        f(13, "ownerReferences", Msg(&OWNER_REFERENCE)).rep(),
        f(14, "finalizers", Str).rep(),
    ],
};
static OWNER_REFERENCE: Message = Message {
    name: "k8s.io.apimachinery.pkg.apis.meta.v1.OwnerReference",
    fields: &[
        f(5, "apiVersion", Str),
        f(1, "kind", Str),
        f(3, "name", Str),
        f(4, "uid", Str),
        f(6, "controller", Bool).ptr(),
        f(7, "blockOwnerDeletion", Bool).ptr(),
    ],
};
static LABEL_SELECTOR: Message = Message {
    name: "k8s.io.apimachinery.pkg.apis.meta.v1.LabelSelector",
    fields: &[
        f(1, "matchLabels", StrMap),
        f(2, "matchExpressions", Msg(&LABEL_SELECTOR_REQUIREMENT)).rep(),
    ],
};
static LABEL_SELECTOR_REQUIREMENT: Message = Message {
    name: "k8s.io.apimachinery.pkg.apis.meta.v1.LabelSelectorRequirement",
    fields: &[f(1, "key", Str), f(2, "operator", Str), f(3, "values", Str).rep()],
};

// k8s.io/api/apps/v1
static DEPLOYMENT: Message = Message {
    name: "k8s.io.api.apps.v1.Deployment",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&DEPLOYMENT_SPEC)),
        f(3, "status", Msg(&DEPLOYMENT_STATUS)),
    ],
};
static DEPLOYMENT_SPEC: Message = Message {
    name: "k8s.io.api.apps.v1.DeploymentSpec",
    fields: &[
        f(1, "replicas", Int).ptr(),
        f(2, "selector", Msg(&LABEL_SELECTOR)).ptr(),
        f(3, "template", Msg(&POD_TEMPLATE_SPEC)),
        f(4, "strategy", Msg(&DEPLOYMENT_STRATEGY)),
        f(5, "minReadySeconds", Int),
        f(6, "revisionHistoryLimit", Int).ptr(),
        f(7, "paused", Bool),
        f(9, "progressDeadlineSeconds", Int).ptr(),
    ],
};
static DEPLOYMENT_STRATEGY: Message = Message {
    name: "k8s.io.api.apps.v1.DeploymentStrategy",
    fields: &[
        f(1, "type", Str),
        f(2, "rollingUpdate", Msg(&ROLLING_UPDATE_DEPLOYMENT)).ptr(),
    ],
};
static ROLLING_UPDATE_DEPLOYMENT: Message = Message {
    name: "k8s.io.api.apps.v1.RollingUpdateDeployment",
    fields: &[
        f(1, "maxUnavailable", IntOrString).ptr(),
        f(2, "maxSurge", IntOrString).ptr(),
    ],
};
static DEPLOYMENT_STATUS: Message = Message {
    name: "k8s.io.api.apps.v1.DeploymentStatus",
    fields: &[
        f(1, "observedGeneration", Int),
        f(2, "replicas", Int),
        f(3, "updatedReplicas", Int),
        f(7, "readyReplicas", Int),
        f(4, "availableReplicas", Int),
        f(5, "unavailableReplicas", Int),
        f(9, "terminatingReplicas", Int).ptr(),
        f(8, "collisionCount", Int).ptr(),
    ],
};

// k8s.io/api/core/v1
static POD: Message = Message {
    name: "k8s.io.api.core.v1.Pod",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&POD_SPEC)),
        f(3, "status", Msg(&POD_STATUS)),
    ],
};
static POD_STATUS: Message = Message {
    name: "k8s.io.api.core.v1.PodStatus",
    fields: &[
        f(1, "phase", Str),
        f(3, "message", Str),
        f(4, "reason", Str),
        f(11, "nominatedNodeName", Str),
        f(5, "hostIP", Str),
        f(6, "podIP", Str),
        f(12, "podIPs", Msg(&POD_IP)).rep(),
        f(7, "startTime", Time).ptr(),
        f(9, "qosClass", Str),
        f(14, "resize", Str),
    ],
};
static POD_IP: Message = Message {
    name: "k8s.io.api.core.v1.PodIP",
    fields: &[f(1, "ip", Str)],
};
static POD_TEMPLATE_SPEC: Message = Message {
    name: "k8s.io.api.core.v1.PodTemplateSpec",
    fields: &[f(1, "metadata", Msg(&OBJECT_META)), f(2, "spec", Msg(&POD_SPEC))],
};
static POD_SPEC: Message = Message {
    name: "k8s.io.api.core.v1.PodSpec",
    fields: &[
        f(20, "initContainers", Msg(&CONTAINER)).rep(),
        f(2, "containers", Msg(&CONTAINER)).rep(),
        f(3, "restartPolicy", Str),
        f(4, "terminationGracePeriodSeconds", Int).ptr(),
        f(5, "activeDeadlineSeconds", Int).ptr(),
        f(6, "dnsPolicy", Str),
        f(7, "nodeSelector", StrMap),
        f(8, "serviceAccountName", Str),
        f(9, "serviceAccount", Str),
        f(21, "automountServiceAccountToken", Bool).ptr(),
        f(10, "nodeName", Str),
        f(11, "hostNetwork", Bool),
        f(12, "hostPID", Bool),
        f(13, "hostIPC", Bool),
        f(27, "shareProcessNamespace", Bool).ptr(),
        f(14, "securityContext", Msg(&POD_SECURITY_CONTEXT)).ptr(),
        f(15, "imagePullSecrets", Msg(&LOCAL_OBJECT_REFERENCE)).rep(),
        f(16, "hostname", Str),
        f(17, "subdomain", Str),
        f(19, "schedulerName", Str),
        f(22, "tolerations", Msg(&TOLERATION)).rep(),
        f(24, "priorityClassName", Str),
        f(25, "priority", Int).ptr(),
        f(28, "readinessGates", Msg(&POD_READINESS_GATE)).rep(),
        f(29, "runtimeClassName", Str).ptr(),
        f(30, "enableServiceLinks", Bool).ptr(),
        f(31, "preemptionPolicy", Str).ptr(),
        f(35, "setHostnameAsFQDN", Bool).ptr(),
        f(37, "hostUsers", Bool).ptr(),
    ],
};
static POD_SECURITY_CONTEXT: Message = Message {
    name: "k8s.io.api.core.v1.PodSecurityContext",
    fields: &[
        f(2, "runAsUser", Int).ptr(),
        f(6, "runAsGroup", Int).ptr(),
        f(3, "runAsNonRoot", Bool).ptr(),
        f(4, "supplementalGroups", Int).rep(),
        f(5, "fsGroup", Int).ptr(),
    ],
};
static LOCAL_OBJECT_REFERENCE: Message = Message {
    name: "k8s.io.api.core.v1.LocalObjectReference",
    fields: &[f(1, "name", Str)],
};
static TOLERATION: Message = Message {
    name: "k8s.io.api.core.v1.Toleration",
    fields: &[
        f(1, "key", Str),
        f(2, "operator", Str),
        f(3, "value", Str),
        f(4, "effect", Str),
        f(5, "tolerationSeconds", Int).ptr(),
    ],
};
static POD_READINESS_GATE: Message = Message {
    name: "k8s.io.api.core.v1.PodReadinessGate",
    fields: &[f(1, "conditionType", Str)],
};
static CONTAINER: Message = Message {
    name: "k8s.io.api.core.v1.Container",
    fields: &[
        f(1, "name", Str),
        f(2, "image", Str),
        f(3, "command", Str).rep(),
        f(4, "args", Str).rep(),
        f(5, "workingDir", Str),
        f(6, "ports", Msg(&CONTAINER_PORT)).rep(),
        f(19, "envFrom", Msg(&ENV_FROM_SOURCE)).rep(),
        f(7, "env", Msg(&ENV_VAR)).rep(),
        f(8, "resources", Msg(&RESOURCE_REQUIREMENTS)),
        f(24, "restartPolicy", Str).ptr(),
        f(9, "volumeMounts", Msg(&VOLUME_MOUNT)).rep(),
        f(10, "livenessProbe", Msg(&PROBE)).ptr(),
        f(11, "readinessProbe", Msg(&PROBE)).ptr(),
        f(22, "startupProbe", Msg(&PROBE)).ptr(),
        f(13, "terminationMessagePath", Str),
        f(20, "terminationMessagePolicy", Str),
        f(14, "imagePullPolicy", Str),
        f(15, "securityContext", Msg(&SECURITY_CONTEXT)).ptr(),
        f(16, "stdin", Bool),
        f(17, "stdinOnce", Bool),
        f(18, "tty", Bool),
    ],
};
static CONTAINER_PORT: Message = Message {
    name: "k8s.io.api.core.v1.ContainerPort",
    fields: &[
        f(1, "name", Str),
        f(2, "hostPort", Int),
        f(3, "containerPort", Int),
        f(4, "protocol", Str),
        f(5, "hostIP", Str),
    ],
};
static ENV_VAR: Message = Message {
    name: "k8s.io.api.core.v1.EnvVar",
    fields: &[
        f(1, "name", Str),
        f(2, "value", Str),
        f(3, "valueFrom", Msg(&ENV_VAR_SOURCE)).ptr(),
    ],
};
static ENV_VAR_SOURCE: Message = Message {
    name: "k8s.io.api.core.v1.EnvVarSource",
    fields: &[
        f(1, "fieldRef", Msg(&OBJECT_FIELD_SELECTOR)).ptr(),
        f(2, "resourceFieldRef", Msg(&RESOURCE_FIELD_SELECTOR)).ptr(),
        f(3, "configMapKeyRef", Msg(&KEY_SELECTOR)).ptr(),
        f(4, "secretKeyRef", Msg(&KEY_SELECTOR)).ptr(),
    ],
};
static OBJECT_FIELD_SELECTOR: Message = Message {
    name: "k8s.io.api.core.v1.ObjectFieldSelector",
    fields: &[f(1, "apiVersion", Str), f(2, "fieldPath", Str)],
};
static RESOURCE_FIELD_SELECTOR: Message = Message {
    name: "k8s.io.api.core.v1.ResourceFieldSelector",
    fields: &[
        f(1, "containerName", Str),
        f(2, "resource", Str),
        f(3, "divisor", Quantity),
    ],
};
/// `ConfigMapKeySelector` and `SecretKeySelector`, which have the same fields.
static KEY_SELECTOR: Message = Message {
    name: "k8s.io.api.core.v1.ConfigMapKeySelector/SecretKeySelector",
    fields: &[
        f(1, "localObjectReference", Msg(&LOCAL_OBJECT_REFERENCE)).inline(),
        f(2, "key", Str),
        f(3, "optional", Bool).ptr(),
    ],
};
static ENV_FROM_SOURCE: Message = Message {
    name: "k8s.io.api.core.v1.EnvFromSource",
    fields: &[
        f(1, "prefix", Str),
        f(2, "configMapRef", Msg(&ENV_SOURCE)).ptr(),
        f(3, "secretRef", Msg(&ENV_SOURCE)).ptr(),
    ],
};
/// `ConfigMapEnvSource` and `SecretEnvSource`, which have the same fields.
static ENV_SOURCE: Message = Message {
    name: "k8s.io.api.core.v1.ConfigMapEnvSource/SecretEnvSource",
    fields: &[
        f(1, "localObjectReference", Msg(&LOCAL_OBJECT_REFERENCE)).inline(),
        f(2, "optional", Bool).ptr(),
    ],
};
static RESOURCE_REQUIREMENTS: Message = Message {
    name: "k8s.io.api.core.v1.ResourceRequirements",
    fields: &[
        f(1, "limits", QuantityMap),
        f(2, "requests", QuantityMap),
        f(3, "claims", Msg(&RESOURCE_CLAIM)).rep(),
    ],
};
static RESOURCE_CLAIM: Message = Message {
    name: "k8s.io.api.core.v1.ResourceClaim",
    fields: &[f(1, "name", Str), f(2, "request", Str)],
};
static VOLUME_MOUNT: Message = Message {
    name: "k8s.io.api.core.v1.VolumeMount",
    fields: &[
        f(1, "name", Str),
        f(2, "readOnly", Bool),
        f(7, "recursiveReadOnly", Str).ptr(),
        f(3, "mountPath", Str),
        f(4, "subPath", Str),
        f(5, "mountPropagation", Str).ptr(),
        f(6, "subPathExpr", Str),
    ],
};
static PROBE: Message = Message {
    name: "k8s.io.api.core.v1.Probe",
    fields: &[
        f(1, "handler", Msg(&PROBE_HANDLER)).inline(),
        f(2, "initialDelaySeconds", Int),
        f(3, "timeoutSeconds", Int),
        f(4, "periodSeconds", Int),
        f(5, "successThreshold", Int),
        f(6, "failureThreshold", Int),
        f(7, "terminationGracePeriodSeconds", Int).ptr(),
    ],
};
static PROBE_HANDLER: Message = Message {
    name: "k8s.io.api.core.v1.ProbeHandler",
    fields: &[
        f(1, "exec", Msg(&EXEC_ACTION)).ptr(),
        f(2, "httpGet", Msg(&HTTP_GET_ACTION)).ptr(),
        f(3, "tcpSocket", Msg(&TCP_SOCKET_ACTION)).ptr(),
        f(4, "grpc", Msg(&GRPC_ACTION)).ptr(),
    ],
};
static EXEC_ACTION: Message = Message {
    name: "k8s.io.api.core.v1.ExecAction",
    fields: &[f(1, "command", Str).rep()],
};
static HTTP_GET_ACTION: Message = Message {
    name: "k8s.io.api.core.v1.HTTPGetAction",
    fields: &[
        f(1, "path", Str),
        f(2, "port", IntOrString),
        f(3, "host", Str),
        f(4, "scheme", Str),
        f(5, "httpHeaders", Msg(&HTTP_HEADER)).rep(),
    ],
};
static HTTP_HEADER: Message = Message {
    name: "k8s.io.api.core.v1.HTTPHeader",
    fields: &[f(1, "name", Str), f(2, "value", Str)],
};
static TCP_SOCKET_ACTION: Message = Message {
    name: "k8s.io.api.core.v1.TCPSocketAction",
    fields: &[f(1, "port", IntOrString), f(2, "host", Str)],
};
static GRPC_ACTION: Message = Message {
    name: "k8s.io.api.core.v1.GRPCAction",
    fields: &[f(1, "port", Int), f(2, "service", Str).ptr()],
};
static SECURITY_CONTEXT: Message = Message {
    name: "k8s.io.api.core.v1.SecurityContext",
    fields: &[
        f(1, "capabilities", Msg(&CAPABILITIES)).ptr(),
        f(2, "privileged", Bool).ptr(),
        f(4, "runAsUser", Int).ptr(),
        f(8, "runAsGroup", Int).ptr(),
        f(5, "runAsNonRoot", Bool).ptr(),
        f(6, "readOnlyRootFilesystem", Bool).ptr(),
        f(7, "allowPrivilegeEscalation", Bool).ptr(),
        f(9, "procMount", Str).ptr(),
    ],
};
static CAPABILITIES: Message = Message {
    name: "k8s.io.api.core.v1.Capabilities",
    fields: &[f(1, "add", Str).rep(), f(2, "drop", Str).rep()],
};
static SERVICE: Message = Message {
    name: "k8s.io.api.core.v1.Service",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&SERVICE_SPEC)),
        f(3, "status", Msg(&SERVICE_STATUS)),
    ],
};
static SERVICE_SPEC: Message = Message {
    name: "k8s.io.api.core.v1.ServiceSpec",
    fields: &[
        f(1, "ports", Msg(&SERVICE_PORT)).rep(),
        f(2, "selector", StrMap),
        f(3, "clusterIP", Str),
        f(18, "clusterIPs", Str).rep(),
        f(4, "type", Str),
        f(5, "externalIPs", Str).rep(),
        f(7, "sessionAffinity", Str),
        f(8, "loadBalancerIP", Str),
        f(9, "loadBalancerSourceRanges", Str).rep(),
        f(10, "externalName", Str),
        f(11, "externalTrafficPolicy", Str),
        f(12, "healthCheckNodePort", Int),
        f(13, "publishNotReadyAddresses", Bool),
        f(14, "sessionAffinityConfig", Msg(&SESSION_AFFINITY_CONFIG)).ptr(),
        f(19, "ipFamilies", Str).rep(),
        f(17, "ipFamilyPolicy", Str).ptr(),
        f(20, "allocateLoadBalancerNodePorts", Bool).ptr(),
        f(21, "loadBalancerClass", Str).ptr(),
        f(22, "internalTrafficPolicy", Str).ptr(),
        f(23, "trafficDistribution", Str).ptr(),
    ],
};
static SESSION_AFFINITY_CONFIG: Message = Message {
    name: "k8s.io.api.core.v1.SessionAffinityConfig",
    fields: &[f(1, "clientIP", Msg(&CLIENT_IP_CONFIG)).ptr()],
};
static CLIENT_IP_CONFIG: Message = Message {
    name: "k8s.io.api.core.v1.ClientIPConfig",
    fields: &[f(1, "timeoutSeconds", Int).ptr()],
};
static SERVICE_PORT: Message = Message {
    name: "k8s.io.api.core.v1.ServicePort",
    fields: &[
        f(1, "name", Str),
        f(2, "protocol", Str),
        f(6, "appProtocol", Str).ptr(),
        f(3, "port", Int),
        f(4, "targetPort", IntOrString),
        f(5, "nodePort", Int),
    ],
};
static SERVICE_STATUS: Message = Message {
    name: "k8s.io.api.core.v1.ServiceStatus",
    fields: &[f(1, "loadBalancer", Msg(&LOAD_BALANCER_STATUS))],
};
static LOAD_BALANCER_STATUS: Message = Message {
    name: "k8s.io.api.core.v1.LoadBalancerStatus",
    fields: &[f(1, "ingress", Msg(&LOAD_BALANCER_INGRESS)).rep()],
};
static LOAD_BALANCER_INGRESS: Message = Message {
    name: "k8s.io.api.core.v1.LoadBalancerIngress",
    fields: &[f(1, "ip", Str), f(2, "hostname", Str), f(3, "ipMode", Str).ptr()],
};

/// The kinds whose protobuf the stand-in decodes, by `apiVersion` and `kind`.
static OBJECTS: [(&str, &str, &Message); 3] = [
    ("apps/v1", "Deployment", &DEPLOYMENT),
    ("v1", "Service", &SERVICE),
    ("v1", "Pod", &POD),
];

/// Whether a `Content-Type` is Kubernetes' protobuf.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type.starts_with("application/vnd.kubernetes.protobuf")
}

/// A protobuf request body (envelope and object) as the JSON object it stands for.
pub fn decode_object(body: &[u8]) -> Result<Value, ProtoError> {
    let envelope = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| ProtoError::Malformed("the protobuf body does not start with the magic k8s\\0".into()))?;
    let (mut api_version, mut kind, mut raw, mut encoding) = (String::new(), String::new(), &[][..], String::new());
    let mut reader = Reader::new(envelope);
    while let Some((number, wire)) = reader.field()? {
        match (number, wire) {
            (1, Wire::Bytes(type_meta)) => {
                let mut meta = Reader::new(type_meta);
                while let Some((number, wire)) = meta.field()? {
                    match (number, wire) {
                        (1, Wire::Bytes(b)) => api_version = utf8(b, "typeMeta.apiVersion")?,
                        (2, Wire::Bytes(b)) => kind = utf8(b, "typeMeta.kind")?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            (3, Wire::Bytes(b)) => encoding = utf8(b, "contentEncoding")?,
            _ => {}
        }
    }
    if !encoding.is_empty() {
        return Err(ProtoError::Unsupported(format!(
            "the API stand-in does not decode protobuf with contentEncoding {encoding:?}"
        )));
    }
    let Some((_, _, message)) = OBJECTS.iter().find(|(v, k, _)| *v == api_version && *k == kind) else {
        let known: Vec<String> = OBJECTS.iter().map(|(v, k, _)| format!("{k} ({v})")).collect();
        return Err(ProtoError::Unsupported(format!(
            "the API stand-in decodes protobuf only for {}, not for {kind} ({api_version}); send JSON",
            known.join(", ")
        )));
    };
    let mut object = decode(message, raw, "")?;
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    Ok(Value::Object(object))
}

/// One message's fields as a JSON object. `path` (JSON field path) makes errors findable.
fn decode(message: &Message, bytes: &[u8], path: &str) -> Result<Map<String, Value>, ProtoError> {
    let mut object = Map::new();
    let mut reader = Reader::new(bytes);
    while let Some((number, wire)) = reader.field()? {
        let Some(field) = message.fields.iter().find(|f| f.number == number) else {
            if is_empty(&wire, 0) {
                continue;
            }
            return Err(ProtoError::Unsupported(format!(
                "the API stand-in does not know field number {number} of protobuf message {} (at {}), \
                 which has a value: send JSON instead",
                message.name,
                if path.is_empty() { "the object" } else { path }
            )));
        };
        let here = if path.is_empty() {
            field.name.to_string()
        } else {
            format!("{path}.{}", field.name)
        };
        if field.repeated {
            let list = object.entry(field.name).or_insert_with(|| json!([]));
            let Value::Array(items) = list else {
                continue;
            };
            if let (Int, Wire::Bytes(packed)) = (field.ty, &wire) {
                let mut numbers = Reader::new(packed);
                while !numbers.done() {
                    items.push(json!(numbers.varint()? as i64));
                }
                continue;
            }
            let at = format!("{here}[{}]", items.len());
            if let Some(value) = value(field, wire, &at)? {
                items.push(value);
            }
            continue;
        }
        if let (StrMap | QuantityMap, Wire::Bytes(entry)) = (field.ty, &wire) {
            let (key, value) = map_entry(entry, field.ty, &here)?;
            let map = object.entry(field.name).or_insert_with(|| json!({}));
            if let Value::Object(map) = map {
                map.insert(key, value);
            }
            continue;
        }
        match value(field, wire, &here)? {
            Some(Value::Object(fields)) if field.inline => object.extend(fields),
            Some(value) if field.pointer || !is_zero(&value) => {
                object.insert(field.name.into(), value);
            }
            _ => {
                object.remove(field.name);
            }
        }
    }
    Ok(object)
}

/// A field's value as JSON, none for a zero `Time` (which Go writes as `null`).
fn value(field: &Field, wire: Wire, path: &str) -> Result<Option<Value>, ProtoError> {
    let wrong = || {
        ProtoError::Malformed(format!(
            "field {} ({path}) has the wrong wire type for its type",
            field.number
        ))
    };
    Ok(Some(match (field.ty, wire) {
        (Str, Wire::Bytes(b)) => json!(utf8(b, path)?),
        // int32 and int64 alike: a negative int32 is written sign-extended to 64 bits.
        (Int, Wire::Varint(v)) => json!(v as i64),
        (Bool, Wire::Varint(v)) => json!(v != 0),
        (Msg(message), Wire::Bytes(b)) => Value::Object(decode(message, b, path)?),
        (IntOrString, Wire::Bytes(b)) => int_or_string(b, path)?,
        (Quantity, Wire::Bytes(b)) => quantity(b, path)?,
        (Time, Wire::Bytes(b)) => return time(b, path),
        _ => return Err(wrong()),
    }))
}

/// Whether a scalar is what Go's JSON `omitempty` leaves out.
fn is_zero(value: &Value) -> bool {
    match value {
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_i64() == Some(0),
        Value::Bool(b) => !b,
        _ => false,
    }
}

/// A map entry (`key` = 1, `value` = 2).
fn map_entry(bytes: &[u8], ty: Ty, path: &str) -> Result<(String, Value), ProtoError> {
    let (mut key, mut value) = (String::new(), json!(""));
    let mut reader = Reader::new(bytes);
    while let Some((number, wire)) = reader.field()? {
        match (number, wire, ty) {
            (1, Wire::Bytes(b), _) => key = utf8(b, path)?,
            (2, Wire::Bytes(b), StrMap) => value = json!(utf8(b, path)?),
            (2, Wire::Bytes(b), _) => value = quantity(b, path)?,
            (_, wire, _) if is_empty(&wire, 0) => {}
            (number, _, _) => {
                return Err(ProtoError::Unsupported(format!(
                    "unknown field number {number} in a map entry at {path}"
                )));
            }
        }
    }
    Ok((key, value))
}

/// `intstr.IntOrString`: `type` = 1 (0 a number, 1 a string), `intVal` = 2, `strVal` = 3.
fn int_or_string(bytes: &[u8], path: &str) -> Result<Value, ProtoError> {
    let (mut is_string, mut number, mut text) = (false, 0i64, String::new());
    let mut reader = Reader::new(bytes);
    while let Some((field, wire)) = reader.field()? {
        match (field, wire) {
            (1, Wire::Varint(v)) => is_string = v == 1,
            (2, Wire::Varint(v)) => number = v as i64,
            (3, Wire::Bytes(b)) => text = utf8(b, path)?,
            (_, wire) if is_empty(&wire, 0) => {}
            (field, _) => {
                return Err(ProtoError::Unsupported(format!(
                    "unknown field number {field} of protobuf message k8s.io.apimachinery.pkg.util.intstr.IntOrString (at {path})"
                )));
            }
        }
    }
    Ok(if is_string { json!(text) } else { json!(number) })
}

/// `resource.Quantity`: `string` = 1.
fn quantity(bytes: &[u8], path: &str) -> Result<Value, ProtoError> {
    let mut text = String::new();
    let mut reader = Reader::new(bytes);
    while let Some((field, wire)) = reader.field()? {
        if let (1, Wire::Bytes(b)) = (field, wire) {
            text = utf8(b, path)?;
        }
    }
    Ok(json!(text))
}

/// `meta/v1.Time`: `seconds` = 1, `nanos` = 2; JSON has whole seconds. None when zero.
fn time(bytes: &[u8], path: &str) -> Result<Option<Value>, ProtoError> {
    let mut seconds = 0i64;
    let mut reader = Reader::new(bytes);
    while let Some((field, wire)) = reader.field()? {
        match (field, wire) {
            (1, Wire::Varint(v)) => seconds = v as i64,
            (2, Wire::Varint(_)) => {}
            (field, _) => {
                return Err(ProtoError::Malformed(format!("field {field} of a Time at {path}")));
            }
        }
    }
    Ok((seconds != 0).then(|| json!(super::rfc3339(seconds))))
}

fn utf8(bytes: &[u8], path: &str) -> Result<String, ProtoError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::Malformed(format!("{path} is not UTF-8")))
}

/// Whether an unknown field's value carries nothing: a zero, or bytes that are empty or read as
/// a message of nothing but empty fields (Go's code writes every non-pointer field of a struct,
/// so an empty struct the schema does not know arrives as such a message). Nesting is bounded,
/// so a body of nested lengths cannot exhaust the stack.
fn is_empty(wire: &Wire, depth: usize) -> bool {
    match wire {
        Wire::Varint(v) | Wire::Fixed64(v) => *v == 0,
        Wire::Fixed32(v) => *v == 0,
        Wire::Bytes([]) => true,
        Wire::Bytes(b) if depth < 16 => {
            let mut reader = Reader::new(b);
            loop {
                match reader.field() {
                    Ok(None) => return true,
                    Ok(Some((_, inner))) if is_empty(&inner, depth + 1) => {}
                    _ => return false,
                }
            }
        }
        Wire::Bytes(_) => false,
    }
}

/// A field's value as it is on the wire.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Reads protobuf's wire format, never past the end of its bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| ProtoError::Malformed("a varint runs past the end of the body".into()))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ProtoError::Malformed("a varint is longer than 10 bytes".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| ProtoError::Malformed("a field runs past the end of the body".into()))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    /// The next field's number and value, none at the end.
    fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, ProtoError> {
        if self.done() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| ProtoError::Malformed("a length does not fit in memory".into()))?;
                Wire::Bytes(self.take(len)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            other => return Err(ProtoError::Malformed(format!("wire type {other} is not supported"))),
        };
        Ok(Some((key >> 3, wire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding, by hand, for the tests.
    fn key(number: u64, wire: u64) -> Vec<u8> {
        varint(number << 3 | wire)
    }
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }
    fn int(number: u64, v: i64) -> Vec<u8> {
        [key(number, 0), varint(v as u64)].concat()
    }
    fn bytes(number: u64, b: &[u8]) -> Vec<u8> {
        [key(number, 2), varint(b.len() as u64), b.to_vec()].concat()
    }
    fn text(number: u64, s: &str) -> Vec<u8> {
        bytes(number, s.as_bytes())
    }
    fn entry(number: u64, k: &str, v: &str) -> Vec<u8> {
        bytes(number, &[text(1, k), text(2, v)].concat())
    }
    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [text(1, api_version), text(2, kind)].concat();
        [
            MAGIC.to_vec(),
            bytes(1, &type_meta),
            bytes(2, raw),
            text(3, ""),
            text(4, ""),
        ]
        .concat()
    }
    /// An ObjectMeta as Go writes it: every non-pointer field, empty ones included.
    fn meta(name: &str, labels: &[(&str, &str)]) -> Vec<u8> {
        let mut out = [
            text(1, name),
            text(2, ""),
            text(3, ""),
            text(4, ""),
            text(5, ""),
            text(6, ""),
            int(7, 0),
            bytes(8, &[int(1, 0), int(2, 0)].concat()),
        ]
        .concat();
        for (k, v) in labels {
            out.extend(entry(11, k, v));
        }
        out
    }

    #[test]
    fn a_deployment_as_kubectl_create_deployment_sends_it() {
        let container = [
            text(1, "busybox"),
            text(2, "busybox"),
            text(3, "sleep"),
            text(3, "3600"),
            text(5, ""),
            bytes(
                6,
                &[text(1, ""), int(2, 0), int(3, 80), text(4, "TCP"), text(5, "")].concat(),
            ),
            bytes(7, &[text(1, "MODE"), text(2, "demo")].concat()),
            bytes(8, &[]),
            text(13, ""),
            text(14, ""),
            int(16, 0),
            int(17, 0),
            int(18, 0),
            text(20, ""),
        ]
        .concat();
        let pod_spec = [
            bytes(2, &container),
            text(3, ""),
            int(4, 0),
            text(6, ""),
            int(11, 0),
            int(12, 0),
            int(13, 0),
        ]
        .concat();
        let template = [bytes(1, &meta("", &[("app", "d2")])), bytes(2, &pod_spec)].concat();
        let rolling = [
            bytes(1, &[int(1, 1), int(2, 0), text(3, "25%")].concat()),
            bytes(2, &[int(2, 1)].concat()),
        ]
        .concat();
        let spec = [
            int(1, 0),
            bytes(2, &entry(1, "app", "d2")),
            bytes(3, &template),
            bytes(4, &[text(1, "RollingUpdate"), bytes(2, &rolling)].concat()),
            int(5, 0),
            int(7, 0),
        ]
        .concat();
        let status = [int(1, 0), int(2, 0), int(3, 0), int(4, 0), int(5, 0), int(7, 0)].concat();
        let raw = [
            bytes(1, &meta("d2", &[("app", "d2")])),
            bytes(2, &spec),
            bytes(3, &status),
        ]
        .concat();
        let object = decode_object(&envelope("apps/v1", "Deployment", &raw)).unwrap();
        assert_eq!(
            object,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "d2", "labels": {"app": "d2"}},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "d2"}},
                    "template": {"metadata": {"labels": {"app": "d2"}}, "spec": {
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "busybox", "image": "busybox", "command": ["sleep", "3600"],
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                            "env": [{"name": "MODE", "value": "demo"}], "resources": {}}]}},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 1}}},
                "status": {}})
        );
    }

    #[test]
    fn a_service_with_int_and_string_target_ports() {
        let port = |name: &str, n: i64, target: Vec<u8>| {
            bytes(
                1,
                &[text(1, name), text(2, "TCP"), int(3, n), bytes(4, &target), int(5, 0)].concat(),
            )
        };
        let spec = [
            port("80-8080", 80, [int(1, 0), int(2, 8080), text(3, "")].concat()),
            port("web", 443, [int(1, 1), int(2, 0), text(3, "https")].concat()),
            entry(2, "app", "s1"),
            text(3, ""),
            text(4, "ClusterIP"),
            int(12, 0),
            int(13, 0),
            text(17, "SingleStack"),
        ]
        .concat();
        let raw = [bytes(1, &meta("s1", &[])), bytes(2, &spec), bytes(3, &bytes(1, &[]))].concat();
        let object = decode_object(&envelope("v1", "Service", &raw)).unwrap();
        assert_eq!(
            object,
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s1"},
                "spec": {"ports": [
                    {"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080},
                    {"name": "web", "protocol": "TCP", "port": 443, "targetPort": "https"}],
                    "selector": {"app": "s1"}, "type": "ClusterIP", "ipFamilyPolicy": "SingleStack"},
                "status": {"loadBalancer": {}}})
        );
    }

    #[test]
    fn unknown_fields_with_values_are_refused_by_number_and_message() {
        // Container field 12 (lifecycle) is not in the schema: empty is fine, a value is not.
        let container = |extra: Vec<u8>| [text(1, "c"), text(2, "nginx"), extra].concat();
        let pod = |container: Vec<u8>| {
            let spec = bytes(2, &container);
            envelope("v1", "Pod", &[bytes(1, &meta("p", &[])), bytes(2, &spec)].concat())
        };
        let empty_struct = bytes(12, &[text(3, ""), int(4, 0)].concat());
        let object = decode_object(&pod(container(empty_struct))).unwrap();
        assert_eq!(object["spec"]["containers"][0], json!({"name": "c", "image": "nginx"}));
        let set = bytes(12, &text(3, "SIGTERM"));
        match decode_object(&pod(container(set))) {
            Err(ProtoError::Unsupported(message)) => {
                assert!(
                    message.contains("field number 12") && message.contains("k8s.io.api.core.v1.Container"),
                    "{message}"
                );
                assert!(message.contains("spec.containers[0]"), "{message}");
            }
            other => panic!("not refused: {other:?}"),
        }
        // A number of its own, too.
        match decode_object(&pod(container(int(99, 7)))) {
            Err(ProtoError::Unsupported(message)) => assert!(message.contains("field number 99"), "{message}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn other_kinds_and_bad_bytes_are_refused() {
        let secret = envelope("v1", "Secret", &bytes(1, &meta("s", &[])));
        assert!(
            matches!(decode_object(&secret), Err(ProtoError::Unsupported(m)) if m.contains("Secret (v1)")),
            "Secret"
        );
        assert!(matches!(decode_object(b"{}"), Err(ProtoError::Malformed(_))));
        // A length past the end, a varint that never ends, a group.
        let mut truncated = envelope("v1", "Pod", &bytes(1, &meta("p", &[])));
        truncated.truncate(truncated.len() - 3);
        assert!(matches!(decode_object(&truncated), Err(ProtoError::Malformed(_))));
        let endless = [MAGIC.to_vec(), vec![0x08], vec![0xff; 12]].concat();
        assert!(matches!(decode_object(&endless), Err(ProtoError::Malformed(_))));
        let group = [MAGIC.to_vec(), key(1, 3)].concat();
        assert!(matches!(decode_object(&group), Err(ProtoError::Malformed(_))));
        // Deeply nested empty lengths are judged without recursing without bound.
        let mut nested = Vec::new();
        for _ in 0..10_000 {
            nested = bytes(5, &nested);
        }
        let deep = envelope("v1", "Pod", &[bytes(1, &meta("p", &[])), nested].concat());
        assert!(matches!(decode_object(&deep), Err(ProtoError::Unsupported(_))));
    }

    #[test]
    fn times_owner_references_and_negative_numbers() {
        let owner = [
            text(1, "ReplicaSet"),
            text(3, "rs"),
            text(4, "u-1"),
            text(5, "apps/v1"),
            int(6, 1),
        ]
        .concat();
        let meta = [
            text(1, "p"),
            bytes(8, &int(1, 1_700_000_000)),
            bytes(13, &owner),
            int(10, -1),
        ]
        .concat();
        let object = decode_object(&envelope("v1", "Pod", &bytes(1, &meta))).unwrap();
        assert_eq!(
            object["metadata"],
            json!({"name": "p", "creationTimestamp": "2023-11-14T22:13:20Z", "deletionGracePeriodSeconds": -1,
                "ownerReferences": [{"kind": "ReplicaSet", "name": "rs", "uid": "u-1", "apiVersion": "apps/v1", "controller": true}]})
        );
    }
}
