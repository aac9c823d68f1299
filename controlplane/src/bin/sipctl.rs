//! `sipctl`: the operator's client of a node's gRPC `Admin` service.

use std::fmt::Write as _;
use std::time::Duration;

use sipmesh_controlplane::pb;
use sipmesh_controlplane::pb::admin_client::AdminClient;
use tonic::transport::Channel;

const HELP: &str = "\
sipctl - operate a sipmesh node through its gRPC control plane

USAGE:
    sipctl [--server ADDR:PORT] [--json] COMMAND

COMMANDS:
    node list              every node: state, link, next hop, capabilities
    node remove ID         remove a node from the cluster (on every node)
    node disable           take this node out without it looking failed
    node enable            bring it back
    topology               the link-state database: who sees whom
    sync status [--reset-lag]
                           per capability: sync state, objects, digest, repairs,
                           replication lag (--reset-lag starts a new measurement)
    sync request CAP       full sync of CAP (usrloc) from a donor now
    events                 node up/down, link and sync events, with reasons
    usrloc dump [AOR]      registered contacts (all, or one address-of-record)
    tag list               sharing tags: state here, term, active node
    tag history            this node's tag transitions, with reasons
    tag activate NAME      make this node active for NAME (the next term; the
                           node that held it steps down)
    ownership [--segment FILE]
                           what the ownership segment says: active tag slots,
                           partition buckets acted on here (from the node, or
                           straight from a segment file, without a server)
    presence list          presentities (event, AoR, publications, watchers)
    presence show URI [EVENT]      the document its watchers get, and its publications
    presence watchers URI  the watchers of URI (every package)
    dialog list            calls the proxy tracks (state, caller, callee, age)
    dialog show ID         one call in full
    dialog end ID          end a call: a BYE to each side, and its CDR
    profile get NAME [VALUE]
                           live calls counted by a dialog profile (per value)
    ping [status]          NAT keepalives: settings and counters
    ping enable|disable    start or stop pinging on this node
    ping interval MS       ping each flagged contact every MS ms
    db stats               the store: rows and bytes per column family, writes
    db compact             flush and compact every column family
    db checkpoint DIR      a consistent copy of the store in DIR (on the node's
                           machine; DIR must not exist)

OPTIONS:
    -s, --server ADDR:PORT node to talk to (default 127.0.0.1:50051)
        --json             JSON instead of tables
    -h, --help             this text
";

/// Prints a line; a closed standard output (`sipctl ... | head`) ends quietly.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout().lock(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("sipctl: {msg}");
    std::process::exit(1);
}

