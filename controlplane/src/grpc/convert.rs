//! The edge: protobuf messages to validated mesh types and back. Anything that does not
//! validate is refused here, with a message naming the field.

use sipmesh_cluster::NodeId;

use crate::config::check_peer_url;
use crate::mesh::tags::TagClaim;
use crate::mesh::{
    Batch, Body, CapAdvert, Capability, Envelope, FLOOD, LinkStateAd, NodeInfo, Removal, SyncState,
    Watermark,
};
use crate::pb;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

fn invalid<T>(m: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(m.into()))
}

/// A node id field: 1..=65535.
pub fn node_id(field: &str, v: u32) -> Result<NodeId, Invalid> {
    match u16::try_from(v) {
        Ok(n) if n != 0 => Ok(NodeId(n)),
        _ => invalid(format!("{field}: {v} is not a node id (1..=65535)")),
    }
}

pub fn node_info(field: &str, n: Option<pb::NodeInfo>) -> Result<NodeInfo, Invalid> {
    let Some(n) = n else {
        return invalid(format!("{field}: missing"));
    };
    let id = node_id(&format!("{field}.node_id"), n.node_id)?;
    check_peer_url(&n.peer_url).map_err(|e| Invalid(format!("{field}.peer_url: {e}")))?;
    if !n.sip_addr.is_empty() && n.sip_addr.parse::<std::net::SocketAddr>().is_err() {
        return invalid(format!("{field}.sip_addr: `{}` is not IP:port", n.sip_addr));
    }
    Ok(NodeInfo {
        id,
        peer_url: n.peer_url,
        sip_addr: n.sip_addr,
        seed: n.seed,
        priority: n.priority,
    })
}

pub fn node_info_pb(n: &NodeInfo) -> pb::NodeInfo {
    pb::NodeInfo {
        node_id: u32::from(n.id.0),
        peer_url: n.peer_url.clone(),
        sip_addr: n.sip_addr.clone(),
        seed: n.seed,
        priority: n.priority,
    }
}

pub fn sync_state(s: i32) -> SyncState {
    match pb::SyncState::try_from(s) {
        Ok(pb::SyncState::Syncing) => SyncState::Syncing,
        Ok(pb::SyncState::Synced) => SyncState::Synced,
        _ => SyncState::NotSynced,
    }
}

pub fn sync_state_pb(s: SyncState) -> i32 {
    match s {
        SyncState::NotSynced => pb::SyncState::NotSynced as i32,
        SyncState::Syncing => pb::SyncState::Syncing as i32,
        SyncState::Synced => pb::SyncState::Synced as i32,
    }
}

pub fn cap_pb(c: &CapAdvert) -> pb::CapabilityState {
    pb::CapabilityState {
        name: c.cap.name().to_string(),
        state: sync_state_pb(c.state),
        newest_version: c.newest_version,
    }
}

fn link_state(ls: pb::LinkState) -> Result<LinkStateAd, Invalid> {
    let node = node_info("link_state.node", ls.node)?;
    let up_links = ls
        .up_links
        .iter()
        .map(|&v| node_id("link_state.up_links", v))
        .collect::<Result<_, _>>()?;
    // Capabilities this build does not know are skipped (a newer peer may have more).
    let caps = ls
        .capabilities
        .iter()
        .filter_map(|c| {
            Capability::parse(&c.name).map(|cap| CapAdvert {
                cap,
                state: sync_state(c.state),
                newest_version: c.newest_version,
            })
        })
        .collect();
    let known = ls
        .known
        .into_iter()
        .map(|k| node_info("link_state.known", Some(k)))
        .collect::<Result<_, _>>()?;
    let removed = ls
        .removed
        .iter()
        .map(|r| {
            Ok(Removal {
                id: node_id("link_state.removed.node_id", r.node_id)?,
                incarnation: r.incarnation,
            })
        })
        .collect::<Result<_, _>>()?;
    let tags = ls
        .tags
        .into_iter()
        .map(|t| {
            Ok(TagClaim {
                holder: if t.holder == 0 {
                    None
                } else {
                    Some(node_id("link_state.tags.holder", t.holder)?)
                },
                name: t.name,
                term: t.term,
                since: t.since_ms,
                candidate: t.candidate,
            })
        })
        .collect::<Result<_, Invalid>>()?;
    Ok(LinkStateAd {
        tags,
        node,
        incarnation: ls.incarnation,
        seq: ls.seq,
        up_links,
        disabled: ls.disabled,
        caps,
        known,
        removed,
        last_repl_seq: ls.last_repl_seq,
        acting_since: ls.acting_since_ms,
    })
}

