//! Presence documents: PIDF (RFC 3863) with the RFC 4479 data model, dialog-info
//! (RFC 4235) and watcherinfo (RFC 3857/3858).
//!
//! Bodies come from the network: every parser here returns a [`DocError`] on bad input
//! and never panics. DTDs are refused outright, so no entity is ever expanded.

use std::borrow::Cow;

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::name::{PrefixDeclaration, ResolveResult};
use quick_xml::{NsReader, XmlVersion};

/// Why a document was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocError {
    /// Not well-formed (namespace-aware) XML, a DOCTYPE, or a required attribute missing.
    Malformed,
    /// Well-formed, but the root element is not the one of the package.
    WrongRoot,
    /// The document is about another entity than the publication's (for callers).
    EntityMismatch,
    /// Larger than 64 KiB.
    TooLarge,
}

/// Media type of PIDF documents (RFC 3863).
pub const PIDF: &[u8] = b"application/pidf+xml";
/// Media type of dialog-info documents (RFC 4235).
pub const DIALOG_INFO: &[u8] = b"application/dialog-info+xml";
/// Media type of watcherinfo documents (RFC 3858).
pub const WATCHERINFO: &[u8] = b"application/watcherinfo+xml";

const NS_PIDF: &str = "urn:ietf:params:xml:ns:pidf";
const NS_DIALOG: &str = "urn:ietf:params:xml:ns:dialog-info";
const NS_WINFO: &str = "urn:ietf:params:xml:ns:watcherinfo";
const XML_DECL: &[u8] = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
const MAX_DOC: usize = 64 * 1024;
const BAD: DocError = DocError::Malformed;

/// A top-level child element of a parsed document, kept as source text.
struct Child<'a> {
    ns: String,
    local: String,
    start: BytesStart<'a>,
    /// Text between the start and end tags; None for an empty-element tag.
    inner: Option<&'a str>,
    id: Option<String>,
    lang: Option<String>,
    /// Prefixes the element declares itself (None: the default namespace).
    own_decls: Vec<Option<String>>,
}

/// A parsed document: the root's attributes and namespace declarations, and its children.
#[derive(Default)]
struct Doc<'a> {
    attrs: Vec<(String, String)>,
    decls: Vec<(Option<String>, String)>,
    children: Vec<Child<'a>>,
}

impl Doc<'_> {
    fn attr(&self, key: &str) -> Option<&str> {
        get(&self.attrs, key)
    }
}

/// A child to copy, with its document and its rank in the output order.
type Item<'d, 'a> = (u8, &'d Doc<'a>, &'d Child<'a>);

fn get<'v>(attrs: &'v [(String, String)], key: &str) -> Option<&'v str> {
    attrs
        .iter()
        .find_map(|(k, v)| (k == key).then_some(v.as_str()))
}

/// Any error of the XML layer is a malformed document.
fn bad<T, E>(r: Result<T, E>) -> Result<T, DocError> {
    r.map_err(|_| BAD)
}

/// XML 1.0 §2.2 `Char`.
fn legal_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// XML 1.0 §4.6: without a DTD only the predefined entities and character references exist.
fn check_ref(r: &BytesRef<'_>) -> Result<(), DocError> {
    match r.resolve_char_ref() {
        Ok(Some(c)) if legal_char(c) => Ok(()),
        Ok(None) if matches!(&**r, "lt" | "gt" | "amp" | "apos" | "quot") => Ok(()),
        _ => Err(BAD),
    }
}

/// Validates the attributes of `e` (syntax, duplicates, references, namespace rules) and
/// returns them unescaped as (qualified name, value).
fn attributes(r: &NsReader<&[u8]>, e: &BytesStart<'_>) -> Result<Vec<(String, String)>, DocError> {
    let mut out = Vec::new();
    for a in e.attributes() {
        let a = bad(a)?;
        let v = bad(a.normalized_value(XmlVersion::Implicit1_0))?;
        // Namespaces in XML 1.0 §5: a prefix cannot be undeclared, nor used undeclared.
        let ns_ok = match a.key.as_namespace_binding() {
            Some(PrefixDeclaration::Named(_)) => !v.is_empty(),
            Some(PrefixDeclaration::Default) => true,
            None => !matches!(
                r.resolver().resolve_attribute(a.key).0,
                ResolveResult::Unknown(_)
            ),
        };
        if a.value.contains('<') || !v.chars().all(legal_char) || !ns_ok {
            return Err(BAD);
        }
        out.push((a.key.as_ref().to_owned(), v.into_owned()));
    }
    Ok(out)
}

/// Namespace declarations among `attrs`: (prefix, or None for the default; namespace).
fn decls(attrs: &[(String, String)]) -> Vec<(Option<String>, String)> {
    let decl = |(k, v): &(String, String)| match k.strip_prefix("xmlns") {
        Some("") => Some((None, v.clone())),
        Some(p) => p.strip_prefix(':').map(|p| (Some(p.to_owned()), v.clone())),
        None => None,
    };
    attrs.iter().filter_map(decl).collect()
}

