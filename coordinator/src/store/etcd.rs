//! The etcd store: several coordinators share one etcd (Debian's 3.4.23 is the tested server)
//! and one of them leads. Same semantics as [`super::MemoryStore`], checked by the same
//! conformance suite against a real etcd (`tests/tests/etcd_store.rs`).
//!
//! # Key layout
//! Everything lives under one prefix (default `/vmgov/`, written `P/` below). Every JSON value
//! is `{"v": 1, "data": …}`: a reader refuses a `v` it does not know (as
//! [`StoreError::Corrupt`]), so a later release can migrate. Binary values (model and sample
//! chunks) are described by a versioned JSON value that names their encoding.
//!
//! | key | value |
//! |---|---|
//! | `P/leader/<lease>` | election candidates (etcd's election API); the one with the lowest create revision leads, its create revision is the epoch; value: id, address |
//! | `P/thresholds/<scope>` | a [`ThresholdRecord`]; scope printed as `fleet`, `class/NAME`, `host/NAME`, `vm/ID` |
//! | `P/thresholds-generation` | written with every threshold change: its mod revision is the generation |
//! | `P/models/<class>/<version:020>` | model manifest: encoding, upload id, chunk count, bytes |
//! | `P/model-chunks/<class>/<version>/<upload>/<i:06>` | ≤ 512 KiB pieces of the encoded `vmgov.v1.EnergyModel` |
//! | `P/active/<class>` | active version, its [`Fence`], the versions active before it |
//! | `P/hosts/<host>` | a [`HostRecord`], under the registering store's host lease |
//! | `P/samples/<class>/meta` | reservoir state: samples seen, retained, samples per chunk |
//! | `P/samples/<class>/chunk/<i:08>` | a `vmgov.v1.SampleBatch` holding reservoir slots `i·chunk ..` |
//! | `P/batches/<host>/<id:020>` | a batch's progress (samples stored of total), under a marker lease |
//!
//! Class and host names are percent-escaped (`/`, `%` and anything unusual) in keys.
//!
//! # Fencing
//! `campaign` grants a lease (kept alive here: renewed every third of its TTL, a TTL of 0 in the
//! answer means lost, streams re-opened after an etcd restart) and uses etcd's election API; the
//! epoch is the create revision of the winning key. Every leader-only write is one txn whose
//! compares require that the key with exactly that create revision exists and that no candidate
//! key is older: a paused leader whose lease expired changes nothing ([`StoreError::Fenced`],
//! naming the current leader's epoch).
//!
//! # Chunking
//! etcd refuses requests over 1.5 MiB (`--max-request-bytes`), and a txn is one request, so a
//! large model cannot go in one txn. Its pieces are written two per txn under a fresh upload id,
//! each txn fenced and conditional on the manifest not existing; the manifest goes in the last
//! txn, and only a manifest makes a version exist. A leader that dies mid-upload leaves an
//! unreferenced upload that the next successful upload of that version deletes; a write that
//! loses deletes its own pieces.
//!
//! # Samples
//! Per class a reservoir (Vitter's algorithm R, as the memory store): while it holds fewer than
//! `sample_capacity` samples each sample takes the next slot, then a sample replaces a random slot
//! with probability capacity/seen. Slots live in chunk keys of `sample_chunk` samples, so reading
//! a class for training is a few paged range reads. An append is a txn that rewrites the chunks it
//! touches, the meta and the batch's progress marker, on condition that neither meta nor marker
//! changed since read (optimistic; retried on conflict, serialised per class inside one store). A
//! big batch goes in several such txns (at most 8 chunks and about 1 MiB each); the marker records
//! how many of its samples are in, so a batch re-sent after a coordinator died mid-way continues
//! where it stopped: no sample is lost or counted twice. Markers hang on a marker lease granted with
//! TTL `batch_window_s` · 5/4 and replaced every `batch_window_s`/4, so every marker lives at least
//! `batch_window_s` and then vanishes with its lease: etcd compacts the batch ids by itself, and a
//! batch re-sent after that window would be stored again.
//!
//! # Hosts
//! Registrations hang on one lease per store instance (TTL `host_ttl_s`), kept alive by the store:
//! if the coordinator dies they lapse. If the lease is lost while the store lives, a new one is
//! granted and this store's hosts are registered again (unless another coordinator took them).
//! `remove_host` deletes a registration unless another coordinator took the host over meanwhile.
//!
//! # Changes
//! Four etcd watches (leader candidates, the thresholds generation, active models, hosts) feed the
//! broadcast channel of [`Store::subscribe`]; a store also announces its own writes at once.
//! Both paths go through a small de-duplication by revision. Watch streams do not survive an etcd
//! restart: each watch re-opens from its last seen revision + 1 (progress notifications keep that
//! revision current), and if that revision was compacted meanwhile, re-reads its state and
//! announces it. The client uses HTTP/2 keep-alive (default 1 s / 1 s), so a stream to a frozen
//! etcd fails after about two seconds instead of hanging, and every request other than the
//! campaign's wait has a deadline.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    future::Future,
    sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, ElectionClient, Event, EventType,
    GetOptions, GetResponse, KeyValue, KvClient, LeaderKey, LeaseClient, PutOptions, ResignOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchClient, WatchOptions,
};
use prost::Message;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    sync::{Mutex, broadcast},
    task::AbortHandle,
};
use vmgov_proto::{EnergyModel, Ratios, RawCounters, ThresholdScope, pb};

use super::{
    Change, Fence, HostRecord, LeaderInfo, Leadership, Store, StoreError, ThresholdRecord,
};
use crate::train::LabelledSample;

/// The format version of every value this build writes.
const FORMAT: u32 = 1;
/// How model bytes are encoded in their chunks.
const MODEL_ENCODING: &str = "vmgov.v1.EnergyModel/protobuf";
/// How sample chunks are encoded.
const SAMPLE_ENCODING: &str = "vmgov.v1.SampleBatch/protobuf";
/// Model bytes per chunk key.
const MODEL_CHUNK_BYTES: usize = 512 * 1024;
/// Model chunks per txn: 1 MiB, under etcd's default 1.5 MiB request limit.
const MODEL_CHUNKS_PER_TXN: usize = 2;
/// Sample chunks one append txn may rewrite at most (etcd allows 128 operations per txn).
const SAMPLE_TXN_CHUNKS: usize = 8;
/// Bytes of sample chunks one append txn may write at most (etcd refuses requests > 1.5 MiB).
const SAMPLE_TXN_BYTES: usize = 1024 * 1024;
/// An upper bound of one encoded sample (checked by a unit test).
const SAMPLE_MAX_BYTES: usize = 256;
/// Largest number of samples per chunk key: one chunk must fit in one txn.
const SAMPLE_CHUNK_MAX: usize = SAMPLE_TXN_BYTES / SAMPLE_MAX_BYTES;
/// Keys per page when reading big values (model and sample chunks).
const BIG_PAGE: i64 = 8;
/// Keys per page when reading small values.
const SMALL_PAGE: i64 = 512;
/// Largest answer the client accepts (tonic's default is 4 MiB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Optimistic txns retried at most this often before giving up.
const CONFLICT_RETRIES: u32 = 64;
/// Pause before re-opening a stream or retrying a background step.
const RETRY: Duration = Duration::from_millis(400);
/// etcd's smallest lease TTL, s.
const MIN_TTL_S: i64 = 2;
/// Activation history kept per class.
const HISTORY_MAX: usize = 10_000;

/// How to reach etcd and how to lay the state out in it.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// etcd client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key starts with it; a `/` is appended if missing.
    pub prefix: String,
    /// TTL of the leader's lease, s (at least 2): a dead leader is replaced within about this.
    pub leader_ttl_s: i64,
    /// TTL of the lease host registrations hang on, s (at least 2).
    pub host_ttl_s: i64,
    /// Samples retained per hardware class.
    pub sample_capacity: usize,
    /// Samples per chunk key, for classes whose first samples this store writes (at most 4096).
    pub sample_chunk: usize,
    /// How long a (host, batch id) is remembered at least, s.
    pub batch_window_s: i64,
    /// Deadline of every request except the wait in `campaign`.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive interval and timeout towards etcd.
    pub keep_alive: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/vmgov/".into(),
            leader_ttl_s: 10,
            host_ttl_s: 10,
            sample_capacity: 200_000,
            sample_chunk: 512,
            batch_window_s: 3600,
            request_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
        }
    }
}

