//! Sharing tags, sans-IO: which node is active for each tag, decided by terms.
//!
//! Every node advertises, in its link-state advertisement, the `(term, holder)` it knows
//! for every tag, and which tags it is configured for (it is a candidate). Claims merge
//! by term: the higher term wins everywhere; at equal terms (two simultaneous
//! activations, e.g. on both sides of a partition) the lower holder id wins, so every
//! node reaches the same answer once the advertisements meet. An activation
//! (`sipctl tag activate`, or an automatic failover) takes the next term, so a stale or
//! restarted node can never take a tag back with an old term; the terms are persisted.
//!
//! Hand-over at a boundary: an activation takes effect `handover` ms after it is made
//! (wall clock, carried in the claim as `since`), so the advertisement reaches the
//! previous holder first; that node keeps acting until `since` and not after, the new one
//! acts from `since` on. Actions are checked by the time they are due, so none is done
//! twice nor skipped across the change.
//!
//! Automatic failover: when the holder of a tag has been unreachable for
//! `failover_after`, the reachable candidate with the lowest id activates it with the
//! next term (OpenSIPS tags never move by themselves).
//!
//! Tags occupy slots of the ownership segment: slot 0 is the node-wide default tag
//! (untagged data; active on every acting node, its objects split by bucket), named tags
//! take the next free slot the first time this node hears of them.

use std::collections::{BTreeMap, VecDeque};

use sipmesh_cluster::NodeId;
use sipmesh_cluster::ownership::TAG_SLOTS;

use super::types::Millis;

/// The slot of the node-wide default tag.
pub const DEFAULT_TAG_SLOT: usize = 0;

/// A tag name: 1 to 64 of A-Z a-z 0-9 - _ .
pub fn check_tag_name(name: &str) -> Result<(), String> {
    if !sipmesh_cluster::ownership::is_tag_name(name.as_bytes()) {
        return Err(format!(
            "`{name}` is not a tag name (1..64 of A-Z a-z 0-9 - _ .)"
        ));
    }
    Ok(())
}

/// What a node says about one tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagClaim {
    /// Tag name.
    pub name: String,
    /// Term of the activation the node knows.
    pub term: u64,
    /// Node active under that term (None: nobody yet).
    pub holder: Option<NodeId>,
    /// Wall-clock ms from which the holder acts under this term.
    pub since: u64,
    /// The advertising node is configured for this tag (a failover candidate).
    pub candidate: bool,
}

/// A tag's role as configured (`name=active|backup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagRole {
    /// Claims the tag at start unless a newer term is known.
    Active,
    /// Waits; a failover candidate.
    Backup,
}

/// One transition of a tag on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagTransition {
    /// When.
    pub at: Millis,
    /// Tag.
    pub tag: String,
    /// `active` or `backup`.
    pub became: &'static str,
    /// Term.
    pub term: u64,
    /// Why.
    pub reason: String,
}

/// Operator view of one tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagView {
    /// Name.
    pub name: String,
    /// Segment slot.
    pub slot: usize,
    /// This node is active for it.
    pub active: bool,
    /// Current term.
    pub term: u64,
    /// Active node.
    pub holder: Option<NodeId>,
    /// Configured role here (None: learned from peers).
    pub configured: Option<TagRole>,
    /// Wall-clock window `[from, until)` in which this node acts for the tag (None:
    /// it does not; `until` is `u64::MAX` while it holds the tag).
    pub window: Option<(u64, u64)>,
}

#[derive(Debug)]
struct Tag {
    slot: usize,
    configured: Option<TagRole>,
    term: u64,
    holder: Option<NodeId>,
    /// Wall-clock ms from which the holder acts.
    since: u64,
    /// This node held the tag until another took it over at this wall-clock ms.
    handed_over_at: Option<u64>,
    /// Since when the holder is unreachable.
    holder_lost_at: Option<Millis>,
}

/// The tags of one node.
#[derive(Debug)]
pub struct Tags {
    me: NodeId,
    tags: BTreeMap<String, Tag>,
    history: VecDeque<TagTransition>,
    history_cap: usize,
    failover_after: Option<Millis>,
    /// Tags whose (term, holder) changed since the last [`Tags::take_changed`].
    changed: Vec<String>,
    /// Wall-clock ms at mesh time 0.
    wall_at_zero: u64,
    /// Delay between an activation and the moment it takes effect.
    handover: Millis,
}

