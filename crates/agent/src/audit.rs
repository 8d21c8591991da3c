//! The audit stream: one JSON line per token decision (served, denied, unavailable), on a stream of its
//! own, so that "what got a token, when, and why not" is answered from a record meant to be kept rather
//! than from logs meant to be read (the original's design promised issuance auditing and never shipped
//! it; peers log at most a line per request among their other lines).
//!
//! A record names the caller (node, pod namespace/name/UID, service account), the identity (resource ID,
//! client ID), the resource asked for, the decision and its reason, whether the cache answered, the
//! latency, and for served tokens a SHA-256 prefix of each token, never the token: enough to match a
//! token seen elsewhere (a Key Vault or ARM sign-in log, a leaked header) to the pod it was issued to.
//!
//! [`build`] turns a decision into a record and [`Aggregator`] folds repeated refusals, both plain
//! functions of their input; [`Audit`] carries records off the request path to a writer thread through
//! a bounded queue (a full queue drops and counts, it never slows a request).
//!
//! Repeated refusals are folded: the first refusal of a caller for a reason is written at once; the
//! same refusal again within the window is only counted, and one record with `count` closes the window.
//! A pod that asks for someone else's identity in a loop writes two lines a window, not one per request.
//! Served tokens are never folded: each issuance is a record.

use std::{
    collections::HashMap,
    io::Write,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::Duration,
};

use serde::Serialize;

use pod_identity_api::AzureIdentity;

use crate::{
    metrics::{Metrics, ResultLabels},
    request::{Selector, TokenQuery},
    upstream::Token,
    world::PodRecord,
};

/// What was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// A token was served (200).
    Served,
    /// Refused for good (400, 403): nothing the caller waits for changes it.
    Denied,
    /// Not now (503 with `Retry-After`): the answer may change.
    Unavailable,
}

/// Why, as a bounded CamelCase word (the vocabulary of the agent's Kubernetes Events); the free text is
/// the record's `message`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Reason {
    /// A token of one of the pod's identities.
    TokenServed,
    /// The pod is excepted (AzurePodIdentityException) and got what the node's IMDS gives.
    Excepted,
    /// Malformed request (headers, query): 400.
    InvalidRequest,
    /// The pod may not use what it asked for (no binding, another pod's identity, a finished pod).
    IdentityDenied,
    /// The identity is bound but not assigned to this node yet.
    IdentityNotAssigned,
    /// No pod of this node is known to have the caller's address (yet), or several have it.
    UnknownCaller,
    /// The agent is still loading pods and identities.
    NotSynced,
    /// IMDS or Entra refused or failed.
    TokenUpstreamError,
    /// With callers attested: the caller's socket is not in the pod its address names (a forged address).
    CallerSpoofed,
    /// With callers attested: the caller could not be attested in time (it may ask again).
    CallerUnattested,
    /// With callers attested: a process in no pod, refused by `--node-callers=refuse`.
    NodeRefused,
}

/// The pod a record is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID: names and IPs are reused, UIDs are not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The identity a record is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRef {
    /// The AzureIdentity (`namespace/name`); absent for an excepted pod's node identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_identity: Option<String>,
    /// ARM resource ID of a user-assigned identity.
    #[serde(rename = "resourceID", skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Client (application) ID.
    #[serde(rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

impl IdentityRef {
    /// The identity a decision is recorded under: the AzureIdentity chosen, else (a refusal, an excepted
    /// pod's node identity) the one the request named, if any.
    pub fn of(object: Option<&AzureIdentity>, selector: &Selector) -> Self {
        match (object, selector) {
            (Some(object), _) => Self {
                azure_identity: Some(crate::world::key_of(object).to_string()),
                resource_id: object.spec.resource_id.clone(),
                client_id: object.spec.client_id.clone(),
            },
            (None, Selector::ClientId(id)) => Self {
                client_id: Some(id.clone()),
                ..Self::default()
            },
            (None, Selector::ResourceId(id)) => Self {
                resource_id: Some(id.clone()),
                ..Self::default()
            },
            (None, Selector::Default | Selector::ObjectId(_)) => Self::default(),
        }
    }
}

