//! apps/v1 Deployments: the API server's defaulting and the checks that keep the lab's
//! controllers from meeting nonsense, and the `scale` subresource (`kubectl scale`, HPA) as an
//! `autoscaling/v1` Scale. No controller runs here: ReplicaSets and pods are the lab's business.
use axum::{
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use serde_json::{Map, Value, json};

use super::{
    ApiServer, DEPLOYMENT, Requirement, Selector, Target, json_response, merge_patch, not_found, status_error,
};

fn invalid(message: String) -> Box<Response> {
    Box::new(status_error(422, "Invalid", message))
}

/// The map at `value` (a null becomes an empty one); none for anything else.
fn object_at(value: &mut Value) -> Option<&mut Map<String, Value>> {
    if value.is_null() {
        *value = json!({});
    }
    value.as_object_mut()
}

/// Sets `key` unless it has a value.
fn default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.into(), value);
    }
}

/// What the API server does to a new Deployment: checks it, fills in the defaults that
/// kubectl's output and the controllers depend on, and empties its status.
pub(super) fn prepare_new(object: &mut Value) -> Result<(), Box<Response>> {
    apply_defaults(object)?;
    validate(object)?;
    object["status"] = json!({});
    Ok(())
}

/// Checks a Deployment after an update (defaults first, as the server decodes with them).
pub(super) fn prepare_update(object: &mut Value) -> Result<(), Box<Response>> {
    apply_defaults(object)?;
    validate(object)
}

/// apps/v1 defaulting: one replica, a 25%/25% rolling update, 10 old ReplicaSets kept, a 600 s
/// progress deadline; and the pod template's own defaults, as for a pod.
fn apply_defaults(object: &mut Value) -> Result<(), Box<Response>> {
    let spec =
        object_at(&mut object["spec"]).ok_or_else(|| invalid("spec: Invalid value: must be an object".into()))?;
    default(spec, "replicas", json!(1));
    default(spec, "revisionHistoryLimit", json!(10));
    default(spec, "progressDeadlineSeconds", json!(600));
    let strategy = spec.entry("strategy").or_insert(Value::Null);
    let strategy =
        object_at(strategy).ok_or_else(|| invalid("spec.strategy: Invalid value: must be an object".into()))?;
    default(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        let rolling = strategy.entry("rollingUpdate").or_insert(Value::Null);
        let rolling = object_at(rolling)
            .ok_or_else(|| invalid("spec.strategy.rollingUpdate: Invalid value: must be an object".into()))?;
        default(rolling, "maxUnavailable", json!("25%"));
        default(rolling, "maxSurge", json!("25%"));
    }
    let template = spec.entry("template").or_insert(Value::Null);
    let template =
        object_at(template).ok_or_else(|| invalid("spec.template: Invalid value: must be an object".into()))?;
    let pod_spec = template.entry("spec").or_insert(Value::Null);
    let pod_spec =
        object_at(pod_spec).ok_or_else(|| invalid("spec.template.spec: Invalid value: must be an object".into()))?;
    default_pod_spec(pod_spec);
    Ok(())
}

/// core/v1 defaulting of a pod spec: restart policy, DNS policy, grace period, scheduler, and
/// each container's pull policy, termination message and port protocols.
fn default_pod_spec(spec: &mut Map<String, Value>) {
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "securityContext", json!({}));
    for list in ["initContainers", "containers"] {
        for container in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(container) = container.as_object_mut() else {
                continue;
            };
            let image = container.get("image").and_then(Value::as_str).unwrap_or("");
            // The tag is after the last colon of the last path segment (a registry may have a port).
            let tag = image
                .rsplit('/')
                .next()
                .and_then(|last| last.split('@').next()?.split_once(':'));
            let latest = !image.contains('@') && tag.is_none_or(|(_, tag)| tag == "latest");
            default(
                container,
                "imagePullPolicy",
                json!(if latest { "Always" } else { "IfNotPresent" }),
            );
            default(container, "terminationMessagePath", json!("/dev/termination-log"));
            default(container, "terminationMessagePolicy", json!("File"));
            default(container, "resources", json!({}));
            for port in container
                .get_mut("ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(port) = port.as_object_mut() {
                    default(port, "protocol", json!("TCP"));
                }
            }
        }
    }
}

