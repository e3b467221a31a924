//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! the holder renews `renewTime` every `renew_every`; a candidate takes the lease over when the
//! record has not changed for `lease_duration` (measured on the candidate's own clock, so clocks
//! need not agree); every write carries the `resourceVersion` it read, so two candidates cannot
//! both win. A leader that cannot renew within the lease duration steps down. On shutdown the
//! leader releases the lease so the next one need not wait.
//!
//! Every replica serves agents; only the leader does the work that must happen once
//! (publishing the root certificate ConfigMaps).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in `holderIdentity` (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// The last record seen (holder, renewTime) and when it was first seen.
    observed: Option<(String, String, Instant)>,
    /// When this replica last renewed successfully.
    renewed: Option<Instant>,
}

/// Runs the election until `stop` fires; `is_leader` follows it. Releases the lease on stop.
pub async fn run(
    client: Client,
    cfg: LeaderConfig,
    is_leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut e = Elector {
        api: Api::namespaced(client, &cfg.namespace),
        cfg,
        observed: None,
        renewed: None,
    };
    loop {
        let leading = e.try_acquire_or_renew().await;
        if *is_leader.borrow() != leading {
            if leading {
                info!(identity = %e.cfg.identity, lease = %e.cfg.lease_name, "became the leader");
            } else {
                warn!(identity = %e.cfg.identity, lease = %e.cfg.lease_name, "no longer the leader");
            }
            let _ = is_leader.send(leading);
        }
        tokio::select! {
            _ = tokio::time::sleep(e.cfg.renew_every) => {}
            _ = stop.changed() => break,
        }
    }
    if *is_leader.borrow() {
        e.release().await;
        let _ = is_leader.send(false);
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    fn secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round; returns whether this replica leads afterwards.
    async fn try_acquire_or_renew(&mut self) -> bool {
        let me = self.cfg.identity.clone();
        let current = match self.api.get_opt(&self.cfg.lease_name).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "reading the leader lease");
                return self.still_leading();
            }
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.secs()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(Instant::now());
                    true
                }
                Err(e) => {
                    info!(error = %e, "creating the leader lease (another replica may have won)");
                    false
                }
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew = spec
            .renew_time
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        // Track when the record last changed, on our clock.
        let changed = match &self.observed {
            Some((h, r, _)) => *h != holder || *r != renew,
            None => true,
        };
        if changed {
            self.observed = Some((holder.clone(), renew.clone(), Instant::now()));
        }
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1)))
            .unwrap_or(self.cfg.lease_duration);
        let expired = holder.is_empty()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, _, at)| at.elapsed() > duration);
        if holder != me && !expired {
            self.renewed = None;
            return false;
        }
        let mut new_spec = spec.clone();
        if holder != me {
            new_spec.holder_identity = Some(me);
            new_spec.acquire_time = Some(now());
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.renew_time = Some(now());
        new_spec.lease_duration_seconds = Some(self.secs());
        lease.spec = Some(new_spec);
        // `replace` sends the resourceVersion read above: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.renewed = Some(Instant::now());
                true
            }
            Err(e) => {
                info!(error = %e, "updating the leader lease");
                self.still_leading()
            }
        }
    }

    /// After a failed renewal: lead on only while the last renewal is within the lease.
    fn still_leading(&mut self) -> bool {
        let ok = self
            .renewed
            .is_some_and(|t| t.elapsed() < self.cfg.lease_duration);
        if !ok {
            self.renewed = None;
        }
        ok
    }

    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.lease_name).await else {
            return;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.cfg.lease_name, "released the leader lease"),
            Err(e) => warn!(error = %e, "releasing the leader lease"),
        }
    }
}