fn wins(a: (u64, Option<NodeId>), b: (u64, Option<NodeId>)) -> bool {
    // Higher term; at equal terms a holder beats none, and the lower id beats the higher.
    match a.0.cmp(&b.0) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (a.1, b.1) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            _ => false,
        },
    }
}

impl Tags {
    /// Tags of node `me`: `configured` from the configuration, `persisted` (name, term,
    /// holder) from the store. A tag configured active is claimed at start with its
    /// persisted term if this node held it then, with term 1 if it was never held; if
    /// another node held it last, this node starts as backup (it cannot take a tag back
    /// with an old term).
    pub fn new(
        me: NodeId,
        configured: &[(String, TagRole)],
        persisted: &[(String, u64, Option<NodeId>)],
        failover_after: Option<Millis>,
        now: Millis,
    ) -> Tags {
        let mut t = Tags {
            me,
            tags: BTreeMap::new(),
            history: VecDeque::new(),
            history_cap: 256,
            failover_after,
            changed: Vec::new(),
            wall_at_zero: 0,
            handover: 0,
        };
        for (name, term, holder) in persisted {
            let tag = t.entry(name);
            tag.term = *term;
            tag.holder = *holder;
        }
        for (name, role) in configured {
            let me = t.me;
            let tag = t.entry(name);
            tag.configured = Some(*role);
            if *role == TagRole::Active {
                match tag.holder {
                    Some(h) if h == me => {}
                    None => {
                        tag.term = tag.term.max(1);
                        tag.holder = Some(me);
                    }
                    Some(_) => {}
                }
            }
        }
        let names: Vec<String> = t.tags.keys().cloned().collect();
        for name in names {
            let (term, holder) = (t.tags[&name].term, t.tags[&name].holder);
            let reason = match holder {
                Some(h) if h == me => "configured active".to_string(),
                Some(h) => format!("node {} held it last (term {term})", h.0),
                None => "configured backup".to_string(),
            };
            t.note(now, &name, holder == Some(me), term, reason);
        }
        t
    }

    fn entry(&mut self, name: &str) -> &mut Tag {
        if !self.tags.contains_key(name) {
            let used: Vec<usize> = self.tags.values().map(|t| t.slot).collect();
            let slot = (1..TAG_SLOTS)
                .find(|s| !used.contains(s))
                .unwrap_or(TAG_SLOTS);
            self.tags.insert(
                name.to_string(),
                Tag {
                    slot,
                    configured: None,
                    term: 0,
                    holder: None,
                    since: 0,
                    handed_over_at: None,
                    holder_lost_at: None,
                },
            );
        }
        self.tags.get_mut(name).expect("just inserted")
    }

    fn note(&mut self, at: Millis, tag: &str, active: bool, term: u64, reason: String) {
        if self.history.len() >= self.history_cap {
            self.history.pop_front();
        }
        self.history.push_back(TagTransition {
            at,
            tag: tag.to_string(),
            became: if active { "active" } else { "backup" },
            term,
            reason,
        });
        self.changed.push(tag.to_string());
    }

    /// What this node advertises.
    pub fn claims(&self) -> Vec<TagClaim> {
        self.tags
            .iter()
            .map(|(name, t)| TagClaim {
                name: name.clone(),
                term: t.term,
                holder: t.holder,
                since: t.since,
                candidate: t.configured.is_some(),
            })
            .collect()
    }

    /// A peer's claims. Returns whether anything changed here.
    pub fn merge(&mut self, from: NodeId, claims: &[TagClaim], now: Millis) -> bool {
        let me = self.me;
        let mut changed = false;
        for c in claims {
            let tag = self.entry(&c.name);
            if tag.slot >= TAG_SLOTS {
                continue;
            }
            let (old_term, old_holder) = (tag.term, tag.holder);
            if !wins((c.term, c.holder), (old_term, old_holder)) {
                continue;
            }
            tag.term = c.term;
            tag.holder = c.holder;
            tag.since = c.since;
            tag.holder_lost_at = None;
            if old_holder == Some(me) && c.holder != Some(me) {
                // Keep acting until the new holder starts (at once if that is past).
                tag.handed_over_at = Some(c.since);
            }
            changed = true;
            let was = old_holder == Some(me);
            let is = c.holder == Some(me);
            if was != is || old_term != c.term {
                let reason = match c.holder {
                    Some(h) if h == me => format!(
                        "became active: term {} names this node (learned from node {})",
                        c.term, from.0
                    ),
                    Some(h) => format!("activated on node {}, term {}", h.0, c.term),
                    None => format!("term {} without a holder", c.term),
                };
                self.note(now, &c.name, is, c.term, reason);
            }
        }
        changed
    }

