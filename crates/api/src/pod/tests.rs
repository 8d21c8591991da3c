//! The life rule and the address rule, one test per case of each.

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, PodIP,
        PodSpec,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};

use super::*;

fn state(running: bool, terminated: bool, waiting: bool) -> ContainerStatus {
    ContainerStatus {
        name: "c".into(),
        state: Some(ContainerState {
            running: running.then(ContainerStateRunning::default),
            terminated: terminated.then(ContainerStateTerminated::default),
            waiting: waiting.then(ContainerStateWaiting::default),
        }),
        ..ContainerStatus::default()
    }
}

fn status(init: Vec<ContainerStatus>, app: Vec<ContainerStatus>) -> PodStatus {
    PodStatus {
        init_container_statuses: Some(init),
        container_statuses: Some(app),
        ..PodStatus::default()
    }
}

#[test]
fn containers_run_while_any_runs_and_stop_once_every_one_is_reported_stopped() {
    let running = state(true, false, false);
    let done = state(false, true, false);
    let waiting = state(false, false, true);
    assert_eq!(Containers::of(None), Containers::Unreported);
    assert_eq!(
        Containers::of(Some(&PodStatus::default())),
        Containers::Unreported
    );
    assert_eq!(
        Containers::of(Some(&status(vec![done.clone()], vec![running.clone()]))),
        Containers::Running
    );
    // A sidecar (restartable init container) still running keeps the pod running.
    assert_eq!(
        Containers::of(Some(&status(vec![running], vec![done.clone()]))),
        Containers::Running
    );
    assert_eq!(
        Containers::of(Some(&status(vec![done.clone()], vec![done.clone(), waiting]))),
        Containers::NoneRunning
    );
    // A status without a state says nothing.
    let blank = ContainerStatus {
        name: "c".into(),
        ..ContainerStatus::default()
    };
    assert_eq!(
        Containers::of(Some(&status(vec![], vec![done, blank]))),
        Containers::Unreported
    );
}

#[test]
fn life_follows_phase_deletion_and_containers() {
    use Containers::*;
    let cases = [
        // (scheduled, phase, deleting, containers) → life
        ((false, None, false, Unreported), Life::Unscheduled),
        (
            (false, Some("Failed"), false, Unreported),
            Life::Finished(Ending::Failed),
        ),
        ((true, None, false, Unreported), Life::Active),
        ((true, Some("Pending"), false, Unreported), Life::Active),
        ((true, Some("Pending"), false, Running), Life::Active),
        ((true, Some("Running"), false, NoneRunning), Life::Active),
        ((true, Some("Unknown"), false, Unreported), Life::Active),
        ((true, Some("SomethingNew"), false, Running), Life::Active),
        ((true, Some("Running"), true, Running), Life::Terminating),
        ((true, Some("Running"), true, Unreported), Life::Terminating),
        ((true, Some("Unknown"), true, Running), Life::Terminating),
        (
            (true, Some("Running"), true, NoneRunning),
            Life::Finished(Ending::Stopped),
        ),
        (
            (true, Some("Succeeded"), false, Running),
            Life::Finished(Ending::Succeeded),
        ),
        (
            (true, Some("Failed"), true, Running),
            Life::Finished(Ending::Failed),
        ),
    ];
    for ((scheduled, phase, deleting, containers), life) in cases {
        assert_eq!(
            Life::of(scheduled, phase, deleting, containers),
            life,
            "{scheduled} {phase:?} {deleting} {containers:?}"
        );
        assert_eq!(life.may_run(), matches!(life, Life::Active | Life::Terminating));
    }
}

#[test]
fn the_view_of_a_kubernetes_pod() {
    let mut pod = Pod {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some("web".into()),
            uid: Some("u1".into()),
            labels: Some(BTreeMap::from([(POD_LABEL.into(), "pay".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("node-1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.5".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.0.0.5".into(),
                },
                PodIP { ip: "fd00::5".into() },
                PodIP {
                    ip: "not an address".into(),
                },
            ]),
            container_statuses: Some(vec![state(true, false, false)]),
            ..Default::default()
        }),
    };
    let view = PodView::from_pod(&pod);
    assert_eq!(view.key, ObjectKey::new("shop", "web"));
    assert_eq!(view.binding_selector(), Some("pay"));
    assert_eq!(view.node_name.as_deref(), Some("node-1"));
    assert_eq!(
        view.ips,
        vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]
    );
    assert_eq!(view.life(), Life::Active);
    assert!(!view.host_network);

    pod.metadata.deletion_timestamp = Some(Time(Default::default()));
    assert_eq!(PodView::from_pod(&pod).life(), Life::Terminating);
    pod.status.as_mut().unwrap().container_statuses = Some(vec![state(false, true, false)]);
    assert_eq!(PodView::from_pod(&pod).life(), Life::Finished(Ending::Stopped));

    pod.spec = Some(PodSpec {
        node_name: Some(String::new()),
        host_network: Some(true),
        ..Default::default()
    });
    let view = PodView::from_pod(&pod);
    assert_eq!(view.node_name, None, "an empty nodeName is not a node");
    assert!(view.host_network);
}