fn link_state_pb(a: &LinkStateAd) -> pb::LinkState {
    pb::LinkState {
        node: Some(node_info_pb(&a.node)),
        incarnation: a.incarnation,
        seq: a.seq,
        up_links: a.up_links.iter().map(|n| u32::from(n.0)).collect(),
        disabled: a.disabled,
        capabilities: a.caps.iter().map(cap_pb).collect(),
        known: a.known.iter().map(node_info_pb).collect(),
        removed: a
            .removed
            .iter()
            .map(|r| pb::Removal {
                node_id: u32::from(r.id.0),
                incarnation: r.incarnation,
            })
            .collect(),
        last_repl_seq: a.last_repl_seq,
        acting_since_ms: a.acting_since,
        tags: a
            .tags
            .iter()
            .map(|t| pb::TagClaim {
                name: t.name.clone(),
                term: t.term,
                holder: t.holder.map_or(0, |h| u32::from(h.0)),
                since_ms: t.since,
                candidate: t.candidate,
            })
            .collect(),
    }
}

/// Checks that `records` holds exactly `count` frames.
pub fn check_frames(records: &[u8], count: u32) -> Result<(), Invalid> {
    let mut at = 0usize;
    for i in 0..count {
        let Some(h) = records.get(at..at + 4) else {
            return invalid(format!("records: frame {i} of {count} is missing"));
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        at += 4;
        if records.len() - at < len {
            return invalid(format!("records: frame {i} is truncated"));
        }
        at += len;
    }
    if at != records.len() {
        return invalid("records: bytes after the last frame");
    }
    Ok(())
}

/// Iterates the payloads of framed records (already checked with [`check_frames`]).
pub fn frames(records: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = records.get(at..at + 4)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let p = records.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        Some(p)
    })
}

/// Validates an envelope received on a link stream of cluster `cluster_id`.
pub fn envelope(cluster_id: u32, e: pb::Envelope) -> Result<Envelope, Invalid> {
    use pb::envelope::Body as B;
    if e.cluster_id != cluster_id {
        return invalid(format!(
            "cluster_id: {} is not this cluster ({cluster_id})",
            e.cluster_id
        ));
    }
    let src = node_id("src", e.src)?;
    let hop = node_id("hop", e.hop)?;
    let dst = if e.dst == 0 {
        FLOOD
    } else {
        node_id("dst", e.dst)?
    };
    let ttl = u8::try_from(e.ttl).map_err(|_| Invalid(format!("ttl: {} > 255", e.ttl)))?;
    let body = match e.body {
        None => return invalid("body: missing"),
        Some(B::Ping(p)) => Body::Ping(p.seq),
        Some(B::Pong(p)) => Body::Pong(p.seq),
        Some(B::LinkState(ls)) => Body::LinkState(Box::new(link_state(ls)?)),
        Some(B::Replicate(r)) => {
            check_frames(&r.records, r.count)?;
            Body::Replicate(Batch {
                origin: node_id("replicate.origin", r.origin)?,
                incarnation: r.incarnation,
                first_seq: r.first_seq,
                count: r.count,
                records: r.records,
                resent: r.resent,
            })
        }
        Some(B::ResendRequest(r)) => {
            if r.from_seq == 0 || r.to_seq < r.from_seq {
                return invalid("resend_request: empty or reversed range");
            }
            Body::ResendRequest {
                incarnation: r.incarnation,
                from: r.from_seq,
                to: r.to_seq,
            }
        }
        Some(B::ResendUnavailable(r)) => Body::ResendUnavailable {
            incarnation: r.incarnation,
            from: r.from_seq,
        },
    };
    if dst == FLOOD && !matches!(body, Body::LinkState(_)) {
        return invalid("dst: 0 is only for link-state advertisements");
    }
    Ok(Envelope {
        src,
        dst,
        hop,
        ttl,
        body,
    })
}

pub fn envelope_pb(cluster_id: u32, e: &Envelope) -> pb::Envelope {
    use pb::envelope::Body as B;
    let body = match &e.body {
        Body::Ping(s) => B::Ping(pb::Ping { seq: *s }),
        Body::Pong(s) => B::Pong(pb::Pong { seq: *s }),
        Body::LinkState(a) => B::LinkState(link_state_pb(a)),
        Body::Replicate(b) => B::Replicate(pb::Replicate {
            origin: u32::from(b.origin.0),
            incarnation: b.incarnation,
            first_seq: b.first_seq,
            count: b.count,
            records: b.records.clone(),
            resent: b.resent,
        }),
        Body::ResendRequest {
            incarnation,
            from,
            to,
        } => B::ResendRequest(pb::ResendRequest {
            incarnation: *incarnation,
            from_seq: *from,
            to_seq: *to,
        }),
        Body::ResendUnavailable { incarnation, from } => {
            B::ResendUnavailable(pb::ResendUnavailable {
                incarnation: *incarnation,
                from_seq: *from,
            })
        }
    };
    pb::Envelope {
        cluster_id,
        src: u32::from(e.src.0),
        dst: u32::from(e.dst.0),
        ttl: u32::from(e.ttl),
        hop: u32::from(e.hop.0),
        body: Some(body),
    }
}

pub fn watermark(w: &pb::Watermark) -> Result<Watermark, Invalid> {
    Ok(Watermark {
        origin: node_id("watermark.origin", w.origin)?,
        incarnation: w.incarnation,
        seq: w.seq,
    })
}