/// Who asked and when the request arrived: what every record of a request shares.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// The connection's source address.
    pub peer: IpAddr,
    /// When the request arrived.
    pub started: std::time::Instant,
}

impl Call {
    /// A request from `peer` that arrived at `started`.
    pub fn new(peer: IpAddr, started: std::time::Instant) -> Self {
        Self { peer, started }
    }

    /// Records a decision that served no token; the identity is the one the request named, if any.
    pub fn refused(
        &self,
        audit: &Audit,
        pod: Option<&PodRecord>,
        query: Option<&TokenQuery>,
        decided: (Decision, Reason),
        why: &str,
    ) {
        let identity = query
            .map(|query| IdentityRef::of(None, &query.selector))
            .filter(|identity| *identity != IdentityRef::default());
        audit.record(&Entry {
            caller: self.peer,
            pod,
            identity: identity.as_ref(),
            resource: query.map_or("", |query| query.resource.as_str()),
            decision: decided.0,
            reason: decided.1,
            message: why,
            cache_hit: None,
            latency: self.started.elapsed(),
            tokens: &[],
        });
    }
}

/// One decision as the request path knows it.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// The connection's source address.
    pub caller: IpAddr,
    /// The pod, when known.
    pub pod: Option<&'a PodRecord>,
    /// The identity, when one was chosen (or asked for).
    pub identity: Option<&'a IdentityRef>,
    /// The `resource` asked for (empty when the query could not be read).
    pub resource: &'a str,
    /// What was decided.
    pub decision: Decision,
    /// Why.
    pub reason: Reason,
    /// What the caller was told.
    pub message: &'a str,
    /// Whether the cache answered (`None`: no token was looked up).
    pub cache_hit: Option<bool>,
    /// From the request's arrival to the decision.
    pub latency: Duration,
    /// The tokens served (empty unless served).
    pub tokens: &'a [Token],
}

/// One line of the audit stream. The schema is documented in the agent's README; fields are only ever
/// added.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// RFC 3339, UTC: when the decision was made (for a folded record, the last one of the window).
    pub time: String,
    /// The node whose agent decided.
    pub node: String,
    /// The caller's address.
    pub caller: String,
    /// The pod, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The pod's service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The identity, when one was chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityRef>,
    /// The resource (audience) asked for.
    pub resource: String,
    /// What was decided.
    pub decision: Decision,
    /// Why, a bounded word.
    pub reason: Reason,
    /// What the caller was told, cut to [`MAX_MESSAGE_BYTES`].
    pub message: String,
    /// Whether the cache answered; absent when no token was looked up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    /// Milliseconds from the request's arrival to the decision.
    pub latency_ms: f64,
    /// The first [`TOKEN_HASH_HEX_CHARS`] hex digits of the SHA-256 of each token served (one per tenant
    /// for a multi-tenant service principal); empty unless served.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_sha256: Vec<String>,
    /// How many decisions this record stands for: 1, or for a folded record the repeats of the window.
    pub count: u64,
    /// For a folded record: the first repeat of the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_time: Option<String>,
}

/// Hex digits of a token's SHA-256 kept: 64 bits, enough to tell tokens apart, far too few to matter to
/// anyone holding the record (and a token's hash reveals nothing of it anyway).
pub const TOKEN_HASH_HEX_CHARS: usize = 16;

/// Longest message kept, in bytes: messages quote what the caller sent (a `client_id`), and a pod must
/// not write the audit stream's volume.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// The SHA-256 prefix that stands for a token in records.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut hex = String::with_capacity(TOKEN_HASH_HEX_CHARS);
    for byte in digest.as_ref() {
        if hex.len() >= TOKEN_HASH_HEX_CHARS {
            break;
        }
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.truncate(TOKEN_HASH_HEX_CHARS);
    hex
}