impl EtcdConfig {
    /// The defaults, with these endpoints.
    pub fn new<E: Into<String>>(endpoints: impl IntoIterator<Item = E>) -> Self {
        Self { endpoints: endpoints.into_iter().map(Into::into).collect(), ..Self::default() }
    }
}

/// The etcd backend of [`Store`]. Clones share one connection and one set of background tasks
/// (watches, lease keepers), which stop when the last clone is dropped; its leases then lapse.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.shared.endpoints)
            .field("prefix", &self.inner.shared.keys.p)
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    tasks: StdMutex<Vec<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        for (_, held) in lock(&self.shared.held).drain() {
            held.keeper.abort();
        }
    }
}

/// What the background tasks share with the store (never the task handles themselves).
struct Shared {
    kv: KvClient,
    leases: LeaseClient,
    election: ElectionClient,
    watch: WatchClient,
    keys: Keys,
    config: EtcdConfig,
    endpoints: String,
    changes: broadcast::Sender<Change>,
    announced: StdMutex<Announced>,
    held: StdMutex<HashMap<u64, Held>>,
    hosts: Mutex<HostState>,
    sample_locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    marker_lease: Mutex<Option<(i64, Instant)>>,
    rng: StdMutex<ChaCha8Rng>,
}

/// A leadership this store holds.
struct Held {
    leader_key: LeaderKey,
    lease: i64,
    keeper: AbortHandle,
}

#[derive(Default)]
struct HostState {
    lease: Option<i64>,
    keeper_started: bool,
    registry: BTreeMap<String, HostRecord>,
}

fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Keys and values

/// Escapes a name for use as one key segment.
fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.:@+=,~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`segment`].
fn unsegment(seg: &str) -> Option<String> {
    let bytes = seg.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = seg.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Debug, Clone)]
struct Keys {
    p: String,
}

impl Keys {
    fn election(&self) -> String {
        format!("{}leader", self.p)
    }
    fn election_prefix(&self) -> String {
        format!("{}leader/", self.p)
    }
    fn thresholds(&self) -> String {
        format!("{}thresholds/", self.p)
    }
    fn threshold(&self, scope: &ThresholdScope) -> String {
        format!("{}thresholds/{scope}", self.p)
    }
    fn thresholds_generation(&self) -> String {
        format!("{}thresholds-generation", self.p)
    }
    fn models(&self) -> String {
        format!("{}models/", self.p)
    }
    fn class_models(&self, class: &str) -> String {
        format!("{}models/{}/", self.p, segment(class))
    }
    fn manifest(&self, class: &str, version: u64) -> String {
        format!("{}models/{}/{version:020}", self.p, segment(class))
    }
    fn model_chunks(&self, class: &str, version: u64) -> String {
        format!("{}model-chunks/{}/{version:020}/", self.p, segment(class))
    }
    fn active(&self, class: &str) -> String {
        format!("{}active/{}", self.p, segment(class))
    }
    fn actives(&self) -> String {
        format!("{}active/", self.p)
    }
    fn host(&self, host: &str) -> String {
        format!("{}hosts/{}", self.p, segment(host))
    }
    fn hosts(&self) -> String {
        format!("{}hosts/", self.p)
    }
    fn sample_meta(&self, class: &str) -> String {
        format!("{}samples/{}/meta", self.p, segment(class))
    }
    fn sample_chunks(&self, class: &str) -> String {
        format!("{}samples/{}/chunk/", self.p, segment(class))
    }
    fn sample_chunk(&self, class: &str, chunk: u64) -> String {
        format!("{}{chunk:08}", self.sample_chunks(class))
    }
    fn batch(&self, host: &str, id: u64) -> String {
        format!("{}batches/{}/{id:020}", self.p, segment(host))
    }

    /// The part of `key` after `prefix`, if it starts with it.
    fn rest<'k>(key: &'k [u8], prefix: &str) -> Option<&'k str> {
        std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?).ok()
    }
}

#[derive(Serialize)]
struct StoredRef<'a, T> {
    v: u32,
    data: &'a T,
}

#[derive(Deserialize)]
struct Stored<T> {
    data: T,
}

#[derive(Deserialize)]
struct Probe {
    v: u32,
}

fn corrupt(key: &[u8], problem: impl fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        problem: problem.to_string(),
    }
}

fn encode<T: Serialize>(data: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&StoredRef { v: FORMAT, data }).map_err(|e| StoreError::Corrupt {
        key: "(a value being written)".into(),
        problem: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    let probe: Probe = serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv.key(), e))?;
    if probe.v != FORMAT {
        return Err(corrupt(
            kv.key(),
            format!(
                "format version {}, this build reads {FORMAT} (written by a newer vmgov?)",
                probe.v
            ),
        ));
    }
    let stored: Stored<T> = serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv.key(), e))?;
    Ok(stored.data)
}

#[derive(Serialize, Deserialize)]
struct LeaderValue {
    id: String,
    address: String,
}

#[derive(Serialize, Deserialize)]
struct GenerationValue {
    epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct ModelManifest {
    encoding: String,
    upload: String,
    chunks: u64,
    bytes: u64,
    epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct ActiveRecord {
    version: u64,
    fence: Fence,
    history: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct SampleMeta {
    /// Samples ever accepted.
    seen: u64,
    /// Slots filled.
    len: u64,
    /// Slots per chunk key.
    chunk: u64,
}

#[derive(Serialize, Deserialize)]
struct SampleMetaValue {
    #[serde(flatten)]
    meta: SampleMeta,
    encoding: String,
}

#[derive(Serialize, Deserialize)]
struct BatchMarker {
    class: String,
    total: u64,
    done: u64,
    unix_ms: u64,
}

fn sample_to_pb(s: &LabelledSample) -> pb::Sample {
    pb::Sample {
        pstate_index: u32::try_from(s.pstate).unwrap_or(u32::MAX),
        counters: Some((&s.counters).into()),
        labels: Some((&s.labels).into()),
        ..pb::Sample::default()
    }
}

fn sample_from_pb(s: &pb::Sample) -> Result<LabelledSample, String> {
    let counters = s.counters.as_ref().ok_or("a sample without counters")?;
    let labels = s.labels.as_ref().ok_or("a sample without labels")?;
    Ok(LabelledSample {
        pstate: usize::try_from(s.pstate_index).unwrap_or(usize::MAX),
        counters: RawCounters::try_from(counters).map_err(|e| e.to_string())?,
        labels: Ratios::from(labels),
    })
}

// ---------------------------------------------------------------------------------------------
// The reservoir, planned without I/O

/// What one append txn does: the first `taken` samples of what is left of a batch, written to
/// `writes` (slot, index into those samples; later writes to a slot win), leaving `meta`.
#[derive(Debug)]
struct Plan {
    taken: usize,
    writes: Vec<(u64, usize)>,
    meta: SampleMeta,
}

/// Plans algorithm R over `count` samples, stopping right after the sample whose write makes
/// the piece touch `max_chunks` chunks. The decision to stop looks only at draws already used
/// (a rule that discarded a draw that would overflow would favour slots in touched chunks), so
/// the pieces together are exactly algorithm R. Takes at least one sample.
fn plan_piece(
    meta: &SampleMeta,
    capacity: u64,
    count: usize,
    max_chunks: usize,
    rng: &mut ChaCha8Rng,
) -> Plan {
    let mut m = *meta;
    let chunk = m.chunk.max(1);
    let mut touched = BTreeSet::new();
    let mut writes = Vec::new();
    let mut taken = 0;
    for i in 0..count {
        let seen = m.seen + 1;
        let slot = if m.len < capacity {
            Some(m.len)
        } else {
            let j = rng.random_range(0..seen);
            (j < capacity).then_some(j)
        };
        m.seen = seen;
        taken = i + 1;
        if let Some(slot) = slot {
            touched.insert(slot / chunk);
            writes.push((slot, i));
            if slot == m.len {
                m.len += 1;
            }
            if touched.len() >= max_chunks.max(1) {
                break;
            }
        }
    }
    Plan { taken, writes, meta: m }
}

// ---------------------------------------------------------------------------------------------
// Announcing changes

/// Revisions announced by one path (this store's writes, or the watch) and not yet by the other.
#[derive(Debug, Default)]
struct Announced(BTreeSet<(i64, u8)>);

impl Announced {
    /// True the first time a (revision, kind) is offered; the second offer consumes it.
    fn first(&mut self, revision: i64, kind: u8) -> bool {
        if self.0.remove(&(revision, kind)) {
            return false;
        }
        self.0.insert((revision, kind));
        while self.0.len() > 4096 {
            self.0.pop_first();
        }
        true
    }
}

const fn kind_of(change: &Change) -> u8 {
    match change {
        Change::Thresholds(_) => 0,
        Change::ActiveModel { .. } => 1,
        Change::Hosts => 2,
        Change::Leader => 3,
    }
}

/// The key ranges watched, one watch each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    Leader,
    Thresholds,
    Active,
    Hosts,
}

// ---------------------------------------------------------------------------------------------
// Requests

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, etcd_client::ResponseHeader::revision)
}

