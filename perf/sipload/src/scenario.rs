//! The SIPp XML scenario subset the bundled profiles use: `<send [retrans=MS]>` with a
//! CDATA message, `<recv response=CODE | request=METHOD [optional=true|global] [rtd]
//! [rrs] [response_txn=NAME]>`,
//! `<pause [milliseconds=MS]/>`, and `<nop>` whose `<action>` holds
//! `<assignstr assign_to=NAME value=TEMPLATE/>` (a call variable, `[$NAME]` in a message),
//! and in a `<recv>`'s `<action>` `<ereg search_in="hdr" header=NAME regexp="[^ \t\r\n]+"
//! assign_to=VAR/>` (the first token of that header of the message received; no other
//! regular expression is read).
//! Other elements (`ResponseTimeRepartition` ...) are ignored. A small reader of its own: the format is a handful of elements with
//! attributes and CDATA.

use std::fmt;

/// One step of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this message template (keywords in brackets); retransmit every `retrans`
    /// ms (UDP, doubling up to 4 s) until the next step's message arrives.
    Send {
        template: String,
        retrans: Option<u64>,
    },
    /// Wait for a response with this status, or a request with this method.
    Recv {
        what: Expect,
        optional: bool,
        /// `optional="global"`: a late message of this step is ignored wherever the call
        /// is, not only while no mandatory step has been passed since (SIPp's rule).
        global: bool,
        /// `response_txn=...`: a response of a transaction the scenario names, so a late
        /// provisional of it is ignored wherever the call is (SIPp's rule).
        txn: bool,
        /// Response time measured from the call's start to this message.
        rtd: bool,
        /// Record the route set (Record-Route) and the remote target (Contact).
        rrs: bool,
    },
    /// Wait (`None`: the command line's `-d`).
    Pause(Option<u64>),
    /// No message: assign call variables, each `(name, template)` filled with the
    /// keywords as they are now (`[last_Via:]` of the message just received ...).
    Nop(Vec<(String, String)>),
}

/// What a `recv` waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Response(u16),
    Request(String),
}

/// A parse error, with the line.
#[derive(Debug)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub steps: Vec<Step>,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let pat = format!("{name}=");
    let mut rest = tag;
    while let Some(i) = rest.find(&pat) {
        // A whole attribute name: preceded by whitespace.
        let before = rest[..i].chars().last();
        let after = &rest[i + pat.len()..];
        if before.is_none_or(char::is_whitespace) {
            let q = after.chars().next()?;
            if q == '"' || q == '\'' {
                let end = after[1..].find(q)?;
                return Some(after[1..1 + end].to_string());
            }
        }
        rest = after;
    }
    None
}