/// A minimal JSON value for `--json` output.
enum Json {
    Str(String),
    Num(u64),
    Bool(bool),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    fn write(&self, out: &mut String) {
        match self {
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Arr(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.write(out);
                }
                out.push(']');
            }
            Json::Obj(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Json::Str((*k).to_string()).write(out);
                    out.push(':');
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn s(v: impl Into<String>) -> Json {
    Json::Str(v.into())
}

/// Prints rows as an aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                let _ = write!(
                    out,
                    "{:<width$}  ",
                    c,
                    width = w.get(i).copied().unwrap_or(0)
                );
            }
        }
        say!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn presentity_json(p: &pb::PresentityInfo) -> Json {
    Json::Obj(vec![
        ("event", s(p.event.clone())),
        ("aor", s(p.aor.clone())),
        ("watchers", Json::Num(u64::from(p.watchers))),
        (
            "publications",
            Json::Arr(
                p.publications
                    .iter()
                    .map(|x| {
                        Json::Obj(vec![
                            ("etag", s(x.etag.clone())),
                            ("content_type", s(x.content_type.clone())),
                            ("published_ms", Json::Num(x.published_ms)),
                            ("expires_ms", Json::Num(x.expires_ms)),
                            ("origin", Json::Num(u64::from(x.origin))),
                            ("body_bytes", Json::Num(u64::from(x.body_bytes))),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

fn state_name(s: i32) -> &'static str {
    match pb::SyncState::try_from(s) {
        Ok(pb::SyncState::Synced) => "synced",
        Ok(pb::SyncState::Syncing) => "syncing",
        _ => "not-synced",
    }
}

fn caps_text(caps: &[pb::CapabilityState]) -> String {
    caps.iter()
        .map(|c| format!("{}={}", c.name, state_name(c.state)))
        .collect::<Vec<_>>()
        .join(",")
}

fn caps_json(caps: &[pb::CapabilityState]) -> Json {
    Json::Arr(
        caps.iter()
            .map(|c| {
                Json::Obj(vec![
                    ("name", s(c.name.clone())),
                    ("state", s(state_name(c.state))),
                    ("newest_version", Json::Num(c.newest_version)),
                ])
            })
            .collect(),
    )
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut server = "127.0.0.1:50051".to_string();
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.drain(..);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-s" | "--server" => {
                server = it.next().unwrap_or_else(|| fail("--server needs a value"))
            }
            "--json" => json = true,
            "-h" | "--help" => {
                print!("{HELP}");
                return;
            }
            _ => rest.push(a),
        }
    }
    if rest.is_empty() {
        print!("{HELP}");
        std::process::exit(2);
    }
    // Reading a segment file needs no server (a node that is down, or another process).
    if let ["ownership", "--segment", path] =
        rest.iter().map(String::as_str).collect::<Vec<_>>()[..]
    {
        dump_segment(std::path::Path::new(path), json);
        return;
    }
    let url = if server.starts_with("http://") {
        server.clone()
    } else {
        format!("http://{server}")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e));
    rt.block_on(async move {
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap_or_else(|e| fail(format!("--server {server}: {e}")))
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap_or_else(|e| fail(format!("cannot reach {server}: {e}")));
        let words: Vec<&str> = rest.iter().map(String::as_str).collect();
        if let Err(st) = run(AdminClient::new(ch), &words, json).await {
            fail(format!("{}: {}", server, st.message()));
        }
    });
}

fn dump_segment(path: &std::path::Path, json: bool) {
    use sipmesh_cluster::ownership::{BUCKETS, Segment, TAG_SLOTS};
    let seg = Segment::open(path).unwrap_or_else(|e| fail(e));
    let (o, generation) = seg.snapshot();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let o = o.at(now);
    let slots = |bits: &[u64]| -> Vec<u64> {
        (0..TAG_SLOTS)
            .filter(|i| bits[i / 64] >> (i % 64) & 1 == 1)
            .map(|i| i as u64)
            .collect()
    };
    let (active, shared) = (slots(&o.tags), slots(&o.shared));
    if json {
        let mut out = String::new();
        Json::Obj(vec![
            ("segment", s(path.display().to_string())),
            ("node_id", Json::Num(u64::from(seg.node_id()))),
            ("generation", Json::Num(generation)),
            (
                "active_tag_slots",
                Json::Arr(active.iter().map(|x| Json::Num(*x)).collect()),
            ),
            (
                "shared_tag_slots",
                Json::Arr(shared.iter().map(|x| Json::Num(*x)).collect()),
            ),
            (
                "terms",
                Json::Arr(
                    active
                        .iter()
                        .map(|x| Json::Num(o.terms[*x as usize]))
                        .collect(),
                ),
            ),
            ("buckets", Json::Num(BUCKETS as u64)),
            ("buckets_mine", Json::Num(o.bucket_count() as u64)),
        ])
        .write(&mut out);
        say!("{out}");
    } else {
        say!(
            "segment {} of node {} generation {generation}",
            path.display(),
            seg.node_id()
        );
        say!("active tag slots: {active:?} (shared, split by bucket: {shared:?})");
        say!(
            "partition buckets acted on here: {} of {BUCKETS}",
            o.bucket_count()
        );
    }
}

async fn run(mut c: AdminClient<Channel>, words: &[&str], json: bool) -> Result<(), tonic::Status> {
    let e = pb::Empty {};
    let print = |j: Json| {
        let mut out = String::new();
        j.write(&mut out);
        say!("{out}");
    };
    match words {
        ["node", "list"] | ["nodes"] => {
            let r = c.list_nodes(e).await?.into_inner();
            if json {
                print(Json::Arr(
                    r.nodes
                        .iter()
                        .map(|n| {
                            let i = n.node.clone().unwrap_or_default();
                            Json::Obj(vec![
                                ("node_id", Json::Num(u64::from(i.node_id))),
                                ("local", Json::Bool(n.local)),
                                ("state", s(n.state.clone())),
                                ("link", s(n.link.clone())),
                                ("next_hop", Json::Num(u64::from(n.next_hop))),
                                ("peer_url", s(i.peer_url)),
                                ("sip_addr", s(i.sip_addr)),
                                ("seed", Json::Bool(i.seed)),
                                ("rtt_us", Json::Num(n.rtt_us)),
                                ("capabilities", caps_json(&n.capabilities)),
                            ])
                        })
                        .collect(),
                ));
            } else {
                table(
                    &[
                        "NODE",
                        "STATE",
                        "LINK",
                        "NEXT-HOP",
                        "RTT",
                        "PEER-URL",
                        "SIP",
                        "CAPABILITIES",
                    ],
                    r.nodes
                        .iter()
                        .map(|n| {
                            let i = n.node.clone().unwrap_or_default();
                            vec![
                                format!("{}{}", i.node_id, if n.local { "*" } else { "" }),
                                n.state.clone(),
                                n.link.clone(),
                                if n.next_hop == 0 {
                                    "-".into()
                                } else {
                                    n.next_hop.to_string()
                                },
                                if n.local {
                                    "-".into()
                                } else {
                                    format!("{:.1}ms", n.rtt_us as f64 / 1000.0)
                                },
                                i.peer_url,
                                i.sip_addr,
                                caps_text(&n.capabilities),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["node", "remove", id] => {
            let node_id = id
                .parse()
                .map_err(|_| tonic::Status::invalid_argument(format!("`{id}` is not a node id")))?;
            c.remove_node(pb::NodeIdArg { node_id }).await?;
            say!("node {id} removed");
        }
        ["node", "disable"] | ["node", "enable"] => {
            let enabled = words[1] == "enable";
            c.set_node_enabled(pb::EnabledArg { enabled }).await?;
            say!("node {}", if enabled { "enabled" } else { "disabled" });
        }
        ["topology"] => {
            let r = c.topology(e).await?.into_inner();
            if json {
                print(Json::Obj(vec![
                    ("local", Json::Num(u64::from(r.local))),
                    (
                        "nodes",
                        Json::Arr(
                            r.nodes
                                .iter()
                                .map(|a| {
                                    Json::Obj(vec![
                                        ("node_id", Json::Num(u64::from(a.node_id))),
                                        ("seq", Json::Num(a.seq)),
                                        (
                                            "up_links",
                                            Json::Arr(
                                                a.up_links
                                                    .iter()
                                                    .map(|l| Json::Num(u64::from(*l)))
                                                    .collect(),
                                            ),
                                        ),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ]));
            } else {
                table(
                    &["NODE", "SEQ", "UP-LINKS"],
                    r.nodes
                        .iter()
                        .map(|a| {
                            vec![
                                format!(
                                    "{}{}",
                                    a.node_id,
                                    if a.node_id == r.local { "*" } else { "" }
                                ),
                                a.seq.to_string(),
                                a.up_links
                                    .iter()
                                    .map(|l| l.to_string())
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["sync", "status"] | ["sync", "status", "--reset-lag"] => {
            let reset_lag = words.len() == 3;
            let r = c
                .sync_status(pb::SyncStatusArgs { reset_lag })
                .await?
                .into_inner();
            if json {
                print(Json::Arr(
                    r.capabilities
                        .iter()
                        .map(|x| {
                            Json::Obj(vec![
                                ("name", s(x.name.clone())),
                                ("state", s(state_name(x.state))),
                                ("donor", Json::Num(u64::from(x.donor))),
                                ("count", Json::Num(x.count)),
                                ("digest", s(format!("{:016x}", x.digest))),
                                ("syncs_completed", Json::Num(x.syncs_completed)),
                                ("syncs_failed", Json::Num(x.syncs_failed)),
                                ("gaps_repaired", Json::Num(x.gaps_repaired)),
                                ("records_applied", Json::Num(x.records_applied)),
                                ("lag_samples", Json::Num(x.lag_samples)),
                                ("lag_p50_us", Json::Num(x.lag_p50_us)),
                                ("lag_p99_us", Json::Num(x.lag_p99_us)),
                                ("lag_max_us", Json::Num(x.lag_max_us)),
                                ("last_result", s(x.last_result.clone())),
                            ])
                        })
                        .collect(),
                ));
            } else {
                table(
                    &[
                        "CAPABILITY",
                        "STATE",
                        "DONOR",
                        "OBJECTS",
                        "DIGEST",
                        "SYNCS",
                        "FAILED",
                        "GAPS-REPAIRED",
                        "APPLIED",
                        "LAG-P50/P99",
                        "LAST",
                    ],
                    r.capabilities
                        .iter()
                        .map(|x| {
                            vec![
                                x.name.clone(),
                                state_name(x.state).into(),
                                if x.donor == 0 {
                                    "-".into()
                                } else {
                                    x.donor.to_string()
                                },
                                x.count.to_string(),
                                format!("{:016x}", x.digest),
                                x.syncs_completed.to_string(),
                                x.syncs_failed.to_string(),
                                x.gaps_repaired.to_string(),
                                x.records_applied.to_string(),
                                format!(
                                    "{:.1}/{:.1}ms",
                                    x.lag_p50_us as f64 / 1000.0,
                                    x.lag_p99_us as f64 / 1000.0
                                ),
                                x.last_result.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["sync", "request", cap] => {
            c.sync_request(pb::SyncRequestArgs {
                capability: cap.to_string(),
            })
            .await?;
            say!("full sync of {cap} requested");
        }
        ["events"] => {
            let r = c.events(e).await?.into_inner();
            if json {
                print(Json::Arr(
                    r.events
                        .iter()
                        .map(|x| {
                            Json::Obj(vec![
                                ("at_ms", Json::Num(x.at_ms)),
                                ("node_id", Json::Num(u64::from(x.node_id))),
                                ("kind", s(x.kind.clone())),
                                ("reason", s(x.reason.clone())),
                            ])
                        })
                        .collect(),
                ));
            } else {
                table(
                    &["AT(unix ms)", "NODE", "EVENT", "REASON"],
                    r.events
                        .iter()
                        .map(|x| {
                            vec![
                                x.at_ms.to_string(),
                                x.node_id.to_string(),
                                x.kind.clone(),
                                x.reason.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["usrloc", "dump"] | ["usrloc", "dump", _] => {
            let aor = words.get(2).map(|a| a.to_string()).unwrap_or_default();
            let mut stream = c
                .usrloc_dump(pb::UsrlocDumpArgs { aor })
                .await?
                .into_inner();
            let mut r = pb::UsrlocDumpReply::default();
            while let Some(chunk) = stream.message().await? {
                r.aors.extend(chunk.aors);
            }
            r.aors.sort_by(|a, b| a.aor.cmp(&b.aor));
            if json {
                print(Json::Arr(
                    r.aors
                        .iter()
                        .map(|a| {
                            Json::Obj(vec![
                                ("aor", s(a.aor.clone())),
                                (
                                    "contacts",
                                    Json::Arr(
                                        a.contacts
                                            .iter()
                                            .map(|b| {
                                                Json::Obj(vec![
                                                    ("contact", s(b.contact.clone())),
                                                    ("expires_at", Json::Num(b.expires_at)),
                                                    ("version", Json::Num(b.version)),
                                                    ("origin", Json::Num(u64::from(b.origin))),
                                                    ("call_id", s(b.call_id.clone())),
                                                    ("cseq", Json::Num(u64::from(b.cseq))),
                                                ])
                                            })
                                            .collect(),
                                    ),
                                ),
                            ])
                        })
                        .collect(),
                ));
            } else {
                let mut rows = Vec::new();
                for a in &r.aors {
                    for b in &a.contacts {
                        rows.push(vec![
                            a.aor.clone(),
                            b.contact.clone(),
                            b.expires_at.to_string(),
                            b.origin.to_string(),
                            b.version.to_string(),
                        ]);
                    }
                }
                table(&["AOR", "CONTACT", "EXPIRES-AT", "ORIGIN", "VERSION"], rows);
            }
        }
        ["db", "stats"] => {
            let r = c.db_stats(e).await?.into_inner();
            if json {
                print(Json::Obj(vec![
                    ("data_dir", s(r.data_dir.clone())),
                    ("durability", s(r.durability.clone())),
                    ("records_written", Json::Num(r.records_written)),
                    ("batches", Json::Num(r.batches)),
                    ("wal_syncs", Json::Num(r.wal_syncs)),
                    ("write_errors", Json::Num(r.write_errors)),
                    ("write_p50_us", Json::Num(r.write_p50_us)),
                    ("write_p99_us", Json::Num(r.write_p99_us)),
                    (
                        "families",
                        Json::Arr(
                            r.families
                                .iter()
                                .map(|f| {
                                    Json::Obj(vec![
                                        ("name", s(f.name.clone())),
                                        ("keys", Json::Num(f.keys)),
                                        ("sst_bytes", Json::Num(f.sst_bytes)),
                                        ("memtable_bytes", Json::Num(f.memtable_bytes)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ]));
            } else {
                say!(
                    "{} ({}): {} records written in {} batches, {} WAL syncs, {} errors; batch write p50 {:.2} ms, p99 {:.2} ms",
                    r.data_dir,
                    r.durability,
                    r.records_written,
                    r.batches,
                    r.wal_syncs,
                    r.write_errors,
                    r.write_p50_us as f64 / 1000.0,
                    r.write_p99_us as f64 / 1000.0
                );
                table(
                    &["FAMILY", "KEYS(est.)", "SST-BYTES", "MEMTABLE-BYTES"],
                    r.families
                        .iter()
                        .map(|f| {
                            vec![
                                f.name.clone(),
                                f.keys.to_string(),
                                f.sst_bytes.to_string(),
                                f.memtable_bytes.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["tag", "list"] | ["tags"] => {
            let r = c.list_tags(e).await?.into_inner();
            if json {
                print(Json::Arr(
                    r.tags
                        .iter()
                        .map(|t| {
                            Json::Obj(vec![
                                ("name", s(t.name.clone())),
                                ("slot", Json::Num(u64::from(t.slot))),
                                ("state", s(t.state.clone())),
                                ("term", Json::Num(t.term)),
                                ("holder", Json::Num(u64::from(t.holder))),
                                ("configured", s(t.configured.clone())),
                            ])
                        })
                        .collect(),
                ));
            } else {
                table(
                    &["TAG", "STATE", "TERM", "ACTIVE-NODE", "CONFIGURED", "SLOT"],
                    r.tags
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.state.clone(),
                                t.term.to_string(),
                                if t.holder == 0 {
                                    "-".into()
                                } else {
                                    t.holder.to_string()
                                },
                                if t.configured.is_empty() {
                                    "-".into()
                                } else {
                                    t.configured.clone()
                                },
                                t.slot.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["tag", "history"] => {
            let r = c.tag_history(e).await?.into_inner();
            if json {
                print(Json::Arr(
                    r.transitions
                        .iter()
                        .map(|t| {
                            Json::Obj(vec![
                                ("at_ms", Json::Num(t.at_ms)),
                                ("tag", s(t.tag.clone())),
                                ("became", s(t.became.clone())),
                                ("term", Json::Num(t.term)),
                                ("reason", s(t.reason.clone())),
                            ])
                        })
                        .collect(),
                ));
            } else {
                table(
                    &["AT(unix ms)", "TAG", "BECAME", "TERM", "REASON"],
                    r.transitions
                        .iter()
                        .map(|t| {
                            vec![
                                t.at_ms.to_string(),
                                t.tag.clone(),
                                t.became.clone(),
                                t.term.to_string(),
                                t.reason.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["tag", "activate", name] => {
            let r = c
                .set_tag_active(pb::TagArg {
                    name: name.to_string(),
                })
                .await?
                .into_inner();
            say!("tag {name} active here with term {}", r.term);
        }
        ["ownership"] => {
            let r = c.ownership(e).await?.into_inner();
            if json {
                print(Json::Obj(vec![
                    ("segment", s(r.segment.clone())),
                    ("generation", Json::Num(r.generation)),
                    (
                        "active_tag_slots",
                        Json::Arr(
                            r.active_tag_slots
                                .iter()
                                .map(|x| Json::Num(u64::from(*x)))
                                .collect(),
                        ),
                    ),
                    (
                        "shared_tag_slots",
                        Json::Arr(
                            r.shared_tag_slots
                                .iter()
                                .map(|x| Json::Num(u64::from(*x)))
                                .collect(),
                        ),
                    ),
                    ("buckets", Json::Num(u64::from(r.buckets))),
                    ("buckets_mine", Json::Num(u64::from(r.buckets_mine))),
                    (
                        "bucket_bits",
                        Json::Arr(
                            r.bucket_bits
                                .iter()
                                .map(|x| s(format!("{x:016x}")))
                                .collect(),
                        ),
                    ),
                ]));
            } else {
                say!(
                    "segment {} generation {}",
                    if r.segment.is_empty() {
                        "(anonymous)"
                    } else {
                        &r.segment
                    },
                    r.generation
                );
                say!(
                    "active tag slots: {:?} (shared, split by bucket: {:?})",
                    r.active_tag_slots,
                    r.shared_tag_slots
                );
                say!(
                    "partition buckets acted on here: {} of {}",
                    r.buckets_mine,
                    r.buckets
                );
            }
        }
        ["dialog", "list"] | ["dialogs"] | ["dialog", "show", _] => {
            let id = match words {
                ["dialog", "show", id] => id.to_string(),
                _ => String::new(),
            };
            let show = !id.is_empty();
            let r = c
                .dialogs(pb::DialogArgs { id, limit: 0 })
                .await?
                .into_inner();
            let obj = |d: &pb::DialogInfo| {
                Json::Obj(vec![
                    ("id", s(d.id.clone())),
                    ("state", s(d.state.clone())),
                    ("call_id", s(d.call_id.clone())),
                    ("from_tag", s(d.from_tag.clone())),
                    ("to_tag", s(d.to_tag.clone())),
                    ("caller", s(d.caller.clone())),
                    ("callee", s(d.callee.clone())),
                    ("created_ms", Json::Num(d.created_ms)),
                    ("answered_ms", Json::Num(d.answered_ms)),
                    ("expires_ms", Json::Num(d.expires_ms)),
                    ("early_tags", Json::Num(u64::from(d.early_tags))),
                    ("origin", Json::Num(u64::from(d.origin))),
                ])
            };
            if json {
                if show {
                    print(r.dialogs.first().map_or(Json::Arr(Vec::new()), obj));
                } else {
                    print(Json::Obj(vec![
                        ("total", Json::Num(r.total)),
                        ("dialogs", Json::Arr(r.dialogs.iter().map(obj).collect())),
                    ]));
                }
            } else if show {
                for d in &r.dialogs {
                    for (k, v) in [
                        ("id", d.id.clone()),
                        ("state", d.state.clone()),
                        ("call-id", d.call_id.clone()),
                        ("from-tag", d.from_tag.clone()),
                        ("to-tag", d.to_tag.clone()),
                        ("caller", d.caller.clone()),
                        ("callee", d.callee.clone()),
                        ("created", d.created_ms.to_string()),
                        ("answered", d.answered_ms.to_string()),
                        ("expires", d.expires_ms.to_string()),
                        ("early dialogs", d.early_tags.to_string()),
                        ("origin node", d.origin.to_string()),
                    ] {
                        say!("{k:<14} {v}");
                    }
                }
            } else {
                say!("{} live dialogs", r.total);
                table(
                    &["ID", "STATE", "CALLER", "CALLEE", "CALL-ID", "AGE-S"],
                    r.dialogs
                        .iter()
                        .map(|d| {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |t| t.as_millis() as u64);
                            vec![
                                d.id.clone(),
                                d.state.clone(),
                                d.caller.clone(),
                                d.callee.clone(),
                                d.call_id.clone(),
                                (now.saturating_sub(d.created_ms) / 1000).to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["profile", "get", name, rest @ ..] if rest.len() <= 1 => {
            let r = c
                .profile_get(pb::ProfileArgs {
                    name: name.to_string(),
                    value: rest.first().map(|v| v.to_string()).unwrap_or_default(),
                    has_value: !rest.is_empty(),
                })
                .await?
                .into_inner();
            if json {
                print(Json::Obj(vec![
                    ("total", Json::Num(r.total.max(0) as u64)),
                    (
                        "counts",
                        Json::Arr(
                            r.counts
                                .iter()
                                .map(|c| {
                                    Json::Obj(vec![
                                        ("value", s(c.value.clone())),
                                        ("count", Json::Num(c.count.max(0) as u64)),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                ]));
            } else {
                say!("{name}: {} live calls", r.total);
                for c in &r.counts {
                    if !c.value.is_empty() {
                        say!("  {:<30} {}", c.value, c.count);
                    }
                }
            }
        }
        ["presence", "list"] => {
            let r = c.presence(pb::PresenceArgs::default()).await?.into_inner();
            if json {
                print(Json::Obj(vec![
                    ("presentities", Json::Num(r.total_presentities)),
                    ("watchers", Json::Num(r.total_watchers)),
                    (
                        "list",
                        Json::Arr(r.presentities.iter().map(presentity_json).collect()),
                    ),
                ]));
            } else {
                say!(
                    "{} presentities, {} watchers",
                    r.total_presentities,
                    r.total_watchers
                );
                table(
                    &["EVENT", "AOR", "PUBLICATIONS", "WATCHERS"],
                    r.presentities
                        .iter()
                        .map(|p| {
                            vec![
                                p.event.clone(),
                                p.aor.clone(),
                                p.publications.len().to_string(),
                                p.watchers.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["presence", cmd @ ("show" | "watchers"), uri, rest @ ..] if rest.len() <= 1 => {
            let r = c
                .presence(pb::PresenceArgs {
                    uri: uri.to_string(),
                    event: rest.first().map(|e| e.to_string()).unwrap_or_default(),
                    limit: 0,
                })
                .await?
                .into_inner();
            let watcher = |w: &pb::WatcherInfo| {
                Json::Obj(vec![
                    ("id", s(w.id.clone())),
                    ("event", s(w.event.clone())),
                    ("watcher", s(w.watcher.clone())),
                    ("state", s(w.state.clone())),
                    ("contact", s(w.contact.clone())),
                    ("expires_ms", Json::Num(w.expires_ms)),
                    ("origin", Json::Num(u64::from(w.origin))),
                    ("call_id", s(w.call_id.clone())),
                ])
            };
            if *cmd == "show" {
                if json {
                    print(Json::Obj(vec![
                        ("document", s(r.document.clone())),
                        (
                            "publications",
                            Json::Arr(r.presentities.iter().map(presentity_json).collect()),
                        ),
                    ]));
                } else {
                    for p in &r.presentities {
                        for x in &p.publications {
                            say!(
                                "publication {} {} {} bytes, expires {} (node {})",
                                x.etag,
                                x.content_type,
                                x.body_bytes,
                                x.expires_ms,
                                x.origin
                            );
                        }
                    }
                    say!("{}", r.document);
                }
            } else if json {
                print(Json::Arr(r.watchers.iter().map(watcher).collect()));
            } else {
                table(
                    &["ID", "EVENT", "WATCHER", "STATE", "CONTACT", "EXPIRES-MS"],
                    r.watchers
                        .iter()
                        .map(|w| {
                            vec![
                                w.id.clone(),
                                w.event.clone(),
                                w.watcher.clone(),
                                w.state.clone(),
                                w.contact.clone(),
                                w.expires_ms.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        ["dialog", "end", id] => {
            c.dialog_end(pb::DialogArgs {
                id: id.to_string(),
                limit: 0,
            })
            .await?;
            say!("dialog {id}: a BYE goes to each side");
        }
        ["ping", rest @ ..] => {
            let (enable, interval_ms) = match rest {
                [] | ["status"] => ("", 0),
                ["enable"] => ("enable", 0),
                ["disable"] => ("disable", 0),
                ["interval", ms] => (
                    "",
                    ms.parse::<u64>().map_err(|_| {
                        tonic::Status::invalid_argument(format!("`{ms}` is not ms"))
                    })?,
                ),
                _ => {
                    return Err(tonic::Status::invalid_argument(
                        "usage: ping [status | enable | disable | interval MS]",
                    ));
                }
            };
            let r = c
                .keepalive(pb::KeepaliveArgs {
                    enable: enable.into(),
                    interval_ms,
                })
                .await?
                .into_inner();
            let counters = [
                ("aors", r.aors),
                ("tracked", r.tracked),
                ("ordered", r.ordered),
                ("sent", r.sent),
                ("answers", r.answers),
                ("missed", r.missed),
                ("removed", r.removed),
                ("not_owner", r.not_owner),
                ("fenced", r.fenced),
                ("ring_full", r.ring_full),
            ];
            if json {
                let mut o = vec![
                    ("enabled", Json::Bool(r.enabled)),
                    ("method", s(r.method.clone())),
                    ("interval_ms", Json::Num(r.interval_ms)),
                    ("max_misses", Json::Num(u64::from(r.max_misses))),
                ];
                o.extend(counters.iter().map(|(k, v)| (*k, Json::Num(*v))));
                print(Json::Obj(o));
            } else {
                say!(
                    "keepalive {} ({} every {} ms, removed after {} unanswered)",
                    if r.enabled { "enabled" } else { "disabled" },
                    r.method,
                    r.interval_ms,
                    r.max_misses
                );
                for (k, v) in counters {
                    say!("  {k:<10} {v}");
                }
            }
        }
        ["db", "compact"] => {
            c.db_compact(e).await?;
            say!("compacted");
        }
        ["db", "checkpoint", dir] => {
            c.db_checkpoint(pb::CheckpointArgs {
                dir: dir.to_string(),
            })
            .await?;
            say!("checkpoint written to {dir}");
        }
        _ => {
            eprint!("{HELP}");
            std::process::exit(2);
        }
    }
    Ok(())
}
