//! Message templates, compiled once per thread: the keywords whose value is fixed for the
//! run (`[service]`, `[local_ip]` ...) become text; the others are filled per message,
//! straight into a reused buffer (no allocation once the buffers have grown).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;

use crate::sip::{header_lines, header_value};

/// What a template is filled from, besides the call.
pub struct Consts<'a> {
    pub service: &'a str,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub pid: u32,
    /// Call variable names (`[$name]`), by index.
    pub vars: &'a [String],
}

/// What a template is filled from: the call's values.
#[derive(Default)]
pub struct Vals {
    pub number: u64,
    pub call_id: String,
    /// The last message received (for `[last_*:]` and the like).
    pub last: String,
    /// The route set (`Route: ...` value), empty if none.
    pub routes: String,
    pub next_url: String,
    pub peer_tag: String,
    /// Call variables by index.
    pub vars: Vec<String>,
}

impl Vals {
    /// Ready for another call: every value empty, the buffers kept.
    pub fn reset(&mut self, number: u64, nvars: usize) {
        self.number = number;
        self.call_id.clear();
        self.last.clear();
        self.routes.clear();
        self.next_url.clear();
        self.peer_tag.clear();
        self.vars.resize_with(nvars, String::new);
        for v in &mut self.vars {
            v.clear();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Lit(Box<str>),
    CallNumber,
    CallId,
    /// `[branch]` (0) and `[branch-N]`: the branch of the message N steps back.
    Branch(usize),
    /// The first token of a header of the last message.
    HdrToken(Box<str>),
    LastCseqNumber,
    Var(usize),
    PeerTagParam,
    Routes,
    NextUrl,
    Len,
    /// `[last_Name:]`: every `Name` header line of the last message.
    Last(Box<str>),
    Field(usize),
}

/// A compiled sequence of text and keywords.
#[derive(Debug, Default)]
pub struct Pieces(Vec<Piece>);

/// A compiled message: head lines (a line that fills to nothing is dropped), then the
/// body; `[len]` is the body's length.
#[derive(Debug)]
pub struct Template {
    head: Vec<Pieces>,
    body: Pieces,
}

impl Pieces {
    /// Compiles `t`; `[$name]` and `<assignstr>` names resolve through `vars`.
    pub fn compile(t: &str, c: &Consts<'_>) -> Pieces {
        let mut out: Vec<Piece> = Vec::new();
        let mut lit = String::new();
        let mut rest = t;
        while let Some(i) = rest.find('[') {
            lit.push_str(&rest[..i]);
            let Some(j) = rest[i..].find(']') else {
                lit.push_str(&rest[i..]);
                rest = "";
                break;
            };
            let key = &rest[i + 1..i + j];
            rest = &rest[i + j + 1..];
            let ipv = if c.local.is_ipv4() { "4" } else { "6" };
            let piece = match key {
                "service" => {
                    lit.push_str(c.service);
                    None
                }
                "remote_ip" => {
                    let _ = write!(lit, "{}", c.remote.ip());
                    None
                }
                "remote_port" => {
                    let _ = write!(lit, "{}", c.remote.port());
                    None
                }
                "local_ip" | "media_ip" => {
                    let _ = write!(lit, "{}", c.local.ip());
                    None
                }
                "local_port" => {
                    let _ = write!(lit, "{}", c.local.port());
                    None
                }
                "media_port" => {
                    lit.push_str("6000");
                    None
                }
                "local_ip_type" | "media_ip_type" => {
                    lit.push_str(ipv);
                    None
                }
                "transport" => {
                    lit.push_str("UDP");
                    None
                }
                "pid" => {
                    let _ = write!(lit, "{}", c.pid);
                    None
                }
                "call_number" => Some(Piece::CallNumber),
                "call_id" => Some(Piece::CallId),
                "branch" => Some(Piece::Branch(0)),
                k if k.starts_with("branch-") && k[7..].parse::<usize>().is_ok() => {
                    Some(Piece::Branch(k[7..].parse().unwrap_or(0)))
                }
                k if k.starts_with("hdrtoken:") => Some(Piece::HdrToken(k[9..].into())),
                "last_cseq_number" => Some(Piece::LastCseqNumber),
                k if k.starts_with('$') => c
                    .vars
                    .iter()
                    .position(|n| n == &k[1..])
                    .map(Piece::Var)
                    // An unknown variable is empty (SIPp's rule).
                    .or(Some(Piece::Lit("".into()))),
                "peer_tag_param" => Some(Piece::PeerTagParam),
                "routes" => Some(Piece::Routes),
                "next_url" => Some(Piece::NextUrl),
                "len" => Some(Piece::Len),
                k if k.starts_with("last_") && k.ends_with(':') => {
                    Some(Piece::Last(k[5..k.len() - 1].into()))
                }
                k if k.starts_with("field") && k[5..].parse::<usize>().is_ok() => {
                    Some(Piece::Field(k[5..].parse().unwrap_or(0)))
                }
                _ => {
                    // Not a keyword: kept as written.
                    lit.push('[');
                    lit.push_str(key);
                    lit.push(']');
                    None
                }
            };
            if let Some(p) = piece {
                if !lit.is_empty() {
                    out.push(Piece::Lit(std::mem::take(&mut lit).into()));
                }
                out.push(p);
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            out.push(Piece::Lit(lit.into()));
        }
        Pieces(out)
    }

    /// Appends the filled pieces to `out`. `step` numbers the branches; `len` is what
    /// `[len]` writes; `fields` are the injection file's lines.
    pub fn fill(&self, v: &Vals, step: usize, len: usize, c: &Fill<'_>, out: &mut Vec<u8>) {
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.extend_from_slice(s.as_bytes()),
                Piece::CallNumber => {
                    let _ = write!(out, "{}", v.number);
                }
                Piece::CallId => out.extend_from_slice(v.call_id.as_bytes()),
                Piece::Branch(back) => {
                    let _ = write!(
                        out,
                        "z9hG4bK-{}-{}-{}",
                        c.pid,
                        v.number,
                        step.saturating_sub(*back)
                    );
                }
                Piece::HdrToken(h) => {
                    let t = header_value(&v.last, h).unwrap_or("");
                    out.extend_from_slice(t.split_whitespace().next().unwrap_or("").as_bytes());
                }
                Piece::LastCseqNumber => {
                    let t = header_value(&v.last, "CSeq").unwrap_or("");
                    out.extend_from_slice(t.split_whitespace().next().unwrap_or("").as_bytes());
                }
                Piece::Var(i) => {
                    out.extend_from_slice(v.vars.get(*i).map_or("", String::as_str).as_bytes());
                }
                Piece::PeerTagParam => {
                    if !v.peer_tag.is_empty() {
                        out.extend_from_slice(b";tag=");
                        out.extend_from_slice(v.peer_tag.as_bytes());
                    }
                }
                Piece::Routes => {
                    if !v.routes.is_empty() {
                        out.extend_from_slice(b"Route: ");
                        out.extend_from_slice(v.routes.as_bytes());
                    }
                }
                Piece::NextUrl => out.extend_from_slice(v.next_url.as_bytes()),
                Piece::Len => {
                    let _ = write!(out, "{len}");
                }
                Piece::Last(name) => {
                    for (i, l) in header_lines(&v.last, name).enumerate() {
                        if i > 0 {
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(l.as_bytes());
                    }
                }
                Piece::Field(n) => {
                    if !c.fields.is_empty() {
                        let line = &c.fields[(v.number.max(1) as usize - 1) % c.fields.len()];
                        out.extend_from_slice(line.get(*n).map_or("", String::as_str).as_bytes());
                    }
                }
            }
        }
    }
}

/// What filling needs besides the call: the process id (branches) and the injection
/// file.
pub struct Fill<'a> {
    pub pid: u32,
    pub fields: &'a [Vec<String>],
}

impl Template {
    /// Compiles a message of a `send` (CRLF line ends, an empty line before the body).
    pub fn compile(t: &str, c: &Consts<'_>) -> Template {
        let (head, body) = match t.find("\r\n\r\n") {
            Some(i) => (&t[..i], &t[i + 4..]),
            None => (t.trim_end_matches("\r\n"), ""),
        };
        Template {
            head: head
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|l| Pieces::compile(l, c))
                .collect(),
            body: Pieces::compile(body, c),
        }
    }