/// The message of a `send`: its CDATA, lines trimmed of the indentation SIPp scenarios
/// use, blank lines at both ends removed, CRLF line ends, the empty line before the body
/// kept (SIPp's rules).
fn message(cdata: &str) -> String {
    let lines: Vec<&str> = cdata.lines().map(str::trim).collect();
    let first = lines.iter().position(|l| !l.is_empty()).unwrap_or(0);
    let last = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    let lines = &lines[first..last.max(first)];
    let mut out = String::new();
    let mut in_body = false;
    for l in lines {
        if l.is_empty() && !in_body {
            in_body = true;
            out.push_str("\r\n");
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    if !in_body {
        out.push_str("\r\n");
    }
    out
}

impl Scenario {
    /// A server scenario: it starts by waiting for a request (a UAS).
    pub fn is_server(&self) -> bool {
        matches!(self.steps.first(), Some(Step::Recv { .. }))
    }

    /// Parses the text of a scenario file.
    pub fn parse(text: &str) -> Result<Scenario, ParseError> {
        let mut steps = Vec::new();
        let mut name = String::new();
        let mut rest = text;
        while let Some(lt) = rest.find('<') {
            rest = &rest[lt..];
            if rest.starts_with("<!--") {
                let end = rest
                    .find("-->")
                    .ok_or(ParseError("unclosed comment".into()))?;
                rest = &rest[end + 3..];
                continue;
            }
            if rest.starts_with("<?") || rest.starts_with("<!") {
                let end = rest
                    .find('>')
                    .ok_or(ParseError("unclosed declaration".into()))?;
                rest = &rest[end + 1..];
                continue;
            }
            let end = rest.find('>').ok_or(ParseError("unclosed tag".into()))?;
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let elem = tag.split_whitespace().next().unwrap_or("");
            match elem {
                "scenario" => name = attr(tag, "name").unwrap_or_default(),
                "send" => {
                    let start = rest
                        .find("<![CDATA[")
                        .ok_or(ParseError("a <send> without CDATA".into()))?;
                    let after = &rest[start + 9..];
                    let stop = after
                        .find("]]>")
                        .ok_or(ParseError("unclosed CDATA".into()))?;
                    let retrans = match attr(tag, "retrans") {
                        Some(v) => Some(v.parse::<u64>().map_err(|_| {
                            ParseError(format!("send retrans=\"{v}\" is not a number"))
                        })?),
                        None => None,
                    };
                    steps.push(Step::Send {
                        template: message(&after[..stop]),
                        retrans,
                    });
                    rest = &after[stop + 3..];
                }
                "recv" => {
                    let what = match (attr(tag, "response"), attr(tag, "request")) {
                        (Some(r), None) => Expect::Response(r.parse().map_err(|_| {
                            ParseError(format!("recv response=\"{r}\" is not a status"))
                        })?),
                        (None, Some(m)) => Expect::Request(m),
                        _ => {
                            return Err(ParseError("a <recv> needs response= or request=".into()));
                        }
                    };
                    let flag = |n: &str| attr(tag, n).is_some_and(|v| v == "true");
                    let global = attr(tag, "optional").is_some_and(|v| v == "global");
                    steps.push(Step::Recv {
                        what,
                        optional: flag("optional") || global,
                        global,
                        txn: attr(tag, "response_txn").is_some(),
                        rtd: flag("rtd"),
                        rrs: flag("rrs"),
                    });
                }
                "nop" => steps.push(Step::Nop(Vec::new())),
                "ereg" => {
                    let (Some(name), Some(header)) = (attr(tag, "assign_to"), attr(tag, "header"))
                    else {
                        return Err(ParseError(
                            "an <ereg> needs assign_to= and header= (search_in=\"hdr\")".into(),
                        ));
                    };
                    let re = attr(tag, "regexp").unwrap_or_default();
                    if attr(tag, "search_in").as_deref() != Some("hdr") || re != "[^ \\t\\r\\n]+" {
                        return Err(ParseError(format!(
                            "<ereg regexp=\"{re}\">: only search_in=\"hdr\" with regexp=\"[^ \\t\\r\\n]+\" (a header's first token) is supported"
                        )));
                    }
                    let header = header.trim_end_matches(':').to_string();
                    if !matches!(steps.last(), Some(Step::Recv { .. } | Step::Nop(_))) {
                        return Err(ParseError("an <ereg> is read inside a <recv> only".into()));
                    }
                    // Runs as the step after the recv, with its message as the last one.
                    steps.push(Step::Nop(vec![(name, format!("[hdrtoken:{header}]"))]));
                }
                "assignstr" => {
                    let (Some(name), Some(value)) = (attr(tag, "assign_to"), attr(tag, "value"))
                    else {
                        return Err(ParseError(
                            "an <assignstr> needs assign_to= and value=".into(),
                        ));
                    };
                    match steps.last_mut() {
                        Some(Step::Nop(assign)) => assign.push((name, value)),
                        _ => {
                            return Err(ParseError(
                                "an <assignstr> is read inside a <nop> only".into(),
                            ));
                        }
                    }
                }
                "pause" => {
                    let ms = match attr(tag, "milliseconds") {
                        Some(v) => Some(v.parse::<u64>().map_err(|_| {
                            ParseError(format!("pause milliseconds=\"{v}\" is not a number"))
                        })?),
                        None => None,
                    };
                    steps.push(Step::Pause(ms));
                }
                _ => {}
            }
            let _ = self_closing;
        }
        if steps.is_empty() {
            return Err(ParseError(
                "no <send>, <recv> or <pause> in the scenario".into(),
            ));
        }
        match &steps[0] {
            Step::Send { .. } => {}
            Step::Recv {
                what: Expect::Request(_),
                ..
            } => {}
            _ => {
                return Err(ParseError(
                    "a scenario starts with a <send> (client) or a <recv request=...> (server)"
                        .into(),
                ));
            }
        }
        Ok(Scenario { name, steps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(f: &str) -> Scenario {
        let path = format!("{}/../profiles/{f}", env!("CARGO_MANIFEST_DIR"));
        Scenario::parse(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{f}: {e}"))
    }

    fn kinds(s: &Scenario) -> Vec<String> {
        s.steps
            .iter()
            .map(|s| match s {
                Step::Send { .. } => "send".into(),
                Step::Recv {
                    what: Expect::Response(c),
                    optional,
                    ..
                } => {
                    format!("recv {c}{}", if *optional { "?" } else { "" })
                }
                Step::Recv {
                    what: Expect::Request(m),
                    ..
                } => format!("recv {m}"),
                Step::Pause(_) => "pause".into(),
                Step::Nop(a) => format!("nop {}", a.len()),
            })
            .collect()
    }

    #[test]
    fn the_bundled_client_profiles_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles");
        for f in [
            "register.xml",
            "reregister.xml",
            "unregister.xml",
            "options.xml",
            "call-uac.xml",
            "call-cancel-uac.xml",
            "presence-publish.xml",
            "presence-subscribe.xml",
            "mixed.xml",
        ] {
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            let s = Scenario::parse(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!s.name.is_empty(), "{f}");
            let Step::Send { template, .. } = &s.steps[0] else {
                panic!()
            };
            assert!(template.contains("\r\nCall-ID: [call_id]\r\n"), "{f}");
            assert!(template.ends_with("\r\n"));
        }
        let call = load("call-uac.xml");
        assert_eq!(
            kinds(&call),
            vec![
                "send",
                "recv 100?",
                "recv 180?",
                "recv 200",
                "send",
                "pause",
                "send",
                "recv 200"
            ]
        );
        let Step::Send { template, .. } = &call.steps[0] else {
            panic!()
        };
        // The body follows one empty line.
        assert!(
            template.contains("Content-Length: [len]\r\n\r\nv=0\r\n"),
            "{template}"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(Scenario::parse("<scenario></scenario>").is_err());
        let e = Scenario::parse("<scenario><recv response=\"200\"/></scenario>").unwrap_err();
        assert!(e.0.contains("starts with"), "{e}");
        let s = Scenario::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../profiles/call-uas.xml"
            ))
            .unwrap(),
        )
        .unwrap();
        assert!(s.is_server());
        let e = Scenario::parse("<scenario><send retrans=\"x\"><![CDATA[A]]></send></scenario>")
            .unwrap_err();
        assert!(e.0.contains("retrans"), "{e}");
    }

    #[test]
    fn the_cancel_profiles_keep_the_invite_vias_in_a_variable() {
        let uac = load("call-cancel-uac.xml");
        assert_eq!(
            kinds(&uac),
            vec![
                "send",
                "recv 100?",
                "recv 180",
                "pause",
                "send",
                "recv 200?",
                "recv 487",
                "send"
            ]
        );
        let uas = load("call-cancel-uas.xml");
        assert!(uas.is_server());
        assert_eq!(
            kinds(&uas),
            vec![
                "recv INVITE",
                "nop 1",
                "send",
                "recv CANCEL",
                "send",
                "send",
                "recv ACK"
            ]
        );
        assert_eq!(
            uas.steps[1],
            Step::Nop(vec![("inv_via".into(), "[last_Via:]".into())])
        );
        let e = Scenario::parse(
            "<scenario><send><![CDATA[A]]></send><assignstr assign_to=\"x\" value=\"y\"/></scenario>",
        )
        .unwrap_err();
        assert!(e.0.contains("<nop>"), "{e}");
    }

    #[test]
    fn an_ereg_of_a_header_token_becomes_an_assignment_after_its_recv() {
        let s = Scenario::parse(
            "<scenario><send><![CDATA[A]]></send><recv response=\"200\"><action>\
             <ereg regexp=\"[^ \\t\\r\\n]+\" search_in=\"hdr\" header=\"SIP-ETag:\" \
             assign_to=\"etag\"/></action></recv></scenario>",
        )
        .unwrap();
        assert_eq!(
            s.steps[2],
            Step::Nop(vec![("etag".into(), "[hdrtoken:SIP-ETag]".into())])
        );
        // Any other regular expression is refused, not misread.
        assert!(
            Scenario::parse(
                "<scenario><send><![CDATA[A]]></send><recv response=\"200\"><action>\
                 <ereg regexp=\"(.*)\" search_in=\"msg\" assign_to=\"x\"/></action></recv></scenario>"
            )
            .is_err()
        );
    }
}
