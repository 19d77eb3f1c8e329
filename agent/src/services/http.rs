//! The service proxy's two HTTP endpoints, each bound narrowly:
//!
//! - `/healthz` (kube-proxy's port 10256 by default, on the node's address), answering as
//!   kube-proxy's does: `{"lastUpdated", "currentTime", "nodeEligible"}`, 200 while the datapath
//!   is up to date, 503 once a change has waited too long or before the first sync;
//! - `/metrics` (on localhost by default), Prometheus' text format.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::ServiceMetrics;

/// How fresh the datapath is.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<HealthInner>,
    /// How long a change may wait before the datapath counts as stale.
    pub stale_after: Duration,
}

#[derive(Debug, Default)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    pending_since: Option<Instant>,
}

impl Health {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            stale_after,
        }
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// The datapath holds every change that arrived.
    pub fn updated(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.last_updated = Some(SystemTime::now());
            inner.pending_since = None;
        }
    }

    /// Whether the datapath is up to date.
    pub fn healthy(&self) -> bool {
        self.healthy_at(Instant::now())
    }

    /// Whether the datapath is up to date at `now`.
    pub fn healthy_at(&self, now: Instant) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        inner.last_updated.is_some()
            && inner
                .pending_since
                .is_none_or(|since| now.saturating_duration_since(since) < self.stale_after)
    }

    fn last_updated(&self) -> Option<SystemTime> {
        self.inner.lock().ok().and_then(|i| i.last_updated)
    }
}

fn rfc3339(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let now = SystemTime::now();
    let body = serde_json::json!({
        "lastUpdated": health.last_updated().map(rfc3339).unwrap_or_default(),
        "currentTime": rfc3339(now),
        "nodeEligible": true,
    });
    let code = if health.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [("content-type", "application/json")], body.to_string())
}

async fn metrics(State(metrics): State<Arc<ServiceMetrics>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], metrics.render())
}

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("listening on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Serves `/healthz` on `addr` until the task is aborted.
pub async fn serve_healthz(addr: SocketAddr, health: Arc<Health>) -> Result<(), ListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    let app = Router::new().route("/healthz", get(healthz)).with_state(health);
    axum::serve(listener, app)
        .await
        .map_err(|source| ListenError { addr, source })
}

/// Serves `/metrics` on `addr` until the task is aborted.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<ServiceMetrics>) -> Result<(), ListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    let app = Router::new().route("/metrics", get(self::metrics)).with_state(metrics);
    axum::serve(listener, app)
        .await
        .map_err(|source| ListenError { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_after_a_sync_and_stale_once_a_change_waits_too_long() {
        let health = Health::new(Duration::from_secs(30));
        assert!(!health.healthy(), "not before the first sync");
        health.updated();
        assert!(health.healthy());
        health.queued();
        let now = Instant::now();
        assert!(health.healthy_at(now), "a fresh change is not staleness");
        assert!(!health.healthy_at(now + Duration::from_secs(31)));
        health.updated();
        assert!(health.healthy_at(now + Duration::from_secs(31)));
    }
}
