//! The bus's subject names: `<cluster_name>.ev.<clusterId>` for events, `<cluster_name>.node.<node>` for heartbeats.

use std::fmt::Write as _;

/// A cluster id as one subject token: `%`, `.`, `*`, `>` and whitespace or control
/// characters are written `%XX`, so that any id maps to one token and back.
pub fn token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '%' | '.' | '*' | '>' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c if c.is_whitespace() || c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The subjects of one bus system (one `cluster_name`).
#[derive(Debug, Clone)]
pub struct Subjects {
    /// `<cluster_name>.ev.`
    events: String,
    /// `<cluster_name>.node.`
    nodes: String,
}

impl Subjects {
    pub fn new(cluster_name: &str) -> Subjects {
        Subjects {
            events: format!("{cluster_name}.ev."),
            nodes: format!("{cluster_name}.node."),
        }
    }

    /// Where the events of cluster `id` travel.
    pub fn events(&self, id: &str) -> String {
        format!("{}{}", self.events, token(id))
    }

    /// Where node `node` sends its heartbeats.
    pub fn heartbeat(&self, node: &str) -> String {
        format!("{}{node}", self.nodes)
    }

    /// Every node's heartbeats.
    pub fn heartbeats(&self) -> String {
        format!("{}*", self.nodes)
    }

    /// The node a heartbeat subject names.
    pub fn node_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.nodes.as_str())
            .filter(|n| !n.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_cluster_id_is_one_token_and_comes_back() {
        for id in [
            "plain-id_1",
            "a.b",
            "*",
            ">",
            "50%",
            "with space",
            "tab\there",
            "é.ü",
            "",
        ] {
            let t = token(id);
            assert!(!t.contains(['.', '*', '>', ' ', '\t']), "{id:?} -> {t:?}");
            assert_eq!(
                crate::admin::api::percent_decode(&t).as_deref(),
                Some(id),
                "{t:?}"
            );
        }
        // Distinct ids never share a token.
        assert_ne!(token("a.b"), token("a%2Eb"));
        assert_eq!(crate::admin::api::percent_decode("%zz"), None);
        assert_eq!(crate::admin::api::percent_decode("%2"), None);
    }

    #[test]
    fn subjects_of_a_bus_system() {
        let s = Subjects::new("prod");
        assert_eq!(s.events("c.1"), "prod.ev.c%2E1");
        assert_eq!(s.heartbeat("gw-1"), "prod.node.gw-1");
        assert_eq!(s.heartbeats(), "prod.node.*");
        assert_eq!(s.node_of("prod.node.gw-2"), Some("gw-2"));
        assert_eq!(s.node_of("prod.node."), None);
        assert_eq!(s.node_of("other.node.gw-2"), None);
    }
}