/// The record of a decision made at `at` on `node`. Only hashes of the tokens enter it.
pub fn build(node: &str, entry: &Entry<'_>, at: jiff::Timestamp) -> AuditRecord {
    let tokens = if entry.decision == Decision::Served {
        entry.tokens.iter().map(|t| token_hash(&t.access_token)).collect()
    } else {
        Vec::new()
    };
    AuditRecord {
        time: at.to_string(),
        node: node.to_owned(),
        caller: entry.caller.to_string(),
        pod: entry.pod.map(|pod| PodRef {
            namespace: pod.view.key.namespace.clone(),
            name: pod.view.key.name.clone(),
            uid: pod.view.uid.clone(),
        }),
        service_account: entry.pod.and_then(|pod| pod.service_account.clone()),
        identity: entry.identity.cloned(),
        resource: pod_identity_api::text::truncate(entry.resource, MAX_MESSAGE_BYTES).into_owned(),
        decision: entry.decision,
        reason: entry.reason,
        message: pod_identity_api::text::truncate(entry.message, MAX_MESSAGE_BYTES).into_owned(),
        cache_hit: entry.cache_hit,
        latency_ms: (entry.latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
        token_sha256: tokens,
        count: 1,
        first_time: None,
    }
}

/// What makes two refusals the same: the caller (its pod UID, else its address), the decision and the
/// reason. The message is not part of it: it quotes what the caller sent, and a caller varying its
/// request must not escape folding.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FoldKey {
    caller: String,
    decision: Decision,
    reason: Reason,
}

#[derive(Debug)]
struct Window {
    opened: jiff::Timestamp,
    repeats: u64,
    first_repeat: Option<String>,
    last: Option<AuditRecord>,
}

/// Folds repeated refusals per caller and reason over a window.
#[derive(Debug)]
pub struct Aggregator {
    window: Duration,
    max_callers: usize,
    open: HashMap<FoldKey, Window>,
}

/// Callers whose refusals are folded apart; beyond, refusals of new callers share one window per
/// decision and reason (the node has a few hundred pod addresses at most).
const MAX_FOLDED_CALLERS: usize = 4096;

impl Aggregator {
    /// Folds over `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            max_callers: MAX_FOLDED_CALLERS,
            open: HashMap::new(),
        }
    }

    /// What to write now for `record`: itself (a served token, or the first refusal of a window), or
    /// nothing (a repeat, counted into the window's closing record).
    pub fn offer(&mut self, record: AuditRecord, now: jiff::Timestamp) -> Option<AuditRecord> {
        if record.decision == Decision::Served {
            return Some(record);
        }
        let caller = record
            .pod
            .as_ref()
            .and_then(|pod| pod.uid.clone())
            .unwrap_or_else(|| record.caller.clone());
        let mut key = FoldKey {
            caller,
            decision: record.decision,
            reason: record.reason,
        };
        if !self.open.contains_key(&key) && self.open.len() >= self.max_callers {
            key.caller = "*".to_owned();
        }
        let window = self.window;
        match self.open.get_mut(&key) {
            Some(open) if now.duration_since(open.opened).unsigned_abs() < window => {
                open.repeats += 1;
                if open.first_repeat.is_none() {
                    open.first_repeat = Some(record.time.clone());
                }
                open.last = Some(record);
                None
            }
            _ => {
                self.open.insert(
                    key,
                    Window {
                        opened: now,
                        repeats: 0,
                        first_repeat: None,
                        last: None,
                    },
                );
                Some(record)
            }
        }
    }

    /// The closing records of windows over at `now` (all of them when `now` is `None`, at shutdown).
    pub fn due(&mut self, now: Option<jiff::Timestamp>) -> Vec<AuditRecord> {
        let window = self.window;
        let mut closed = Vec::new();
        self.open.retain(|_, open| {
            let over = now.is_none_or(|now| now.duration_since(open.opened).unsigned_abs() >= window);
            if over && let Some(mut last) = open.last.take() {
                last.count = open.repeats;
                last.first_time = open.first_repeat.take();
                closed.push(last);
            }
            !over
        });
        closed.sort_by(|a, b| a.time.cmp(&b.time));
        closed
    }
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Standard output (`-`): the agent's logs go to standard error, so a node's log collector keeps the
    /// two apart by stream.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl Target {
    /// `-` for standard output, else a path.
    pub fn parse(value: &str) -> Self {
        if value == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(value))
        }
    }
}