fn rev_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

/// The first key-value of the `i`-th answer of a txn, if that answer is a non-empty read.
fn txn_kv(resp: &TxnResponse, i: usize) -> Option<KeyValue> {
    match resp.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(mut g)) => g.take_kvs().into_iter().next(),
        _ => None,
    }
}

/// Every key-value of the `i`-th answer of a txn.
fn txn_kvs(resp: &TxnResponse, i: usize) -> Vec<KeyValue> {
    match resp.op_responses().into_iter().nth(i) {
        Some(TxnOpResponse::Get(mut g)) => g.take_kvs(),
        _ => Vec::new(),
    }
}

fn first_by_creation() -> GetOptions {
    GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1)
}

fn is_lease_gone(e: &impl fmt::Display) -> bool {
    e.to_string().contains("lease not found")
}

impl Shared {
    fn unavailable(&self, what: &str, e: impl fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("etcd at {}: {what}: {e}", self.endpoints))
    }

    /// One request, with the deadline.
    async fn rpc<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(self.unavailable(what, e)),
            Err(_) => Err(self.unavailable(
                what,
                format_args!("no answer within {:?}", self.config.request_timeout),
            )),
        }
    }

    async fn get(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        let mut kv = self.kv.clone();
        self.rpc(what, kv.get(key, options)).await
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut kv = self.kv.clone();
        self.rpc(what, kv.txn(txn)).await
    }

    /// Every key under `prefix`, in pages of `page` keys, all at one revision (`at`, or the
    /// current one if 0); returns them and that revision.
    async fn range_all(
        &self,
        what: &str,
        prefix: &str,
        page: i64,
        keys_only: bool,
        at: i64,
    ) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = at;
        let mut out = Vec::new();
        loop {
            let mut options =
                GetOptions::new().with_range(end.clone()).with_limit(page).with_revision(revision);
            if keys_only {
                options = options.with_keys_only();
            }
            let mut resp = self.get(what, from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = revision_of(resp.header());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            match kvs.last() {
                Some(last) if more => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    out.extend(kvs);
                    return Ok((out, revision));
                }
            }
            out.extend(kvs);
        }
    }

    /// The leading candidate, if any, and the revision read at.
    async fn first_candidate(&self) -> Result<(Option<KeyValue>, i64), StoreError> {
        let mut resp = self
            .get("reading the leader", self.keys.election_prefix(), Some(first_by_creation()))
            .await?;
        let revision = revision_of(resp.header());
        Ok((resp.take_kvs().into_iter().next(), revision))
    }

    /// A txn read of the leading candidate, put first in the `or_else` of fenced txns.
    fn leader_probe(&self) -> TxnOp {
        TxnOp::get(self.keys.election_prefix(), Some(first_by_creation()))
    }

    /// The compares that make a txn a write of the leader of `epoch`: its key still exists with
    /// that create revision and no candidate is older.
    async fn guard(&self, epoch: u64) -> Result<Vec<Compare>, StoreError> {
        let Ok(rev) = i64::try_from(epoch) else {
            return Err(StoreError::Fenced { writer: epoch, current: 0 });
        };
        let held = lock(&self.held).get(&epoch).map(|h| h.leader_key.key().to_vec());
        let key = match held {
            Some(key) => key,
            None => match self.first_candidate().await? {
                (Some(kv), _) if kv.create_revision() == rev => kv.key().to_vec(),
                (first, _) => {
                    let current = first.map_or(0, |kv| rev_u64(kv.create_revision()));
                    return Err(StoreError::Fenced { writer: epoch, current });
                }
            },
        };
        Ok(vec![
            Compare::create_revision(key, CompareOp::Equal, rev),
            Compare::create_revision(self.keys.election_prefix(), CompareOp::Greater, rev - 1)
                .with_prefix(),
        ])
    }

    /// The fencing error if a failed fenced txn (with [`Self::leader_probe`] first in its
    /// `or_else`) failed because `epoch` no longer leads.
    fn fenced_from(resp: &TxnResponse, epoch: u64) -> Option<StoreError> {
        let current = txn_kv(resp, 0).map_or(0, |kv| rev_u64(kv.create_revision()));
        (current != epoch).then_some(StoreError::Fenced { writer: epoch, current })
    }

    fn announce(&self, revision: i64, change: Change) {
        if lock(&self.announced).first(revision, kind_of(&change)) {
            // Nobody listening is fine.
            let _ = self.changes.send(change);
        }
    }

    fn class_lock(&self, class: &str) -> Arc<Mutex<()>> {
        Arc::clone(lock(&self.sample_locks).entry(class.into()).or_default())
    }

    /// Keeps lease `id` alive until it is lost (a TTL of 0, or "not found"); re-opens the
    /// keep-alive stream whenever it ends (it does on every etcd restart).
    async fn keep_lease(&self, id: i64, ttl_s: i64) {
        let ms = u64::try_from(ttl_s.max(MIN_TTL_S)).unwrap_or(10).saturating_mul(1000) / 3;
        let period = Duration::from_millis(ms);
        let deadline = self.config.request_timeout;
        loop {
            let mut leases = self.leases.clone();
            match tokio::time::timeout(deadline, leases.keep_alive(id)).await {
                Ok(Ok((mut keeper, mut stream))) => loop {
                    tokio::time::sleep(period).await;
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(deadline, stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => return,
                        Ok(Ok(None) | Err(_)) | Err(_) => break,
                    }
                },
                Ok(Err(e)) if is_lease_gone(&e) => return,
                Ok(Err(_)) | Err(_) => {}
            }
            tracing::debug!(lease = id, "lease keep-alive stream ended; re-opening it");
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Keeps the election lease alive; when it is lost, forgets the leadership and says so.
    async fn keep_leader_lease(self: Arc<Self>, lease: i64) {
        self.keep_lease(lease, self.config.leader_ttl_s).await;
        let lost: Vec<u64> = {
            let mut held = lock(&self.held);
            let epochs: Vec<u64> =
                held.iter().filter(|(_, h)| h.lease == lease).map(|(e, _)| *e).collect();
            for e in &epochs {
                held.remove(e);
            }
            epochs
        };
        if !lost.is_empty() {
            tracing::warn!(epochs = ?lost, "the leader's lease was lost: no longer leading");
        }
        let _ = self.changes.send(Change::Leader);
    }

    /// The host lease, granted (and this store's hosts registered again under it) if there is
    /// none. Called with the host state locked.
    async fn host_lease(&self, state: &mut HostState) -> Result<i64, StoreError> {
        if let Some(id) = state.lease {
            return Ok(id);
        }
        let mut leases = self.leases.clone();
        let ttl = self.config.host_ttl_s.max(MIN_TTL_S);
        let id = self.rpc("granting the host lease", leases.grant(ttl, None)).await?.id();
        state.lease = Some(id);
        let mut revision = 0;
        for record in state.registry.values() {
            let key = self.keys.host(&record.host_id);
            // Only where no other coordinator registered the host meanwhile.
            let txn = Txn::new()
                .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(
                    key,
                    encode(record)?,
                    Some(PutOptions::new().with_lease(id)),
                )]);
            let resp = self.txn("registering a host again", txn).await?;
            if resp.succeeded() {
                revision = revision_of(resp.header());
            }
        }
        if revision > 0 {
            self.announce(revision, Change::Hosts);
        }
        Ok(id)
    }

    /// Keeps the host lease alive; replaces it (registering this store's hosts again) when lost.
    async fn keep_host_lease(self: Arc<Self>) {
        loop {
            let lease = {
                let mut state = self.hosts.lock().await;
                match self.host_lease(&mut state).await {
                    Ok(id) => id,
                    Err(e) => {
                        drop(state);
                        tracing::warn!("cannot renew the host registrations: {e}");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            };
            self.keep_lease(lease, self.config.host_ttl_s).await;
            tracing::warn!(lease, "the host lease was lost; registering the hosts again");
            let mut state = self.hosts.lock().await;
            if state.lease == Some(lease) {
                state.lease = None;
            }
        }
    }

    /// A lease for batch markers: granted for 5/4 of the window, replaced after a quarter of it.
    async fn marker_lease(&self) -> Result<i64, StoreError> {
        let window = self.config.batch_window_s.max(MIN_TTL_S);
        let rotate = Duration::from_secs(u64::try_from(window / 4).unwrap_or(1).max(1));
        let mut current = self.marker_lease.lock().await;
        if let Some((id, at)) = *current
            && at.elapsed() < rotate
        {
            return Ok(id);
        }
        let mut leases = self.leases.clone();
        let ttl = window + (window / 4).max(1);
        let id = self.rpc("granting a batch-marker lease", leases.grant(ttl, None)).await?.id();
        *current = Some((id, Instant::now()));
        Ok(id)
    }

    // -- the watches ----------------------------------------------------------------------------

    fn watched_range(&self, what: Watched) -> (String, bool) {
        match what {
            Watched::Leader => (self.keys.election_prefix(), true),
            Watched::Thresholds => (self.keys.thresholds_generation(), false),
            Watched::Active => (self.keys.actives(), true),
            Watched::Hosts => (self.keys.hosts(), true),
        }
    }

    fn change_for(&self, what: Watched, event: &Event) -> Option<(i64, Change)> {
        let kv = event.kv()?;
        let revision = kv.mod_revision();
        let change = match what {
            Watched::Leader => Change::Leader,
            Watched::Hosts => Change::Hosts,
            Watched::Thresholds => Change::Thresholds(rev_u64(revision)),
            Watched::Active => {
                if event.event_type() != EventType::Put {
                    return None;
                }
                let record: ActiveRecord = decode(kv)
                    .inspect_err(|e| tracing::warn!("ignoring an active model I cannot read: {e}"))
                    .ok()?;
                let class = unsegment(Keys::rest(kv.key(), &self.keys.actives())?)?;
                Change::ActiveModel { class, version: record.version, fence: record.fence }
            }
        };
        Some((revision, change))
    }

    /// Re-reads what a watch covers after its history was compacted away, announces it, and
    /// returns the revision read at.
    async fn catch_up(&self, what: Watched) -> Result<i64, StoreError> {
        let (key, prefix) = self.watched_range(what);
        let options = if prefix { Some(GetOptions::new().with_prefix()) } else { None };
        let mut resp = self.get("catching up after a compaction", key, options).await?;
        let revision = revision_of(resp.header());
        let kvs = resp.take_kvs();
        let _ = match what {
            Watched::Leader => self.changes.send(Change::Leader),
            Watched::Hosts => self.changes.send(Change::Hosts),
            Watched::Thresholds => self
                .changes
                .send(Change::Thresholds(kvs.first().map_or(0, |kv| rev_u64(kv.mod_revision())))),
            Watched::Active => {
                for kv in &kvs {
                    let class = Keys::rest(kv.key(), &self.keys.actives()).and_then(unsegment);
                    if let (Some(class), Ok(r)) = (class, decode::<ActiveRecord>(kv)) {
                        let change =
                            Change::ActiveModel { class, version: r.version, fence: r.fence };
                        let _ = self.changes.send(change);
                    }
                }
                Ok(0)
            }
        };
        Ok(revision)
    }

    /// One watch, for ever: re-opened from the last revision seen + 1 whenever its stream ends.
    async fn watch_range(self: Arc<Self>, what: Watched, mut next: i64) {
        let (key, prefix) = self.watched_range(what);
        loop {
            let mut options = WatchOptions::new().with_start_revision(next).with_progress_notify();
            if prefix {
                options = options.with_prefix();
            }
            let mut client = self.watch.clone();
            let opened = tokio::time::timeout(
                self.config.request_timeout,
                client.watch(key.clone(), Some(options)),
            )
            .await;
            if let Ok(Ok(mut stream)) = opened {
                loop {
                    let resp = match stream.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) | Err(_) => break,
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            tracing::info!(?what, next, "watch history compacted; re-reading");
                            if let Ok(revision) = self.catch_up(what).await {
                                next = revision + 1;
                            }
                        }
                        break;
                    }
                    if resp.created() {
                        continue;
                    }
                    let events = resp.events();
                    if events.is_empty() {
                        // A progress notification: nothing up to its revision is outstanding.
                        next = next.max(revision_of(resp.header()) + 1);
                        continue;
                    }
                    let mut seen = HashSet::new();
                    for event in events {
                        let Some((revision, change)) = self.change_for(what, event) else {
                            if let Some(kv) = event.kv() {
                                next = next.max(kv.mod_revision() + 1);
                            }
                            continue;
                        };
                        next = next.max(revision + 1);
                        if !seen.insert((revision, kind_of(&change))) {
                            continue;
                        }
                        if change == Change::Leader {
                            let _ = self.changes.send(change);
                        } else {
                            self.announce(revision, change);
                        }
                    }
                }
            }
            tracing::debug!(?what, next, "watch stream ended; re-watching");
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Revokes a campaign's lease if the campaign does not end in leadership (also when its future
/// is dropped): the candidate key goes with it.
struct CampaignGuard {
    leases: LeaseClient,
    lease: i64,
    keeper: Option<AbortHandle>,
    timeout: Duration,
}

impl CampaignGuard {
    fn keeper_alive(&self) -> bool {
        self.keeper.as_ref().is_some_and(|k| !k.is_finished())
    }
}

impl Drop for CampaignGuard {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
            let (mut leases, id, timeout) = (self.leases.clone(), self.lease, self.timeout);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = tokio::time::timeout(timeout, leases.revoke(id)).await;
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store

impl EtcdStore {
    /// Connects to etcd and starts watching. Fails, naming the endpoints, when etcd does not
    /// answer within the request timeout.
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        let mut config = config;
        if !config.prefix.ends_with('/') {
            config.prefix.push('/');
        }
        let endpoints = config.endpoints.join(",");
        if config.endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_keep_alive(config.keep_alive, config.keep_alive)
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(config.request_timeout)
            .with_require_leader(true);
        let client = match tokio::time::timeout(
            config.request_timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to etcd at {endpoints}: {e}"
                )));
            }
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to etcd at {endpoints}: no answer within {:?}",
                    config.request_timeout
                )));
            }
        };
        let (changes, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            leases: client.lease_client(),
            election: client.election_client(),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            keys: Keys { p: config.prefix.clone() },
            endpoints: endpoints.clone(),
            config,
            changes,
            announced: StdMutex::default(),
            held: StdMutex::default(),
            hosts: Mutex::default(),
            sample_locks: StdMutex::default(),
            marker_lease: Mutex::default(),
            rng: StdMutex::new(ChaCha8Rng::from_rng(&mut rand::rng())),
        });
        // The client connects lazily: this is the first contact, and the revision to watch from.
        let probe = shared
            .get(
                "first contact",
                shared.keys.election_prefix(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| StoreError::Unavailable(format!("etcd is unreachable ({e})")))?;
        let next = revision_of(probe.header()) + 1;
        let tasks = [Watched::Leader, Watched::Thresholds, Watched::Active, Watched::Hosts]
            .into_iter()
            .map(|what| tokio::spawn(Arc::clone(&shared).watch_range(what, next)).abort_handle())
            .collect();
        Ok(Self { inner: Arc::new(Inner { shared, tasks: StdMutex::new(tasks) }) })
    }

    /// The configuration in use (prefix normalised).
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.shared.config
    }

    fn s(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    async fn campaign_as(&self, id: &str, address: &str) -> Result<Leadership, StoreError> {
        let s = self.s();
        let value = encode(&LeaderValue { id: id.into(), address: address.into() })?;
        loop {
            let mut leases = s.leases.clone();
            let ttl = s.config.leader_ttl_s.max(MIN_TTL_S);
            let lease = s.rpc("granting the leader's lease", leases.grant(ttl, None)).await?.id();
            let keeper = tokio::spawn(Arc::clone(s).keep_leader_lease(lease)).abort_handle();
            let guard = CampaignGuard {
                leases: s.leases.clone(),
                lease,
                keeper: Some(keeper),
                timeout: s.config.request_timeout,
            };
            // Waits (without deadline) until every older candidate is gone; the HTTP/2
            // keep-alive ends it if etcd freezes or goes away.
            let mut election = s.election.clone();
            let mut resp = election
                .campaign(s.keys.election(), value.clone(), lease)
                .await
                .map_err(|e| s.unavailable("campaigning", e))?;
            let leader_key =
                resp.take_leader().ok_or_else(|| s.unavailable("campaigning", "no leader key"))?;
            // etcd answers once the older candidates are gone, even if this key went too (its
            // lease lost meanwhile): check before claiming leadership.
            let (first, _) = s.first_candidate().await?;
            let ours = first.is_some_and(|kv| {
                kv.key() == leader_key.key() && kv.create_revision() == leader_key.rev()
            });
            if ours && guard.keeper_alive() {
                let mut guard = guard;
                let Some(keeper) = guard.keeper.take() else { continue };
                let epoch = rev_u64(leader_key.rev());
                lock(&s.held).insert(epoch, Held { leader_key, lease, keeper });
                let _ = s.changes.send(Change::Leader);
                return Ok(Leadership { epoch, id: id.into() });
            }
            tracing::warn!("elected, but the leader key is gone (lease lost): campaigning again");
        }
    }

    async fn resign_as(&self, leadership: &Leadership) -> Result<(), StoreError> {
        let s = self.s();
        let held = lock(&s.held).remove(&leadership.epoch);
        if let Some(held) = held {
            held.keeper.abort();
            let mut election = s.election.clone();
            let options = ResignOptions::new().with_leader(held.leader_key);
            let resigned = s.rpc("resigning", election.resign(Some(options))).await;
            let mut leases = s.leases.clone();
            let revoked = s.rpc("revoking the leader's lease", leases.revoke(held.lease)).await;
            if let (Err(e), Err(_)) = (resigned, revoked) {
                return Err(e);
            }
        } else if let (Some(kv), _) = s.first_candidate().await?
            && rev_u64(kv.create_revision()) == leadership.epoch
        {
            // Held by another instance of this coordinator (or lost here): delete that key.
            let key = kv.key().to_vec();
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.create_revision(),
                )])
                .and_then(vec![TxnOp::delete(key, None)]);
            s.txn("resigning", txn).await?;
        }
        let _ = s.changes.send(Change::Leader);
        Ok(())
    }

    async fn put_host_record(&self, record: HostRecord) -> Result<(), StoreError> {
        let s = self.s();
        let key = s.keys.host(&record.host_id);
        let value = encode(&record)?;
        let mut state = s.hosts.lock().await;
        if !state.keeper_started {
            s.host_lease(&mut state).await?;
            state.keeper_started = true;
            let keeper = tokio::spawn(Arc::clone(s).keep_host_lease()).abort_handle();
            lock(&self.inner.tasks).push(keeper);
        }
        let mut attempt = 0;
        let resp = loop {
            let lease = s.host_lease(&mut state).await?;
            let mut kv = s.kv.clone();
            let put = kv.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)));
            match s.rpc("registering a host", put).await {
                Ok(resp) => break resp,
                Err(e) if attempt == 0 && is_lease_gone(&e) => {
                    state.lease = None;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        state.registry.insert(record.host_id.clone(), record);
        drop(state);
        s.announce(revision_of(resp.header()), Change::Hosts);
        Ok(())
    }
}