    /// Makes this node active for `name` with the next term; every node that held it
    /// steps down when it hears of the new term.
    pub fn activate(&mut self, name: &str, now: Millis, why: &str) -> Result<u64, String> {
        check_tag_name(name)?;
        let me = self.me;
        let wall = self.wall_at_zero + now + self.handover;
        let tag = self.entry(name);
        if tag.slot >= TAG_SLOTS {
            return Err(format!(
                "no free tag slot for `{name}` ({TAG_SLOTS} tags at most)"
            ));
        }
        if tag.holder == Some(me) {
            return Ok(tag.term);
        }
        tag.term += 1;
        tag.holder = Some(me);
        tag.holder_lost_at = None;
        tag.handed_over_at = None;
        tag.since = wall;
        let term = tag.term;
        self.note(
            now,
            name,
            true,
            term,
            format!("activated on this node: {why}"),
        );
        Ok(term)
    }

    /// Automatic failover: called with the reachability of every node and the candidate
    /// tags each reachable peer advertises. Returns the tags this node took over.
    pub fn check_failover(
        &mut self,
        now: Millis,
        reachable: &dyn Fn(NodeId) -> bool,
        candidates: &dyn Fn(&str) -> Vec<NodeId>,
    ) -> Vec<String> {
        let Some(after) = self.failover_after else {
            return Vec::new();
        };
        let me = self.me;
        let mut take = Vec::new();
        for (name, t) in &mut self.tags {
            let Some(h) = t.holder else { continue };
            if h == me || reachable(h) {
                t.holder_lost_at = None;
                continue;
            }
            let since = *t.holder_lost_at.get_or_insert(now);
            if now < since + after || t.configured.is_none() {
                continue;
            }
            // The lowest-id reachable candidate takes over.
            let lowest = candidates(name).into_iter().filter(|n| *n != h).min();
            if lowest.is_none_or(|n| n >= me) {
                take.push(name.clone());
            }
        }
        for name in &take {
            let h = self.tags[name].holder.map_or(0, |h| h.0);
            let _ = self.activate(name, now, &format!("failover, node {h} unreachable"));
        }
        take
    }

    /// Activations take effect `handover` ms after they are made; `wall_at_zero` is the
    /// wall-clock ms at mesh time 0.
    pub fn set_handover(&mut self, wall_at_zero: u64, handover: Millis) {
        self.wall_at_zero = wall_at_zero;
        self.handover = handover;
    }

    /// Tags changed since the last call (for persistence).
    pub fn take_changed(&mut self) -> Vec<(String, u64, Option<NodeId>)> {
        let mut names = std::mem::take(&mut self.changed);
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|n| self.tags.get(&n).map(|t| (n.clone(), t.term, t.holder)))
            .collect()
    }

    /// Every tag.
    pub fn list(&self) -> Vec<TagView> {
        self.tags
            .iter()
            .map(|(name, t)| TagView {
                name: name.clone(),
                slot: t.slot,
                active: t.holder == Some(self.me),
                term: t.term,
                holder: t.holder,
                configured: t.configured,
                window: if t.holder == Some(self.me) {
                    Some((t.since, u64::MAX))
                } else {
                    t.handed_over_at.map(|u| (0, u))
                },
            })
            .collect()
    }

    /// Transitions, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &TagTransition> {
        self.history.iter()
    }

    /// Whether this node is active for `name` (an unknown tag: not owner).
    pub fn is_active(&self, name: &str) -> bool {
        self.tags
            .get(name)
            .is_some_and(|t| t.holder == Some(self.me))
    }
}