/// The checks the API server makes that matter to a controller: a selector, that selects the
/// template's labels, containers, and a replica count that is not negative.
fn validate(object: &Value) -> Result<(), Box<Response>> {
    let spec = &object["spec"];
    if let Some(replicas) = spec["replicas"].as_i64().filter(|r| *r < 0) {
        return Err(invalid(format!(
            "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
        )));
    }
    if !spec["replicas"].is_i64() {
        return Err(invalid(format!(
            "spec.replicas: Invalid value: {}: must be an integer",
            spec["replicas"]
        )));
    }
    let selector = &spec["selector"];
    if selector.is_null() {
        return Err(invalid("spec.selector: Required value".into()));
    }
    let parsed = label_selector(selector).map_err(|e| invalid(format!("spec.selector: Invalid value: {e}")))?;
    if parsed.0.is_empty() {
        return Err(invalid(
            "spec.selector: Invalid value: {}: empty selector is invalid for deployment".into(),
        ));
    }
    let labels = spec["template"]["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if !parsed.matches(&labels) {
        return Err(invalid(format!(
            "spec.template.metadata.labels: Invalid value: {}: `selector` does not match template `labels`",
            Value::Object(labels)
        )));
    }
    let containers = spec["template"]["spec"]["containers"].as_array();
    if containers.is_none_or(Vec::is_empty) {
        return Err(invalid("spec.template.spec.containers: Required value".into()));
    }
    Ok(())
}

/// A `metav1.LabelSelector` (matchLabels and matchExpressions) as a [`Selector`].
pub(super) fn label_selector(selector: &Value) -> Result<Selector, String> {
    let mut requirements = Vec::new();
    for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
        let value = value.as_str().ok_or(format!("matchLabels[{key}] is not a string"))?;
        requirements.push(Requirement::Eq(key.clone(), value.into()));
    }
    for expression in selector["matchExpressions"].as_array().into_iter().flatten() {
        let key = expression["key"]
            .as_str()
            .ok_or("a matchExpression without a key")?
            .to_string();
        let values: Vec<String> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        requirements.push(match expression["operator"].as_str() {
            Some("In") => Requirement::In(key, values),
            Some("NotIn") => Requirement::NotIn(key, values),
            Some("Exists") => Requirement::Exists(key),
            Some("DoesNotExist") => Requirement::Absent(key),
            other => return Err(format!("{other:?} is not a valid label selector operator")),
        });
    }
    Ok(Selector(requirements))
}

/// A Deployment's `autoscaling/v1` Scale.
pub(super) fn scale_of(deployment: &Value) -> Value {
    let meta = &deployment["metadata"];
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"]},
        "spec": {"replicas": deployment["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": deployment["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": super::table::selector_string(&deployment["spec"]["selector"])}})
}

/// The `scale` subresource: GET reads it; PUT (a Scale) and PATCH (merge or strategic merge,
/// the same thing for a Scale, which has no lists) set `spec.replicas`.
pub(super) fn scale(
    server: &ApiServer,
    target: &Target,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
    dry_run: bool,
) -> Response {
    let key = target.key();
    let current = match server
        .inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .objects
        .get(&key)
    {
        Some(d) => d.clone(),
        None => return not_found(target),
    };
    let wanted: Value = match *method {
        Method::GET => return json_response(StatusCode::OK, scale_of(&current)),
        Method::PUT => match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return status_error(400, "BadRequest", "the body is not a JSON Scale".into()),
        },
        Method::PATCH => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with("application/merge-patch+json")
                && !content_type.starts_with("application/strategic-merge-patch+json")
            {
                return status_error(
                    415,
                    "UnsupportedMediaType",
                    format!("the API stand-in patches a Scale with a merge patch only, not {content_type:?}"),
                );
            }
            let patch: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return status_error(400, "BadRequest", e.to_string()),
            };
            let mut scale = scale_of(&current);
            merge_patch(&mut scale, &patch);
            scale
        }
        _ => {
            return status_error(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on a scale subresource"),
            );
        }
    };
    set_replicas(server, target, &wanted, dry_run)
}

