//! Supervision: every reflector and controller runs as a task of its own. When one ends or
//! panics, the agent does not go on reconciling from a frozen store while reporting ready: its
//! section says it is down (and readiness fails, where the section gates it), and it is restarted
//! after a backoff that grows while it keeps failing.
use std::{future::Future, time::Duration};

use tokio::{task::JoinSet, time::Instant};
use tracing::{error, info, warn};

use crate::status::{SectionName, StatusHandle};

/// The first and the longest wait before a restart.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A task that ran this long before failing starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The next wait, given the last one and how long the task ran.
pub fn next_backoff(last: Option<Duration>, ran_for: Duration) -> Duration {
    match last {
        Some(last) if ran_for < STABLE_AFTER => (last * 2).min(BACKOFF_MAX),
        _ => BACKOFF_MIN,
    }
}

/// Runs supervised tasks until it is dropped (which aborts them all).
pub struct Supervisor {
    status: StatusHandle,
    tasks: JoinSet<()>,
}

impl Supervisor {
    pub fn new(status: StatusHandle) -> Self {
        Self {
            status,
            tasks: JoinSet::new(),
        }
    }

    /// Runs `make()`'s future as section `name`, restarting it whenever it ends or panics.
    pub fn spawn<F, Fut, E>(&mut self, name: SectionName, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let status = self.status.clone();
        self.tasks.spawn(async move {
            let mut backoff = None;
            loop {
                status.update(|s| {
                    let (running, _, _) = s.supervision_mut(name);
                    *running = true;
                });
                let started = Instant::now();
                let outcome = tokio::spawn(make()).await;
                let why = match outcome {
                    Ok(Ok(())) => "ended".to_string(),
                    Ok(Err(e)) => format!("failed: {e}"),
                    Err(join) if join.is_panic() => {
                        let panic = join.into_panic();
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        format!("panicked: {what}")
                    }
                    Err(_) => return,
                };
                let wait = next_backoff(backoff, started.elapsed());
                backoff = Some(wait);
                error!("{} {why}; restarting in {wait:?}", name.as_str());
                status.update(|s| {
                    let (running, restarts, last_error) = s.supervision_mut(name);
                    *running = false;
                    *restarts += 1;
                    *last_error = Some(format!("{} {why}", name.as_str()));
                });
                tokio::time::sleep(wait).await;
                info!("restarting {}", name.as_str());
            }
        });
    }

    /// Waits until a supervision loop itself ends (it never does, short of a bug).
    pub async fn join_next(&mut self) {
        match self.tasks.join_next().await {
            Some(Err(e)) => warn!("a supervision loop ended: {e}"),
            Some(Ok(())) => warn!("a supervision loop ended"),
            None => std::future::pending().await,
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[test]
    fn backoff_grows_while_failing_and_resets_after_a_stable_run() {
        let quick = Duration::from_secs(1);
        let first = next_backoff(None, quick);
        assert_eq!(first, BACKOFF_MIN);
        let second = next_backoff(Some(first), quick);
        assert_eq!(second, BACKOFF_MIN * 2);
        assert_eq!(next_backoff(Some(BACKOFF_MAX), quick), BACKOFF_MAX);
        assert_eq!(next_backoff(Some(BACKOFF_MAX), STABLE_AFTER), BACKOFF_MIN);
    }

    /// Waits (in real time, at most 10 s) until `done` holds.
    async fn until(mut done: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_down_and_restarted() {
        let status = StatusHandle::new("n1");
        let mut supervisor = Supervisor::new(status.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        supervisor.spawn(SectionName::NodeNetworking, move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run");
                }
                std::future::pending::<()>().await;
                Ok::<(), std::io::Error>(())
            }
        });
        // The first run panics: down, with the panic as its error, for the backoff.
        assert!(until(|| status.snapshot().node_networking.restarts == 1).await);
        let s = status.snapshot();
        assert!(!s.node_networking.running);
        assert!(
            s.node_networking
                .last_error
                .as_deref()
                .unwrap()
                .contains("panicked: first run")
        );
        assert_eq!(s.not_ready().first(), Some(&"watches"));
        assert!(s.not_ready().contains(&"node-networking"));
        // After the backoff it runs again.
        assert!(until(|| runs.load(Ordering::SeqCst) == 2 && status.snapshot().node_networking.running).await);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(status.snapshot().node_networking.running);
    }
}