fn view(name: &str, ip: Option<&str>, life: Life) -> PodView {
    let (phase, deleting, containers) = match life {
        Life::Active | Life::Unscheduled => ("Running", false, Containers::Running),
        Life::Terminating => ("Running", true, Containers::Running),
        Life::Finished(Ending::Stopped) => ("Running", true, Containers::NoneRunning),
        Life::Finished(Ending::Succeeded) => ("Succeeded", false, Containers::NoneRunning),
        Life::Finished(Ending::Failed) => ("Failed", false, Containers::NoneRunning),
    };
    PodView {
        key: ObjectKey::new("ns", name),
        node_name: (life != Life::Unscheduled).then(|| "node".to_owned()),
        phase: Some(phase.into()),
        deleting,
        containers,
        ips: ip.map(|ip| ip.parse().unwrap()).into_iter().collect(),
        ..PodView::default()
    }
}

fn who<'a>(pods: &'a [PodView], awaiting: bool) -> Caller<'a, PodView> {
    caller(pods.iter().map(|p| (p, p)), awaiting)
}

fn name<'a>(caller: &Caller<'a, PodView>) -> String {
    match caller {
        Caller::Pod(p) => format!("pod {}", p.key.name),
        Caller::Unknown => "unknown".into(),
        Caller::Ambiguous(ps) => format!(
            "ambiguous {}",
            ps.iter()
                .map(|p| p.key.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ),
        Caller::Unsettled(p) => format!("unsettled {}", p.key.name),
    }
}

#[test]
fn a_pod_being_deleted_keeps_its_address_until_another_pod_may_have_it() {
    let ip = Some("10.0.0.5");
    let old = view("old", ip, Life::Terminating);
    let new = view("new", ip, Life::Active);
    // Alone, the pod being deleted is the caller: its grace period counts.
    assert_eq!(name(&who(std::slice::from_ref(&old), false)), "pod old");
    // The kubelet releases the address before it reports the containers stopped: a pod that is not
    // being deleted and has the address is the caller, whatever the order the pods are listed in.
    assert_eq!(name(&who(&[old.clone(), new.clone()], false)), "pod new");
    assert_eq!(name(&who(&[new, old.clone()], false)), "pod new");
    // A pod of the node whose address is not reported yet may have been given this one.
    assert_eq!(name(&who(std::slice::from_ref(&old), true)), "unsettled old");
    // Once its containers are reported stopped, it owns nothing.
    let stopped = view("old", ip, Life::Finished(Ending::Stopped));
    assert_eq!(name(&who(&[stopped], false)), "unknown");
}

#[test]
fn finished_host_network_and_duplicate_pods_do_not_make_a_caller() {
    let ip = Some("10.0.0.5");
    for ending in [Ending::Succeeded, Ending::Failed, Ending::Stopped] {
        let done = view("done", ip, Life::Finished(ending));
        let live = view("live", ip, Life::Active);
        assert_eq!(
            name(&who(std::slice::from_ref(&done), false)),
            "unknown",
            "{ending:?}"
        );
        assert_eq!(name(&who(&[done, live], false)), "pod live", "{ending:?}");
    }
    let mut host = view("host", ip, Life::Active);
    host.host_network = true;
    assert_eq!(
        name(&who(&[host], false)),
        "unknown",
        "a host-network pod's address is the node's"
    );
    let unknown_phase = PodView {
        phase: Some("Unknown".into()),
        ..view("lost", ip, Life::Active)
    };
    assert_eq!(name(&who(&[unknown_phase], false)), "pod lost");
    // Every pod that may be the caller is named, in the order listed; pods being deleted only when no
    // other pod may be.
    use Life::{Active, Terminating};
    /// The pods listed for the address (name, life), whether a pod awaits its address, the caller named.
    type Case<'a> = (&'a [(&'a str, Life)], bool, &'a str);
    let several: [Case<'_>; 4] = [
        (&[("a", Active), ("b", Active)], false, "ambiguous a,b"),
        (&[("a", Terminating), ("b", Terminating)], false, "ambiguous a,b"),
        (
            &[("a", Active), ("old", Terminating), ("b", Active), ("c", Active)],
            true,
            "ambiguous a,b,c",
        ),
        (
            &[("a", Terminating), ("b", Terminating), ("c", Terminating)],
            true,
            "ambiguous a,b,c",
        ),
    ];
    for (pods, awaiting, named) in several {
        let views: Vec<PodView> = pods.iter().map(|(n, life)| view(n, ip, *life)).collect();
        assert_eq!(
            name(&who(&views, awaiting)),
            named,
            "{pods:?}, awaiting {awaiting}"
        );
    }
}

#[test]
fn pods_that_may_run_on_their_own_network_without_an_address_await_one() {
    assert!(view("p", None, Life::Active).awaits_its_address());
    assert!(view("p", None, Life::Terminating).awaits_its_address());
    assert!(!view("p", Some("10.0.0.5"), Life::Active).awaits_its_address());
    assert!(!view("p", None, Life::Finished(Ending::Failed)).awaits_its_address());
    assert!(!view("p", None, Life::Unscheduled).awaits_its_address());
    let mut host = view("p", None, Life::Active);
    host.host_network = true;
    assert!(!host.awaits_its_address());
}
