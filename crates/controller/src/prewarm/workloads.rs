//! The workloads whose pod templates are warmed for, watched while pre-warming is on.

use std::sync::Arc;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    batch::v1::{CronJob, Job},
};
use kube::{
    Api, Client, Resource,
    runtime::{reflector::Store, watcher},
};
use tokio::sync::Notify;

use super::{WorkloadKind, WorkloadTemplate};
use crate::planner::reflect;

/// Deployments, StatefulSets, DaemonSets, Jobs and CronJobs in memory.
#[derive(Clone)]
pub struct Workloads {
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
    daemon_sets: Store<DaemonSet>,
    jobs: Store<Job>,
    cron_jobs: Store<CronJob>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

impl Workloads {
    /// Starts watching (all namespaces, or only `namespace`); any change wakes `notify`.
    pub fn reflectors(
        client: &Client,
        namespace: Option<&str>,
        notify: Arc<Notify>,
    ) -> (Self, impl Future<Output = ()> + use<>) {
        let config = watcher::Config::default;
        let (deployments, a) = reflect(api(client, namespace), config(), slim, notify.clone());
        let (stateful_sets, b) = reflect(api(client, namespace), config(), slim, notify.clone());
        let (daemon_sets, c) = reflect(api(client, namespace), config(), slim, notify.clone());
        let (jobs, d) = reflect(api(client, namespace), config(), slim, notify.clone());
        let (cron_jobs, e) = reflect(api(client, namespace), config(), slim, notify);
        let task = async move {
            tokio::join!(a, b, c, d, e);
        };
        (
            Self {
                deployments,
                stateful_sets,
                daemon_sets,
                jobs,
                cron_jobs,
            },
            task,
        )
    }

    /// Waits until every store holds a complete list; `false` when the watches stopped first.
    pub async fn ready(&self) -> bool {
        self.deployments.wait_until_ready().await.is_ok()
            && self.stateful_sets.wait_until_ready().await.is_ok()
            && self.daemon_sets.wait_until_ready().await.is_ok()
            && self.jobs.wait_until_ready().await.is_ok()
            && self.cron_jobs.wait_until_ready().await.is_ok()
    }

    /// The pod templates of workloads that may still start pods: finished Jobs and suspended CronJobs
    /// are left out.
    pub fn templates(&self) -> Vec<WorkloadTemplate> {
        fn of<K: Resource>(object: &K) -> (String, String) {
            let meta = object.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        }
        let mut templates = Vec::new();
        for d in self.deployments.state() {
            if let Some(spec) = &d.spec {
                let (ns, name) = of(&*d);
                templates.push(WorkloadTemplate::from_template(
                    WorkloadKind::Deployment,
                    &ns,
                    &name,
                    &spec.template,
                ));
            }
        }
        for s in self.stateful_sets.state() {
            if let Some(spec) = &s.spec {
                let (ns, name) = of(&*s);
                templates.push(WorkloadTemplate::from_template(
                    WorkloadKind::StatefulSet,
                    &ns,
                    &name,
                    &spec.template,
                ));
            }
        }
        for d in self.daemon_sets.state() {
            if let Some(spec) = &d.spec {
                let (ns, name) = of(&*d);
                templates.push(WorkloadTemplate::from_template(
                    WorkloadKind::DaemonSet,
                    &ns,
                    &name,
                    &spec.template,
                ));
            }
        }
        for j in self.jobs.state() {
            let finished = j.status.as_ref().is_some_and(|status| {
                status.completion_time.is_some()
                    || status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            });
            if let (Some(spec), false) = (&j.spec, finished) {
                let (ns, name) = of(&*j);
                templates.push(WorkloadTemplate::from_template(
                    WorkloadKind::Job,
                    &ns,
                    &name,
                    &spec.template,
                ));
            }
        }
        for c in self.cron_jobs.state() {
            let Some(spec) = &c.spec else { continue };
            if spec.suspend == Some(true) {
                continue;
            }
            if let Some(template) = spec.job_template.spec.as_ref().map(|j| &j.template) {
                let (ns, name) = of(&*c);
                templates.push(WorkloadTemplate::from_template(
                    WorkloadKind::CronJob,
                    &ns,
                    &name,
                    template,
                ));
            }
        }
        templates
    }
}