fn position(r: &NsReader<&[u8]>) -> Result<usize, DocError> {
    bad(usize::try_from(r.buffer_position()))
}

/// Parses a whole document, checking it is well-formed and namespace-well-formed, that its
/// root is `{root_ns}root_local`, and collecting the root's children as source text.
fn parse<'a>(body: &'a [u8], root_ns: &str, root_local: &str) -> Result<Doc<'a>, DocError> {
    if body.len() > MAX_DOC {
        return Err(DocError::TooLarge);
    }
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let text = bad(std::str::from_utf8(body))?;
    if !text.chars().all(legal_char) {
        return Err(BAD);
    }
    let mut r = NsReader::from_str(text);
    r.config_mut().check_comments = true;
    let (mut doc, mut depth, mut seen_root) = (Doc::default(), 0usize, false);
    let mut open: Option<(Child<'a>, usize)> = None;
    loop {
        let before = position(&r)?;
        let (ns, ev) = bad(r.read_resolved_event())?;
        let ns = match ns {
            ResolveResult::Bound(n) => n.as_ref().to_owned(),
            ResolveResult::Unbound => String::new(),
            ResolveResult::Unknown(_) => return Err(BAD),
        };
        let (e, empty) = match ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                depth = depth.checked_sub(1).ok_or(BAD)?;
                if let Some((mut c, from)) = open.take_if(|_| depth == 1) {
                    c.inner = Some(text.get(from..before).ok_or(BAD)?);
                    doc.children.push(c);
                }
                continue;
            }
            // XML 1.0 §2.4: no `]]>` in character data; §2.8: only white space around the root.
            Event::Text(t) if t.contains("]]>") || depth == 0 && !t.trim_ascii().is_empty() => {
                return Err(BAD);
            }
            Event::GeneralRef(g) if depth > 0 => {
                check_ref(&g)?;
                continue;
            }
            Event::CData(_) | Event::GeneralRef(_) if depth == 0 => return Err(BAD),
            // No DTD: nothing external is ever fetched or expanded.
            Event::DocType(_) => return Err(BAD),
            Event::Decl(d) => match d.encoding() {
                _ if before != 0 => return Err(BAD),
                Some(Ok(enc)) if enc.eq_ignore_ascii_case("utf-8") => continue,
                Some(_) => return Err(BAD),
                None => continue,
            },
            Event::Eof if depth == 0 && seen_root => return Ok(doc),
            Event::Eof => return Err(BAD),
            _ => continue,
        };
        let attrs = attributes(&r, &e)?;
        let local = e.local_name().as_ref().to_owned();
        match depth {
            0 if seen_root => return Err(BAD),
            0 if ns != root_ns || local != root_local => return Err(DocError::WrongRoot),
            0 => {
                seen_root = true;
                doc.decls = decls(&attrs);
                doc.attrs = attrs;
            }
            1 => {
                let child = Child {
                    id: get(&attrs, "id").map(str::to_owned),
                    lang: get(&attrs, "xml:lang").map(str::to_owned),
                    own_decls: decls(&attrs).into_iter().map(|(p, _)| p).collect(),
                    ns,
                    local,
                    start: e,
                    inner: None,
                };
                match empty {
                    true => doc.children.push(child),
                    false => open = Some((child, position(&r)?)),
                }
            }
            _ => {}
        }
        depth += usize::from(!empty);
    }
}

/// Parses every document of a list (see [`parse`]).
fn parse_all<'a>(docs: &[&'a [u8]], ns: &str, local: &str) -> Result<Vec<Doc<'a>>, DocError> {
    docs.iter().map(|d| parse(d, ns, local)).collect()
}

/// Appends `parts` to `out`.
fn put(out: &mut Vec<u8>, parts: &[&[u8]]) {
    parts.iter().for_each(|p| out.extend_from_slice(p));
}

/// Clears `out` and starts a document: the XML declaration and `<root xmlns="ns"`.
fn begin(out: &mut Vec<u8>, root: &str, ns: &str) {
    out.clear();
    put(
        out,
        &[
            XML_DECL,
            b"<",
            root.as_bytes(),
            b" xmlns=\"",
            ns.as_bytes(),
            b"\"",
        ],
    );
}

/// Writes `raw` escaped for text or a double-quoted attribute value (always valid UTF-8,
/// characters XML cannot carry dropped).
fn esc(out: &mut Vec<u8>, raw: &[u8]) {
    let mut s = String::from_utf8_lossy(raw);
    if !s.chars().all(legal_char) {
        s = Cow::Owned(s.chars().filter(|&c| legal_char(c)).collect());
    }
    out.extend_from_slice(quick_xml::escape::escape(s.as_ref()).as_bytes());
}