pub fn watermark_pb(w: &Watermark) -> pb::Watermark {
    pb::Watermark {
        origin: u32::from(w.origin.0),
        incarnation: w.incarnation,
        seq: w.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn info(id: u16) -> NodeInfo {
        NodeInfo {
            id: NodeId(id),
            peer_url: format!("http://127.0.0.{id}:50051"),
            sip_addr: format!("127.0.0.{id}:5060"),
            seed: id == 1,
            priority: 3,
        }
    }

    #[test]
    fn envelopes_roundtrip() {
        let mut frame = Vec::new();
        frame.extend_from_slice(&3u32.to_le_bytes());
        frame.extend_from_slice(b"abc");
        let bodies = vec![
            Body::Ping(7),
            Body::Pong(8),
            Body::Replicate(Batch {
                origin: NodeId(2),
                incarnation: 99,
                first_seq: 5,
                count: 1,
                records: Bytes::from(frame),
                resent: true,
            }),
            Body::ResendRequest {
                incarnation: 1,
                from: 2,
                to: 3,
            },
            Body::ResendUnavailable {
                incarnation: 1,
                from: 2,
            },
        ];
        for body in bodies {
            let e = Envelope {
                src: NodeId(1),
                dst: NodeId(2),
                hop: NodeId(3),
                ttl: 4,
                body,
            };
            assert_eq!(envelope(9, envelope_pb(9, &e)).unwrap(), e);
        }
        let ad = LinkStateAd {
            node: info(1),
            incarnation: 5,
            seq: 6,
            up_links: vec![NodeId(2), NodeId(3)],
            disabled: true,
            caps: vec![CapAdvert {
                cap: Capability::Usrloc,
                state: SyncState::Syncing,
                newest_version: 77,
            }],
            known: vec![info(2), info(3)],
            removed: vec![Removal {
                id: NodeId(4),
                incarnation: 10,
            }],
            last_repl_seq: 42,
            acting_since: 1_800_000_000_200,
            tags: vec![
                TagClaim {
                    name: "vip".into(),
                    term: 7,
                    holder: Some(NodeId(2)),
                    since: 1_800_000_000_123,
                    candidate: true,
                },
                TagClaim {
                    name: "new".into(),
                    term: 0,
                    holder: None,
                    since: 0,
                    candidate: false,
                },
            ],
        };
        let e = Envelope {
            src: NodeId(1),
            dst: FLOOD,
            hop: NodeId(1),
            ttl: 16,
            body: Body::LinkState(Box::new(ad)),
        };
        assert_eq!(envelope(9, envelope_pb(9, &e)).unwrap(), e);
    }

    #[test]
    fn bad_envelopes_are_refused_naming_the_field() {
        let good = envelope_pb(
            1,
            &Envelope {
                src: NodeId(1),
                dst: NodeId(2),
                hop: NodeId(1),
                ttl: 3,
                body: Body::Ping(1),
            },
        );
        let cases: Vec<(pb::Envelope, &str)> = vec![
            (
                pb::Envelope {
                    cluster_id: 2,
                    ..good.clone()
                },
                "cluster_id",
            ),
            (
                pb::Envelope {
                    src: 0,
                    ..good.clone()
                },
                "src",
            ),
            (
                pb::Envelope {
                    src: 70000,
                    ..good.clone()
                },
                "src",
            ),
            (
                pb::Envelope {
                    dst: 0,
                    ..good.clone()
                },
                "dst",
            ),
            (
                pb::Envelope {
                    ttl: 300,
                    ..good.clone()
                },
                "ttl",
            ),
            (
                pb::Envelope {
                    body: None,
                    ..good.clone()
                },
                "body",
            ),
            (
                pb::Envelope {
                    body: Some(pb::envelope::Body::Replicate(pb::Replicate {
                        origin: 1,
                        count: 2,
                        records: Bytes::from_static(&[1, 0, 0, 0, 9]),
                        ..Default::default()
                    })),
                    ..good.clone()
                },
                "records",
            ),
            (
                pb::Envelope {
                    body: Some(pb::envelope::Body::LinkState(pb::LinkState {
                        node: Some(pb::NodeInfo {
                            node_id: 3,
                            peer_url: "tcp://x".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..good.clone()
                },
                "link_state.node.peer_url",
            ),
        ];
        for (e, field) in cases {
            let err = envelope(1, e).unwrap_err();
            assert!(err.0.starts_with(field), "{field}: {}", err.0);
        }
    }

    #[test]
    fn frames_are_checked_and_walked() {
        let mut r = Vec::new();
        for p in [&b"ab"[..], b"", b"xyz"] {
            r.extend_from_slice(&(p.len() as u32).to_le_bytes());
            r.extend_from_slice(p);
        }
        check_frames(&r, 3).unwrap();
        assert!(check_frames(&r, 2).is_err());
        assert!(check_frames(&r, 4).is_err());
        assert!(check_frames(&r[..r.len() - 1], 3).is_err());
        let got: Vec<&[u8]> = frames(&r).collect();
        assert_eq!(got, vec![&b"ab"[..], b"", b"xyz"]);
    }
}