/// Sets a Deployment's `spec.replicas` from a Scale, checking the Scale's resourceVersion.
fn set_replicas(server: &ApiServer, target: &Target, scale: &Value, dry_run: bool) -> Response {
    // Scale's spec.replicas is omitted when zero.
    let replicas = &scale["spec"]["replicas"];
    let Some(replicas) = (if replicas.is_null() { Some(0) } else { replicas.as_i64() })
        .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
    else {
        return status_error(
            422,
            "Invalid",
            format!("spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"),
        );
    };
    let mut inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(current) = inner.copy(&target.key()) else {
        return not_found(target);
    };
    if let Some(rv) = scale["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty())
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        return status_error(
            409,
            "Conflict",
            "Operation cannot be fulfilled on deployments.apps: the object has been modified; please apply your changes to the latest version and try again".into(),
        );
    }
    if current["spec"]["replicas"] == json!(replicas) {
        return json_response(StatusCode::OK, scale_of(&current));
    }
    let mut updated = current.clone();
    updated["spec"]["replicas"] = json!(replicas);
    updated["metadata"]["generation"] = json!(current["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
    if dry_run {
        return json_response(StatusCode::OK, scale_of(&updated));
    }
    let stored = server.commit(&mut inner, DEPLOYMENT, "MODIFIED", updated);
    json_response(StatusCode::OK, scale_of(&stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({"metadata": {"name": "demo"}, "spec": {"selector": {"matchLabels": {"app": "demo"}},
            "template": {"metadata": {"labels": {"app": "demo"}},
                "spec": {"containers": [{"name": "nginx", "image": "nginx", "ports": [{"containerPort": 80}]},
                    {"name": "pinned", "image": "registry:5000/busybox:1.36"}]}},
            "strategy": {}}, "status": {"replicas": 9}})
    }

    #[test]
    fn new_deployments_are_defaulted_and_lose_their_status() {
        let mut d = deployment();
        prepare_new(&mut d).unwrap();
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(
            spec["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        assert_eq!(
            (
                spec["revisionHistoryLimit"].clone(),
                spec["progressDeadlineSeconds"].clone()
            ),
            (json!(10), json!(600))
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Always");
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["containers"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(pod["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(d["status"], json!({}));
        // Given values are kept: zero replicas, a Recreate strategy.
        let mut d = deployment();
        d["spec"]["replicas"] = json!(0);
        d["spec"]["strategy"] = json!({"type": "Recreate"});
        prepare_new(&mut d).unwrap();
        assert_eq!(d["spec"]["replicas"], 0);
        assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn deployments_that_select_nothing_of_theirs_are_refused() {
        let refused = |change: &dyn Fn(&mut Value)| {
            let mut d = deployment();
            change(&mut d);
            prepare_new(&mut d).map(|_| ()).map_err(|r| r.status().as_u16())
        };
        assert_eq!(refused(&|d| d["spec"]["selector"] = Value::Null), Err(422));
        assert_eq!(refused(&|d| d["spec"]["selector"] = json!({})), Err(422));
        assert_eq!(
            refused(&|d| d["spec"]["selector"]["matchLabels"]["app"] = json!("other")),
            Err(422)
        );
        assert_eq!(refused(&|d| d["spec"]["replicas"] = json!(-1)), Err(422));
        assert_eq!(refused(&|d| d["spec"]["template"] = json!("x")), Err(422));
        assert_eq!(
            refused(&|d| d["spec"]["template"]["spec"]["containers"] = json!([])),
            Err(422)
        );
        assert_eq!(
            refused(&|d| d["spec"]["selector"]["matchExpressions"] =
                json!([{"key": "app", "operator": "In", "values": ["demo", "x"]}])),
            Ok(())
        );
    }

    #[test]
    fn the_scale_of_a_deployment() {
        let mut d = deployment();
        prepare_new(&mut d).unwrap();
        d["metadata"]["resourceVersion"] = json!("7");
        d["spec"]["replicas"] = json!(3);
        let scale = scale_of(&d);
        assert_eq!(scale["spec"], json!({"replicas": 3}));
        assert_eq!(scale["status"], json!({"replicas": 0, "selector": "app=demo"}));
        assert_eq!(scale["metadata"]["resourceVersion"], "7");
    }
}