/// Writes ` name="value"` with the value escaped.
fn attr(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    put(out, &[b" ", name.as_bytes(), b"=\""]);
    esc(out, value);
    out.push(b'"');
}

/// Writes ` name="value"` unless the value is empty.
fn opt_attr(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    if !value.is_empty() {
        attr(out, name, value);
    }
}

/// Copies a top-level child verbatim under a new root whose default namespace is
/// `default_ns`, adding the declarations of its source root so every prefix (and the
/// default namespace) keeps its meaning, and the root's `xml:lang` if it has none.
fn write_child(out: &mut Vec<u8>, doc: &Doc<'_>, c: &Child<'_>, default_ns: &str) {
    let name = c.start.name().0.as_bytes();
    put(out, &[b"<", name]);
    for (prefix, ns) in doc.decls.iter().filter(|(p, _)| !c.own_decls.contains(p)) {
        match prefix {
            Some(p) => attr(out, &format!("xmlns:{p}"), ns.as_bytes()),
            None if ns != default_ns => attr(out, "xmlns", ns.as_bytes()),
            None => {}
        }
    }
    if !doc.decls.iter().any(|(p, _)| p.is_none()) && !c.own_decls.contains(&None) {
        attr(out, "xmlns", b""); // unprefixed names of the source were in no namespace
    }
    if let (None, Some(lang)) = (&c.lang, doc.attr("xml:lang")) {
        attr(out, "xml:lang", lang.as_bytes());
    }
    out.extend_from_slice(c.start.attributes_raw().as_bytes());
    match c.inner {
        None => out.extend_from_slice(b"/>\n"),
        Some(inner) => put(out, &[b">", inner.as_bytes(), b"</", name, b">\n"]),
    }
}

/// Appends `item`, first removing any earlier item of the same rank with the same `id`.
fn upsert<'d, 'a>(items: &mut Vec<Item<'d, 'a>>, item: Item<'d, 'a>) {
    if let Some(id) = &item.2.id {
        items.retain(|(rank, _, c)| *rank != item.0 || c.id.as_ref() != Some(id));
    }
    items.push(item);
}

/// A root note's identity: its (inherited) language and its trimmed source text.
fn note_key<'d>(d: &'d Doc<'_>, c: &'d Child<'_>) -> (Option<&'d str>, &'d str) {
    let lang = c.lang.as_deref().or_else(|| d.attr("xml:lang"));
    (lang, c.inner.unwrap_or_default().trim())
}

/// Checks a PUBLISH body of the presence package: well-formed XML whose root is
/// `presence` in namespace `urn:ietf:params:xml:ns:pidf` with an `entity` attribute.
pub fn check_pidf(body: &[u8]) -> Result<(), DocError> {
    let doc = parse(body, NS_PIDF, "presence")?;
    // RFC 3863 §4.1: the <presence> element MUST have an 'entity' attribute.
    doc.attr("entity").map(|_| ()).ok_or(BAD)
}

/// Merges the PIDF documents of every live publication of one presentity (oldest first)
/// into one document for `entity` (RFC 3863 §4, RFC 4479): tuples and devices merged by
/// `id` (newer wins, at the newer position), persons of the newest document that has any,
/// root notes deduplicated, other extensions kept, each child keeping its namespaces.
pub fn aggregate_pidf(entity: &[u8], docs: &[&[u8]], out: &mut Vec<u8>) -> Result<(), DocError> {
    out.clear();
    let parsed = parse_all(docs, NS_PIDF, "presence")?;
    // RFC 4479 §3.2: a presentity is one person; the newest publication describing it wins.
    let person_doc = parsed
        .iter()
        .rposition(|d| d.children.iter().any(|c| c.local == "person"));
    let mut items: Vec<Item> = Vec::new();
    for (i, d) in parsed.iter().enumerate() {
        for c in &d.children {
            // RFC 3863 §4.1 schema order: tuples, notes, then extensions (persons, devices,
            // others).
            match (c.ns == NS_PIDF, c.local.as_str()) {
                (true, "tuple") => upsert(&mut items, (0, d, c)),
                (true, "note") => {
                    // The same text in the same language is said once.
                    let same = |&(r, nd, n): &Item| r == 1 && note_key(nd, n) == note_key(d, c);
                    if !items.iter().any(same) {
                        items.push((1, d, c));
                    }
                }
                (_, "person") if Some(i) == person_doc => items.push((2, d, c)),
                (_, "person") => {}
                (_, "device") => upsert(&mut items, (3, d, c)),
                _ => items.push((4, d, c)),
            }
        }
    }
    items.sort_by_key(|item| item.0);
    begin(out, "presence", NS_PIDF);
    attr(out, "entity", entity);
    out.extend_from_slice(b">\n");
    for (_, d, c) in &items {
        write_child(out, d, c, NS_PIDF);
    }
    out.extend_from_slice(b"</presence>\n");
    Ok(())
}