impl Shared {
    async fn leader_info(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let (first, _) = self.first_candidate().await?;
        let Some(kv) = first else { return Ok(None) };
        let value: LeaderValue = decode(&kv)?;
        Ok(Some(LeaderInfo {
            id: value.id,
            address: value.address,
            epoch: rev_u64(kv.create_revision()),
        }))
    }

    async fn put_threshold(&self, epoch: u64, record: ThresholdRecord) -> Result<u64, StoreError> {
        let guard = self.guard(epoch).await?;
        let txn = Txn::new()
            .when(guard)
            .and_then(vec![
                TxnOp::put(self.keys.threshold(&record.scope), encode(&record)?, None),
                TxnOp::put(
                    self.keys.thresholds_generation(),
                    encode(&GenerationValue { epoch })?,
                    None,
                ),
            ])
            .or_else(vec![self.leader_probe()]);
        let resp = self.txn("setting a threshold", txn).await?;
        if !resp.succeeded() {
            return Err(Self::fenced_from(&resp, epoch)
                .unwrap_or(StoreError::Fenced { writer: epoch, current: 0 }));
        }
        let revision = revision_of(resp.header());
        self.announce(revision, Change::Thresholds(rev_u64(revision)));
        Ok(rev_u64(revision))
    }

    async fn delete_threshold(
        &self,
        epoch: u64,
        scope: &ThresholdScope,
    ) -> Result<Option<ThresholdRecord>, StoreError> {
        let key = self.keys.threshold(scope);
        for _ in 0..CONFLICT_RETRIES {
            let mut compares = self.guard(epoch).await?;
            let mut resp = self.get("reading a threshold", key.clone(), None).await?;
            let existing = match resp.take_kvs().into_iter().next() {
                Some(kv) => Some((decode::<ThresholdRecord>(&kv)?, kv.mod_revision())),
                None => None,
            };
            let ops = match &existing {
                Some((_, modified)) => {
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *modified));
                    vec![
                        TxnOp::delete(key.clone(), None),
                        TxnOp::put(
                            self.keys.thresholds_generation(),
                            encode(&GenerationValue { epoch })?,
                            None,
                        ),
                    ]
                }
                None => {
                    compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    Vec::new()
                }
            };
            let txn = Txn::new().when(compares).and_then(ops).or_else(vec![self.leader_probe()]);
            let resp = self.txn("deleting a threshold", txn).await?;
            if resp.succeeded() {
                if existing.is_some() {
                    let revision = revision_of(resp.header());
                    self.announce(revision, Change::Thresholds(rev_u64(revision)));
                }
                return Ok(existing.map(|(record, _)| record));
            }
            if let Some(fenced) = Self::fenced_from(&resp, epoch) {
                return Err(fenced);
            }
        }
        Err(self.unavailable("deleting a threshold", "too much contention"))
    }

    async fn thresholds(&self) -> Result<(Vec<ThresholdRecord>, u64), StoreError> {
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.keys.thresholds(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.keys.thresholds_generation(), None),
        ]);
        let resp = self.txn("reading thresholds", txn).await?;
        let records = txn_kvs(&resp, 0).iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let generation = txn_kv(&resp, 1).map_or(0, |kv| rev_u64(kv.mod_revision()));
        Ok((records, generation))
    }

    /// Deletes an upload's pieces; best effort (an unreferenced upload is only garbage).
    async fn forget_upload(&self, prefix: &str) {
        let mut kv = self.kv.clone();
        let options = DeleteOptions::new().with_prefix();
        if let Err(e) = self.rpc("deleting model pieces", kv.delete(prefix, Some(options))).await {
            tracing::debug!("could not delete {prefix}: {e}");
        }
    }

    async fn put_model(&self, epoch: u64, model: &EnergyModel) -> Result<(), StoreError> {
        let guard = self.guard(epoch).await?;
        let (class, version) = (&model.hardware_class, model.version);
        let manifest_key = self.keys.manifest(class, version);
        let bytes = pb::EnergyModel::from(model).encode_to_vec();
        let upload = format!("{:016x}", lock(&self.rng).random::<u64>());
        let upload_prefix = format!("{}{upload}/", self.keys.model_chunks(class, version));
        let pieces: Vec<&[u8]> = bytes.chunks(MODEL_CHUNK_BYTES).collect();
        let manifest = encode(&ModelManifest {
            encoding: MODEL_ENCODING.into(),
            upload,
            chunks: u64_of(pieces.len()),
            bytes: u64_of(bytes.len()),
            epoch,
        })?;
        let mut compares = guard;
        compares.push(Compare::create_revision(manifest_key.clone(), CompareOp::Equal, 0));
        let mut groups: Vec<Vec<(usize, &[u8])>> = pieces
            .iter()
            .copied()
            .enumerate()
            .collect::<Vec<_>>()
            .chunks(MODEL_CHUNKS_PER_TXN)
            .map(<[_]>::to_vec)
            .collect();
        if groups.is_empty() {
            groups.push(Vec::new());
        }
        let last = groups.len() - 1;
        for (g, group) in groups.into_iter().enumerate() {
            let mut ops: Vec<TxnOp> = group
                .into_iter()
                .map(|(i, piece)| {
                    TxnOp::put(format!("{upload_prefix}{i:06}"), piece.to_vec(), None)
                })
                .collect();
            if g == last {
                ops.push(TxnOp::put(manifest_key.clone(), manifest.clone(), None));
            }
            let txn = Txn::new().when(compares.clone()).and_then(ops).or_else(vec![
                self.leader_probe(),
                TxnOp::get(manifest_key.clone(), Some(GetOptions::new().with_keys_only())),
            ]);
            let resp = match self.txn("storing a model", txn).await {
                Ok(resp) => resp,
                Err(e) => {
                    // Whether the last txn (the manifest's) applied is unknown: its pieces may
                    // be referenced now, so only an earlier txn's failure removes them.
                    if g != last {
                        self.forget_upload(&upload_prefix).await;
                    }
                    return Err(e);
                }
            };
            if !resp.succeeded() {
                self.forget_upload(&upload_prefix).await;
                return Err(Self::fenced_from(&resp, epoch).unwrap_or_else(|| {
                    StoreError::VersionExists { class: class.clone(), version }
                }));
            }
        }
        // Pieces of uploads that died before their manifest are garbage now.
        let version_prefix = self.keys.model_chunks(class, version);
        if let Ok((kvs, _)) =
            self.range_all("listing model pieces", &version_prefix, SMALL_PAGE, true, 0).await
        {
            let others: BTreeSet<String> = kvs
                .iter()
                .filter_map(|kv| Keys::rest(kv.key(), &version_prefix))
                .filter_map(|rest| rest.split('/').next())
                .filter(|u| !upload_prefix.ends_with(&format!("{u}/")))
                .map(|u| format!("{version_prefix}{u}/"))
                .collect();
            for other in others {
                self.forget_upload(&other).await;
            }
        }
        Ok(())
    }

    async fn model(&self, class: &str, version: u64) -> Result<Option<EnergyModel>, StoreError> {
        let mut resp =
            self.get("reading a model", self.keys.manifest(class, version), None).await?;
        let Some(kv) = resp.take_kvs().into_iter().next() else { return Ok(None) };
        let manifest: ModelManifest = decode(&kv)?;
        if manifest.encoding != MODEL_ENCODING {
            return Err(corrupt(kv.key(), format!("unknown encoding {:?}", manifest.encoding)));
        }
        let prefix = format!("{}{}/", self.keys.model_chunks(class, version), manifest.upload);
        // The pieces never change once the manifest exists: read them at the latest revision.
        let (pieces, _) = self.range_all("reading a model", &prefix, BIG_PAGE, false, 0).await?;
        if u64_of(pieces.len()) != manifest.chunks {
            return Err(corrupt(
                kv.key(),
                format!("{} pieces of {} found", pieces.len(), manifest.chunks),
            ));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(manifest.bytes).unwrap_or(0));
        for piece in &pieces {
            bytes.extend_from_slice(piece.value());
        }
        if u64_of(bytes.len()) != manifest.bytes {
            return Err(corrupt(kv.key(), format!("{} bytes of {}", bytes.len(), manifest.bytes)));
        }
        let message =
            pb::EnergyModel::decode(bytes.as_slice()).map_err(|e| corrupt(kv.key(), e))?;
        EnergyModel::try_from(&message).map(Some).map_err(|e| corrupt(kv.key(), e))
    }

    async fn model_versions(&self, class: &str) -> Result<Vec<u64>, StoreError> {
        let prefix = self.keys.class_models(class);
        let (kvs, _) = self.range_all("listing models", &prefix, SMALL_PAGE, true, 0).await?;
        kvs.iter()
            .map(|kv| {
                Keys::rest(kv.key(), &prefix)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| corrupt(kv.key(), "not a model version"))
            })
            .collect()
    }

    async fn model_classes(&self) -> Result<Vec<String>, StoreError> {
        let prefix = self.keys.models();
        let (kvs, _) = self.range_all("listing models", &prefix, SMALL_PAGE, true, 0).await?;
        let classes: BTreeSet<String> = kvs
            .iter()
            .filter_map(|kv| Keys::rest(kv.key(), &prefix)?.split('/').next().and_then(unsegment))
            .collect();
        Ok(classes.into_iter().collect())
    }

    async fn activate(&self, epoch: u64, class: &str, version: u64) -> Result<Fence, StoreError> {
        let active_key = self.keys.active(class);
        let manifest_key = self.keys.manifest(class, version);
        for _ in 0..CONFLICT_RETRIES {
            let mut compares = self.guard(epoch).await?;
            let mut resp = self.get("reading the active model", active_key.clone(), None).await?;
            let (record, modified) = match resp.take_kvs().into_iter().next() {
                Some(kv) => {
                    let previous: ActiveRecord = decode(&kv)?;
                    let mut history = previous.history;
                    history.push(previous.version);
                    if history.len() > HISTORY_MAX {
                        history.drain(..history.len() - HISTORY_MAX);
                    }
                    let fence = Fence { epoch, generation: previous.fence.generation + 1 };
                    (ActiveRecord { version, fence, history }, kv.mod_revision())
                }
                None => {
                    let fence = Fence { epoch, generation: 1 };
                    (ActiveRecord { version, fence, history: Vec::new() }, 0)
                }
            };
            compares.push(Compare::create_revision(manifest_key.clone(), CompareOp::Greater, 0));
            compares.push(Compare::mod_revision(active_key.clone(), CompareOp::Equal, modified));
            let txn = Txn::new()
                .when(compares)
                .and_then(vec![TxnOp::put(active_key.clone(), encode(&record)?, None)])
                .or_else(vec![
                    self.leader_probe(),
                    TxnOp::get(manifest_key.clone(), Some(GetOptions::new().with_keys_only())),
                ]);
            let resp = self.txn("activating a model", txn).await?;
            if resp.succeeded() {
                let change =
                    Change::ActiveModel { class: class.into(), version, fence: record.fence };
                self.announce(revision_of(resp.header()), change);
                return Ok(record.fence);
            }
            if let Some(fenced) = Self::fenced_from(&resp, epoch) {
                return Err(fenced);
            }
            if txn_kv(&resp, 1).is_none() {
                return Err(StoreError::NoSuchModel { class: class.into(), version });
            }
        }
        Err(self.unavailable("activating a model", "too much contention"))
    }

    async fn active(&self, class: &str) -> Result<Option<(u64, Fence, Vec<u64>)>, StoreError> {
        let mut resp = self.get("reading the active model", self.keys.active(class), None).await?;
        let Some(kv) = resp.take_kvs().into_iter().next() else { return Ok(None) };
        let record: ActiveRecord = decode(&kv)?;
        Ok(Some((record.version, record.fence, record.history)))
    }

    async fn remove_host(&self, host_id: &str) -> Result<(), StoreError> {
        let key = self.keys.host(host_id);
        let mut state = self.hosts.lock().await;
        let mine = state.registry.remove(host_id).is_some();
        // A host this store registered may have moved to another coordinator since: delete it
        // only if it still hangs on this store's lease. Others (an operator's removal) go.
        let compares = match (mine, state.lease) {
            (true, Some(lease)) => vec![Compare::lease(key.clone(), CompareOp::Equal, lease)],
            _ => Vec::new(),
        };
        drop(state);
        let txn = Txn::new().when(compares).and_then(vec![TxnOp::delete(key, None)]);
        let resp = self.txn("removing a host", txn).await?;
        let deleted = resp.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        if deleted {
            self.announce(revision_of(resp.header()), Change::Hosts);
        }
        Ok(())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        let (kvs, _) =
            self.range_all("listing hosts", &self.keys.hosts(), SMALL_PAGE, false, 0).await?;
        kvs.iter().map(decode).collect()
    }

    async fn append_samples(
        &self,
        class: &str,
        host_id: &str,
        batch_id: u64,
        samples: Vec<LabelledSample>,
    ) -> Result<bool, StoreError> {
        let class_lock = self.class_lock(class);
        let _serial = class_lock.lock().await;
        let meta_key = self.keys.sample_meta(class);
        let marker_key = self.keys.batch(host_id, batch_id);
        let total = u64_of(samples.len());
        let capacity = u64_of(self.config.sample_capacity.max(1));
        let mut stored = false;
        let mut conflicts = 0;
        loop {
            let read = Txn::new().and_then(vec![
                TxnOp::get(marker_key.clone(), None),
                TxnOp::get(meta_key.clone(), None),
            ]);
            let resp = self.txn("reading a batch's progress", read).await?;
            let (done, marker_rev) = match txn_kv(&resp, 0) {
                Some(kv) => {
                    let marker: BatchMarker = decode(&kv)?;
                    if marker.done >= marker.total {
                        return Ok(stored);
                    }
                    (marker.done, kv.mod_revision())
                }
                None => (0, 0),
            };
            let (meta, meta_rev) = match txn_kv(&resp, 1) {
                Some(kv) => (decode::<SampleMetaValue>(&kv)?.meta, kv.mod_revision()),
                None => {
                    let chunk = u64_of(self.config.sample_chunk.clamp(1, SAMPLE_CHUNK_MAX));
                    (SampleMeta { seen: 0, len: 0, chunk }, 0)
                }
            };
            // Chunks of at most chunk · SAMPLE_MAX_BYTES bytes: this many fit in one txn.
            let chunk_bytes = usize::try_from(meta.chunk).unwrap_or(usize::MAX);
            let max_chunks = (SAMPLE_TXN_BYTES / chunk_bytes.saturating_mul(SAMPLE_MAX_BYTES))
                .clamp(1, SAMPLE_TXN_CHUNKS);
            let start = usize::try_from(done).unwrap_or(usize::MAX).min(samples.len());
            let rest = &samples[start..];
            let plan = plan_piece(&meta, capacity, rest.len(), max_chunks, &mut lock(&self.rng));

            // Read the chunks the piece rewrites, and rewrite them.
            let touched: BTreeSet<u64> =
                plan.writes.iter().map(|(slot, _)| slot / meta.chunk).collect();
            let mut chunks: BTreeMap<u64, pb::SampleBatch> = BTreeMap::new();
            if !touched.is_empty() {
                let gets: Vec<TxnOp> = touched
                    .iter()
                    .map(|&c| TxnOp::get(self.keys.sample_chunk(class, c), None))
                    .collect();
                let resp = self.txn("reading sample chunks", Txn::new().and_then(gets)).await?;
                for (i, &c) in touched.iter().enumerate() {
                    let batch = match txn_kv(&resp, i) {
                        Some(kv) => {
                            pb::SampleBatch::decode(kv.value()).map_err(|e| corrupt(kv.key(), e))?
                        }
                        None => pb::SampleBatch::default(),
                    };
                    chunks.insert(c, batch);
                }
            }
            for &(slot, i) in &plan.writes {
                let c = slot / meta.chunk;
                let pos = usize::try_from(slot % meta.chunk).unwrap_or(usize::MAX);
                let chunk = chunks.entry(c).or_default();
                let sample = sample_to_pb(&rest[i]);
                match pos.cmp(&chunk.samples.len()) {
                    std::cmp::Ordering::Less => chunk.samples[pos] = sample,
                    std::cmp::Ordering::Equal => chunk.samples.push(sample),
                    std::cmp::Ordering::Greater => {
                        return Err(corrupt(
                            self.keys.sample_chunk(class, c).as_bytes(),
                            format!("slot {slot} lies beyond the chunk's end"),
                        ));
                    }
                }
            }
            let mut ops: Vec<TxnOp> = chunks
                .iter()
                .map(|(c, chunk)| {
                    TxnOp::put(self.keys.sample_chunk(class, *c), chunk.encode_to_vec(), None)
                })
                .collect();
            let done = done + u64_of(plan.taken);
            let marker = BatchMarker { class: class.into(), total, done, unix_ms: now_unix_ms() };
            let meta_value = SampleMetaValue { meta: plan.meta, encoding: SAMPLE_ENCODING.into() };
            let lease = self.marker_lease().await?;
            ops.push(TxnOp::put(meta_key.clone(), encode(&meta_value)?, None));
            ops.push(TxnOp::put(
                marker_key.clone(),
                encode(&marker)?,
                Some(PutOptions::new().with_lease(lease)),
            ));
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(meta_key.clone(), CompareOp::Equal, meta_rev),
                    Compare::mod_revision(marker_key.clone(), CompareOp::Equal, marker_rev),
                ])
                .and_then(ops);
            match self.txn("storing samples", txn).await {
                Ok(resp) if resp.succeeded() => {
                    stored = true;
                    if done >= total {
                        return Ok(true);
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) if is_lease_gone(&e) => *self.marker_lease.lock().await = None,
                Err(e) => return Err(e),
            }
            conflicts += 1;
            if conflicts > CONFLICT_RETRIES {
                return Err(self.unavailable("storing samples", "too much contention on the class"));
            }
        }
    }

    async fn samples(&self, class: &str) -> Result<Vec<LabelledSample>, StoreError> {
        let prefix = self.keys.sample_chunks(class);
        let mut attempt = 0;
        loop {
            let mut resp = self.get("reading samples", self.keys.sample_meta(class), None).await?;
            let revision = revision_of(resp.header());
            let Some(meta_kv) = resp.take_kvs().into_iter().next() else { return Ok(Vec::new()) };
            let meta = decode::<SampleMetaValue>(&meta_kv)?;
            if meta.encoding != SAMPLE_ENCODING {
                return Err(corrupt(
                    meta_kv.key(),
                    format!("unknown encoding {:?}", meta.encoding),
                ));
            }
            // Chunks at the meta's revision: one consistent reservoir even while others append.
            let kvs =
                match self.range_all("reading samples", &prefix, BIG_PAGE, false, revision).await {
                    Ok((kvs, _)) => kvs,
                    Err(e) if attempt < 2 && e.to_string().contains("compacted") => {
                        attempt += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            let mut out = Vec::with_capacity(usize::try_from(meta.meta.len).unwrap_or(0));
            for kv in &kvs {
                let batch =
                    pb::SampleBatch::decode(kv.value()).map_err(|e| corrupt(kv.key(), e))?;
                for s in &batch.samples {
                    out.push(sample_from_pb(s).map_err(|e| corrupt(kv.key(), e))?);
                }
            }
            return Ok(out);
        }
    }

    async fn samples_seen(&self, class: &str) -> Result<u64, StoreError> {
        let mut resp = self.get("reading samples", self.keys.sample_meta(class), None).await?;
        match resp.take_kvs().into_iter().next() {
            Some(kv) => Ok(decode::<SampleMetaValue>(&kv)?.meta.seen),
            None => Ok(0),
        }
    }
}

impl Store for EtcdStore {
    async fn campaign(&self, id: &str, address: &str) -> Result<Leadership, StoreError> {
        self.campaign_as(id, address).await
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        self.s().leader_info().await
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        self.resign_as(leadership).await
    }

    async fn put_threshold(&self, epoch: u64, record: ThresholdRecord) -> Result<u64, StoreError> {
        self.s().put_threshold(epoch, record).await
    }

    async fn delete_threshold(
        &self,
        epoch: u64,
        scope: &ThresholdScope,
    ) -> Result<Option<ThresholdRecord>, StoreError> {
        self.s().delete_threshold(epoch, scope).await
    }

    async fn thresholds(&self) -> Result<(Vec<ThresholdRecord>, u64), StoreError> {
        self.s().thresholds().await
    }

    async fn put_model(&self, epoch: u64, model: &EnergyModel) -> Result<(), StoreError> {
        self.s().put_model(epoch, model).await
    }

    async fn model(&self, class: &str, version: u64) -> Result<Option<EnergyModel>, StoreError> {
        self.s().model(class, version).await
    }

    async fn model_versions(&self, class: &str) -> Result<Vec<u64>, StoreError> {
        self.s().model_versions(class).await
    }

    async fn model_classes(&self) -> Result<Vec<String>, StoreError> {
        self.s().model_classes().await
    }

    async fn activate(&self, epoch: u64, class: &str, version: u64) -> Result<Fence, StoreError> {
        self.s().activate(epoch, class, version).await
    }

    async fn active(&self, class: &str) -> Result<Option<(u64, Fence, Vec<u64>)>, StoreError> {
        self.s().active(class).await
    }

    async fn put_host(&self, record: HostRecord) -> Result<(), StoreError> {
        self.put_host_record(record).await
    }

    async fn remove_host(&self, host_id: &str) -> Result<(), StoreError> {
        self.s().remove_host(host_id).await
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.s().hosts().await
    }

    async fn append_samples(
        &self,
        class: &str,
        host_id: &str,
        batch_id: u64,
        samples: Vec<LabelledSample>,
    ) -> Result<bool, StoreError> {
        self.s().append_samples(class, host_id, batch_id, samples).await
    }

    async fn samples(&self, class: &str) -> Result<Vec<LabelledSample>, StoreError> {
        self.s().samples(class).await
    }

    async fn samples_seen(&self, class: &str) -> Result<u64, StoreError> {
        self.s().samples_seen(class).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.s().changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_escape_and_come_back() {
        for name in ["phenom-ii_x4", "a/b", "100%", "ü ber", ""] {
            let seg = segment(name);
            assert!(!seg.contains('/'), "{seg}");
            assert_eq!(unsegment(&seg).as_deref(), Some(name));
        }
        assert_eq!(segment("a/b"), "a%2Fb");
        assert_eq!(unsegment("%zz"), None);
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/vmgov/"), b"/vmgov0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn values_carry_their_format_version() {
        let bytes = encode(&GenerationValue { epoch: 7 }).unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), r#"{"v":1,"data":{"epoch":7}}"#);
    }

    #[test]
    fn announcements_are_made_once_per_revision_and_kind() {
        let mut a = Announced::default();
        assert!(a.first(5, 0), "the first path announces");
        assert!(!a.first(5, 0), "the second path is a duplicate");
        assert!(a.first(5, 2), "another kind at the same revision is news");
        assert!(a.first(5, 0), "a third offer is news again (the pair was consumed)");
    }

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn the_reservoir_fills_slots_in_order_then_replaces() {
        let mut r = rng();
        let empty = SampleMeta { seen: 0, len: 0, chunk: 4 };
        let plan = plan_piece(&empty, 10, 6, 8, &mut r);
        assert_eq!(plan.taken, 6);
        assert_eq!(
            plan.writes,
            (0..6).map(|i| (i, usize::try_from(i).unwrap())).collect::<Vec<_>>()
        );
        assert_eq!(plan.meta, SampleMeta { seen: 6, len: 6, chunk: 4 });
        let full = SampleMeta { seen: 10, len: 10, chunk: 4 };
        let plan = plan_piece(&full, 10, 1000, 8, &mut r);
        assert_eq!(plan.taken, 1000);
        assert_eq!(plan.meta.len, 10);
        assert_eq!(plan.meta.seen, 1010);
        assert!(plan.writes.iter().all(|&(slot, _)| slot < 10));
        // About capacity · ln(1010/10) ≈ 46 replacements are expected.
        assert!((10..150).contains(&plan.writes.len()), "{}", plan.writes.len());
    }

    #[test]
    fn a_piece_touches_at_most_its_chunk_budget() {
        let mut r = rng();
        let full = SampleMeta { seen: 1000, len: 1000, chunk: 10 };
        let plan = plan_piece(&full, 1000, 100_000, 3, &mut r);
        let touched: BTreeSet<u64> = plan.writes.iter().map(|(s, _)| s / 10).collect();
        assert!(touched.len() <= 3);
        assert!(plan.taken >= 1 && plan.taken < 100_000);
        assert_eq!(plan.meta.seen, 1000 + u64_of(plan.taken));
    }

    #[test]
    fn one_sample_encodes_within_its_bound() {
        let mut counters = RawCounters {
            timeslice_seconds: f64::MAX,
            vcpus: u32::MAX,
            energy_joules: Some(f64::MAX),
            ..RawCounters::default()
        };
        for field in [
            &mut counters.instructions,
            &mut counters.cycles,
            &mut counters.l2_misses,
            &mut counters.l3_misses,
            &mut counters.memory_accesses,
            &mut counters.disk_reads,
            &mut counters.disk_read_bytes,
            &mut counters.disk_writes,
            &mut counters.disk_write_bytes,
            &mut counters.packets_rx,
            &mut counters.bytes_rx,
            &mut counters.packets_tx,
            &mut counters.bytes_tx,
            &mut counters.cpu_time_ns,
        ] {
            *field = u64::MAX;
        }
        counters.unavailable = vmgov_proto::Counter::ALL.iter().copied().collect();
        let sample = LabelledSample {
            pstate: usize::MAX,
            counters,
            labels: Ratios { perf: f64::MAX, power: f64::MAX, throughput: f64::MAX },
        };
        let one = pb::SampleBatch { batch_id: 0, samples: vec![sample_to_pb(&sample)] };
        assert!(one.encoded_len() <= SAMPLE_MAX_BYTES, "{} bytes", one.encoded_len());
        let back = sample_from_pb(&one.samples[0]).unwrap();
        assert_eq!(back.counters, sample.counters);
    }

    #[test]
    fn every_sample_has_the_same_chance_to_stay() {
        // 10 slots, 100 samples offered in pieces of at most 2 chunks: each sample should be
        // retained with probability 10/100.
        let mut r = rng();
        let mut counts = [0u32; 100];
        let runs = 4000;
        for _ in 0..runs {
            let mut meta = SampleMeta { seen: 0, len: 0, chunk: 3 };
            let mut slots = [usize::MAX; 10];
            let mut next = 0;
            while next < 100 {
                let plan = plan_piece(&meta, 10, 100 - next, 2, &mut r);
                for (slot, i) in plan.writes {
                    slots[usize::try_from(slot).unwrap()] = next + i;
                }
                next += plan.taken;
                meta = plan.meta;
            }
            for s in slots {
                counts[s] += 1;
            }
        }
        let expected = f64::from(runs) * 0.1;
        for (i, c) in counts.iter().enumerate() {
            assert!((f64::from(*c) - expected).abs() < expected * 0.3, "sample {i}: {c} of {runs}");
        }
    }
}
