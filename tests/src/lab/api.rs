//! The lab's own calls to its API stand-in, through kube-rs with k8s-openapi's typed objects, as
//! the agent's are. The stand-in listens inside the control-plane namespace, so each call runs
//! on a short-lived thread that has entered it (netavark's pattern), with a runtime of its own.
use std::{fmt::Debug, future::Future, path::PathBuf};

use anyhow::{Context, Result, anyhow};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};

use super::{Lab, topology::ns_name};
use crate::netns::Netns;

/// The namespace the lab's namespaced objects live in.
pub const NAMESPACE: &str = "default";

/// A handle on the lab's API stand-in.
pub struct LabApi {
    cp: Netns,
    kubeconfig: PathBuf,
}

/// Anything the lab creates or reads, with the API it lives in: the lab's namespace for
/// namespaced kinds, the cluster for the others.
pub trait LabObject:
    Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    fn api(client: Client) -> Api<Self>;
}

macro_rules! lab_objects {
    (cluster: $($cluster:ty),*; namespaced: $($namespaced:ty),*) => {
        $(impl LabObject for $cluster {
            fn api(client: Client) -> Api<Self> {
                Api::all(client)
            }
        })*
        $(impl LabObject for $namespaced {
            fn api(client: Client) -> Api<Self> {
                Api::namespaced(client, NAMESPACE)
            }
        })*
    };
}

lab_objects!(
    cluster: k8s_openapi::api::core::v1::Node, k8s_openapi::api::core::v1::Namespace,
        k8s_openapi::api::networking::v1::ServiceCIDR;
    namespaced: k8s_openapi::api::core::v1::Pod, k8s_openapi::api::core::v1::Service,
        k8s_openapi::api::discovery::v1::EndpointSlice, k8s_openapi::api::apps::v1::Deployment
);

fn api_for<K: LabObject>(client: Client) -> Api<K> {
    K::api(client)
}

impl LabApi {
    pub fn new(lab: &Lab) -> Result<Self> {
        let name = ns_name(&lab.state.name, "cp");
        Ok(Self {
            cp: Netns::attach(&name).with_context(|| format!("namespace {name}"))?,
            kubeconfig: lab.kubeconfig(),
        })
    }

    /// Runs `f` with a client, from inside the control-plane namespace.
    pub fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(Client) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        let kubeconfig = self.kubeconfig.clone();
        ferrynet_kernel::netns::run_in(self.cp.fd(), move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime
                .block_on(async move {
                    let config = Kubeconfig::read_from(&kubeconfig)?;
                    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
                    f(Client::try_from(config)?).await
                })
                .map_err(|e| std::io::Error::other(format!("{e:#}")))
        })
        .map_err(|e| anyhow!("{e}"))
    }

    pub fn create<K: LabObject>(&self, object: &K) -> Result<K> {
        let object = object.clone();
        self.call(move |client| async move {
            let name = object.name_any();
            api_for::<K>(client)
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating {} {name}", K::kind(&())))
        })
    }

    pub fn get<K: LabObject>(&self, name: &str) -> Result<Option<K>> {
        let name = name.to_string();
        self.call(move |client| async move {
            api_for::<K>(client)
                .get_opt(&name)
                .await
                .with_context(|| format!("getting {} {name}", K::kind(&())))
        })
    }

    pub fn list<K: LabObject>(&self, labels: Option<&str>) -> Result<Vec<K>> {
        let params = match labels {
            Some(selector) => ListParams::default().labels(selector),
            None => ListParams::default(),
        };
        self.call(move |client| async move {
            Ok(api_for::<K>(client)
                .list(&params)
                .await
                .with_context(|| format!("listing {}", K::plural(&())))?
                .items)
        })
    }

    pub fn replace<K: LabObject>(&self, object: &K) -> Result<K> {
        let object = object.clone();
        self.call(move |client| async move {
            let name = object.name_any();
            api_for::<K>(client)
                .replace(&name, &PostParams::default(), &object)
                .await
                .with_context(|| format!("replacing {} {name}", K::kind(&())))
        })
    }

    /// Replaces the object's `status` (the subresource controllers and kubelets write).
    pub fn replace_status<K: LabObject>(&self, object: &K) -> Result<K> {
        let object = object.clone();
        self.call(move |client| async move {
            let name = object.name_any();
            api_for::<K>(client)
                .replace_status(&name, &PostParams::default(), &object)
                .await
                .with_context(|| format!("replacing the status of {} {name}", K::kind(&())))
        })
    }

    /// A JSON merge patch.
    pub fn merge_patch<K: LabObject>(&self, name: &str, patch: serde_json::Value) -> Result<K> {
        let name = name.to_string();
        self.call(move |client| async move {
            api_for::<K>(client)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("patching {} {name}", K::kind(&())))
        })
    }

    /// Deletes an object at once (a grace period of 0, as a kubelet finishes a pod's deletion);
    /// one that is already gone is fine.
    pub fn delete<K: LabObject>(&self, name: &str) -> Result<()> {
        self.delete_with_grace::<K>(name, 0)
    }

    /// Deletes an object with a grace period: a pod then stays, terminating, until it is deleted
    /// at once.
    pub fn delete_with_grace<K: LabObject>(&self, name: &str, grace_seconds: u32) -> Result<()> {
        let name = name.to_string();
        let params = DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..Default::default()
        };
        self.call(move |client| async move {
            match api_for::<K>(client).delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e).with_context(|| format!("deleting {} {name}", K::kind(&()))),
            }
        })
    }
}