/// Records queued and not yet written, at most; beyond, records are dropped and counted.
const QUEUE: usize = 4096;

/// What the writer thread receives.
#[derive(Debug)]
enum Message {
    /// A record to write (or fold).
    Record(Box<AuditRecord>),
    /// Close every window, flush, acknowledge, stop.
    Close(mpsc::Sender<()>),
}

/// The request path's handle on the audit stream; never blocks.
#[derive(Clone, Debug)]
pub struct Audit {
    node: String,
    queue: Option<SyncSender<Message>>,
    metrics: Arc<Metrics>,
}

impl Audit {
    /// No audit stream.
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self {
            node: String::new(),
            queue: None,
            metrics,
        }
    }

    /// An audit stream of `node` written to `target` by a thread of its own, folding refusals over
    /// `window`. Errors: the file cannot be opened.
    pub fn start(
        target: &Target,
        node: &str,
        window: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (queue, records) = mpsc::sync_channel::<Message>(QUEUE);
        let writer_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_loop(records, out, window, &writer_metrics))?;
        Ok(Self {
            node: node.to_owned(),
            queue: Some(queue),
            metrics,
        })
    }

    /// Whether records are kept at all: building one is skipped when they are not.
    pub fn is_enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Records one decision (nothing when disabled); a full queue drops it and counts the drop.
    pub fn record(&self, entry: &Entry<'_>) {
        let Some(queue) = &self.queue else { return };
        let record = build(&self.node, entry, jiff::Timestamp::now());
        match queue.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.count("dropped"),
        }
    }

    /// Writes the closing records of open windows and flushes, waiting at most `wait` (at shutdown:
    /// a process that exits does not wait for the writer thread). Later records are dropped.
    pub async fn close(&self, wait: Duration) {
        let Some(queue) = self.queue.clone() else { return };
        let _ = tokio::task::spawn_blocking(move || {
            let (done, finished) = mpsc::channel();
            if queue.send(Message::Close(done)).is_ok() {
                let _ = finished.recv_timeout(wait);
            }
        })
        .await;
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .audit_records
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

fn write_loop(
    records: mpsc::Receiver<Message>,
    out: Box<dyn Write + Send>,
    window: Duration,
    metrics: &Metrics,
) {
    let mut out = std::io::BufWriter::new(out);
    let mut folding = Aggregator::new(window);
    let tick = (window / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let count = |result: &'static str, n: u64| {
        metrics
            .audit_records
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    };
    let write = |out: &mut std::io::BufWriter<Box<dyn Write + Send>>, record: &AuditRecord| {
        let written = serde_json::to_writer(&mut *out, record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => count("written", 1),
            Err(error) => {
                count("failed", 1);
                tracing::warn!(%error, "could not write an audit record");
            }
        }
    };
    loop {
        let received = records.recv_timeout(tick);
        let now = jiff::Timestamp::now();
        let mut closed = None;
        let mut ended = false;
        match received {
            Ok(first) => {
                // Take what else is queued before flushing once.
                let mut next = Some(first);
                while let Some(message) = next {
                    match message {
                        Message::Record(record) => match folding.offer(*record, now) {
                            Some(record) => write(&mut out, &record),
                            None => count("folded", 1),
                        },
                        Message::Close(done) => {
                            closed = Some(done);
                            ended = true;
                            break;
                        }
                    }
                    next = records.try_recv().ok();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => ended = true,
        }
        for record in folding.due((!ended).then_some(now)) {
            write(&mut out, &record);
        }
        if let Err(error) = out.flush() {
            tracing::warn!(%error, "could not flush the audit stream");
        }
        if ended {
            if let Some(done) = closed {
                let _ = done.send(());
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests;