    /// Fills the message into `out` (cleared first); `body` is scratch space.
    pub fn fill(&self, v: &Vals, step: usize, c: &Fill<'_>, body: &mut Vec<u8>, out: &mut Vec<u8>) {
        body.clear();
        self.body.fill(v, step, 0, c, body);
        out.clear();
        for line in &self.head {
            let mark = out.len();
            line.fill(v, step, body.len(), c, out);
            // A line that filled to nothing (an absent [last_Record-Route:]) goes.
            if out.len() > mark {
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_fills_like_sipp() {
        let vars = vec!["etag".to_string()];
        let c = Consts {
            service: "bob",
            remote: "127.0.0.1:5060".parse().unwrap(),
            local: "127.0.0.2:5070".parse().unwrap(),
            pid: 7,
            vars: &vars,
        };
        let t = Template::compile(
            "INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0\r\n\
             Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]\r\n\
             [last_Record-Route:]\r\n[routes]\r\nTo: <sip:x>[peer_tag_param]\r\n\
             SIP-If-Match: [$etag]\r\nX: [field1] [not_a_keyword] [$unknown]\r\n\
             Content-Length: [len]\r\n\r\nv=0\r\nc=IN IP[media_ip_type] [media_ip]\r\n",
            &c,
        );
        let mut v = Vals::default();
        v.reset(3, 1);
        v.call_id.push_str("3-7@127.0.0.2");
        v.peer_tag.push_str("t1");
        v.vars[0].push_str("E1");
        v.last.push_str("SIP/2.0 200 OK\r\nCSeq: 1 INVITE\r\n\r\n");
        let fields = vec![vec!["a".to_string(), "b".to_string()]];
        let f = Fill {
            pid: 7,
            fields: &fields,
        };
        let (mut body, mut out) = (Vec::new(), Vec::new());
        t.fill(&v, 2, &f, &mut body, &mut out);
        let body = "v=0\r\nc=IN IP4 127.0.0.2\r\n";
        let want = format!(
            "INVITE sip:bob@127.0.0.1:5060 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.2:5070;branch=z9hG4bK-7-3-2\r\n\
             To: <sip:x>;tag=t1\r\nSIP-If-Match: E1\r\nX: b [not_a_keyword] \r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        // A route set and the last message's headers appear when there are some.
        v.routes.push_str("<sip:p1;lr>");
        v.last.clear();
        v.last.push_str(
            "SIP/2.0 200 OK\r\nRecord-Route: <sip:p1;lr>\r\nRecord-Route: <sip:p2>\r\n\r\n",
        );
        t.fill(&v, 4, &f, &mut Vec::new(), &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("branch=z9hG4bK-7-3-4\r\nRecord-Route: <sip:p1;lr>\r\nRecord-Route: <sip:p2>\r\nRoute: <sip:p1;lr>\r\nTo:"),
            "{s}"
        );
    }
}