/// The document of a presentity with no live publication: one tuple with
/// `<status><basic>closed</basic></status>` (a neutral "offline" state), entity ENTITY.
pub fn offline_pidf(entity: &[u8], out: &mut Vec<u8>) {
    begin(out, "presence", NS_PIDF);
    attr(out, "entity", entity);
    out.extend_from_slice(b">\n<tuple id=\"offline\"><status><basic>closed</basic></status>");
    out.extend_from_slice(b"</tuple>\n</presence>\n");
}

/// Checks a PUBLISH body of the dialog package: root `dialog-info` in
/// `urn:ietf:params:xml:ns:dialog-info` with `version`, `state` and `entity` attributes.
pub fn check_dialog_info(body: &[u8]) -> Result<(), DocError> {
    let doc = parse(body, NS_DIALOG, "dialog-info")?;
    // RFC 4235 §4.1: version (a non-negative integer), state ("full" or "partial") and
    // entity are mandatory attributes of <dialog-info>.
    let version = doc.attr("version").map(str::parse::<u32>);
    let state = doc.attr("state");
    match (version, state, doc.attr("entity")) {
        (Some(Ok(_)), Some("full" | "partial"), Some(_)) => Ok(()),
        _ => Err(BAD),
    }
}

/// Direction of a dialog as seen by the watched user (RFC 4235 §4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The watched user sent the initial request.
    Initiator,
    /// The watched user received the initial request.
    Recipient,
}

/// One dialog of the watched user, as the node's own dialog table knows it.
#[derive(Debug, Clone, Copy)]
pub struct DialogView<'a> {
    /// The `id` attribute of the dialog element.
    pub id: &'a [u8],
    /// The dialog's Call-ID; may be empty (then omitted).
    pub call_id: &'a [u8],
    /// The watched user's tag; may be empty (then omitted).
    pub local_tag: &'a [u8],
    /// The peer's tag; may be empty (then omitted).
    pub remote_tag: &'a [u8],
    /// Who sent the initial request.
    pub direction: Direction,
    /// RFC 4235 §3.7.1 state: "trying", "proceeding", "early", "confirmed", "terminated".
    pub state: &'a str,
    /// Duration in seconds (confirmed dialogs), None to omit.
    pub duration_s: Option<u64>,
    /// The watched user's URI; may be empty (then omitted).
    pub local_identity: &'a [u8],
    /// The peer's URI; may be empty (then omitted).
    pub remote_identity: &'a [u8],
}

/// Writes one `<dialog>` element for a view (RFC 4235 §4.1, children in schema order).
fn write_dialog(out: &mut Vec<u8>, v: &DialogView<'_>) {
    out.extend_from_slice(b"<dialog");
    attr(out, "id", v.id);
    opt_attr(out, "call-id", v.call_id);
    opt_attr(out, "local-tag", v.local_tag);
    opt_attr(out, "remote-tag", v.remote_tag);
    let dir: &[u8] = match v.direction {
        Direction::Initiator => b"initiator",
        Direction::Recipient => b"recipient",
    };
    attr(out, "direction", dir);
    out.extend_from_slice(b"><state>");
    esc(out, v.state.as_bytes());
    out.extend_from_slice(b"</state>");
    if let Some(d) = v.duration_s {
        out.extend_from_slice(format!("<duration>{d}</duration>").as_bytes());
    }
    for (tag, uri) in [("local", v.local_identity), ("remote", v.remote_identity)] {
        if !uri.is_empty() {
            put(out, &[b"<", tag.as_bytes(), b"><identity>"]);
            esc(out, uri);
            put(out, &[b"</identity></", tag.as_bytes(), b">"]);
        }
    }
    out.extend_from_slice(b"</dialog>\n");
}

/// A full dialog-info document (RFC 4235 §4) for `entity` with `version`: the published
/// `<dialog>` elements (oldest first, a repeated id replaced by the newer), then one
/// `<dialog>` per generated view (which replaces a published dialog of the same id). With
/// no dialog at all, an empty `<dialog-info ... state="full"/>` (read as idle).
pub fn aggregate_dialog_info(
    entity: &[u8],
    version: u32,
    published: &[&[u8]],
    generated: &[DialogView<'_>],
    out: &mut Vec<u8>,
) -> Result<(), DocError> {
    out.clear();
    let parsed = parse_all(published, NS_DIALOG, "dialog-info")?;
    let mut dialogs = Vec::new();
    for d in &parsed {
        for c in &d.children {
            let id = c.id.as_deref().map(str::as_bytes);
            let replaced = generated.iter().any(|v| Some(v.id) == id);
            if c.ns == NS_DIALOG && c.local == "dialog" && !replaced {
                upsert(&mut dialogs, (0, d, c));
            }
        }
    }
    begin(out, "dialog-info", NS_DIALOG);
    attr(out, "version", version.to_string().as_bytes());
    attr(out, "state", b"full");
    attr(out, "entity", entity);
    if dialogs.is_empty() && generated.is_empty() {
        out.extend_from_slice(b"/>\n");
        return Ok(());
    }
    out.extend_from_slice(b">\n");
    for (_, d, c) in &dialogs {
        write_child(out, d, c, NS_DIALOG);
    }
    generated.iter().for_each(|v| write_dialog(out, v));
    out.extend_from_slice(b"</dialog-info>\n");
    Ok(())
}

/// Status of one watcher (RFC 3857 §5.2 / RFC 3858).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatcherStatus {
    /// Subscription awaiting authorization.
    Pending,
    /// Subscription authorized.
    Active,
    /// Subscription refused or timed out while pending, remembered for a while.
    Waiting,
    /// Subscription ended.
    Terminated,
}

