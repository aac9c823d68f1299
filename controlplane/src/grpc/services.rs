//! The `Peer` and `Admin` gRPC services: thin, they validate at the edge and hand over to
//! the mesh task.

use std::sync::atomic::Ordering;

use sipmesh_cluster::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, Invalid};
use super::{Input, Shared, walk_snapshot};
use crate::mesh::Capability;
use crate::pb;

fn bad(e: Invalid) -> Status {
    Status::invalid_argument(e.0)
}

pub(crate) async fn serve(
    shared: Shared,
    listener: tokio::net::TcpListener,
    stop: oneshot::Receiver<()>,
) {
    let peer = pb::peer_server::PeerServer::new(PeerSvc(shared.clone()))
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let admin = pb::admin_server::AdminServer::new(AdminSvc(shared));
    let r = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(peer)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop.await;
        })
        .await;
    if let Err(e) = r {
        eprintln!("sipd: gRPC server: {e}");
    }
}

struct PeerSvc(Shared);

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerSvc {
    async fn link(
        &self,
        req: Request<Streaming<pb::Envelope>>,
    ) -> Result<Response<pb::LinkClosed>, Status> {
        let mut stream = req.into_inner();
        let s = &self.0;
        while let Some(m) = stream.message().await? {
            match convert::envelope(s.cluster_id, m) {
                Ok(env) => {
                    if s.tx.send(Input::Envelope(env)).await.is_err() {
                        break;
                    }
                }
                Err(_) => {
                    s.stats.bad_envelopes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(Response::new(pb::LinkClosed {}))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = req.into_inner();
        if r.cluster_id != self.0.cluster_id {
            return Err(Status::invalid_argument(format!(
                "cluster_id: {} is not this cluster ({})",
                r.cluster_id, self.0.cluster_id
            )));
        }
        let info = convert::node_info("node", r.node).map_err(bad)?;
        let members = self.0.query(move |m, now| m.on_join(now, info)).await?;
        match members {
            Ok(ms) => Ok(Response::new(pb::JoinReply {
                members: ms.iter().map(convert::node_info_pb).collect(),
            })),
            Err(e) => Err(Status::already_exists(e)),
        }
    }

    type SnapshotStream = ReceiverStream<Result<pb::SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let r = req.into_inner();
        if r.cluster_id != self.0.cluster_id {
            return Err(Status::invalid_argument("cluster_id: not this cluster"));
        }
        convert::node_id("node_id", r.node_id).map_err(bad)?;
        let since = r.since_version;
        let Some(cap) = Capability::parse(&r.capability) else {
            return Err(Status::invalid_argument(format!(
                "capability: `{}` is unknown",
                r.capability
            )));
        };
        let marks = self
            .0
            .query(move |m, _| m.can_donate(cap).then(|| m.watermarks()))
            .await?;
        let Some(marks) = marks else {
            return Err(Status::unavailable(format!("{cap} is not synced here")));
        };
        let (tx, rx) = mpsc::channel(4);
        let begin = pb::SnapshotChunk {
            body: Some(pb::snapshot_chunk::Body::Begin(pb::SnapshotBegin {
                watermarks: marks.iter().map(convert::watermark_pb).collect(),
            })),
        };
        let (usrloc, dialogs, presence) = (
            self.0.usrloc.clone(),
            self.0.dialogs.clone(),
            self.0.presence.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if tx.blocking_send(Ok(begin)).is_ok() {
                match cap {
                    Capability::Usrloc => {
                        walk_snapshot(&usrloc, dialogs.as_deref(), presence.as_deref(), since, &tx)
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct AdminSvc(Shared);

fn ms_to_unix(now_mono: u64, at_mono: u64) -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    wall.saturating_sub(now_mono.saturating_sub(at_mono))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminSvc {
    async fn list_nodes(&self, _: Request<pb::Empty>) -> Result<Response<pb::NodeList>, Status> {
        let nodes = self.0.query(|m, _| m.nodes()).await?;
        Ok(Response::new(pb::NodeList {
            nodes: nodes
                .iter()
                .map(|n| pb::NodeStatus {
                    node: Some(convert::node_info_pb(&n.info)),
                    local: n.local,
                    state: n.state.to_string(),
                    link: n.link.to_string(),
                    next_hop: n.next_hop.map_or(0, |h| u32::from(h.0)),
                    capabilities: n.caps.iter().map(convert::cap_pb).collect(),
                    rtt_us: n.rtt.map_or(0, |r| r * 1000),
                })
                .collect(),
        }))
    }

    async fn topology(&self, _: Request<pb::Empty>) -> Result<Response<pb::TopologyReply>, Status> {
        let (me, topo) = self.0.query(|m, _| (m.me().id, m.topology())).await?;
        Ok(Response::new(pb::TopologyReply {
            local: u32::from(me.0),
            nodes: topo
                .into_iter()
                .map(|(id, seq, links)| pb::Adjacency {
                    node_id: u32::from(id.0),
                    seq,
                    up_links: links.iter().map(|l| u32::from(l.0)).collect(),
                })
                .collect(),
        }))
    }

    async fn sync_status(
        &self,
        req: Request<pb::SyncStatusArgs>,
    ) -> Result<Response<pb::SyncStatusReply>, Status> {
        let reset = req.into_inner().reset_lag;
        let views = self.0.query(|m, _| m.sync_status()).await?;
        let usrloc = self.0.usrloc.clone();
        let digest = tokio::task::spawn_blocking(move || usrloc.digest())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let lag = &self.0.stats.lag_us;
        let (samples, p50, p99, max) = (
            lag.count(),
            lag.quantile(0.5),
            lag.quantile(0.99),
            lag.max(),
        );
        if reset {
            lag.reset();
        }
        Ok(Response::new(pb::SyncStatusReply {
            capabilities: views
                .into_iter()
                .map(|v| {
                    let d = match v.cap {
                        Capability::Usrloc => digest,
                    };
                    pb::CapabilitySync {
                        name: v.cap.name().to_string(),
                        state: convert::sync_state_pb(v.state),
                        donor: v.donor.map_or(0, |d| u32::from(d.0)),
                        count: d.count,
                        digest: d.hash,
                        syncs_completed: v.completed,
                        syncs_failed: v.failed,
                        last_result: v.last_result,
                        gaps_repaired: v.gaps_repaired,
                        records_applied: v.records_applied,
                        lag_samples: samples,
                        lag_p50_us: p50,
                        lag_p99_us: p99,
                        lag_max_us: max,
                    }
                })
                .collect(),
        }))
    }

    async fn sync_request(
        &self,
        req: Request<pb::SyncRequestArgs>,
    ) -> Result<Response<pb::Empty>, Status> {
        let name = req.into_inner().capability;
        let Some(cap) = Capability::parse(&name) else {
            return Err(Status::invalid_argument(format!(
                "capability: `{name}` is unknown (usrloc)"
            )));
        };
        self.0
            .query(move |m, now| m.request_sync(now, cap))
            .await?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn remove_node(
        &self,
        req: Request<pb::NodeIdArg>,
    ) -> Result<Response<pb::Empty>, Status> {
        let id: NodeId = convert::node_id("node_id", req.into_inner().node_id).map_err(bad)?;
        self.0
            .query(move |m, now| m.remove_node(now, id))
            .await?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn set_node_enabled(
        &self,
        req: Request<pb::EnabledArg>,
    ) -> Result<Response<pb::Empty>, Status> {
        let on = req.into_inner().enabled;
        self.0.query(move |m, now| m.set_enabled(now, on)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn events(&self, _: Request<pb::Empty>) -> Result<Response<pb::EventList>, Status> {
        let events = self
            .0
            .query(|m, now| {
                m.events()
                    .map(|e| pb::Event {
                        at_ms: ms_to_unix(now, e.at),
                        node_id: u32::from(e.node.0),
                        kind: e.kind.to_string(),
                        reason: e.reason.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(Response::new(pb::EventList { events }))
    }

    type UsrlocDumpStream = ReceiverStream<Result<pb::UsrlocDumpReply, Status>>;

    async fn usrloc_dump(
        &self,
        req: Request<pb::UsrlocDumpArgs>,
    ) -> Result<Response<Self::UsrlocDumpStream>, Status> {
        const CHUNK: usize = 1000;
        let aor = req.into_inner().aor;
        let usrloc = self.0.usrloc.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let entry = |k: &[u8], rec: &sipmesh_cluster::AorRecord| pb::AorEntry {
                aor: String::from_utf8_lossy(k).into_owned(),
                contacts: rec
                    .bindings()
                    .iter()
                    .map(|b| pb::ContactEntry {
                        contact: String::from_utf8_lossy(b.contact()).into_owned(),
                        expires_at: u64::from(b.expires_at),
                        version: b.version,
                        origin: u32::from(b.origin.0),
                        call_id: String::from_utf8_lossy(b.call_id()).into_owned(),
                        cseq: b.cseq,
                    })
                    .collect(),
            };
            let mut out = Vec::with_capacity(CHUNK);
            let mut closed = false;
            if aor.is_empty() {
                usrloc.for_each(|k, rec| {
                    if closed {
                        return;
                    }
                    out.push(entry(k, rec));
                    if out.len() == CHUNK {
                        let aors = std::mem::replace(&mut out, Vec::with_capacity(CHUNK));
                        closed = tx.blocking_send(Ok(pb::UsrlocDumpReply { aors })).is_err();
                    }
                });
            } else {
                usrloc.read(aor.as_bytes(), |rec| {
                    if let Some(rec) = rec {
                        out.push(entry(aor.as_bytes(), rec));
                    }
                });
            }
            if !closed && !out.is_empty() {
                let _ = tx.blocking_send(Ok(pb::UsrlocDumpReply { aors: out }));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn db_stats(&self, _: Request<pb::Empty>) -> Result<Response<pb::DbStatsReply>, Status> {
        let store = self.store()?;
        let (p50, p99, records, batches, syncs, errors, durability) = match &self.0.persist_stats {
            Some(p) => (
                p.write_us.quantile(0.5),
                p.write_us.quantile(0.99),
                p.records.load(Ordering::Relaxed),
                p.batches.load(Ordering::Relaxed),
                p.wal_syncs.load(Ordering::Relaxed),
                p.errors.load(Ordering::Relaxed),
                self.0.durability.to_string(),
            ),
            None => (0, 0, 0, 0, 0, 0, String::new()),
        };
        let dir = store.dir().display().to_string();
        let fams = tokio::task::spawn_blocking(move || store.stats())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::DbStatsReply {
            data_dir: dir,
            durability,
            families: fams
                .into_iter()
                .map(|f| pb::FamilyStats {
                    name: f.name.to_string(),
                    keys: f.keys,
                    sst_bytes: f.sst_bytes,
                    memtable_bytes: f.memtable_bytes,
                })
                .collect(),
            records_written: records,
            batches,
            wal_syncs: syncs,
            write_errors: errors,
            write_p50_us: p50,
            write_p99_us: p99,
        }))
    }

    async fn db_compact(&self, _: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        let store = self.store()?;
        tokio::task::spawn_blocking(move || store.compact())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.0))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn db_checkpoint(
        &self,
        req: Request<pb::CheckpointArgs>,
    ) -> Result<Response<pb::Empty>, Status> {
        let dir = req.into_inner().dir;
        if dir.is_empty() {
            return Err(Status::invalid_argument("dir: a directory is needed"));
        }
        let target = std::path::PathBuf::from(&dir);
        if target.exists() {
            return Err(Status::already_exists(format!("dir: {dir} already exists")));
        }
        let store = self.store()?;
        tokio::task::spawn_blocking(move || store.checkpoint(&target))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.0))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn set_tag_active(
        &self,
        req: Request<pb::TagArg>,
    ) -> Result<Response<pb::TagActivated>, Status> {
        let name = req.into_inner().name;
        let term = self
            .0
            .query(move |m, now| m.activate_tag(now, &name))
            .await?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::TagActivated { term }))
    }

    async fn list_tags(&self, _: Request<pb::Empty>) -> Result<Response<pb::TagList>, Status> {
        let tags = self.0.query(|m, _| m.tags()).await?;
        Ok(Response::new(pb::TagList {
            tags: tags
                .into_iter()
                .map(|t| pb::TagStatus {
                    name: t.name,
                    slot: t.slot as u32,
                    state: if t.active { "active" } else { "backup" }.into(),
                    term: t.term,
                    holder: t.holder.map_or(0, |h| u32::from(h.0)),
                    configured: match t.configured {
                        Some(crate::mesh::tags::TagRole::Active) => "active".into(),
                        Some(crate::mesh::tags::TagRole::Backup) => "backup".into(),
                        None => String::new(),
                    },
                })
                .collect(),
        }))
    }

    async fn tag_history(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::TagHistoryList>, Status> {
        let transitions = self
            .0
            .query(|m, now| {
                m.tag_history()
                    .map(|t| pb::TagTransition {
                        at_ms: ms_to_unix(now, t.at),
                        tag: t.tag.clone(),
                        became: t.became.to_string(),
                        term: t.term,
                        reason: t.reason.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        Ok(Response::new(pb::TagHistoryList { transitions }))
    }

    async fn ownership(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::OwnershipReply>, Status> {
        use sipmesh_cluster::ownership::{BUCKETS, TAG_SLOTS};
        let seg = &self.0.segment;
        let (o, generation) = seg.snapshot();
        // As it stands now (a hand-over under way shows on the side of its boundary).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let o = o.at(now);
        let slots = |bits: &[u64]| -> Vec<u32> {
            (0..TAG_SLOTS)
                .filter(|i| bits[i / 64] >> (i % 64) & 1 == 1)
                .map(|i| i as u32)
                .collect()
        };
        Ok(Response::new(pb::OwnershipReply {
            segment: seg
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            generation,
            active_tag_slots: slots(&o.tags),
            shared_tag_slots: slots(&o.shared),
            buckets: BUCKETS as u32,
            buckets_mine: o.bucket_count() as u32,
            bucket_bits: o.buckets.to_vec(),
        }))
    }

    async fn dialogs(
        &self,
        req: Request<pb::DialogArgs>,
    ) -> Result<Response<pb::DialogList>, Status> {
        let a = req.into_inner();
        let table = self
            .0
            .dialogs
            .clone()
            .ok_or_else(|| Status::failed_precondition("the proxy is off on this node"))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let info = |d: &sipmesh_cluster::dialog::Dialog| pb::DialogInfo {
            id: format!("{:016x}", d.id),
            state: d.state.as_str().into(),
            call_id: text(&d.call_id),
            from_tag: text(&d.from_tag),
            to_tag: text(&d.to_tag),
            caller: text(&d.caller),
            callee: text(&d.callee),
            created_ms: d.created_ms,
            answered_ms: d.answered_ms,
            expires_ms: d.expires_ms,
            early_tags: u32::from(d.early_tags),
            origin: u32::from(d.origin.0),
        };
        let total = table.len() as u64;
        let dialogs = if a.id.is_empty() {
            let limit = if a.limit == 0 { 1000 } else { a.limit as usize };
            let mut all = table.snapshot();
            all.sort_by_key(|d| d.created_ms);
            all.iter().take(limit).map(|d| info(d)).collect()
        } else {
            let id = u64::from_str_radix(a.id.trim_start_matches("0x"), 16).map_err(|_| {
                Status::invalid_argument(format!("id: `{}` is not a hex dialog id", a.id))
            })?;
            let d = table
                .find_id(id)
                .ok_or_else(|| Status::not_found(format!("no dialog {}", a.id)))?;
            vec![info(&d)]
        };
        Ok(Response::new(pb::DialogList { dialogs, total }))
    }

    async fn presence(
        &self,
        req: Request<pb::PresenceArgs>,
    ) -> Result<Response<pb::PresenceReply>, Status> {
        use sipmesh_cluster::presence::split_presentity_key;
        use sipmesh_dataplane::presence::{Package, aor_of_uri, current_document};
        let a = req.into_inner();
        let t = self
            .0
            .presence
            .clone()
            .ok_or_else(|| Status::failed_precondition("presence is off on this node"))?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let limit = if a.limit == 0 { 1000 } else { a.limit as usize };
        let info = |key: &[u8], p: &sipmesh_cluster::presence::Presentity| {
            let (event, aor) = split_presentity_key(key);
            pb::PresentityInfo {
                event: text(event),
                aor: text(aor),
                publications: p
                    .pubs
                    .iter()
                    .map(|x| pb::PublicationInfo {
                        etag: text(&x.etag),
                        content_type: text(&x.content_type),
                        published_ms: x.published_ms,
                        expires_ms: x.expires_ms,
                        origin: u32::from(x.origin.0),
                        body_bytes: x.body.len() as u32,
                    })
                    .collect(),
                watchers: t.watcher_count(key) as u32,
            }
        };
        let mut r = pb::PresenceReply {
            total_presentities: t.presentities() as u64,
            total_watchers: t.watchers() as u64,
            ..Default::default()
        };
        if a.uri.is_empty() {
            t.for_each_presentity(|k, p| {
                if r.presentities.len() < limit {
                    r.presentities.push(info(k, p));
                }
            });
            return Ok(Response::new(r));
        }
        let aor = aor_of_uri(a.uri.as_bytes()).ok_or_else(|| {
            Status::invalid_argument(format!("uri: `{}` is not a SIP URI with a user", a.uri))
        })?;
        let event = if a.event.is_empty() {
            "presence"
        } else {
            a.event.as_str()
        };
        let package = Package::parse(event.as_bytes()).ok_or_else(|| {
            Status::invalid_argument(format!(
                "event: `{event}` is not presence, dialog or presence.winfo"
            ))
        })?;
        let mut doc = Vec::new();
        current_document(&t, package, &aor, &mut doc);
        r.document = text(&doc);
        let mut pkey = Vec::new();
        for pk in [Package::Presence, Package::Dialog, Package::Winfo] {
            sipmesh_cluster::presence::presentity_key(pk.name(), &aor, &mut pkey);
            if pk == package
                && let Some(p) = t.presentity(&pkey)
            {
                r.presentities.push(info(&pkey, &p));
            }
            for k in t.watchers_of(&pkey).iter() {
                if let Some(w) = t.watcher(k) {
                    r.watchers.push(pb::WatcherInfo {
                        id: format!("{:016x}", w.id),
                        event: text(pk.name()),
                        aor: text(&aor),
                        watcher: text(&w.watcher_uri),
                        state: w.state.as_str().into(),
                        contact: text(&w.contact),
                        expires_ms: w.expires_ms,
                        origin: u32::from(w.origin.0),
                        call_id: text(&w.call_id),
                    });
                }
            }
        }
        Ok(Response::new(r))
    }

    async fn profile_get(
        &self,
        req: Request<pb::ProfileArgs>,
    ) -> Result<Response<pb::ProfileReply>, Status> {
        let a = req.into_inner();
        let profiles = self
            .0
            .profiles
            .clone()
            .ok_or_else(|| Status::failed_precondition("the proxy is off on this node"))?;
        let value = a.has_value.then_some(a.value.as_bytes());
        let counts = profiles.get(&a.name, value).ok_or_else(|| {
            let known: Vec<&str> = profiles.defs().iter().map(|(n, _)| n.as_str()).collect();
            Status::not_found(format!(
                "no profile `{}` (defined: {})",
                a.name,
                known.join(", ")
            ))
        })?;
        let total = counts.iter().map(|(_, c)| *c).sum();
        Ok(Response::new(pb::ProfileReply {
            counts: counts
                .into_iter()
                .map(|(v, count)| pb::ProfileCount {
                    value: String::from_utf8_lossy(&v).into_owned(),
                    count,
                })
                .collect(),
            total,
        }))
    }

    async fn dialog_end(
        &self,
        req: Request<pb::DialogArgs>,
    ) -> Result<Response<pb::Empty>, Status> {
        let a = req.into_inner();
        let id = u64::from_str_radix(a.id.trim_start_matches("0x"), 16).map_err(|_| {
            Status::invalid_argument(format!("id: `{}` is not a hex dialog id", a.id))
        })?;
        crate::grpc::end_dialog(&self.0, id).map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn keepalive(
        &self,
        req: Request<pb::KeepaliveArgs>,
    ) -> Result<Response<pb::KeepaliveReply>, Status> {
        let a = req.into_inner();
        let enable = match a.enable.as_str() {
            "" => None,
            "enable" => Some(true),
            "disable" => Some(false),
            other => {
                return Err(Status::invalid_argument(format!(
                    "enable: `{other}` is not enable or disable"
                )));
            }
        };
        if a.interval_ms != 0 && !(100..=3_600_000).contains(&a.interval_ms) {
            return Err(Status::invalid_argument(
                "interval_ms: must be between 100 and 3600000",
            ));
        }
        let st = self
            .keepalive_query(move |k| {
                let mut s = k.status().settings;
                if let Some(e) = enable {
                    s.enabled = e;
                }
                if a.interval_ms != 0 {
                    s.interval_ms = a.interval_ms;
                }
                k.set(s);
                k.status()
            })
            .await?;
        let (s, t) = (st.settings, st.stats);
        Ok(Response::new(pb::KeepaliveReply {
            enabled: s.enabled,
            method: s.method.as_str().into(),
            interval_ms: s.interval_ms,
            max_misses: s.max_misses,
            aors: t.aors,
            tracked: t.tracked,
            ordered: t.ordered,
            not_owner: t.not_owner,
            missed: t.missed,
            removed: t.removed,
            sent: st.sent,
            fenced: st.fenced,
            answers: st.answers,
            ring_full: st.ring_full,
        }))
    }
}

impl AdminSvc {
    /// Runs `f` on the mesh task with the keepalive scheduler.
    async fn keepalive_query<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::grpc::Keepalive) -> R + Send + 'static,
    ) -> Result<R, Status> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        self.0
            .tx
            .send(crate::grpc::Input::Keepalive(Box::new(move |k| {
                let _ = otx.send(k.map(f));
            })))
            .await
            .map_err(|_| Status::unavailable("node is stopping"))?;
        orx.await
            .map_err(|_| Status::unavailable("node is stopping"))?
            .ok_or_else(|| Status::failed_precondition("keepalives are not set up on this node"))
    }

    fn store(&self) -> Result<std::sync::Arc<crate::store::Store>, Status> {
        self.0.store.clone().ok_or_else(|| {
            Status::failed_precondition("this node runs without a store (--no-store)")
        })
    }
}