/// One watcher of a resource.
#[derive(Debug, Clone, Copy)]
pub struct WatcherView<'a> {
    /// The watcher element's `id` attribute.
    pub id: &'a [u8],
    /// The subscription's state.
    pub status: WatcherStatus,
    /// RFC 3858 event attribute: "subscribe", "approved", "deactivated", "probation",
    /// "rejected", "timeout", "giveup", "noresource".
    pub event: &'a str,
    /// The watcher's URI (element text).
    pub uri: &'a [u8],
    /// The watcher's display name; may be empty (then omitted).
    pub display_name: &'a [u8],
    /// Seconds since the subscription was created, None to omit.
    pub duration_subscribed: Option<u64>,
}

/// A full watcherinfo document (RFC 3858 §5): `<watcherinfo version=V state="full">` with
/// one `<watcher-list resource=RESOURCE package=PACKAGE>` holding the watchers.
pub fn watcherinfo(
    resource: &[u8],
    package: &[u8],
    version: u32,
    watchers: &[WatcherView<'_>],
    out: &mut Vec<u8>,
) {
    begin(out, "watcherinfo", NS_WINFO);
    attr(out, "version", version.to_string().as_bytes());
    out.extend_from_slice(b" state=\"full\">\n<watcher-list");
    attr(out, "resource", resource);
    attr(out, "package", package);
    out.extend_from_slice(b">\n");
    for w in watchers {
        // RFC 3858 §5: status, id and event are mandatory attributes of <watcher>.
        let status: &[u8] = match w.status {
            WatcherStatus::Pending => b"pending",
            WatcherStatus::Active => b"active",
            WatcherStatus::Waiting => b"waiting",
            WatcherStatus::Terminated => b"terminated",
        };
        out.extend_from_slice(b"<watcher");
        attr(out, "id", w.id);
        attr(out, "status", status);
        attr(out, "event", w.event.as_bytes());
        opt_attr(out, "display-name", w.display_name);
        if let Some(d) = w.duration_subscribed {
            attr(out, "duration-subscribed", d.to_string().as_bytes());
        }
        out.push(b'>');
        esc(out, w.uri);
        out.extend_from_slice(b"</watcher>\n");
    }
    out.extend_from_slice(b"</watcher-list>\n</watcherinfo>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTITY: &[u8] = b"pres:someone@example.com";
    const RPID: &str = "urn:ietf:params:xml:ns:pidf:rpid";
    const DM: &str = "urn:ietf:params:xml:ns:pidf:data-model";

    // RFC 3863 §3.4-style document with tuple notes, a contact and a root note.
    const DOC_A: &[u8] = br#"<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf"
    xmlns:im="urn:ietf:params:xml:ns:pidf:im"
    xmlns:myex="http://id.example.com/presence/"
    entity="pres:someone@example.com">
  <tuple id="bs35r9">
    <status><basic>open</basic><im:im>busy</im:im><myex:location>home</myex:location></status>
    <contact priority="0.8">im:someone@mobilecarrier.net</contact>
    <note xml:lang="en">Don't Disturb Please!</note>
    <note xml:lang="fr">Ne d&#233;rangez pas, s'il vous pla&#238;t</note>
    <timestamp>2001-10-27T16:49:29Z</timestamp>
  </tuple>
  <note xml:lang="en">I'll be in Tokyo next week</note>
</presence>
"#;

    // RFC 4480 RPID with the RFC 4479 data model.
    const DOC_B: &[u8] = br#"<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf"
    xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
    xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid"
    entity="pres:someone@example.com">
  <tuple id="a8098a">
    <status><basic>open</basic></status>
    <dm:deviceID>mac:8asd7d7d70</dm:deviceID>
    <contact>sip:someone@pc.example.com</contact>
  </tuple>
  <dm:person id="p1"><rpid:activities><rpid:on-the-phone/></rpid:activities></dm:person>
  <dm:device id="pc122"><dm:deviceID>mac:8asd7d7d70</dm:deviceID></dm:device>
  <note xml:lang="en">I'll be in Tokyo next week</note>
</presence>
"#;

    // Another client: PIDF bound to a prefix, other data-model prefixes, and an
    // unprefixed extension that is therefore in no namespace.
    const DOC_P: &[u8] = br#"<p:presence xmlns:p="urn:ietf:params:xml:ns:pidf"
    xmlns:d="urn:ietf:params:xml:ns:pidf:data-model" xmlns:r="urn:ietf:params:xml:ns:pidf:rpid"
    entity="pres:someone@example.com">
  <p:tuple id="bs35r9"><p:status><p:basic>closed</p:basic></p:status></p:tuple>
  <d:person id="p2"><r:activities><r:away/></r:activities></d:person>
  <d:device id="pc122"><d:deviceID>mac:0000</d:deviceID></d:device>
  <legacy flag="1"/>
</p:presence>"#;

    const DIALOG_DOC: &[u8] = br#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" xmlns:x="urn:example:ext"
    version="1" state="full" entity="sip:alice@example.com">
  <dialog id="as7d900as8" call-id="a84b4c76e66710" local-tag="1928301774" direction="initiator">
    <state>early</state>
  </dialog>
  <dialog id="zz1" call-id="b99" direction="recipient"><state>confirmed</state><x:mark/></dialog>
</dialog-info>"#;

    /// Every element of `xml` read back with NsReader: (depth, namespace, local name, id).
    fn elements(xml: &[u8]) -> Vec<(usize, String, String, String)> {
        let mut r = NsReader::from_str(std::str::from_utf8(xml).unwrap());
        let (mut out, mut depth) = (Vec::new(), 0);
        loop {
            let (ns, ev) = r.read_resolved_event().unwrap();
            let ns = match ns {
                ResolveResult::Bound(n) => n.as_ref().to_owned(),
                ResolveResult::Unbound => String::new(),
                ResolveResult::Unknown(p) => panic!("unbound prefix {p}"),
            };
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let id = e.try_get_attribute("id").unwrap().map(|a| a.value);
                    let local = e.local_name().as_ref().to_owned();
                    out.push((depth, ns, local, id.unwrap_or_default().into_owned()));
                    depth += usize::from(matches!(ev, Event::Start(_)));
                }
                Event::End(_) => depth -= 1,
                Event::Eof => return out,
                _ => {}
            }
        }
    }

    /// The (namespace, id) of every element named `local` in `xml`.
    fn named(xml: &[u8], local: &str) -> Vec<(String, String)> {
        let els = elements(xml).into_iter().filter(|e| e.2 == local);
        els.map(|e| (e.1, e.3)).collect()
    }

    fn ids(xml: &[u8], local: &str) -> Vec<String> {
        named(xml, local).into_iter().map(|e| e.1).collect()
    }

    fn all_in(xml: &[u8], local: &str, ns: &str) -> bool {
        let found = named(xml, local);
        !found.is_empty() && found.iter().all(|e| e.0 == ns)
    }

    fn aggregate(docs: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![b'x'];
        aggregate_pidf(ENTITY, docs, &mut out).unwrap();
        assert!(out.starts_with(XML_DECL));
        assert_eq!(check_pidf(&out), Ok(()));
        out
    }

    fn has(out: &[u8], part: &str) -> bool {
        String::from_utf8_lossy(out).contains(part)
    }

    fn has_all(out: &[u8], parts: &[&str]) -> bool {
        parts.iter().all(|p| has(out, p))
    }

    #[test]
    fn two_publications_one_document() {
        let out = aggregate(&[DOC_A, DOC_B]);
        assert_eq!(named(&out, "presence"), [(NS_PIDF.into(), String::new())]);
        assert_eq!(ids(&out, "tuple"), ["bs35r9", "a8098a"]);
        assert!(all_in(&out, "tuple", NS_PIDF) && all_in(&out, "basic", NS_PIDF));
        assert!(all_in(&out, "activities", RPID) && all_in(&out, "on-the-phone", RPID));
        assert!(all_in(&out, "person", DM) && all_in(&out, "device", DM));
        assert!(all_in(&out, "im", "urn:ietf:params:xml:ns:pidf:im"));
        assert!(all_in(&out, "location", "http://id.example.com/presence/"));
        // The Tokyo note is in both documents: once at root level (plus two in the tuple).
        let notes = elements(&out).into_iter().filter(|e| e.2 == "note");
        assert_eq!(notes.filter(|n| n.0 == 1).count(), 1);
        assert!(has_all(
            &out,
            &[
                "entity=\"pres:someone@example.com\"",
                "<contact priority=\"0.8\">im:someone@mobilecarrier.net</contact>",
                "pla&#238;t", // references copied verbatim
            ]
        ));
    }

    #[test]
    fn same_tuple_replaced_by_newer_at_newer_position() {
        let a2 = String::from_utf8_lossy(DOC_A).replace("<basic>open", "<basic>closed");
        let out = aggregate(&[DOC_A, DOC_B, a2.as_bytes()]);
        assert_eq!(ids(&out, "tuple"), ["a8098a", "bs35r9"]);
        assert!(has(&out, "<basic>closed</basic>") && !has(&out, "<basic>open</basic><im:im>"));
    }

    #[test]
    fn persons_only_from_newest_and_prefixed_pidf_root() {
        let out = aggregate(&[DOC_B, DOC_P, DOC_A]);
        assert_eq!(ids(&out, "person"), ["p2"]);
        assert!(all_in(&out, "away", RPID) && all_in(&out, "person", DM));
        // DOC_A is the newest, so its bs35r9 replaces DOC_P's; DOC_P's device replaces B's.
        assert_eq!(ids(&out, "tuple"), ["a8098a", "bs35r9"]);
        assert_eq!(ids(&out, "device"), ["pc122"]);
        assert!(all_in(&out, "basic", NS_PIDF) && has(&out, "mac:0000"));
        assert!(all_in(&out, "legacy", "")); // no namespace stays no namespace

        // Newest, the prefixed tuple comes out as a tuple in the PIDF namespace.
        let out = aggregate(&[DOC_A, DOC_P]);
        assert_eq!(named(&out, "tuple"), [(NS_PIDF.into(), "bs35r9".into())]);
        assert!(all_in(&out, "basic", NS_PIDF) && has(&out, "<p:basic>closed</p:basic>"));
    }

    #[test]
    fn offline_document() {
        let mut out = Vec::new();
        offline_pidf(b"sip:a&b@example.com", &mut out);
        assert_eq!(check_pidf(&out), Ok(()));
        assert!(out.starts_with(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
        assert!(has(&out, "entity=\"sip:a&amp;b@example.com\""));
        assert!(has(&out, "<status><basic>closed</basic></status>"));
    }

    #[test]
    fn check_pidf_accepts_and_rejects() {
        use DocError::*;
        for doc in [DOC_A, DOC_B, DOC_P] {
            assert_eq!(check_pidf(doc), Ok(()));
        }
        let p = |s: &str| format!("<presence xmlns=\"{NS_PIDF}\" entity=\"x\">{s}</presence>");
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE presence [<!ENTITY xxe SYSTEM \"file:///x\">]>";
        let root = |a: &str| format!("<presence xmlns=\"{NS_PIDF}\"{a}/>");
        let cases = [
            (p("").replace("presence", "foo"), WrongRoot),
            (p("").replace(NS_PIDF, "urn:example:other"), WrongRoot),
            ("<presence entity=\"x\"/>".into(), WrongRoot),
            (root(""), Malformed),
            (root(" entity=\"x\" entity=\"y\""), Malformed),
            (root(" entity=\"a<b\""), Malformed),
            (root(" entity=\"&xxe;\""), Malformed),
            (p("<note>a]]>b</note>"), Malformed),
            (p("<tuple>"), Malformed),
            (p("<q:t/>"), Malformed),
            (p("<t q:a=\"1\"/>"), Malformed),
            (p("<note>&xxe;</note>"), Malformed),
            (p("<note>&#1;</note>"), Malformed),
            (p("") + "<presence/>", Malformed),
            (p("") + "junk", Malformed),
            (p("")[..40].to_owned(), Malformed),
            (dtd.to_owned() + &p("<note>&xxe;</note>"), Malformed),
            (String::new(), Malformed),
        ];
        for (doc, err) in cases {
            assert_eq!(check_pidf(doc.as_bytes()), Err(err), "{doc}");
        }
        assert_eq!(check_pidf(b"<presence entity=\"\xff\"/>"), Err(Malformed));
        let mut big = p("").into_bytes();
        big.splice(10..10, [b' '; MAX_DOC]);
        assert_eq!(check_pidf(&big), Err(TooLarge));
        let mut out = Vec::new();
        assert_eq!(
            aggregate_pidf(ENTITY, &[DOC_A, &big], &mut out),
            Err(TooLarge)
        );
    }

    fn view<'a>(id: &'a [u8], state: &'a str) -> DialogView<'a> {
        DialogView {
            id,
            call_id: b"c1@host",
            local_tag: b"lt1",
            remote_tag: b"",
            direction: Direction::Recipient,
            state,
            duration_s: Some(42),
            local_identity: b"sip:alice@example.com",
            remote_identity: b"sip:bob@example.com;x=a&b",
        }
    }

    #[test]
    fn dialog_info_generated_merged_and_empty() {
        let (mut out, alice) = (Vec::new(), &b"sip:alice@example.com"[..]);
        let d2 = DialogView {
            direction: Direction::Initiator,
            ..view(b"d2", "early")
        };
        let views = [view(b"d1", "confirmed"), d2];
        aggregate_dialog_info(alice, 7, &[], &views, &mut out).unwrap();
        assert_eq!(check_dialog_info(&out), Ok(()));
        assert!(has_all(
            &out,
            &[
                "version=\"7\" state=\"full\" entity=\"sip:alice@example.com\"",
                "<dialog id=\"d1\" call-id=\"c1@host\" local-tag=\"lt1\" direction=\"recipient\">",
                "\"recipient\"><state>confirmed</state><duration>42</duration><local>",
                "direction=\"initiator\"><state>early</state>",
                "<local><identity>sip:alice@example.com</identity></local>",
                "<remote><identity>sip:bob@example.com;x=a&amp;b</identity></remote>",
            ]
        ));
        assert!(!has(&out, "remote-tag"));

        assert_eq!(check_dialog_info(DIALOG_DOC), Ok(()));
        aggregate_dialog_info(alice, 8, &[DIALOG_DOC], &views[..1], &mut out).unwrap();
        assert_eq!(check_dialog_info(&out), Ok(()));
        assert_eq!(ids(&out, "dialog"), ["as7d900as8", "zz1", "d1"]);
        assert!(all_in(&out, "dialog", NS_DIALOG) && all_in(&out, "mark", "urn:example:ext"));
        // A generated view replaces the published dialog of the same id.
        let view = [view(b"as7d900as8", "confirmed")];
        aggregate_dialog_info(alice, 9, &[DIALOG_DOC, DIALOG_DOC], &view, &mut out).unwrap();
        assert_eq!(ids(&out, "dialog"), ["zz1", "as7d900as8"]);
        assert!(!has(&out, "<state>early</state>"));

        aggregate_dialog_info(b"sip:a&b", 3, &[], &[], &mut out).unwrap();
        assert_eq!(check_dialog_info(&out), Ok(()));
        assert!(out.ends_with(b"version=\"3\" state=\"full\" entity=\"sip:a&amp;b\"/>\n"));

        let bad = String::from_utf8_lossy(&out).replace("\"3\"", "\"x\"");
        assert_eq!(check_dialog_info(bad.as_bytes()), Err(DocError::Malformed));
        assert_eq!(check_dialog_info(DOC_A), Err(DocError::WrongRoot));
        let truncated: &[u8] = b"<dialog-info";
        let result = aggregate_dialog_info(b"e", 1, &[truncated], &[], &mut out);
        assert_eq!(result, Err(BAD));
    }

    #[test]
    fn watcherinfo_two_watchers() {
        let bob = WatcherView {
            id: b"w1",
            status: WatcherStatus::Active,
            event: "approved",
            uri: b"sip:bob@example.com;a=1&b=2",
            display_name: b"Bob \"B\"",
            duration_subscribed: Some(60),
        };
        let (status, event) = (WatcherStatus::Pending, "subscribe");
        let carol = WatcherView {
            id: b"w2",
            status,
            event,
            uri: b"sip:carol@example.com",
            ..bob
        };
        let carol = WatcherView {
            display_name: b"",
            duration_subscribed: None,
            ..carol
        };
        let mut out = Vec::new();
        watcherinfo(
            b"sip:alice@example.com",
            b"presence",
            2,
            &[bob, carol],
            &mut out,
        );
        assert!(parse(&out, NS_WINFO, "watcherinfo").is_ok());
        assert_eq!(ids(&out, "watcher"), ["w1", "w2"]);
        assert!(elements(&out).iter().all(|e| e.1 == NS_WINFO));
        assert!(has_all(
            &out,
            &[
                "version=\"2\" state=\"full\"",
                "<watcher-list resource=\"sip:alice@example.com\" package=\"presence\">",
                "<watcher id=\"w1\" status=\"active\" event=\"approved\" display-name=\"Bob &quot;",
                "&quot;B&quot;\" duration-subscribed=\"60\">sip:bob@example.com;a=1&amp;b=2</watcher>",
                "<watcher id=\"w2\" status=\"pending\" event=\"subscribe\">sip:carol@example.com<",
            ]
        ));
    }

    #[test]
    fn truncated_documents_never_panic() {
        let mut out = Vec::new();
        for doc in [DOC_A, DOC_B, DOC_P, DIALOG_DOC] {
            let end = doc.iter().rposition(|&b| b == b'>').unwrap_or_default() + 1;
            for len in 0..=doc.len() {
                let part = &doc[..len];
                let pidf = check_pidf(part);
                let dialog = check_dialog_info(part);
                let agg = aggregate_pidf(ENTITY, &[DOC_A, part], &mut out);
                let agg_d = aggregate_dialog_info(b"e", 1, &[part], &[], &mut out);
                if len < end {
                    assert!(pidf.is_err() && dialog.is_err() && agg.is_err() && agg_d.is_err());
                }
            }
        }
    }
}
